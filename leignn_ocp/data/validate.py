"""Check datasets before training: a bad file stops with an error naming the file and the structure.

fairchem reads records lazily, so a bad one shows up mid-epoch, or never: a truncated LMDB kills the
process with SIGBUS, a ``length`` key that is too small silently drops records, a missing label or a
NaN becomes a crash or a NaN loss hours in. :func:`validate_dataset_config` checks every source of
fairchem's ``dataset`` block (train / val / test, merged with the train settings the way fairchem's
``BaseTrainer`` merges them) up front; :func:`validate_source` checks one path (``leignn-oc20-data
check``). LMDB checks live in :mod:`leignn_ocp.data.lmdb_io`; ASE databases (fairchem ``format:
ase_db``) and ASE files (``ase_read``, ``ase_read_multi``) are checked here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from glob import glob
from pathlib import Path

import numpy as np

from .lmdb_io import MAX_Z, DatasetValidationError, _sample, validate_lmdb

__all__ = [
    "DatasetValidationError",
    "ase_db_paths",
    "detect_format",
    "split_configs",
    "validate_ase_db",
    "validate_ase_files",
    "validate_dataset_config",
    "validate_source",
]

log = logging.getLogger(__name__)

LMDB_FORMATS = ("lmdb", "single_point_lmdb", "trajectory_lmdb", "oc22_lmdb")
ASE_FILE_FORMATS = ("ase_read", "ase_read_multi")
SPLITS = ("train", "val", "test")
LABELS = ("energy", "forces")
SQLITE_MAGIC = b"SQLite format 3\x00"


def _structure_problem(natoms: int, numbers, positions, cell, energy, forces, required: Sequence[str]) -> str | None:
    """Why one ASE structure is unusable for S2EF, or None (labels not required: checked if present)."""
    if natoms < 1:
        return "has no atoms"
    numbers = np.asarray(numbers)
    if ((numbers < 1) | (numbers > MAX_Z)).any():
        bad = int(np.flatnonzero((numbers < 1) | (numbers > MAX_Z))[0])
        return f"has atomic number {numbers[bad]} at atom {bad} (expected 1..{MAX_Z})"
    positions = np.asarray(positions)
    if not np.isfinite(positions).all():
        bad = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
        return f"has non-finite positions (atom {bad}: {positions[bad].tolist()})"
    if cell is not None and not np.isfinite(np.asarray(cell, dtype=float)).all():
        return "has a non-finite cell"
    missing = [k for k, v in (("energy", energy), ("forces", forces)) if v is None and k in required]
    if missing:
        have = [k for k, v in (("energy", energy), ("forces", forces)) if v is not None]
        return (f"has no {' and no '.join(missing)} (it has {', '.join(have) or 'no labels'}; write it with a "
                "calculator or SinglePointCalculator holding both; ASE's SQLite backend also stores a NaN "
                "energy as none)")
    if energy is not None:
        try:
            e = float(np.asarray(energy).reshape(()))
        except (TypeError, ValueError):
            return f"has an energy that is not one number ({energy!r})"
        if not math.isfinite(e):
            return f"has a non-finite energy ({e})"
    if forces is not None:
        f = np.asarray(forces)
        if f.shape != (natoms, 3):
            return f"has forces of shape {f.shape} for {natoms} atoms"
        if f.dtype.kind != "f":
            return f"has forces of dtype {f.dtype}, expected floating point"
        if not np.isfinite(f).all():
            bad = int(np.flatnonzero(~np.isfinite(f).all(axis=1))[0])
            return f"has non-finite forces (atom {bad}: {f[bad].tolist()})"
    return None


def ase_db_paths(src: str | Path | Sequence) -> list[str]:
    """The files fairchem's AseDBDataset connects to for ``src`` (a file, a folder: every file in it,
    a glob, or a list of files and folders), in its order."""
    if isinstance(src, (list, tuple)):
        out: list[str] = []
        for p in sorted(str(s) for s in src):
            if os.path.isdir(p):
                out += sorted(glob(f"{p}/*"))
            elif os.path.isfile(p):
                out.append(p)
            else:
                raise DatasetValidationError(f"ASE database {p} does not exist")
        return out
    src = str(src)
    if os.path.isfile(src):
        return [src]
    if os.path.isdir(src):
        files = sorted(glob(f"{src}/*"))
        if not files:
            raise DatasetValidationError(f"{src}: empty folder (expected ASE databases)")
        return files
    files = sorted(glob(src))
    if not files:
        raise DatasetValidationError(f"ASE database {src} does not exist (nor does any file match it as a glob)")
    return files


def _connect(path: str, connect_args: dict | None):
    """``ase.db.connect`` as fairchem calls it, refusing what it would skip silently or overwrite:
    an empty or non-SQLite ``.db`` (ASE writes its tables into an empty file)."""
    import ase.db

    if path.endswith(".db"):
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
        if head != SQLITE_MAGIC:
            raise DatasetValidationError(
                f"{path}: " + ("empty file" if not head else "not an SQLite file") + " (expected an ASE database)")
    args = dict(connect_args or {})
    if "aselmdb" in path:
        args.update(readonly=True, use_lock_file=False)
    try:
        return ase.db.connect(path, **args)
    except Exception as exc:  # fairchem logs a ValueError at debug level and skips the file
        raise DatasetValidationError(f"{path}: cannot open as an ASE database ({type(exc).__name__}: {exc}); "
                                     "fairchem's AseDBDataset would skip it silently") from exc


def validate_ase_db(
    src: str | Path | Sequence,
    required: Sequence[str] = LABELS,
    max_check: int | None = None,
    select_args: dict | None = None,
    connect_args: dict | None = None,
) -> int:
    """Check the ASE database(s) of a fairchem ``format: ase_db`` source; return the row count.

    Raises :class:`DatasetValidationError` naming the file, the row id and the dataset index (the
    index fairchem's AseDBDataset gives the row): a missing / empty / unreadable file, no rows, a row
    without a required label (energy, forces), NaN / inf energy, forces or positions, forces of the
    wrong shape, atomic numbers outside 1..118. ``max_check``: rows checked per file, spread evenly
    (``None``: all; every row is read either way, as fairchem reads them all to list the ids).
    """
    total = 0
    for path in ase_db_paths(src):
        db = _connect(path, connect_args)
        try:
            try:
                rows = list(db.select(**(select_args or {}), include_data=False))
            except Exception as exc:
                raise DatasetValidationError(f"{path}: cannot read rows ({type(exc).__name__}: {exc}); "
                                             "corrupt or not an ASE database") from exc
            for i in _sample(len(rows), max_check):
                row = rows[i]
                problem = _structure_problem(row.natoms, row.numbers, row.positions, row.get("cell"),
                                             row.get("energy"), row.get("forces"), required)
                if problem is not None:
                    raise DatasetValidationError(f"{path}: row id {row.id} (dataset index {total + i}) {problem}")
            total += len(rows)
        finally:
            if hasattr(db, "close"):
                db.close()
    if total == 0:
        raise DatasetValidationError(f"{src}: ASE database(s) hold no rows" + (f" matching {select_args}"
                                                                              if select_args else ""))
    return total


def validate_ase_files(cfg: dict, required: Sequence[str] = LABELS, max_check: int | None = None) -> int:
    """Check a fairchem ``ase_read`` / ``ase_read_multi`` source (read by fairchem's own class, so
    files and order are the trainer's); errors name the source, the index and fairchem's id."""
    from leignn_ocp.evaluation.byo import open_dataset

    try:
        ds = open_dataset({k: v for k, v in cfg.items() if k != "transforms"})
    except Exception as exc:
        raise DatasetValidationError(f"{cfg.get('src')}: fairchem cannot read it ({type(exc).__name__}: {exc})") from exc
    for i in _sample(len(ds), max_check):
        ident = ds.ids[i]
        try:
            atoms = ds.get_atoms(ident)
        except Exception as exc:
            raise DatasetValidationError(f"{cfg.get('src')}: structure {i} ({ident}) cannot be read "
                                         f"({type(exc).__name__}: {exc})") from exc
        res = getattr(atoms.calc, "results", {}) or {}
        problem = _structure_problem(len(atoms), atoms.numbers, atoms.positions, atoms.cell.array,
                                     res.get("energy"), res.get("forces"), required)
        if problem is not None:
            raise DatasetValidationError(f"{cfg.get('src')}: structure {i} ({ident}) {problem}")
    return len(ds)


def detect_format(path: str | Path) -> str:
    """``lmdb`` for a ``*.lmdb`` file or a folder holding some, else ``ase_db``."""
    p = Path(path)
    if (p.is_file() and p.suffix == ".lmdb") or (p.is_dir() and any(p.glob("*.lmdb"))):
        return "lmdb"
    if p.is_dir() or p.is_file() or any(c in str(path) for c in "*?["):
        return "ase_db"
    return "lmdb"  # does not exist: validate_lmdb says so


def validate_source(src, fmt: str | None = None, required: Sequence[str] = LABELS,
                    max_check: int | None = None, **cfg) -> int:
    """Check one fairchem dataset source of format ``fmt`` (default: :func:`detect_format`); return its
    structure count. ``cfg``: the rest of its config (``key_mapping``, ``select_args``, ...)."""
    fmt = fmt or detect_format(src)
    if fmt in LMDB_FORMATS:
        if isinstance(src, (list, tuple)):
            if len(src) != 1:
                raise DatasetValidationError(f"{src}: fairchem's LmdbDataset takes one src path, not a list")
            src = src[0]
        mapping = cfg.get("key_mapping")
        aliases = None if mapping is None else {dst: s for s, dst in mapping.items()}
        return validate_lmdb(src, required=required, max_check=max_check, aliases=aliases)
    if fmt == "ase_db":
        return validate_ase_db(src, required=required, max_check=max_check, select_args=cfg.get("select_args"),
                               connect_args=cfg.get("connect_args"))
    if fmt in ASE_FILE_FORMATS:
        if "pattern" not in cfg:  # a bare file or folder (the CLI): fairchem wants a folder and a glob
            from leignn_ocp.evaluation.byo import dataset_config

            try:
                cfg = {**dataset_config(src, fmt), **cfg}
            except FileNotFoundError as exc:
                raise DatasetValidationError(str(exc)) from exc
            src = cfg.pop("src")
        return validate_ase_files({**cfg, "format": fmt, "src": str(src)}, required=required, max_check=max_check)
    raise DatasetValidationError(f"{src}: format {fmt!r} has no checker (lmdb, ase_db, ase_read, ase_read_multi)")


def split_configs(dataset_cfg: dict | list) -> dict[str, dict]:
    """{split: config} as fairchem's BaseTrainer builds them: val and test start from a copy of the
    train config unless they set ``use_train_settings: False``; a split whose own block has no ``src``
    is left out (fairchem builds no dataset for it)."""
    if isinstance(dataset_cfg, list):
        dataset_cfg = dict(zip(SPLITS, dataset_cfg))
    elif "src" in dataset_cfg:  # the old flat form: the train set only
        dataset_cfg = {"train": dataset_cfg}
    train = dict(dataset_cfg.get("train") or {})
    out = {}
    for split in SPLITS:
        own = dict(dataset_cfg.get(split) or {})
        if "src" in own:  # fairchem builds a split only when its own block names a src
            out[split] = own if split == "train" or not own.get("use_train_settings", True) else {**train, **own}
    return out


def validate_dataset_config(
    dataset_cfg: dict | list,
    max_check: int | None = None,
    required: Sequence[str] = LABELS,
    test_required: Sequence[str] = (),
) -> dict[str, int]:
    """Check every source of fairchem's ``dataset`` config block before the trainer opens it.

    Returns {split: number of structures}. Raises ValueError (:class:`DatasetValidationError`)
    starting ``dataset.<split> (<format>)`` and naming the file and structure. train and val need the
    ``required`` labels, test only ``test_required`` (OC20's test LMDBs are unlabelled); labels present
    are checked either way. ``max_check``: structures per file (spread evenly), ``None`` = all.
    Call it before any LmdbDataset is built: py-lmdb allows one handle per file and process.
    """
    counts = {}
    for split, cfg in split_configs(dataset_cfg).items():
        fmt = cfg.get("format", "lmdb")
        need = tuple(test_required if split == "test" else required)
        where = f"dataset.{split} ({fmt}, {cfg['src']})"
        if fmt == "ase_db" or fmt in ASE_FILE_FORMATS:
            a2g = cfg.get("a2g_args") or {}
            off = [k for k in need if a2g.get(f"r_{k}") is not True]
            if off:
                raise DatasetValidationError(
                    f"{where}: a2g_args.{' and a2g_args.'.join(f'r_{k}' for k in off)} not True, so fairchem "
                    f"reads no {' and no '.join(off)} from it (set --dataset.{split}.a2g_args.r_{off[0]}=True)")
        if fmt not in (*LMDB_FORMATS, "ase_db", *ASE_FILE_FORMATS):
            log.warning("%s: format %r has no checker; not validated", where, fmt)
            continue
        extra = {k: v for k, v in cfg.items() if k not in ("src", "format")}
        if fmt in LMDB_FORMATS:
            extra["key_mapping"] = extra.get("key_mapping") or {}  # none: fairchem renames nothing (y stays y)
        try:
            counts[split] = validate_source(cfg["src"], fmt, required=need, max_check=max_check, **extra)
        except DatasetValidationError as exc:
            raise DatasetValidationError(f"dataset.{split} ({fmt}): {exc}") from exc
    return counts
