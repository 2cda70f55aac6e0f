#!/usr/bin/env python
"""LEIGNN's cost next to fairchem's baselines (paper Fig. 4): the old spelling of ``leignn-benchmark``.

    python scripts/benchmark_efficiency.py --tiny --out /tmp/x   # = leignn-benchmark --tiny --out /tmp/x

Same flags; see ``leignn-benchmark --help`` and leignn_ocp/benchmark/.
"""

import sys

from leignn_ocp.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
