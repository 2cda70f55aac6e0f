"""Reading, writing and checking S2EF LMDB folders in the layout fairchem's ``LmdbDataset`` reads.

A dataset folder holds ``*.lmdb`` files (keys: ascii ints from 0, plus ``length``; values: pickled
``torch_geometric.data.Data``) and ``metadata.npz`` with ``natoms`` per structure (what fairchem's
``make_lmdb_sizes`` script writes, read by its load-balancing sampler and ``max_atoms`` filter).

Writes are deterministic (same structures -> byte-identical files) and atomic (a temp folder renamed
into place at the end), so a crash never leaves a half-written dataset behind.

:func:`validate_lmdb` checks a folder the way LmdbDataset will read it, before it does: fairchem
trusts the file header, the ``length`` key and every record, so a bad file otherwise shows up as a
SIGBUS, a silently shorter dataset, a crash mid-epoch or a NaN loss (``leignn_ocp.data.validate``
checks whole dataset configs and ASE databases).
"""

from __future__ import annotations

import io
import math
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
    "DatasetValidationError",
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


class DatasetValidationError(ValueError):
    """A dataset (any format) that cannot be used for S2EF training or evaluation."""


class LmdbValidationError(DatasetValidationError):
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
    """Read-only handle, refused for a truncated file: LMDB maps the file and trusts its header, so
    reading a page past the end kills the process with SIGBUS (no Python error at all)."""
    try:
        env = lmdb.open(str(db_path), subdir=False, readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=1)
    except lmdb.Error as exc:
        if "already open" in str(exc):  # py-lmdb allows one handle per file and process
            raise RuntimeError(f"{db_path} is already open in this process (validate before building "
                               "the dataset, or drop the LmdbDataset first)") from exc
        raise LmdbValidationError(f"cannot open {db_path} as an LMDB file ({exc}); corrupt or not LMDB") from exc
    # the meta page (read at open) names the last page written; the file must reach its end
    need = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    size = db_path.stat().st_size
    if size < need:
        env.close()
        raise LmdbValidationError(
            f"{db_path} is truncated: {size} bytes, but its LMDB header says {need} (an interrupted copy or "
            "download?); reading it would kill the process with SIGBUS")
    return env


def _num_entries(env: lmdb.Environment, db_path: Path) -> int:
    """Record count as LmdbDataset computes it: the ``length`` key if present, else all entries."""
    try:
        with env.begin() as txn:
            raw = txn.get(b"length")
    except lmdb.Error as exc:
        raise LmdbValidationError(f"{db_path}: corrupt LMDB ({type(exc).__name__}: {exc})") from exc
    if raw is None:
        return int(env.stat()["entries"])
    try:
        return int(pickle.loads(raw))
    except Exception as exc:
        raise LmdbValidationError(f"{db_path}: unreadable 'length' entry ({exc})") from exc


def _check_keys(env: lmdb.Environment, db_path: Path) -> int:
    """The record count, after checking that the keys are exactly ``0..n-1`` (+ ``length``).

    LmdbDataset trusts ``length``: a larger one crashes training at the first missing key (unpickling
    None), a smaller one silently drops the records past it. Looks keys up one by one without copying
    the values (a cursor walk over corrupt pages can abort the process inside liblmdb).
    """
    n = _num_entries(env, db_path)
    try:
        with env.begin(buffers=True) as txn:
            has_length = txn.get(b"length") is not None
            records = int(env.stat()["entries"]) - has_length
            if n != records:
                raise LmdbValidationError(
                    f"{db_path}: 'length' key says {n} records but the file holds {records} (fairchem's "
                    f"LmdbDataset reads keys 0..{n - 1}: " + ("it would crash on a missing key)" if n > records
                                                              else f"{records - n} records would be silently skipped)"))
            for k in range(n):
                if txn.get(f"{k}".encode("ascii")) is None:  # same count, so some other key holds a record
                    raise LmdbValidationError(
                        f"{db_path}: key {k} missing: the {n} records are not under keys 0..{n - 1} (fairchem's "
                        f"LmdbDataset would crash at index {k} and never read the record under the other key)")
    except lmdb.Error as exc:
        raise LmdbValidationError(f"{db_path}: corrupt LMDB ({type(exc).__name__}: {exc})") from exc
    return n


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


# fields a record must hold as ``torch.Tensor`` (when present), one dtype across the dataset:
# a batch of records with mixed dtypes fails (or silently upcasts) only deep inside the model
TENSOR_FIELDS = ("pos", "cell", "forces", "force", "atomic_numbers", "tags", "fixed")
MAX_Z = 118


def _keys(data) -> set[str]:
    return set(data._store.keys())


