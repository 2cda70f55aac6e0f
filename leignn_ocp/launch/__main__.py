"""``python -m leignn_ocp.launch ...`` = ``leignn-launch ...`` (the Runner stays pickled as
``leignn_ocp.launch.runner.Runner``: nothing submitit pickles is defined in this ``__main__``)."""

import sys

from leignn_ocp.launch import main

sys.exit(main())
