"""Offline OC20-style S2EF data: generator, LMDB I/O and validation, OC20 split tools; the console
commands leignn-generate-data (cli.py) and leignn-oc20-data (oc20.py)."""

from .lmdb_io import LmdbValidationError, dumps_deterministic, iter_raw_lmdb_dir, validate_lmdb, write_lmdb_dir
from .generate import SPLITS, GenConfig, existing_matches
from .generate import generate as generate_dataset

__all__ = [
    "SPLITS",
    "GenConfig",
    "LmdbValidationError",
    "dumps_deterministic",
    "existing_matches",
    "generate_dataset",
    "iter_raw_lmdb_dir",
    "validate_lmdb",
    "write_lmdb_dir",
]