def _natoms(data) -> int | None:
    """``natoms`` as an int, or None when it is not one positive integer."""
    value = data["natoms"]
    try:
        t = torch.as_tensor(value)
    except Exception:
        return None
    if t.numel() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or int(t) < 1:
        return None
    return int(t)


def _label_problem(data, key: str, keys: set[str] | None = None, natoms: int | None = None) -> str | None:
    """Why ``data[key]`` is not a usable S2EF field, or None (``"missing"`` when absent).
    ``keys`` / ``natoms``: the record's, when the caller has them already (computed here otherwise)."""
    keys = _keys(data) if keys is None else keys
    if key not in keys or data[key] is None:
        return "missing"
    value = data[key]
    if natoms is None and "natoms" in keys:
        natoms = _natoms(data)
    if key == "natoms":
        return None if natoms is not None else f"not one positive integer ({value!r})"
    if key in TENSOR_FIELDS and not isinstance(value, torch.Tensor):
        return f"a {type(value).__module__}.{type(value).__name__}, not a torch.Tensor"
    if key in ("forces", "force", "pos"):
        t = value
        if t.dim() != 2 or t.shape[1] != 3 or (natoms is not None and t.shape[0] != natoms):
            return f"shape {tuple(t.shape)}, expected [natoms={natoms}, 3]"
        if not t.is_floating_point():
            return f"of dtype {t.dtype}, expected floating point"
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0])
            return f"non-finite values (atom {bad}: {t[bad].tolist()})"
    elif key == "atomic_numbers":
        t = value
        if t.dim() != 1 or (natoms is not None and t.shape[0] != natoms):
            return f"shape {tuple(t.shape)}, expected [natoms={natoms}]"
        if t.is_floating_point():
            if not torch.isfinite(t).all() or (t != t.round()).any():
                bad = int((~torch.isfinite(t) | (t != t.round())).nonzero()[0])
                return f"not whole numbers (atom {bad}: {float(t[bad])!r}; fairchem's .long() would truncate it)"
        elif t.dtype == torch.bool or t.is_complex():
            return f"of dtype {t.dtype}"
        if ((t < 1) | (t > MAX_Z)).any():
            bad = int(((t < 1) | (t > MAX_Z)).nonzero()[0])
            return f"out of range (atom {bad}: {t[bad].item()!r}, expected 1..{MAX_Z})"
    elif key == "cell":
        if value.shape not in ((1, 3, 3), (3, 3)) or not value.is_floating_point():
            return f"shape {tuple(value.shape)} dtype {value.dtype}, expected floating [1, 3, 3]"
        if not torch.isfinite(value).all():
            return "non-finite values"
    elif key in ("tags", "fixed"):
        if value.dim() != 1 or (natoms is not None and value.shape[0] != natoms):
            return f"shape {tuple(value.shape)}, expected [natoms={natoms}]"
    elif key in ("energy", "y"):
        if isinstance(value, float):  # the usual case, fast
            return None if math.isfinite(value) else f"not one finite number ({value!r})"
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except Exception:
            t = None
        if t is None or t.numel() != 1 or not torch.isfinite(t).all():
            return f"not one finite number ({value!r})"
    return None


def _dtypes(data) -> dict[str, str]:
    """{field: type/dtype} of the tensor fields a record holds (compared across records)."""
    keys = data._store
    return {k: str(data[k].dtype) if isinstance(data[k], torch.Tensor) else type(data[k]).__name__
            for k in TENSOR_FIELDS if k in keys and data[k] is not None}


def _as_data(obj):
    """The record as fairchem's LmdbDataset sees it (PyG 1.x pickles, as in OC20's LMDBs, converted
    by fairchem's ``pyg2_data_transform``), or None when it is not a ``Data`` at all."""
    from fairchem.core.common.utils import pyg2_data_transform
    from torch_geometric.data import Data

    try:
        obj = pyg2_data_transform(obj)
    except Exception:
        return None
    return obj if isinstance(obj, Data) else None


def _record_problem(data, required: Sequence[str], aliases: dict[str, str]) -> str | None:
    """Why one record (a ``Data``) is unusable for S2EF, or None. Labels not required are checked
    when present."""
    keys = _keys(data)
    problem = _label_problem(data, "natoms", keys)
    if problem is not None:
        return "has no 'natoms'" if problem == "missing" else f"'natoms' is {problem}"
    natoms = _natoms(data)
    for field in ("pos", "atomic_numbers"):
        problem = _label_problem(data, field, keys, natoms)
        if problem == "missing":
            return f"has no '{field}'"
        if problem is not None:
            return f"'{field}' is {problem}"
    for field in ("cell", "tags", "fixed"):
        if field in keys and data[field] is not None:
            problem = _label_problem(data, field, keys, natoms)
            if problem is not None:
                return f"'{field}' is {problem}"
    for key in ("energy", "forces"):
        alt = aliases.get(key)
        name, problem = f"'{key}'", _label_problem(data, key, keys, natoms)
        if problem == "missing" and alt is not None:
            name, problem = f"'{key}' (or '{alt}')", _label_problem(data, alt, keys, natoms)
        if problem == "missing" and key not in required:
            continue
        if problem is not None:
            return f"label {name} is {problem}"
    return None


