"""``python -m leignn_ocp.benchmark``: the same as ``leignn-benchmark``."""

import sys

from leignn_ocp.benchmark.cli import main

sys.exit(main())
