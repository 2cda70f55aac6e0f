"""LEIGNN for fairchem 1.10.

Importing this package registers the model in fairchem's registry as ``leignn``.
Configs run by the plain ``fairchem`` CLI name it by import path,
``model: {name: leignn_ocp.LEIGNN}``: fairchem's registry imports the dotted path,
which imports this package and so also registers the short name.
"""

from leignn_ocp.model import LEIGNN

__all__ = ["LEIGNN"]
__version__ = "0.1.0"
