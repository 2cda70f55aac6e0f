#!/usr/bin/env python
"""Reference MD systems and their S2EF LMDBs: the old spelling of ``leignn-md-reference``.

    python scripts/make_md_reference.py --system all --out data/md

Everything lives in :mod:`leignn_ocp.md.reference` (``leignn-md-reference --help``).
"""

import sys

from leignn_ocp.md.reference import main

if __name__ == "__main__":
    sys.exit(main())
