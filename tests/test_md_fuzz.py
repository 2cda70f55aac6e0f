"""MD blow-ups end the run with a named reason and a trajectory readable up to the last good frame.

Targeted cases (an atom flying off a molecule and out of a slab's box, a temperature running away,
a frame write interrupted half-way), then a seeded fuzz of ``run_md`` with cheap ASE calculators
(EMT, Lennard-Jones) and a tiny untrained LEIGNN through the project's calculator: random small
molecules, clusters, slabs and crystals, with huge timesteps, huge temperatures, or a calculator
that turns NaN / inf (or raises) from its k-th evaluation on. Every run must stop with one of the
named kinds, and every frame read back with ``ase.io.read(path, ":")`` must pass the same checks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, fcc111, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.io import read

from leignn_ocp.md.run import BLOWUP_KINDS, BlowUpMonitor, run_md

METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")


class Poisoned(Calculator):
    """``base``'s energy and forces, broken from evaluation ``at_call`` on (1 = the first): ``what`` is
    ``forces`` (NaN / inf on one atom), ``energy`` (NaN) or ``raise`` (a ValueError, as a model that
    refuses its input). Each MD step evaluates once, so evaluation k is step k - 1."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, base: Calculator, at_call: int, what: str = "forces", value: float = np.nan, atom: int = 0):
        super().__init__()
        self.base, self.at_call, self.what, self.value, self.atom = base, at_call, what, value, atom
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        if self.calls >= self.at_call and self.what == "raise":
            raise ValueError(f"refusing evaluation {self.calls}")
        a = self.atoms.copy()
        a.calc = self.base
        energy, forces = a.get_potential_energy(), a.get_forces().copy()
        if self.calls >= self.at_call:
            if self.what == "forces":
                forces[self.atom] = self.value
            else:
                energy = self.value
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}


def check_trajectory(path, summary: dict, monitor: BlowUpMonitor, start: Atoms) -> list[Atoms]:
    """The run stopped with a named kind; the file reads back whole, every frame at its step up to the
    last save before the blow-up, and each frame passes the monitor the run used."""
    assert summary["blew_up"] and summary["blowup_kind"] in BLOWUP_KINDS, summary
    assert json.loads(path.with_suffix(".json").read_text()) == summary
    frames = read(str(path), ":")
    b, s, dt = summary["blowup_step"], summary["save_every"], summary["timestep_fs"]
    expected = 0 if b == 0 else (b - 1) // s + 1  # the saves at steps 0, s, 2s, ... before step b
    assert len(frames) == summary["frames_written"] == expected, (len(frames), summary)
    mon = BlowUpMonitor(monitor.max_force, monitor.bond_threshold, monitor.min_distance, monitor.max_temperature,
                        monitor.escape_distance)
    mon.setup(start)
    for j, frame in enumerate(frames):
        assert frame.info["time_fs"] == pytest.approx(j * s * dt)
        mon.check(frame, j * s)  # finite energy / forces / positions / velocities, and every criterion
    return frames


def _run(tmp_path, atoms, calc, name="md", **kw):
    monitor = kw.pop("monitor", None) or BlowUpMonitor(max_temperature=kw.pop("max_temperature", 5000.0))
    path = tmp_path / f"{name}.traj"
    summary = run_md(atoms, calc, path, monitor=monitor, progress=False, **kw)
    return path, summary, monitor


# ----------------------------------------------------------------------------- targeted cases
def test_an_atom_flying_off_a_molecule(tmp_path):
    """A Cu4 cluster at rest and a fifth Cu 6 A away (no bond to it) leaving at 0.01 A/fs (~500 K)."""
    atoms = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.17, 0], [1.25, 0.72, 2.04]])
    atoms += Atoms("Cu", positions=[[7.25, 0.72, 0.5]])
    v = np.zeros((5, 3))
    v[4, 0] = 0.01  # A/fs
    atoms.set_velocities(v * units.Ang / units.fs)
    path, s, mon = _run(tmp_path, atoms, EMT(), ensemble="nve", timestep_fs=5.0, steps=600, save_every=10,
                        keep_velocities=True)
    assert s["blowup_kind"] == "escaped", s
    assert s["blowup_reason"].startswith("atom 4 (Cu) is ") and "it is flying off" in s["blowup_reason"]
    frames = check_trajectory(path, s, mon, atoms)
    assert frames[-1].positions[4, 0] > 14.0  # it did fly: 10 A farther than the first frame's atoms allow


