"""The benchmark's workload: a batch of OC20-like slab+adsorbate structures.

OC20's S2EF structures are 60-80 atom periodic slabs with an adsorbate, the bottom layers
fixed; every model is timed on the same batch of such structures, so the cost of the
periodic graph and of the free-atom force loss is the one a real training run pays. The
structures themselves are built in ``leignn_ocp.testing``, the one place test and benchmark
structures come from.
"""

from __future__ import annotations

import torch
from ase import Atoms

from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.testing import oc20_like_structures

__all__ = ["make_batch", "oc20_like_structures"]


def make_batch(atoms_list: list[Atoms], device: torch.device | str = "cpu"):
    """float32 batch with ``fixed`` and ``tags`` (graphs built on the fly by each model)."""
    return atoms_to_batch(atoms_list, torch.float32).to(device)
