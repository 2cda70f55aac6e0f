"""ASE Atoms -> the Data and batches fairchem models read.

Labelled records (energy and force labels, float32, what LMDBs hold) come from fairchem's own
``AtomsToGraphs``: :func:`labelled_data`, so what the project writes is what fairchem's
preprocessing writes. Model input in any float dtype comes from :func:`atoms_to_data`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from fairchem.core.datasets import data_list_collater
from fairchem.core.preprocessing import AtomsToGraphs
from torch_geometric.data import Data


def labelled_data(atoms: Atoms, energy: bool = True, forces: bool = True, pbc: bool = False,
                  sid: int | None = None) -> Data:
    """One S2EF record by fairchem's ``AtomsToGraphs``, as OC20's preprocess_ef writes them: float32
    positions (wrapped into the cell), cell, tags, fixed, energy and forces from ``atoms.calc``
    (without constraints), ``sid`` if given; no edges (models build the graph on the fly)."""
    return _a2g(energy, forces, pbc).convert(atoms, sid=sid)


@functools.lru_cache(maxsize=8)
def _a2g(energy: bool, forces: bool, pbc: bool) -> AtomsToGraphs:
    return AtomsToGraphs(r_energy=energy, r_forces=forces, r_fixed=True, r_pbc=pbc, r_edges=False,
                         r_distances=False)


def atoms_to_data(atoms: Atoms, dtype: torch.dtype = torch.float32) -> Data:
    """The fields a model reads (pos, cell, atomic_numbers, natoms, tags, fixed) in ``dtype``.

    Not ``AtomsToGraphs``, which serves labelled float32 records but not model input here: it
    casts positions and cell to float32 (float64 checks, symmetries to 1e-10 and finite
    differences, would see float32 round-off), completes a missing cell to the unit cube (a
    use_pbc model could no longer tell a molecule has no cell) and wraps positions into the
    cell (callers that want that, like the MD calculator, wrap themselves).
    """
    fixed = np.zeros(len(atoms), dtype=np.int64)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = 1
    return Data(
        pos=torch.tensor(atoms.get_positions(), dtype=dtype),  # [N, 3]
        cell=torch.tensor(np.asarray(atoms.get_cell(complete=False)), dtype=dtype).view(1, 3, 3),  # [1, 3, 3]
        atomic_numbers=torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long),  # [N]
        natoms=len(atoms),
        tags=torch.tensor(atoms.get_tags(), dtype=torch.long),  # [N]
        fixed=torch.tensor(fixed),  # [N] 1 = fixed
    )


def atoms_to_batch(atoms_list: Sequence[Atoms] | Atoms, dtype: torch.dtype = torch.float32):
    """One structure or a list of them as one fairchem batch (``data_list_collater``), in ``dtype``."""
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    return data_list_collater([atoms_to_data(a, dtype) for a in atoms_list], otf_graph=True)