def test_an_atom_leaving_a_slabs_box(tmp_path):
    """Cu(111) slab, periodic in a and b; an O 4 A above it leaving along c at 0.04 A/fs."""
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    top = slab.positions[:, 2].max()
    slab += Atoms("O", positions=[[slab.positions[-1, 0], slab.positions[-1, 1], top + 4.0]])
    slab.pbc = (True, True, False)
    v = np.zeros((len(slab), 3))
    v[-1, 2] = 0.04 * units.Ang / units.fs  # 0.04 A/fs, ~1 eV: above EMT's O-Cu pull at 4 A
    slab.set_velocities(v)
    path, s, mon = _run(tmp_path, slab, EMT(), ensemble="nve", timestep_fs=2.0, steps=600, save_every=10,
                        keep_velocities=True, max_temperature=None)
    assert s["blowup_kind"] == "escaped", s
    assert s["blowup_reason"].startswith(f"atom {len(slab) - 1} (O) left the box: ")
    assert "outside the cell along its non-periodic axis c (escape_distance 10 A)" in s["blowup_reason"]
    frames = check_trajectory(path, s, mon, slab)
    assert frames[-1].positions[-1, 2] > slab.cell[2, 2]  # already out of the box, not yet 10 A


def test_a_temperature_that_runs_away(tmp_path):
    """Langevin towards 10^4 K in bulk Cu; the monitor allows 3000 K."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    mon = BlowUpMonitor(max_force=1e9, min_distance=0.1, max_temperature=3000.0)
    path, s, _ = _run(tmp_path, atoms, EMT(), monitor=mon, ensemble="langevin", temperature_K=1e4,
                      init_temperature_K=300, friction_per_fs=0.01, timestep_fs=0.5, steps=400, save_every=4)
    assert s["blowup_kind"] == "temperature", s
    assert s["blowup_reason"].startswith("temperature ") and "above max_temperature 3000 K" in s["blowup_reason"]
    frames = check_trajectory(path, s, mon, atoms)
    assert len(frames) >= 5 and all(f.get_temperature() <= 3000.0 for f in frames)
    assert frames[-1].get_temperature() > 5 * frames[0].get_temperature()  # it was running away


@pytest.mark.parametrize("what,value,match", [("forces", np.nan, "non-finite forces (1 atoms; first atom 3 (Cu)"),
                                              ("forces", np.inf, "non-finite forces (1 atoms; first atom 3 (Cu)"),
                                              ("energy", np.nan, "non-finite energy (nan)")])
def test_nan_or_inf_from_the_calculator(tmp_path, what, value, match):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    calc = Poisoned(EMT(), at_call=14, what=what, value=value, atom=3)
    path, s, mon = _run(tmp_path, atoms, calc, ensemble="langevin", timestep_fs=1.0, steps=100, save_every=5)
    assert s["blowup_kind"] == "non_finite" and s["blowup_reason"].startswith(match), s
    # forces: seen at the step they were returned for (13); energy: at the next check (every 5 steps)
    assert s["blowup_step"] == (13 if what == "forces" else 15)
    assert len(check_trajectory(path, s, mon, atoms)) == 3  # steps 0, 5, 10


def test_nan_stops_even_without_stop_on_blowup(tmp_path):
    """stop_on_blowup=False records a blow-up and goes on, but not from NaN (there is no "on")."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    path, s, mon = _run(tmp_path, atoms, Poisoned(EMT(), at_call=9), ensemble="nve", timestep_fs=1.0, steps=50,
                        save_every=2, stop_on_blowup=False)
    assert (s["blowup_kind"], s["blowup_step"], s["steps_done"]) == ("non_finite", 8, 8)
    check_trajectory(path, s, mon, atoms)


