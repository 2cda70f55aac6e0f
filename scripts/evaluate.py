#!/usr/bin/env python
"""Old spelling of ``leignn-evaluate`` (leignn_ocp.evaluation.cli): Table 1, line-up, predict,
score, fit-scales. ``python scripts/evaluate.py <cmd> ...`` = ``leignn-evaluate <cmd> ...``;
``python scripts/evaluate.py --checkpoint CKPT --data DIR --out DIR`` is the ``quick`` command."""

import sys

from leignn_ocp.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
