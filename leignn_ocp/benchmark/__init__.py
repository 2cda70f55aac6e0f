"""The efficiency benchmark (paper Fig. 4): LEIGNN's cost next to fairchem's baselines.

structures: the OC20-like batch every model is timed on.
harness:    each model as its config trains it (fairchem's loader, registry, losses, optimizer),
            the timing / memory / FLOP / matmul probes, and the round-robin loop.
report:     benchmark.csv / .md / .json / .png.
cli:        ``leignn-benchmark`` (also ``python -m leignn_ocp.benchmark``).
"""

from leignn_ocp.benchmark.harness import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_MODELS,
    MatmulProbe,
    Recipe,
    Result,
    Runner,
    Settings,
    load_recipe,
    peak_memory_bytes,
    run_benchmark,
    timed,
)
from leignn_ocp.benchmark.report import write_outputs
from leignn_ocp.benchmark.structures import make_batch, oc20_like_structures

__all__ = [
    "DEFAULT_CONFIG_DIR", "DEFAULT_MODELS", "MatmulProbe", "Recipe", "Result", "Runner", "Settings",
    "load_recipe", "make_batch", "oc20_like_structures", "peak_memory_bytes", "run_benchmark", "timed",
    "write_outputs",
]