def test_an_interrupted_frame_write_leaves_no_half_frame(tmp_path, monkeypatch):
    """Ctrl-C while ASE writes frame 3 (its positions written, its energy and forces not): the file
    is closed with frames 0-2 complete. ASE's writer alone would commit the half frame on close."""
    from ase.io import trajectory

    original = trajectory.TrajectoryWriter._write_atoms
    count = {"n": 0}

    def interrupted(self, atoms, **kwargs):
        count["n"] += 1
        if count["n"] == 4:
            trajectory.write_atoms(self.backend, atoms, write_header=False)
            raise KeyboardInterrupt
        return original(self, atoms, **kwargs)

    monkeypatch.setattr(trajectory.TrajectoryWriter, "_write_atoms", interrupted)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1))
    with pytest.raises(KeyboardInterrupt):
        run_md(atoms, EMT(), tmp_path / "cut.traj", ensemble="nve", timestep_fs=1.0, steps=20, save_every=2,
               progress=False)
    monkeypatch.undo()
    frames = read(str(tmp_path / "cut.traj"), ":")
    assert len(frames) == 3
    assert [f.info["time_fs"] for f in frames] == [0.0, 2.0, 4.0]
    assert all(np.isfinite(f.get_potential_energy()) and f.get_forces().shape == (16, 3) for f in frames)


# ----------------------------------------------------------------------------- the seeded fuzz
@dataclass
class Case:
    seed: int
    system: str
    mode: str  # "timestep" | "temperature" | "nan" | "inf" | "energy" | "raise"


