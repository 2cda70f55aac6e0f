"""Fixtures shared by the test modules; the builders live in leignn_ocp.testing (one of each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leignn_ocp import testing
from leignn_ocp.testing import emt_slab_frames, fairchem_cli, write_s2ef_lmdb  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment for a test's subprocess (two threads unless set, the repository importable)."""
    return testing.cli_env(REPO)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
