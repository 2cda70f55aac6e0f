from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fairchem_cli() -> str:
    """The `fairchem` console script of the interpreter running the tests."""
    exe = BIN / "fairchem"
    if not exe.exists():
        pytest.fail(f"fairchem console script not found next to {sys.executable}")
    return str(exe)


def cli_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
