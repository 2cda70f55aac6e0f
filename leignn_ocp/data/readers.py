"""Readers for the benchmark datasets users bring, written as the S2EF LMDB folders fairchem trains on.

    python -m leignn_ocp.data.readers md17  --src md17_aspirin.npz --out data/md17/aspirin
    python -m leignn_ocp.data.readers rmd17 --src rmd17/npz_data/rmd17_aspirin.npz --out data/rmd17/aspirin \\
        [--split rmd17 --split-index 1]
    python -m leignn_ocp.data.readers iso17 --src iso17/ --out data/iso17
    python -m leignn_ocp.data.readers lips  --src lips.xyz --out data/lips      # or MDSim's lips/ LMDBs

(``leignn-convert`` once registered as a console script.) Each split becomes ``<out>/<split>/``
(``data.lmdb`` + ``metadata.npz``, the package's atomic writer), each record made by fairchem's
``AtomsToGraphs`` (:func:`leignn_ocp.batching.labelled_data`): float32 ``pos`` / ``cell`` / ``forces``,
float ``energy`` (eV), forces in eV/Å, ``pbc`` [1, 3], ``sid`` = the frame's index in the source (ISO17: the
row id), ``fid`` = 0. ``<out>/info.json`` records the source, the units converted and every split's
source indices. The whole ``<out>`` folder appears at once, or not at all (``--force`` replaces it).

Formats (what the real files hold):

- MD17 (sgdml.org ``.npz``): ``z`` [N], ``R`` [n, N, 3] Å, ``E`` [n, 1] kcal/mol, ``F`` [n, N, 3] kcal/mol/Å.
- rMD17 (figshare ``.npz``): ``nuclear_charges`` [N], ``coords``, ``energies`` [n], ``forces`` (same units);
  its ``splits/index_{train,test}_0{1..5}.csv`` hold one frame index per line (1000 each).
- ISO17 (quantum-machine.org): ASE databases ``reference.db``, ``test_within.db``, ``test_other.db``;
  ``total_energy`` (eV) as a key-value pair or in ``row.data``, ``atomic_forces`` (eV/Å) in ``row.data``
  (schnetpack's ISO17 loader reads the same two properties, unit factor 1); ``train_ids.txt`` /
  ``validation_ids.txt`` hold 1-based row ids of ``reference.db``.
- LiPS (MDSim, Fu et al. 2022): the Materials Cloud trajectory ``lips.xyz`` (extxyz, 250,000 frames of
  83 atoms, periodic), which MDSim's ``preprocessing/lips.py`` splits with scikit-learn's
  ``train_test_split(random_state=123)`` into 19,000 train + 1,000 val, the rest test; or the LMDBs
  that script writes (``lips/20k/{train,val,test}/data.lmdb``: records with ``y`` / ``force``, and a
  ``length`` key one short of the records, so fairchem would skip each split's last record; all are
  kept here).

Molecules (MD17, ISO17) have no cell: train them with ``use_pbc: False`` (configs/md17, configs/iso17).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from .lmdb_io import (DatasetValidationError, _open_ro, atomic_dir, dumps_deterministic, lmdb_files,
                      validate_lmdb, write_raw_lmdb_dir)

__all__ = [
    "KCAL_MOL",
    "Frames",
    "ReaderError",
    "convert_iso17",
    "convert_lips",
    "convert_md17",
    "main",
    "mdsim_split",
    "random_split",
    "read_index_file",
    "read_iso17_db",
    "read_lips_trajectory",
    "read_mdsim_lmdb",
    "read_md17",
]

KCAL_MOL = units.kcal / units.mol  # eV per kcal/mol (0.0433641...)
MAX_Z = 118

MD17_KEYS = {"numbers": "z", "positions": "R", "energy": "E", "forces": "F"}
RMD17_KEYS = {"numbers": "nuclear_charges", "positions": "coords", "energy": "energies", "forces": "forces"}

MDSIM_SEED = 123  # MDSim preprocessing/lips.py: train_test_split(..., random_state=123), twice
MDSIM_LIPS_SIZES = (19000, 1000)  # MDSim's "20k" LiPS set: train, val; test = the remaining frames


class ReaderError(DatasetValidationError):
    """A source file that cannot be converted as it is (the message names the file and the frame)."""


@dataclass
class Frames:
    """Labelled structures read from one source, in source order, eV and eV/Å.

    ``where[i]`` names frame i in messages (file and index or row id); ``sid[i]`` is its id in the
    records (the index in the source file, or the ASE row id)."""

    numbers: list = field(default_factory=list)  # [N_i] int64 each
    positions: list = field(default_factory=list)  # [N_i, 3] Å
    energy: list = field(default_factory=list)  # float, eV
    forces: list = field(default_factory=list)  # [N_i, 3] eV/Å
    cell: list = field(default_factory=list)  # [3, 3] Å, or None for a molecule
    pbc: list = field(default_factory=list)  # [3] bool
    sid: list = field(default_factory=list)
    where: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.energy)

    def add(self, numbers, positions, energy, forces, cell, pbc, sid, where) -> None:
        self.numbers.append(numbers)
        self.positions.append(positions)
        self.energy.append(energy)
        self.forces.append(forces)
        self.cell.append(cell)
        self.pbc.append(pbc)
        self.sid.append(sid)
        self.where.append(where)

    def atoms(self, i: int) -> Atoms:
        """Frame i as ASE Atoms with its labels on a SinglePointCalculator (what AtomsToGraphs reads)."""
        cell = self.cell[i]
        atoms = Atoms(numbers=self.numbers[i], positions=self.positions[i],
                      cell=np.zeros((3, 3)) if cell is None else cell, pbc=self.pbc[i])
        atoms.calc = SinglePointCalculator(atoms, energy=float(self.energy[i]), forces=self.forces[i])
        return atoms


# ----------------------------------------------------------------------------------------------- checks

def _first_bad_row(a: np.ndarray) -> int:
    """Index of the first row of ``a`` [N, ...] with a non-finite entry."""
    return int((~np.isfinite(a.reshape(len(a), -1))).any(axis=1).nonzero()[0][0])


def _check_frame(frames: Frames, i: int) -> None:
    """Refuse frame i if a model could not train on it (shapes, atomic numbers, non-finite labels)."""
    where, z, pos, f = frames.where[i], frames.numbers[i], frames.positions[i], frames.forces[i]
    if z.ndim != 1 or len(z) == 0:
        raise ReaderError(f"{where}: atomic numbers have shape {z.shape}, expected [natoms >= 1]")
    bad = (z < 1) | (z > MAX_Z)
    if bad.any():
        a = int(bad.nonzero()[0][0])
        raise ReaderError(f"{where}: atom {a} has atomic number {int(z[a])}, expected 1..{MAX_Z}")
    for name, arr in (("positions", pos), ("forces", f)):
        if arr.shape != (len(z), 3):
            raise ReaderError(f"{where}: {name} have shape {arr.shape}, expected [natoms={len(z)}, 3]")
        if not np.isfinite(arr).all():
            a = _first_bad_row(arr)
            raise ReaderError(f"{where}: {name} of atom {a} are not finite ({arr[a].tolist()})")
    if not np.isfinite(frames.energy[i]):
        raise ReaderError(f"{where}: energy is not finite ({frames.energy[i]!r})")
    cell, pbc = frames.cell[i], frames.pbc[i]
    if any(pbc) and (cell is None or abs(np.linalg.det(cell)) < 1e-6):
        raise ReaderError(f"{where}: periodic (pbc={list(map(bool, pbc))}) but its cell has no volume")


def _as_int_array(a: np.ndarray, where: str) -> np.ndarray:
    """Atomic numbers as int64; whole-valued floats accepted, anything else refused."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
        return a.astype(np.int64)
    raise ReaderError(f"{where}: atomic numbers of dtype {a.dtype} are not whole numbers")