SYSTEMS = ("cluster", "crystal", "slab", "molecule", "argon")
MODES = ("timestep", "temperature", "nan", "inf", "energy", "raise")
# 20 of the 30 (system, mode) pairs: every system meets 4 modes, every mode 3 or 4 systems
CASES = [Case(seed, SYSTEMS[seed % 5], MODES[(seed + 2 * (seed // 5)) % 6]) for seed in range(20)]


def _system(name: str, rng: np.random.Generator) -> tuple[Atoms, Calculator]:
    if name == "cluster":  # 4-8 metal atoms placed one by one 2.4-2.8 A from one already placed
        metal = METALS[rng.integers(len(METALS))]
        pos = [np.zeros(3)]
        while len(pos) < rng.integers(4, 9):
            p = pos[rng.integers(len(pos))] + rng.normal(size=3) / 1.0
            p = pos[-1] + (p - pos[-1]) / np.linalg.norm(p - pos[-1]) * rng.uniform(2.4, 2.8)
            if min(np.linalg.norm(p - q) for q in pos) > 2.2:
                pos.append(p)
        return Atoms(metal * len(pos), positions=pos), EMT()
    if name == "crystal":
        metal = METALS[rng.integers(len(METALS))]
        atoms = bulk(metal, "fcc", cubic=bool(rng.integers(2))).repeat(tuple(rng.integers(1, 3, size=3)))
        atoms.rattle(0.05, seed=int(rng.integers(1 << 16)))
        return atoms, EMT()
    if name == "slab":
        slab = fcc111(METALS[rng.integers(len(METALS))], size=(2, 2, 3), vacuum=6.0)
        slab.pbc = (True, True, False)
        return slab, EMT()
    if name == "molecule":
        return molecule(("H2O", "CH4", "NH3", "CO2", "C2H6", "CH3OH", "N2", "O2")[rng.integers(8)]), EMT()
    n = int(rng.integers(3, 8))  # a small argon cluster, Lennard-Jones
    atoms = Atoms(f"Ar{n}", positions=rng.normal(size=(n, 3)) * 1.0)
    while True:  # push apart until no pair is closer than 3.4 A
        d = atoms.get_all_distances() + np.eye(n) * 10
        if d.min() > 3.4:
            return atoms, LennardJones(sigma=3.4, epsilon=0.0104, rc=10.0)
        atoms.positions *= 1.1


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.seed}-{c.system}-{c.mode}")
def test_fuzz(case, tmp_path):
    rng = np.random.default_rng(1000 + case.seed)
    atoms, calc = _system(case.system, rng)
    ensemble = ("langevin", "nose-hoover", "bussi", "berendsen", "nve")[rng.integers(5)]
    save_every = int(rng.integers(1, 6))
    kw = dict(ensemble=ensemble, seed=case.seed, save_every=save_every, steps=300, timestep_fs=1.0,
              temperature_K=float(rng.uniform(100, 800)))
    at = None
    if case.mode == "timestep":
        kw.update(timestep_fs=float(rng.uniform(40, 150)), temperature_K=float(rng.uniform(500, 1500)))
    elif case.mode == "temperature":
        kw.update(temperature_K=float(10 ** rng.uniform(6, 7)), ensemble="langevin", friction_per_fs=0.1)
        kw["init_temperature_K"] = kw["temperature_K"] if rng.integers(2) else 300.0
    else:
        at = int(rng.integers(2, 40))
        what = {"nan": "forces", "inf": "forces", "energy": "energy", "raise": "raise"}[case.mode]
        calc = Poisoned(calc, at_call=at, what=what, value=np.inf if case.mode == "inf" else np.nan,
                        atom=int(rng.integers(len(atoms))))
    mon = BlowUpMonitor(max_temperature=5000.0)
    path, s, _ = _run(tmp_path, atoms, calc, monitor=mon, **kw)
    check_trajectory(path, s, mon, atoms)
    if case.mode in ("nan", "inf"):
        assert (s["blowup_kind"], s["blowup_step"]) == ("non_finite", at - 1), s
    elif case.mode == "raise":
        assert (s["blowup_kind"], s["blowup_step"]) == ("model_error", at - 1), s
        assert f"ValueError: refusing evaluation {at}" in s["blowup_reason"]
    elif case.mode == "energy":
        # the energy is read at checks and saves (every save_every steps here): the first one from step at - 1
        assert s["blowup_kind"] == "non_finite" and s["blowup_reason"] == "non-finite energy (nan)"
        assert s["blowup_step"] == -(-(at - 1) // save_every) * save_every, s


# ----------------------------------------------------------------------------- the project's calculator
@pytest.fixture(scope="module")
def leignn_calc(tmp_path_factory):
    """A tiny untrained LEIGNN (random weights) through LEIGNNCalculator."""
    from test_md import KW_MOL, _checkpoint

    from leignn_ocp.md.calculator import LEIGNNCalculator

    return LEIGNNCalculator(_checkpoint(tmp_path_factory.mktemp("leignn") / "mol.pt", KW_MOL))


@pytest.mark.parametrize("mode", ["nan", "raise", "temperature"])
def test_fuzz_leignn(mode, leignn_calc, tmp_path):
    rng = np.random.default_rng({"nan": 1, "raise": 2, "temperature": 3}[mode])
    atoms = molecule(("CH3CH2OH", "H2O", "CH4")[rng.integers(3)])
    at = int(rng.integers(3, 12))
    calc = leignn_calc if mode == "temperature" else Poisoned(leignn_calc, at_call=at, what={"nan": "forces"}.get(
        mode, "raise"))
    mon = BlowUpMonitor(max_temperature=5000.0)
    kw = dict(ensemble="langevin", timestep_fs=0.5, steps=40, save_every=int(rng.integers(1, 4)), seed=int(at),
              temperature_K=1e7 if mode == "temperature" else 300.0, friction_per_fs=0.1)
    path, s, _ = _run(tmp_path, atoms, calc, monitor=mon, **kw)
    check_trajectory(path, s, mon, atoms)
    if mode != "temperature":
        assert (s["blowup_kind"], s["blowup_step"]) == ({"nan": "non_finite"}.get(mode, "model_error"), at - 1), s


def test_leignn_md_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    """``leignn-md`` (its main) on a truncated checkpoint: status 2, the file and the problem on stderr,
    no trajectory started."""
    from test_md import KW_MOL, _checkpoint

    from leignn_ocp.md.run import EXIT_BAD_CHECKPOINT, main

    good = _checkpoint(tmp_path / "mol.pt", KW_MOL)
    half = tmp_path / "half.pt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    molecule("H2O").write(tmp_path / "start.traj")
    out = tmp_path / "md.traj"
    rc = main(["--checkpoint", str(half), "--structure", str(tmp_path / "start.traj"), "--out", str(out),
               "--steps", "5", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_CHECKPOINT == 2
    assert err.startswith(f"leignn-md: checkpoint {half} cannot be read: it starts as a torch archive but its end")
    assert "is truncated" in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".json").exists()
