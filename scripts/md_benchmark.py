#!/usr/bin/env python
"""The LEIGNN MD benchmark end to end: the old spelling of ``leignn-md-benchmark``.

    python scripts/md_benchmark.py --systems ethanol --epochs 10 --md-ps 2

Everything lives in :mod:`leignn_ocp.md.benchmark` (``leignn-md-benchmark --help``).
"""

import sys

from leignn_ocp.md.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
