"""LEIGNN for fairchem 1.10.

Importing this package registers the model in fairchem's registry as ``leignn``.
Configs run by the plain ``fairchem`` CLI name it by import path,
``model: {name: leignn_ocp.LEIGNN}``: fairchem's registry imports the dotted path,
which imports this package and so also registers the short name.
"""

# tblite (GFN2-xTB, leignn_ocp.md.reference) needs the system libgomp.so.1 (GOMP_5.0); torch's
# bundled copy has the same soname, lacks that version, and whichever loads first serves the whole
# process. Every entry point imports this package before torch, so this is the one place to load it.
try:
    import tblite.ase  # noqa: F401
except ImportError:
    pass

from leignn_ocp.model import LEIGNN  # noqa: E402

__all__ = ["LEIGNN"]
__version__ = "0.1.0"
