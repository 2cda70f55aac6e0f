"""Stop-gap until ``leignn_ocp.model.LEIGNN`` drops the last layer's global aggregation.

In ``LEIGNN`` the global scalar/vector that the *last* interaction layer aggregates are
never read (no later layer distributes them, the readout uses only atom features), so
those parameters get no gradient and fairchem's CLI, which wraps every model in
``DistributedDataParallel``, stops with "Expected to have finished reduction in the prior
iteration". This subclass removes that dead block; its predictions equal ``LEIGNN``'s
with the same weights. The MD configs (``configs/md/*.yml``) name it
``leignn_ocp.md.compat.LEIGNN``; once the base model is fixed they can name
``leignn_ocp.LEIGNN`` again (checkpoints keep the same parameter names).
"""

from __future__ import annotations

from fairchem.core.common.registry import registry

from leignn_ocp.model import LEIGNN as _LEIGNN


@registry.register_model("leignn_md")
class LEIGNN(_LEIGNN):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.layers) and getattr(self.layers[-1], "aggregate", None) is not None:
            self.layers[-1].aggregate = None
