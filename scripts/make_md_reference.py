#!/usr/bin/env python
"""Reference MD systems (ethanol / GFN2-xTB, liquid Cu / EMT) and their S2EF LMDBs.

Thin CLI over :mod:`leignn_ocp.md.reference`; see its docstring, or ``--help``::

    python scripts/make_md_reference.py --system all --out data/md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # tblite must load its OpenMP runtime before torch does (torch's libgomp lacks GOMP_5.0)
    import tblite.ase  # noqa: F401
except ImportError:
    pass

from leignn_ocp.md.reference import main  # noqa: E402

if __name__ == "__main__":
    main()
