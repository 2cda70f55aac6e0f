"""The benchmark's workloads: OC20-like slabs (the default), small molecules, small periodic cells.

OC20's S2EF structures are 60-80 atom periodic slabs with an adsorbate, the bottom layers
fixed; every model is timed on the same batch of such structures, so the cost of the
periodic graph and of the free-atom force loss is the one a real training run pays. Those
structures are built in ``leignn_ocp.testing``, the one place test structures come from.

The small end (``--workload molecules|cells``): MD17-sized organic molecules, where a step is
a few hundred small ops and fixed per-step costs (graph construction, input checks, the
optimizer) weigh most, and 2-24 atom bulk cells, where the periodic graph's image search does.
ASE's G2 set has only two of MD17's molecules (ethanol, benzene); the others are G2 / ASE
molecules of the same sizes (no coordinates are made up here).
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.testing import oc20_like_structures

__all__ = ["MOLECULES", "CELLS", "WORKLOADS", "make_batch", "oc20_like_structures", "small_cells",
           "small_molecules", "workload_structures"]

# ase.build.molecule names, 9-22 atoms: MD17's ethanol and benzene, then G2 / ASE-extra molecules
# spanning MD17's sizes (malonaldehyde/uracil 9-12, toluene 15, naphthalene 18, aspirin 21).
MOLECULES: tuple[tuple[str, str], ...] = (
    ("CH3CH2OH", "ethanol (MD17)"),          # 9
    ("C4H4O", "furan"),                      # 9
    ("CH3COCH3", "acetone"),                 # 10
    ("C5H5N", "pyridine"),                   # 11
    ("C6H6", "benzene (MD17)"),              # 12
    ("C7NH5", "benzonitrile"),               # 13
    ("trans-butane", "butane"),              # 14
    ("BDA", "1,4-benzenediamine"),           # 16
    ("biphenyl", "biphenyl"),                # 22
)
# (formula, crystal structure, a in Å or None = ASE's, cubic cell, repeat): 2-24 atoms.
CELLS: tuple[tuple[str, str, float | None, bool, tuple[int, int, int]], ...] = (
    ("Si", "diamond", None, False, (1, 1, 1)),    # 2
    ("NaCl", "rocksalt", 5.64, False, (1, 1, 1)),  # 2
    ("Fe", "bcc", None, True, (1, 1, 1)),          # 2
    ("Mg", "hcp", None, False, (1, 1, 1)),         # 2
    ("Cu", "fcc", None, True, (1, 1, 1)),          # 4
    ("Si", "diamond", None, True, (1, 1, 1)),      # 8
    ("NaCl", "rocksalt", 5.64, True, (1, 1, 1)),   # 8
    ("Fe", "bcc", None, True, (2, 2, 2)),          # 16
    ("Mg", "hcp", None, False, (2, 2, 3)),         # 24
)
WORKLOADS = ("oc20", "molecules", "cells")


def _rng_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(1 << 30))


def small_molecules(n: int, seed: int = 0, tiny: bool = False, rattle: float = 0.05) -> list[Atoms]:
    """``n`` molecules cycling through :data:`MOLECULES` (no cell, no pbc, no fixed atoms), each
    rattled by ``rattle`` Å (MD frames are not at the minimum); ``tiny``: the 9-atom ones only."""
    names = [m for m in MOLECULES if len(molecule(m[0])) <= 9] if tiny else list(MOLECULES)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = molecule(names[k % len(names)][0])
        atoms.rattle(rattle, seed=_rng_seed(rng))
        out.append(atoms)
    return out


def small_cells(n: int, seed: int = 0, tiny: bool = False, rattle: float = 0.05) -> list[Atoms]:
    """``n`` 3D-periodic bulk cells cycling through :data:`CELLS` (ase.build.bulk), rattled by
    ``rattle`` Å; ``tiny``: the 2-atom primitive cells only."""
    specs = [c for c in CELLS if c[4] == (1, 1, 1) and not c[3]] if tiny else list(CELLS)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        name, crystal, a, cubic, rep = specs[k % len(specs)]
        atoms = bulk(name, crystal, a=a, cubic=cubic).repeat(rep)
        atoms.rattle(rattle, seed=_rng_seed(rng))
        atoms.pbc = True
        out.append(atoms)
    return out


def workload_structures(workload: str, n: int, seed: int = 0, tiny: bool = False) -> list[Atoms]:
    """The structures of one workload (:data:`WORKLOADS`)."""
    if workload == "oc20":
        return oc20_like_structures(n, seed=seed, tiny=tiny)
    if workload == "molecules":
        return small_molecules(n, seed=seed, tiny=tiny)
    if workload == "cells":
        return small_cells(n, seed=seed, tiny=tiny)
    raise ValueError(f"unknown workload {workload!r}; choose from {list(WORKLOADS)}")


def make_batch(atoms_list: list[Atoms], device: torch.device | str = "cpu"):
    """float32 batch with ``fixed`` and ``tags`` (graphs built on the fly by each model)."""
    return atoms_to_batch(atoms_list, torch.float32).to(device)