def _sample(n: int, max_check: int | None) -> list[int]:
    """All of ``0..n-1``, or ``max_check`` of them spread evenly (first and last included)."""
    if max_check is None or max_check >= n:
        return list(range(n))
    if max_check <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_check)})


def _metadata_natoms(path: Path) -> tuple[Path, np.ndarray] | None:
    """``metadata.npz`` where fairchem looks for it (next to a file src, inside a folder src)."""
    meta = (path.parent if path.is_file() else path) / "metadata.npz"
    if not meta.is_file():
        return None
    try:
        with np.load(meta, allow_pickle=False) as z:
            return meta, np.asarray(z["natoms"])
    except Exception as exc:
        raise LmdbValidationError(f"{meta}: unreadable natoms ({type(exc).__name__}: {exc})") from exc


def validate_lmdb(
    path: Path | str,
    required: Sequence[str] = ("energy", "forces"),
    max_check: int | None = 256,
    aliases: dict[str, str] | None = None,
) -> int:
    """Check an S2EF LMDB path before training; return the number of structures.

    Raises :class:`LmdbValidationError` naming the file and record (and the dataset index, where a
    folder holds several files): missing path, no ``*.lmdb`` files, a file that is not LMDB or is
    truncated, a ``length`` key that disagrees with the records, zero records, an unpicklable record,
    a record without ``pos``/``atomic_numbers``/``natoms`` or a required label, wrong shapes, NaN/inf
    positions or labels, int forces, non-integer atomic numbers, dtypes that differ between records,
    and a ``metadata.npz`` whose natoms disagree with the records.

    Headers, ``length`` and keys are checked in every file; records: ``max_check`` per file spread
    evenly (first and last included), or all of them with ``None``. Labels not in ``required`` are
    checked when present. ``aliases`` accepts OC20's raw key names (default ``y`` for energy,
    ``force`` for forces).
    """
    aliases = {"energy": "y", "forces": "force"} if aliases is None else aliases
    path = Path(path)
    files = lmdb_files(path)
    meta = _metadata_natoms(path)
    total = 0
    first: tuple[str, dict[str, str]] | None = None  # (where, dtypes) of the first record checked
    for db_path in files:
        env = _open_ro(db_path)
        try:
            n = _check_keys(env, db_path)
            with env.begin() as txn:
                for k in _sample(n, max_check):
                    gi = total + k
                    where = f"{db_path}: record {k}" + (f" (dataset index {gi})" if gi != k else "")
                    try:
                        raw = txn.get(f"{k}".encode("ascii"))
                    except lmdb.Error as exc:
                        raise LmdbValidationError(f"{where} cannot be read ({exc}); corrupt LMDB") from exc
                    if raw is None:
                        raise LmdbValidationError(f"{where} missing (length says {n})")
                    try:
                        data = pickle.loads(raw)
                    except Exception as exc:
                        raise LmdbValidationError(f"{where} cannot be unpickled ({type(exc).__name__}: {exc})") from exc
                    record = _as_data(data)
                    if record is None:
                        raise LmdbValidationError(f"{where} is a {type(data).__module__}.{type(data).__name__}, "
                                                  "not a torch_geometric Data")
                    data = record
                    problem = _record_problem(data, required, aliases)
                    if problem is not None:
                        raise LmdbValidationError(f"{where} {problem}")
                    dtypes = _dtypes(data)
                    if first is None:
                        first = (where, dtypes)
                    for field, dt in dtypes.items():
                        if field in first[1] and first[1][field] != dt:
                            raise LmdbValidationError(
                                f"{where} '{field}' is {dt} but {first[0]} has {first[1][field]} (mixed "
                                "dtypes: batching them fails or silently changes precision; rewrite the records)")
                    if meta is not None and gi < len(meta[1]) and int(meta[1][gi]) != _natoms(data):
                        raise LmdbValidationError(f"{meta[0]}: natoms[{gi}] = {int(meta[1][gi])} but {where} has "
                                                  f"{_natoms(data)} atoms (stale metadata.npz: rerun make_lmdb_sizes)")
            total += n
        finally:
            env.close()
    if total == 0:
        raise LmdbValidationError(f"{path}: LMDB files hold no records")
    if meta is not None and len(meta[1]) != total:
        raise LmdbValidationError(f"{meta[0]}: natoms has {len(meta[1])} entries but the LMDB files hold {total} "
                                  "records (stale metadata.npz: rerun make_lmdb_sizes; fairchem asserts on it)")
    return total
