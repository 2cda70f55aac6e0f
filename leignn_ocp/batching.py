"""ASE Atoms -> the batch object fairchem models read, in any float dtype.

fairchem's AtomsToGraphs fixes float32; tests that check symmetries to 1e-10
and benchmarks that feed many copies need the same fields in float64 too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from fairchem.core.datasets import data_list_collater
from torch_geometric.data import Data


def atoms_to_data(atoms: Atoms, dtype: torch.dtype = torch.float32) -> Data:
    fixed = np.zeros(len(atoms), dtype=np.int64)
    for c in atoms.constraints:
        if type(c).__name__ == "FixAtoms":
            fixed[c.get_indices()] = 1
    return Data(
        pos=torch.tensor(atoms.get_positions(), dtype=dtype),  # [N, 3]
        cell=torch.tensor(np.asarray(atoms.get_cell(complete=False)), dtype=dtype).view(1, 3, 3),
        atomic_numbers=torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long),
        natoms=len(atoms),
        tags=torch.tensor(atoms.get_tags(), dtype=torch.long),
        fixed=torch.tensor(fixed),
    )


def atoms_to_batch(atoms_list: Sequence[Atoms] | Atoms, dtype: torch.dtype = torch.float32):
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    return data_list_collater([atoms_to_data(a, dtype) for a in atoms_list], otf_graph=True)
