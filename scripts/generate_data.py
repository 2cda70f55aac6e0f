#!/usr/bin/env python
"""Generate the embedded offline OC20-style S2EF dataset: the old spelling of ``leignn-generate-data``.

    python scripts/generate_data.py --out data/default --seed 0
    python scripts/generate_data.py --help                        # every option

The code lives in leignn_ocp/data/cli.py (generator: leignn_ocp/data/generate.py).
"""

import os
import sys

# one BLAS/OpenMP thread from the start (generate() also holds them at one at run time)
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from leignn_ocp.data.cli import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main())
