#!/usr/bin/env python
"""The real OC20 S2EF data (download, paper splits, split, sizes, check): the old spelling of
``leignn-oc20-data``.

    python scripts/oc20_data.py download --split 200k --split val --num-workers 8
    python scripts/oc20_data.py paper --src data/s2ef/200k/train --data-path data
    python scripts/oc20_data.py --help                            # every subcommand

The code lives in leignn_ocp/data/oc20.py.
"""

import sys

from leignn_ocp.data.oc20 import main

if __name__ == "__main__":
    sys.exit(main())
