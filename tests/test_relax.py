"""leignn_ocp.md.relax: relaxations that converge, and the ones that go wrong, say so."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import read, write

from leignn_ocp.md.relax import RelaxationError, relax
from leignn_ocp.testing import REPO, cli_env, oc20_slab, untrained_checkpoint


class Wrong(Calculator):
    """EMT with its forces flipped (an optimizer then climbs), or NaN from step ``nan_at`` on."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, flip: bool = False, nan_at: int | None = None):
        super().__init__()
        self.flip, self.nan_at, self.calls, self.emt = flip, nan_at, 0, EMT()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.emt
        e, f = a.get_potential_energy(), a.get_forces(apply_constraint=False)
        self.calls += 1
        if self.nan_at is not None and self.calls > self.nan_at:
            e = float("nan")
        self.results = {"energy": e, "forces": -f if self.flip else f}


def slab():
    return oc20_slab((2, 2, 3), ads="O")


def test_emt_relaxation_converges_downhill_and_keeps_fixed_atoms(tmp_path):
    atoms = slab()
    fixed = atoms.constraints[0].get_indices()
    start = atoms.positions[fixed].copy()
    r = relax(atoms, EMT(), "bfgs", fmax=0.05, steps=200, trajectory=tmp_path / "r.traj", reference=EMT())
    assert r.converged and r.fmax < 0.05 and not r.problems
    assert r.energies[-1] < r.energies[0] and r.reference_lowered
    assert np.array_equal(atoms.positions[fixed], start)
    frames = read(tmp_path / "r.traj", ":")
    assert len(frames) == r.steps + 1 == len(r.energies)
    assert frames[-1].get_potential_energy() == pytest.approx(r.energies[-1])


def test_step_cap_is_reported():
    r = relax(slab(), EMT(), "fire", fmax=0.01, steps=3)
    assert not r.converged and r.steps == 3
    assert r.problems[0].startswith("not converged: max free-atom force") and "after 3 steps" in r.problems[0]


def test_forces_that_climb_are_reported_uphill():
    r = relax(slab(), Wrong(flip=True), "fire", fmax=0.05, steps=20, reference=EMT())
    assert r.uphill and r.energies[-1] > r.energies[0]
    assert any(p.startswith("uphill in the model's own energy: +") for p in r.problems)
    assert r.reference_lowered is False and any("reference energy went up" in p for p in r.problems)


def test_nan_stops_with_the_steps_before_on_disk(tmp_path):
    with pytest.raises(RelaxationError, match=r"non-finite energy at step \d+; the trajectory holds the steps before"):
        relax(slab(), Wrong(nan_at=6), "bfgs", fmax=0.01, steps=50, trajectory=tmp_path / "r.traj")
    frames = read(tmp_path / "r.traj", ":")
    assert 1 <= len(frames) <= 6 and all(np.isfinite(f.get_potential_energy()) for f in frames)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"optimizer must be one of \['bfgs', 'fire'\], got 'lbfgs'"):
        relax(slab(), EMT(), "lbfgs")
    with pytest.raises(ValueError, match=r"fmax > 0, got steps=10, fmax=0"):
        relax(slab(), EMT(), fmax=0, steps=10)


@pytest.mark.slow
def test_cli_with_a_leignn_checkpoint(tmp_path):
    """The console script on a (tiny, untrained) LEIGNN checkpoint: it must end, write the trajectory
    and the summary, and say what went wrong (an untrained model does not converge)."""
    ckpt = untrained_checkpoint(tmp_path / "c.pt", dict(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=4.0,
                                                        max_neighbors=30, use_pbc=True, zero_init_energy=False))
    write(tmp_path / "start.traj", slab())
    p = subprocess.run([sys.executable, "-m", "leignn_ocp.md.relax", "--checkpoint", str(ckpt), "--structure",
                        str(tmp_path / "start.traj"), "--out", str(tmp_path / "out.traj"), "--steps", "5", "--fmax", "1e-4",
                        "--reference", "emt"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr[-3000:]
    assert "NOT converged in 5 steps" in p.stdout and "WARNING: not converged" in p.stdout
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["steps"] == 5 and len(summary["energies"]) == 6
    assert summary["reference_initial"] is not None
    assert len(read(tmp_path / "out.traj", ":")) == 6