# ----------------------------------------------------------------------------------------------- splits

def random_split(n: int, n_train: int, n_val: int, n_test: int | None, seed: int, what: str) -> dict:
    """A seeded permutation of ``0..n-1``: ``n_train`` train, ``n_val`` val, ``n_test`` test (None: the
    rest), each sorted (source order)."""
    n_test = n - n_train - n_val if n_test is None else n_test
    if n_train < 1 or n_val < 1 or n_test < 0 or n_train + n_val + n_test > n:
        raise ReaderError(f"{what}: {n} frames cannot give {n_train} train + {n_val} val + "
                          f"{max(n_test, 0)} test (each of train and val needs at least 1)")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([n_train, n_val, n_test])
    return {"train": np.sort(perm[:cuts[0]]), "val": np.sort(perm[cuts[0]:cuts[1]]),
            "test": np.sort(perm[cuts[1]:cuts[2]])}


def _sklearn_split(items: np.ndarray, n_first: int, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``train_test_split(items, train_size=n_first, test_size=n_second,
    random_state=seed)`` for integer sizes (its ShuffleSplit: one ``RandomState(seed).permutation``,
    the test part first), without importing scikit-learn."""
    perm = np.random.RandomState(seed).permutation(len(items))
    return items[perm[n_second:n_second + n_first]], items[perm[:n_second]]


def mdsim_split(n: int, n_train: int = MDSIM_LIPS_SIZES[0], n_val: int = MDSIM_LIPS_SIZES[1],
                seed: int = MDSIM_SEED, what: str = "LiPS") -> dict:
    """MDSim's LiPS split (preprocessing/lips.py): ``n_train + n_val`` frames drawn from all, the
    rest test; then ``n_val`` of those drawn for val. Train and val keep MDSim's order."""
    if n_train < 1 or n_val < 1 or n_train + n_val > n:
        raise ReaderError(f"{what}: {n} frames cannot give {n_train} train + {n_val} val")
    both, test = _sklearn_split(np.arange(n), n_train + n_val, n - n_train - n_val, seed)
    train, val = _sklearn_split(both, n_train, n_val, seed)
    return {"train": train, "val": val, "test": np.sort(test)}


def read_index_file(path: Path, n: int | None = None, base: int = 0, what: str = "frame index") -> np.ndarray:
    """One integer per line (blank lines skipped) minus ``base``; refuses non-integers, duplicates and
    (with ``n``) indices outside ``0..n-1``, naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"{path}: no such split file")
    out, seen = [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            value = None
        if value is None or value != int(value):
            raise ReaderError(f"{path} line {lineno}: {text!r} is not an integer {what}")
        idx = int(value) - base
        if idx < 0 or (n is not None and idx >= n):
            raise ReaderError(f"{path} line {lineno}: {what} {int(value)} is out of range "
                              f"({base}..{(n - 1 + base) if n is not None else 'inf'})")
        if idx in seen:
            raise ReaderError(f"{path} line {lineno}: {what} {int(value)} repeats line {seen[idx]}")
        seen[idx] = lineno
        out.append(idx)
    if not out:
        raise ReaderError(f"{path}: no indices")
    return np.asarray(out, dtype=np.int64)


def _check_disjoint(splits: dict, what: str) -> None:
    names = [k for k in splits if len(splits[k])]
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            common = np.intersect1d(splits[a], splits[b])
            if len(common):
                raise ReaderError(f"{what}: {len(common)} frames are in both {a} and {b} "
                                  f"(first: index {int(common[0])})")


# ----------------------------------------------------------------------------------------------- writing

class _RecordBytes(Sequence):
    """The pickled records of ``frames[idx]``, built one at a time while the LMDB is written, so a
    250,000-frame source never holds every ``Data`` in memory at once."""

    def __init__(self, frames: Frames, idx: np.ndarray, energy_offset: float = 0.0):
        self.frames, self.idx, self.energy_offset = frames, idx, energy_offset

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, k):
        from leignn_ocp.batching import labelled_data

        i = int(self.idx[k])
        d = labelled_data(self.frames.atoms(i), pbc=True, sid=int(self.frames.sid[i]))
        d.fid = 0
        d.energy = float(d.energy) - self.energy_offset
        # [3] -> [1, 3]: a batch then holds pbc [B, 3], what fairchem's radius_graph_pbc and the
        # model's input checks read (a [3] per record would batch to [3B])
        d.pbc = d.pbc.view(1, 3)
        return dumps_deterministic(d)


def _energy_offset(frames: Frames, splits: dict, energy_offset: str | float) -> float:
    """The constant taken off every energy: 0 (``"none"``), the train mean (``"train-mean"``,
    to 1 meV) or a number in eV."""
    if energy_offset in (None, "none"):
        return 0.0
    if energy_offset == "train-mean":
        return round(float(np.mean([frames.energy[int(i)] for i in splits["train"]])), 3)
    try:
        return float(energy_offset)
    except (TypeError, ValueError):
        raise ReaderError(f"energy offset {energy_offset!r}: none, train-mean or a number (eV)") from None


def write_splits(frames: Frames, splits: dict, out: Path, info: dict, force: bool = False,
                 energy_offset: str | float = "none", log=print) -> dict:
    """Check every frame used, then write ``<out>/<split>/`` for each non-empty split and
    ``<out>/info.json``, all at once (a temp folder renamed into place). Returns split -> count.

    ``energy_offset`` (see :func:`_energy_offset`) is subtracted from every stored energy and recorded
    in info.json (``energy_offset_eV``): fairchem batches energies as float32, whose step is 2 meV at
    MD17 aspirin's -17,600 eV and 1 meV at ISO17's -11,500 eV, the size of the errors these benchmarks
    report; energies near 0 keep sub-meV steps. Forces are unchanged."""
    out = Path(out)
    used = np.unique(np.concatenate([np.asarray(v, dtype=np.int64) for v in splits.values()]))
    for i in used:
        _check_frame(frames, int(i))
    offset = _energy_offset(frames, splits, energy_offset)
    counts = {}
    with atomic_dir(out, overwrite=force) as tmp:
        info = dict(info, units={"energy": "eV", "forces": "eV/A", "positions": "A"}, energy_offset_eV=offset,
                    splits={})
        for name, idx in splits.items():
            idx = np.asarray(idx, dtype=np.int64)
            counts[name] = len(idx)
            info["splits"][name] = {"count": len(idx), "sid": [int(frames.sid[i]) for i in idx]}
            if len(idx) == 0:
                log(f"{name}: empty, not written")
                continue
            write_raw_lmdb_dir(tmp / name, _RecordBytes(frames, idx, offset),
                               [len(frames.numbers[int(i)]) for i in idx])
            validate_lmdb(tmp / name, max_check=16)  # what fairchem will read, before it is visible
            log(f"{name}: {len(idx)} structures -> {out / name}")
        (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    if offset:
        log(f"energies stored as E - {offset} eV (info.json energy_offset_eV)")
    return counts


# ----------------------------------------------------------------------------------------------- MD17

def read_md17(path: Path, flavor: str = "md17") -> Frames:
    """An MD17 (``z, R, E, F``) or rMD17 (``nuclear_charges, coords, energies, forces``) ``.npz`` as
    frames in eV and eV/Å (the files hold kcal/mol and kcal/mol/Å)."""
    path = Path(path)
    keys, other = (MD17_KEYS, RMD17_KEYS) if flavor == "md17" else (RMD17_KEYS, MD17_KEYS)
    if not path.is_file():
        raise ReaderError(f"{path}: no such file")
    try:
        npz = np.load(path, allow_pickle=False)
        present = set(npz.files)
    except Exception as exc:
        raise ReaderError(f"{path}: cannot be read as a .npz file ({type(exc).__name__}: {exc})") from exc
    with npz:
        missing = [k for k in keys.values() if k not in present]
        if missing:
            hint = ""
            if all(k in present for k in other.values()):
                hint = f"; it has the {'rMD17' if flavor == 'md17' else 'MD17'} keys: convert it with " \
                       f"`{'rmd17' if flavor == 'md17' else 'md17'}`"
            raise ReaderError(f"{path}: not an {flavor.upper() if flavor == 'md17' else 'rMD17'} file: "
                              f"missing {missing} (has {sorted(present)}){hint}")
        try:
            z = _as_int_array(npz[keys["numbers"]], f"{path} '{keys['numbers']}'")
            pos = np.asarray(npz[keys["positions"]], dtype=np.float64)
            energy = np.asarray(npz[keys["energy"]], dtype=np.float64)
            forces = np.asarray(npz[keys["forces"]], dtype=np.float64)
        except ReaderError:
            raise
        except Exception as exc:
            raise ReaderError(f"{path}: unreadable arrays ({type(exc).__name__}: {exc})") from exc
    if z.ndim != 1:
        raise ReaderError(f"{path}: '{keys['numbers']}' has shape {z.shape}, expected [natoms]")
    n, natoms = (pos.shape[0] if pos.ndim else 0), len(z)
    if pos.shape != (n, natoms, 3) or n == 0:
        raise ReaderError(f"{path}: '{keys['positions']}' has shape {pos.shape}, expected "
                          f"[frames >= 1, natoms={natoms}, 3]")
    if forces.shape != pos.shape:
        raise ReaderError(f"{path}: '{keys['forces']}' has shape {forces.shape}, expected {pos.shape}")
    if energy.shape not in ((n,), (n, 1)):
        raise ReaderError(f"{path}: '{keys['energy']}' has shape {energy.shape}, expected [{n}, 1] or [{n}]")
    energy = energy.reshape(n) * KCAL_MOL  # [n] kcal/mol -> eV
    forces = forces * KCAL_MOL  # [n, N, 3] kcal/mol/A -> eV/A
    frames = Frames()
    pbc = np.zeros(3, dtype=bool)
    for i in range(n):
        frames.add(z, pos[i], float(energy[i]), forces[i], None, pbc, i, f"{path} frame {i}")
    return frames


def _find_splits_dir(src: Path, splits_dir: Path | None) -> Path:
    if splits_dir is not None:
        return Path(splits_dir)
    for cand in (src.parent / "splits", src.parent.parent / "splits"):
        if cand.is_dir():
            return cand
    raise ReaderError(f"{src}: no splits/ folder next to it or one level up (rMD17 ships "
                      "rmd17/splits/index_{train,test}_0{1..5}.csv); pass --splits-dir")


def convert_md17(src: Path, out: Path, flavor: str = "md17", split: str = "random", split_index: int = 1,
                 splits_dir: Path | None = None, n_train: int = 950, n_val: int = 50,
                 n_test: int | None = None, seed: int = 0, force: bool = False,
                 energy_offset: str | float = "none", log=print) -> dict:
    """MD17 / rMD17 -> ``<out>/{train,val,test}``. ``split="random"``: a seeded permutation, ``n_train``
    / ``n_val`` / ``n_test`` (None: the rest). ``split="rmd17"``: rMD17's shipped split
    ``split_index`` (1..5): its 1000 train indices give ``n_val`` val (seeded) and the rest train, its
    1000 test indices the test set."""
    src = Path(src)
    frames = read_md17(src, flavor)
    n = len(frames)
    info = {"dataset": flavor, "source": str(src.resolve()), "converted": "kcal/mol -> eV (x KCAL_MOL = "
            f"{KCAL_MOL!r}), kcal/mol/A -> eV/A", "split": split, "seed": seed}
    if split == "random":
        splits = random_split(n, n_train, n_val, n_test, seed, str(src))
    elif split == "rmd17":
        if not 1 <= split_index <= 5:
            raise ReaderError(f"--split-index {split_index}: rMD17 ships splits 1..5")
        sdir = _find_splits_dir(src, splits_dir)
        train_file, test_file = sdir / f"index_train_0{split_index}.csv", sdir / f"index_test_0{split_index}.csv"
        shipped = read_index_file(train_file, n)
        test = read_index_file(test_file, n)
        if not 1 <= n_val < len(shipped):
            raise ReaderError(f"{train_file}: {len(shipped)} train indices cannot give {n_val} val and "
                              "at least 1 train")
        perm = np.random.default_rng(seed).permutation(len(shipped))
        splits = {"train": np.sort(shipped[perm[n_val:]]), "val": np.sort(shipped[perm[:n_val]]),
                  "test": np.sort(test)}
        info.update(split_files=[str(train_file.resolve()), str(test_file.resolve())], split_index=split_index)
    else:
        raise ReaderError(f"unknown split {split!r} (random or rmd17)")
    _check_disjoint(splits, str(src))
    return write_splits(frames, splits, out, info, force=force, energy_offset=energy_offset, log=log)


# ----------------------------------------------------------------------------------------------- ISO17

ISO17_DBS = ("reference.db", "test_within.db", "test_other.db")


def _iso17_row_labels(row, where: str) -> tuple[float, np.ndarray]:
    """``total_energy`` (key-value pair or ``row.data``) and ``atomic_forces`` (``row.data``)."""
    data = dict(row.data)
    kvp = row.key_value_pairs
    energy = kvp["total_energy"] if "total_energy" in kvp else data.get("total_energy")
    if energy is None:
        raise ReaderError(f"{where}: no 'total_energy' (looked in key-value pairs {sorted(kvp)} "
                          f"and data {sorted(data)})")
    forces = data.get("atomic_forces")
    if forces is None:
        raise ReaderError(f"{where}: no 'atomic_forces' in row.data (it has {sorted(data)})")
    try:
        energy = float(np.asarray(energy, dtype=np.float64).reshape(()))
    except Exception as exc:
        raise ReaderError(f"{where}: 'total_energy' is not one number ({energy!r})") from exc
    return energy, np.asarray(forces, dtype=np.float64)  # shape checked with the frame


def read_iso17_db(path: Path, ids: set[int] | None = None) -> Frames:
    """The rows of one ISO17 ASE database (all, or those whose id is in ``ids``), in id order."""
    import ase.db

    path = Path(path)
    if not path.is_file():  # ase.db.connect would create an empty database
        raise ReaderError(f"{path}: no such file")
    frames = Frames()
    try:
        with ase.db.connect(str(path), type="db") as db:
            for row in db.select():
                if ids is not None and row.id not in ids:
                    continue
                where = f"{path} row id {row.id}"
                energy, forces = _iso17_row_labels(row, where)
                cell = np.asarray(row.cell, dtype=np.float64)
                pbc = np.asarray(row.pbc, dtype=bool)
                frames.add(_as_int_array(row.numbers, where), np.asarray(row.positions, dtype=np.float64),
                           energy, forces, cell if abs(np.linalg.det(cell)) > 0 else None, pbc, row.id, where)
    except ReaderError:
        raise
    except Exception as exc:
        raise ReaderError(f"{path}: cannot be read as an ASE database ({type(exc).__name__}: {exc})") from exc
    if len(frames) == 0:
        raise ReaderError(f"{path}: no rows" + (" with the requested ids" if ids is not None else ""))
    return frames


def convert_iso17(src: Path, out: Path, force: bool = False, energy_offset: str | float = "none",
                  log=print) -> dict:
    """ISO17 -> ``<out>/{train,val}`` (rows of reference.db named by train_ids.txt / validation_ids.txt)
    and ``<out>/{test_within,test_other}`` (every row of those databases)."""
    src = Path(src)
    if not src.is_dir():
        raise ReaderError(f"{src}: not a folder (expected ISO17's iso17/ with {', '.join(ISO17_DBS)})")
    missing = [f for f in (*ISO17_DBS, "train_ids.txt", "validation_ids.txt") if not (src / f).is_file()]
    if missing:
        raise ReaderError(f"{src}: missing {missing} (ISO17 ships {', '.join(ISO17_DBS)}, train_ids.txt "
                          "and validation_ids.txt)")
    train_ids = read_index_file(src / "train_ids.txt", what="row id")
    val_ids = read_index_file(src / "validation_ids.txt", what="row id")
    _check_disjoint({"train_ids.txt": train_ids, "validation_ids.txt": val_ids}, str(src))
    ref = read_iso17_db(src / "reference.db", set(train_ids.tolist()) | set(val_ids.tolist()))
    pos_of = {int(s): k for k, s in enumerate(ref.sid)}
    for name, ids in (("train_ids.txt", train_ids), ("validation_ids.txt", val_ids)):
        absent = [int(i) for i in ids if int(i) not in pos_of]
        if absent:
            raise ReaderError(f"{src / name}: row id {absent[0]} is not in {src / 'reference.db'} "
                              f"({len(absent)} ids missing)")
    # one Frames holding every split; sids stay the row ids of each database
    frames = ref
    splits = {"train": np.array([pos_of[int(i)] for i in train_ids]),
              "val": np.array([pos_of[int(i)] for i in val_ids])}
    for name in ("test_within", "test_other"):
        part = read_iso17_db(src / f"{name}.db")
        start = len(frames)
        for k in range(len(part)):
            frames.add(part.numbers[k], part.positions[k], part.energy[k], part.forces[k], part.cell[k],
                       part.pbc[k], part.sid[k], part.where[k])
        splits[name] = np.arange(start, len(frames))
    info = {"dataset": "iso17", "source": str(src.resolve()), "converted": "none (eV, eV/A)",
            "split": "train_ids.txt / validation_ids.txt (1-based reference.db row ids); test_within.db, "
                     "test_other.db whole; sid = row id"}
    return write_splits(frames, splits, out, info, force=force, energy_offset=energy_offset, log=log)


# ----------------------------------------------------------------------------------------------- LiPS

def read_lips_trajectory(path: Path) -> Frames:
    """An ASE-readable trajectory (MDSim's ``lips.xyz``: extxyz) with energy and forces per frame."""
    from ase.io import iread

    path = Path(path)
    frames = Frames()
    try:
        for i, atoms in enumerate(iread(str(path), index=":")):
            where = f"{path} frame {i}"
            if atoms.calc is None:
                raise ReaderError(f"{where}: no energy/forces (an extxyz needs energy=... in its comment "
                                  "line and a forces column)")
            try:
                energy = atoms.get_potential_energy()
                forces = atoms.get_forces()
            except ReaderError:
                raise
            except Exception as exc:
                raise ReaderError(f"{where}: no energy or forces ({type(exc).__name__}: {exc})") from exc
            cell = np.asarray(atoms.get_cell(), dtype=np.float64)
            frames.add(atoms.get_atomic_numbers().astype(np.int64), atoms.get_positions(), float(energy),
                       np.asarray(forces, dtype=np.float64),
                       cell if abs(np.linalg.det(cell)) > 0 else None, np.asarray(atoms.pbc, dtype=bool), i, where)
    except ReaderError:
        raise
    except Exception as exc:
        raise ReaderError(f"{path}: cannot be read by ase.io ({type(exc).__name__}: {exc}); after "
                          f"{len(frames)} frames") from exc
    if len(frames) == 0:
        raise ReaderError(f"{path}: no frames")
    return frames


def _tensor_np(value, where: str, name: str) -> np.ndarray:
    import torch

    if value is None:
        raise ReaderError(f"{where}: no '{name}'")
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def read_mdsim_lmdb(folder: Path, frames: Frames | None = None, log=print) -> tuple[Frames, np.ndarray]:
    """Every record of an MDSim LMDB folder (``y``/``energy``, ``force``/``forces``, ``pos``, ``cell``,
    ``atomic_numbers``); ``sid`` = MDSim's ``fid`` (the frame's index in lips.xyz). All records are
    read, whatever ``length`` says (MDSim's is one short). Returns the frames and their positions."""
    from fairchem.core.common.utils import pyg2_data_transform
    from torch_geometric.data import Data

    frames = Frames() if frames is None else frames
    start = len(frames)
    for db_path in lmdb_files(folder):
        env = _open_ro(db_path)
        try:
            with env.begin() as txn:
                raw_length = txn.get(b"length")
                keys = [k for k in txn.cursor().iternext(keys=True, values=False) if k != b"length"]
                bad = [k for k in keys if not k.isdigit()]
                if bad:
                    raise ReaderError(f"{db_path}: key {bad[0][:40]!r} is not a record index")
                n = len(keys)
                if sorted(int(k) for k in keys) != list(range(n)):
                    raise ReaderError(f"{db_path}: record keys are not 0..{n - 1}")
                if raw_length is not None:
                    length = pickle.loads(raw_length)
                    if int(length) != n:
                        log(f"{db_path}: 'length' says {int(length)} but {n} records are there "
                            f"(MDSim writes the last index); reading all {n}")
                for k in range(n):
                    where = f"{db_path} record {k}"
                    try:
                        obj = pickle.loads(txn.get(f"{k}".encode("ascii")))
                    except Exception as exc:
                        raise ReaderError(f"{where}: cannot be unpickled ({type(exc).__name__}: {exc})") from exc
                    try:  # PyG 1.x pickles (old OC20-style LMDBs) as fairchem's LmdbDataset converts them
                        d = pyg2_data_transform(obj)
                    except Exception:
                        d = None
                    if not isinstance(d, Data):
                        raise ReaderError(f"{where}: a {type(obj).__name__}, not a torch_geometric Data")
                    store = d._store
                    e_key = "energy" if "energy" in store else "y"
                    f_key = "forces" if "forces" in store else "force"
                    z = _as_int_array(_tensor_np(store.get("atomic_numbers"), where, "atomic_numbers"), where)
                    pos = _tensor_np(store.get("pos"), where, "pos").astype(np.float64)
                    energy = _tensor_np(store.get(e_key), where, "y' or 'energy").astype(np.float64)
                    if energy.size != 1:
                        raise ReaderError(f"{where}: '{e_key}' has {energy.size} values, expected 1")
                    forces = _tensor_np(store.get(f_key), where, "force' or 'forces").astype(np.float64)
                    cell = store.get("cell")
                    cell = None if cell is None else _tensor_np(cell, where, "cell").astype(np.float64).reshape(3, 3)
                    periodic = cell is not None and abs(np.linalg.det(cell)) > 0
                    fid = store.get("fid")
                    sid = int(np.asarray(_tensor_np(fid, where, "fid")).reshape(-1)[0]) if fid is not None \
                        else len(frames)  # no fid: the record's position among all records read
                    frames.add(z, pos, float(energy.reshape(())), forces, cell if periodic else None,
                               np.full(3, periodic), sid, where)
        finally:
            env.close()
    return frames, np.arange(start, len(frames))


def _mdsim_split_dir(src: Path) -> Path | None:
    """The folder holding MDSim's train/val/test LMDB folders: ``src`` itself or its one size folder
    (MDSim writes ``lips/20k/{train,val,test}``)."""
    def has_splits(p: Path) -> bool:
        return all((p / s).is_dir() and any((p / s).glob("*.lmdb")) for s in ("train", "val", "test"))

    if has_splits(src):
        return src
    subs = [p for p in sorted(src.iterdir()) if p.is_dir() and has_splits(p)]
    if len(subs) > 1:
        raise ReaderError(f"{src}: several MDSim size folders ({[p.name for p in subs]}); pass one as --src")
    return subs[0] if subs else None


def convert_lips(src: Path, out: Path, n_train: int = MDSIM_LIPS_SIZES[0], n_val: int = MDSIM_LIPS_SIZES[1],
                 seed: int = MDSIM_SEED, force: bool = False, energy_offset: str | float = "none",
                 log=print) -> dict:
    """LiPS -> ``<out>/{train,val,test}``: from the trajectory (``lips.xyz``, or a folder holding it)
    with MDSim's split, or from MDSim's LMDB folders as they are split (periodic cell kept)."""
    src = Path(src)
    if not src.exists():
        raise ReaderError(f"{src}: no such file or folder")
    info = {"dataset": "lips", "source": str(src.resolve()), "converted": "none (eV, eV/A)"}
    traj = src if src.is_file() else None
    if traj is None:
        lmdb_root = _mdsim_split_dir(src)
        if lmdb_root is not None:
            frames, splits = Frames(), {}
            for name in ("train", "val", "test"):
                frames, splits[name] = read_mdsim_lmdb(lmdb_root / name, frames, log=log)
            info.update(split=f"MDSim's LMDB folders {lmdb_root} as they are; sid = MDSim's fid")
            _check_disjoint({k: np.asarray(frames.sid)[v] for k, v in splits.items()}, str(lmdb_root))
            return write_splits(frames, splits, out, info, force=force, energy_offset=energy_offset, log=log)
        if (src / "lips.xyz").is_file():
            traj = src / "lips.xyz"
        else:
            raise ReaderError(f"{src}: neither MDSim's train/val/test LMDB folders nor lips.xyz inside")
    frames = read_lips_trajectory(traj)
    splits = mdsim_split(len(frames), n_train, n_val, seed, str(traj))
    info.update(split=f"MDSim preprocessing/lips.py: train_test_split(random_state={seed}) twice, "
                      f"{n_train} train + {n_val} val, the rest test; sid = frame index", seed=seed)
    return write_splits(frames, splits, out, info, force=force, energy_offset=energy_offset, log=log)


# ----------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="leignn-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)

    def common(sp):
        sp.add_argument("--src", type=Path, required=True)
        sp.add_argument("--out", type=Path, required=True, help="folder for <split>/ LMDBs and info.json")
        sp.add_argument("--force", action="store_true", help="replace --out if it exists")
        sp.add_argument("--energy-offset", default="none",
                        help="none (default), train-mean, or eV: subtracted from every stored energy and "
                             "recorded in info.json (float32 batches step 1-2 meV at -10^4 eV)")

    for name in ("md17", "rmd17"):
        sp = sub.add_parser(name, help=f"{'MD17' if name == 'md17' else 'revised MD17'} .npz")
        common(sp)
        sp.add_argument("--split", choices=("random", "rmd17") if name == "rmd17" else ("random",),
                        default="random", help="random: seeded 950/50/rest; rmd17: the shipped 1000/1000 split")
        sp.add_argument("--split-index", type=int, default=1, help="rMD17 split 1..5 (--split rmd17)")
        sp.add_argument("--splits-dir", type=Path, default=None,
                        help="rMD17 splits/ folder (default: next to --src or one level up)")
        sp.add_argument("--train-size", type=int, default=950)
        sp.add_argument("--val-size", type=int, default=50)
        sp.add_argument("--test-size", type=int, default=None, help="default: every other frame")
        sp.add_argument("--seed", type=int, default=0)
    sp = sub.add_parser("iso17", help="ISO17 folder (reference.db, test_within.db, test_other.db, id files)")
    common(sp)
    sp = sub.add_parser("lips", help="LiPS: lips.xyz (MDSim's split) or MDSim's train/val/test LMDBs")
    common(sp)
    sp.add_argument("--train-size", type=int, default=MDSIM_LIPS_SIZES[0])
    sp.add_argument("--val-size", type=int, default=MDSIM_LIPS_SIZES[1])
    sp.add_argument("--seed", type=int, default=MDSIM_SEED)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """``leignn-convert``: 0 written, 2 refused (the message names the file and the frame)."""
    a = parse_args(argv)
    try:
        if a.dataset in ("md17", "rmd17"):
            convert_md17(a.src, a.out, flavor=a.dataset, split=a.split, split_index=a.split_index,
                         splits_dir=a.splits_dir, n_train=a.train_size, n_val=a.val_size, n_test=a.test_size,
                         seed=a.seed, force=a.force, energy_offset=a.energy_offset)
        elif a.dataset == "iso17":
            convert_iso17(a.src, a.out, force=a.force, energy_offset=a.energy_offset)
        else:
            convert_lips(a.src, a.out, n_train=a.train_size, n_val=a.val_size, seed=a.seed, force=a.force,
                         energy_offset=a.energy_offset)
    except (DatasetValidationError, FileExistsError) as exc:
        print(f"leignn-convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
