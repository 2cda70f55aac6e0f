"""IS2RS / IS2RE records: an initial structure, its reference relaxed positions and energies.

The format is what fairchem 1.10's ``OCPTrainer.run_relaxations`` reads from ``dataset.relax``: it
relaxes ``pos`` with the model and scores against ``pos_relaxed`` (ADwT over free atoms, minimum
image under ``cell``) and ``energy_relaxed`` (IS2RE energy MAE). ``energy_relaxed`` is ``y_relaxed``
under fairchem's name; ``y_init`` / ``y_relaxed`` are adsorption-referenced like the S2EF
``energy`` field, and ``energy_offset`` puts any total energy of the labelling calculator on that
scale: E_total = y + energy_offset.

Folders are written like the S2EF splits (``lmdb_io``: ``data.lmdb`` + ``metadata.npz``,
deterministic bytes, atomic).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from torch_geometric.data import Data

from leignn_ocp.batching import labelled_data
from leignn_ocp.data.lmdb_io import LmdbValidationError, iter_raw_lmdb_dir, validate_lmdb, write_lmdb_dir

# fields run_relaxations and the benchmark read from every record
IS2RS_FIELDS = ("pos", "pos_relaxed", "cell", "atomic_numbers", "natoms", "fixed", "tags", "sid",
                "energy_relaxed", "y_init", "y_relaxed", "energy_offset")


class IS2RSValidationError(LmdbValidationError):
    """A folder that is not a usable IS2RS set."""


def is2rs_data(init: Atoms, relaxed_positions: np.ndarray, y_init: float, y_relaxed: float,
               energy_offset: float, sid: int) -> Data:
    """One IS2RS record: ``init`` (tags, FixAtoms, cell, pbc) by fairchem's AtomsToGraphs (float32,
    wrapped into the cell, no edges), plus the reference relaxed positions wrapped the same way."""
    relaxed_positions = np.asarray(relaxed_positions, dtype=float)
    if relaxed_positions.shape != (len(init), 3):
        raise ValueError(f"relaxed_positions has shape {relaxed_positions.shape}, expected ({len(init)}, 3)")
    data = labelled_data(init, energy=False, forces=False, sid=int(sid))
    final = init.copy()
    final.positions = relaxed_positions
    data.pos_relaxed = labelled_data(final, energy=False, forces=False).pos  # [N, 3] float32, wrapped like pos
    data.tags = data.tags.long()
    data.y_init, data.y_relaxed = float(y_init), float(y_relaxed)
    data.energy_relaxed = float(y_relaxed)  # fairchem's name: run_relaxations scores IS2RE against it
    data.energy_offset = float(energy_offset)
    return data


def _missing(d: Data) -> list[str]:
    return [f for f in IS2RS_FIELDS if getattr(d, f, None) is None]


def write_is2rs(out_dir: Path, records: Sequence[Data]) -> Path:
    """``out_dir/data.lmdb`` + ``metadata.npz``, as the S2EF splits are written (checked first)."""
    for i, d in enumerate(records):
        missing = _missing(d)
        if missing:
            raise IS2RSValidationError(f"record {i} has no {', '.join(repr(f) for f in missing)} "
                                       "(build records with leignn_ocp.data.is2rs.is2rs_data)")
    return write_lmdb_dir(Path(out_dir), list(records))


def validate_is2rs(path: Path | str) -> int:
    """The number of records of an IS2RS folder, after the S2EF checks (``validate_lmdb``) and a
    check that every record holds every IS2RS field with a ``pos_relaxed`` of ``pos``'s shape."""
    path = Path(path)
    if not path.exists():
        raise IS2RSValidationError(f"IS2RS set {path} does not exist")
    n = validate_lmdb(path, required=(), max_check=None)
    for i, d in read_is2rs(path):
        missing = _missing(d)
        if missing:
            raise IS2RSValidationError(
                f"{path}: record {i} has no {', '.join(repr(f) for f in missing)}: not an IS2RS set "
                "(an S2EF split? IS2RS records come from leignn_ocp.data.is2rs.is2rs_data)")
        if tuple(d.pos_relaxed.shape) != tuple(d.pos.shape):
            raise IS2RSValidationError(f"{path}: record {i} 'pos_relaxed' has shape {tuple(d.pos_relaxed.shape)}, "
                                       f"'pos' {tuple(d.pos.shape)}")
    return n


def read_is2rs(path: Path | str):
    """Yield ``(index, Data)`` in the order fairchem's LmdbDataset reads them."""
    for i, raw in iter_raw_lmdb_dir(path):
        yield i, pickle.loads(raw)


def record_atoms(d: Data, positions: np.ndarray | torch.Tensor | None = None) -> Atoms:
    """The record as ASE Atoms (FixAtoms from ``fixed``, 3D-periodic as fairchem treats it), at
    ``positions`` (default: the initial ones), for a reference calculator."""
    from ase.constraints import FixAtoms

    pos = d.pos if positions is None else positions
    atoms = Atoms(numbers=d.atomic_numbers.long().numpy(), positions=np.asarray(pos, dtype=float),
                  cell=d.cell.reshape(3, 3).numpy().astype(float), pbc=True, tags=d.tags.numpy())
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(d.fixed.numpy())))
    return atoms
