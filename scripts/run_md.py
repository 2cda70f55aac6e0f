#!/usr/bin/env python
"""Molecular dynamics from a LEIGNN checkpoint: the old spelling of ``leignn-md``.

    python scripts/run_md.py --checkpoint CKPT --structure start.traj --out md.traj ...

Everything lives in :mod:`leignn_ocp.md.run` (``leignn-md --help``).
"""

import sys

from leignn_ocp.md.run import main

if __name__ == "__main__":
    sys.exit(main())
