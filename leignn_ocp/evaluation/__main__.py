"""``python -m leignn_ocp.evaluation ...`` = ``leignn-evaluate ...``."""

import sys

from leignn_ocp.evaluation.cli import main

sys.exit(main())
