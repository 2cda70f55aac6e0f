from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def emt_slab_frames(n: int, seed: int, adsorbates=("O",), vacuum: float = 5.0, height: float = 1.6,
                    rattle: float = 0.08):
    """Rattled 2x2x3 Cu / Pt (111) and (100) slabs with an adsorbate on top (cycling through
    ``adsorbates``), bottom layer fixed, tags 1 slab / 2 adsorbate, labelled by ASE's EMT."""
    import numpy as np
    from ase.build import add_adsorbate, fcc100, fcc111, molecule
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        slab = (fcc111 if k % 2 else fcc100)(["Cu", "Pt"][k % 3 == 0], size=(2, 2, 3), vacuum=vacuum)
        n_slab = len(slab)
        ads = adsorbates[k % len(adsorbates)]
        add_adsorbate(slab, molecule(ads) if len(ads) > 1 else ads, height, "ontop")
        slab.set_tags([1] * n_slab + [2] * (len(slab) - n_slab))
        z0 = slab.positions[:n_slab, 2].min()
        slab.set_constraint(FixAtoms(indices=[a.index for a in slab[:n_slab] if a.position[2] < z0 + 0.5]))
        slab.rattle(rattle, seed=int(rng.integers(1 << 30)))
        slab.pbc = True
        slab.calc = EMT()
        slab.get_potential_energy()
        frames.append(slab)
    return frames


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
