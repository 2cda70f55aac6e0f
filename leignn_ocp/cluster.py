"""Old spelling of :mod:`leignn_ocp.launch`: ``python -m leignn_ocp.cluster ...`` = ``leignn-launch ...``.

Only imports: submitit pickles ``leignn_ocp.launch.runner.Runner``, never anything of this ``__main__``.
"""

import sys

from leignn_ocp.launch import Runner, atomic_save_checkpoint, main, patched_fairchem, runner_wrapper

__all__ = ["Runner", "atomic_save_checkpoint", "main", "patched_fairchem", "runner_wrapper"]

if __name__ == "__main__":
    sys.exit(main())
