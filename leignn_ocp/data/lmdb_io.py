"""Reading, writing and checking S2EF LMDB folders in the layout fairchem's ``LmdbDataset`` reads.

A dataset folder holds ``*.lmdb`` files (keys: ascii ints from 0, plus ``length``; values: pickled
``torch_geometric.data.Data``) and ``metadata.npz`` with ``natoms`` per structure (what fairchem's
``make_lmdb_sizes`` script writes, read by its load-balancing sampler and ``max_atoms`` filter).

Writes are deterministic (same structures -> byte-identical files) and atomic (a temp folder renamed
into place at the end), so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import lmdb
import numpy as np
import torch

__all__ = [
    "LmdbValidationError",
    "dumps_deterministic",
    "write_lmdb_dir",
    "write_raw_lmdb_dir",
    "write_metadata_npz",
    "iter_raw_lmdb_dir",
    "lmdb_files",
    "validate_lmdb",
    "atomic_dir",
]

# generous virtual address reservation; LMDB files only grow to the pages actually written on Linux
MAP_SIZE = 1 << 40


class LmdbValidationError(ValueError):
    """An LMDB dataset path that cannot be used for S2EF training or evaluation."""


class _TensorAsNumpyPickler(pickle.Pickler):
    """Pickles tensors through numpy: ``pickle.dumps(tensor)`` embeds storage memory addresses
    (torch's legacy storage keys), so the same data would give different bytes in every process."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return torch.from_numpy, (np.ascontiguousarray(obj.detach().cpu().numpy()),)
        return NotImplemented


def dumps_deterministic(obj) -> bytes:
    """``pickle.dumps`` whose bytes depend only on the values (readable by plain ``pickle.loads``)."""
    buf = io.BytesIO()
    _TensorAsNumpyPickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


def write_metadata_npz(path: Path, natoms: Sequence[int]) -> None:
    """``metadata.npz`` as fairchem's make_lmdb_sizes writes it (``natoms`` int32, one per structure),
    but with fixed zip timestamps so the file is byte-reproducible (``np.savez`` stamps the clock)."""
    arr = np.asarray(natoms, dtype=np.int32)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    info = zipfile.ZipInfo("natoms.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(info, buf.getvalue())


class atomic_dir:
    """Context manager: yields a temp folder next to ``final``; on success replaces ``final`` with it,
    on error removes it. ``final`` is never seen half-written."""

    def __init__(self, final: Path | str, overwrite: bool = True):
        self.final = Path(final)
        self.overwrite = overwrite
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        if self.final.exists() and not self.overwrite:
            raise FileExistsError(f"{self.final} exists (pass overwrite/--force to replace it)")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _write_values(db_path: Path, values: Iterable[bytes]) -> int:
    """One write transaction, keys 0..n-1 then ``length``: same values -> same file bytes
    (``meminit`` stays on so no uninitialised page bytes reach the file, no lock file is made)."""
    env = lmdb.open(str(db_path), map_size=MAP_SIZE, subdir=False, lock=False, meminit=True, sync=True)
    n = 0
    try:
        with env.begin(write=True) as txn:
            for n, value in enumerate(values, start=1):
                txn.put(f"{n - 1}".encode("ascii"), value)
            txn.put(b"length", pickle.dumps(n, protocol=4))
        env.sync()
    finally:
        env.close()
    return n


def write_lmdb_dir(out_dir: Path | str, data_list: Sequence, overwrite: bool = True) -> Path:
    """Atomically write ``data_list`` (``Data`` objects) as ``out_dir/data.lmdb`` + ``metadata.npz``."""
    out_dir = Path(out_dir)
    if len(data_list) == 0:
        raise ValueError(f"refusing to write an empty dataset to {out_dir}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_values(tmp / "data.lmdb", (dumps_deterministic(d) for d in data_list))
        write_metadata_npz(tmp / "metadata.npz", [int(d.natoms) for d in data_list])
    return out_dir


def write_raw_lmdb_dir(
    out_dir: Path | str, values: Sequence[bytes], natoms: Sequence[int], overwrite: bool = True
) -> Path:
    """Like :func:`write_lmdb_dir` for already-pickled values (copies records without re-pickling)."""
    out_dir = Path(out_dir)
    if len(values) != len(natoms):
        raise ValueError(f"{len(values)} records but {len(natoms)} natoms entries")
    if len(values) == 0:
        raise ValueError(f"refusing to write an empty dataset to {out_dir}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_values(tmp / "data.lmdb", values)
        write_metadata_npz(tmp / "metadata.npz", natoms)
    return out_dir


def lmdb_files(path: Path | str) -> list[Path]:
    """The ``*.lmdb`` files fairchem's LmdbDataset would open for ``src: path`` (dir or single file)."""
    path = Path(path)
    if not path.exists():
        raise LmdbValidationError(f"LMDB path does not exist: {path}")
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.lmdb"))
    if not files:
        raise LmdbValidationError(f"no *.lmdb files in {path} (empty or not an S2EF LMDB folder)")
    return files


def _open_ro(db_path: Path) -> lmdb.Environment:
    try:
        return lmdb.open(str(db_path), subdir=False, readonly=True, lock=False, readahead=False,
                         meminit=False, max_readers=1)
    except lmdb.Error as exc:
        if "already open" in str(exc):  # py-lmdb allows one handle per file and process
            raise RuntimeError(f"{db_path} is already open in this process (validate before building "
                               "the dataset, or drop the LmdbDataset first)") from exc
        raise LmdbValidationError(f"cannot open {db_path} as an LMDB file ({exc}); corrupt or not LMDB") from exc


def _num_entries(env: lmdb.Environment, db_path: Path) -> int:
    """Record count as LmdbDataset computes it: the ``length`` key if present, else all entries."""
    with env.begin() as txn:
        raw = txn.get(b"length")
    if raw is None:
        return int(env.stat()["entries"])
    try:
        return int(pickle.loads(raw))
    except Exception as exc:
        raise LmdbValidationError(f"{db_path}: unreadable 'length' entry ({exc})") from exc


def iter_raw_lmdb_dir(path: Path | str):
    """Yield ``(global_index, pickled_bytes)`` in LmdbDataset's order (files sorted, keys 0..n-1)."""
    gi = 0
    for db_path in lmdb_files(path):
        env = _open_ro(db_path)
        try:
            n = _num_entries(env, db_path)
            with env.begin() as txn:
                for k in range(n):
                    raw = txn.get(f"{k}".encode("ascii"))
                    if raw is None:
                        raise LmdbValidationError(f"{db_path}: key {k} missing (length says {n})")
                    yield gi, raw
                    gi += 1
        finally:
            env.close()


def _label_problem(data, key: str) -> str | None:
    """Why ``data[key]`` is not a usable S2EF label, or None."""
    store = getattr(data, "_store", None)
    keys = set(store.keys()) if store is not None else set(vars(data))
    if key not in keys or data[key] is None:
        return "missing"
    value = data[key]
    natoms = int(data["natoms"]) if "natoms" in keys else None
    if key in ("forces", "force"):
        t = torch.as_tensor(value)
        if t.dim() != 2 or t.shape[1] != 3 or (natoms is not None and t.shape[0] != natoms):
            return f"shape {tuple(t.shape)}, expected [natoms={natoms}, 3]"
        if not torch.isfinite(t).all():
            return "non-finite values"
    elif key in ("energy", "y"):
        t = torch.as_tensor(value, dtype=torch.float64)
        if t.numel() != 1 or not torch.isfinite(t).all():
            return f"not one finite number ({value!r})"
    return None


def validate_lmdb(
    path: Path | str,
    required: Sequence[str] = ("energy", "forces"),
    max_check: int | None = 256,
    aliases: dict[str, str] | None = None,
) -> int:
    """Check an S2EF LMDB path before training; return the number of structures.

    Raises :class:`LmdbValidationError` naming the problem: missing path, no ``*.lmdb`` files, a file
    that is not LMDB, zero records, an unpicklable record, a record without ``pos``/``atomic_numbers``/
    ``natoms`` or without a required label (checks the first ``max_check`` records per file; ``None``
    = all). ``aliases`` accepts OC20's raw key names (default ``y`` for energy, ``force`` for forces).
    """
    aliases = {"energy": "y", "forces": "force"} if aliases is None else aliases
    total = 0
    for db_path in lmdb_files(path):
        env = _open_ro(db_path)
        try:
            n = _num_entries(env, db_path)
            total += n
            with env.begin() as txn:
                for k in range(n if max_check is None else min(n, max_check)):
                    raw = txn.get(f"{k}".encode("ascii"))
                    if raw is None:
                        raise LmdbValidationError(f"{db_path}: record {k} missing (length says {n})")
                    try:
                        data = pickle.loads(raw)
                    except Exception as exc:
                        raise LmdbValidationError(f"{db_path}: record {k} cannot be unpickled ({exc})") from exc
                    for field in ("pos", "atomic_numbers", "natoms"):
                        if _label_problem(data, field) == "missing":
                            raise LmdbValidationError(f"{db_path}: record {k} has no '{field}'")
                    for key in required:
                        problem = _label_problem(data, key)
                        alt = aliases.get(key)
                        if problem == "missing" and alt is not None:
                            problem = _label_problem(data, alt)
                            key = f"{key}' (or '{alt}"
                        if problem is not None:
                            raise LmdbValidationError(f"{db_path}: record {k} label '{key}' is {problem}")
        finally:
            env.close()
    if total == 0:
        raise LmdbValidationError(f"{path}: LMDB files hold no records")
    return total
