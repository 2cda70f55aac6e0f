"""Deterministic random splits of any fairchem S2EF LMDB folder (the LEIGNN paper's protocol).

The paper trains on OC20 S2EF-200K split 8:2 into train / internal validation, and on a 50K subset
(25 % of 200K) split the same way. Records are copied byte-for-byte (no re-pickling), streamed in
source order, so a 200K split needs little memory; outputs are written atomically with metadata.npz.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np

from .lmdb_io import MAP_SIZE, atomic_dir, iter_raw_lmdb_dir, validate_lmdb, write_metadata_npz


class _Writer:
    """Streams records into ``dir/data.lmdb`` (keys 0..n-1 + ``length``) and ``metadata.npz``."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.env = lmdb.open(str(directory / "data.lmdb"), map_size=MAP_SIZE, subdir=False, lock=False,
                             meminit=True)
        self.txn = self.env.begin(write=True)
        self.natoms: list[int] = []

    def put(self, value: bytes, natoms: int) -> None:
        self.txn.put(f"{len(self.natoms)}".encode("ascii"), value)
        self.natoms.append(int(natoms))

    def close(self) -> int:
        self.txn.put(b"length", pickle.dumps(len(self.natoms), protocol=4))
        self.txn.commit()
        self.env.sync()
        self.env.close()
        write_metadata_npz(self.dir / "metadata.npz", self.natoms)
        return len(self.natoms)


def _source_natoms(src: Path, n: int) -> np.ndarray | None:
    meta = (src if src.is_dir() else src.parent) / "metadata.npz"
    if meta.is_file():
        natoms = np.load(meta)["natoms"]
        if len(natoms) == n:
            return natoms
    return None


def split_indices(n: int, fractions: Sequence[float], seed: int, subset_frac: float | None = None) -> list[np.ndarray]:
    """Seeded disjoint index sets: optionally a ``subset_frac`` subset of ``range(n)``, then cut by
    ``fractions`` (e.g. (0.8, 0.2)); each set sorted (source order kept inside a split)."""
    if n <= 0:
        raise ValueError("cannot split an empty dataset")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    if subset_frac is not None:
        if not 0 < subset_frac <= 1:
            raise ValueError(f"subset_frac must be in (0, 1], got {subset_frac}")
        perm = perm[: int(round(subset_frac * n))]
    m = len(perm)
    bounds = np.round(np.cumsum([0.0, *fractions]) * m).astype(int)
    bounds[-1] = m
    # the paper lists validation second; cut it from the end so train gets any rounding remainder
    parts = [np.sort(perm[bounds[i]:bounds[i + 1]]) for i in range(len(fractions))]
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"split {i} would be empty ({m} records, fractions {list(fractions)})")
    return parts


def split_lmdb(
    src: Path | str,
    out: Path | str,
    names: Sequence[str] = ("train", "val"),
    fractions: Sequence[float] = (0.8, 0.2),
    seed: int = 0,
    subset_frac: float | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Split the S2EF LMDB at ``src`` into ``out/<name>/`` folders; return records per split.

    ``subset_frac=0.25`` first draws the paper's 50K-of-200K subset. Same (src, seed, args) ->
    byte-identical outputs. Raises ``LmdbValidationError`` for a missing/empty/corrupt ``src``.
    """
    src, out = Path(src), Path(out)
    if len(names) != len(fractions) or len(set(names)) != len(names):
        raise ValueError("names and fractions must have the same length and names must be distinct")
    n = validate_lmdb(src, required=(), max_check=1)
    parts = split_indices(n, fractions, seed, subset_frac)
    owner = np.full(n, -1, dtype=np.int64)
    for i, p in enumerate(parts):
        owner[p] = i
    natoms = _source_natoms(src, n)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writers = []
        for name in names:
            (tmp / name).mkdir()
            writers.append(_Writer(tmp / name))
        try:
            for gi, raw in iter_raw_lmdb_dir(src):
                k = owner[gi]
                if k < 0:
                    continue
                na = int(natoms[gi]) if natoms is not None else int(pickle.loads(raw).natoms)
                writers[k].put(raw, na)
        finally:
            counts = {name: w.close() for name, w in zip(names, writers)}
    return counts
