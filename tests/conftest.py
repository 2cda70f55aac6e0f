from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_s2ef_lmdb(frames, path: Path) -> None:
    """ASE frames (with EMT labels) -> a fairchem S2EF LMDB folder: fairchem's own AtomsToGraphs,
    the package's atomic writer; sid = frame index, fid = 0."""
    from fairchem.core.preprocessing import AtomsToGraphs

    from leignn_ocp.data import write_lmdb_dir

    a2g = AtomsToGraphs(r_energy=True, r_forces=True, r_fixed=True, r_edges=False, r_distances=False)
    data = []
    for i, atoms in enumerate(frames):
        d = a2g.convert(atoms)
        d.sid, d.fid = i, 0
        data.append(d)
    write_lmdb_dir(path, data)


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
