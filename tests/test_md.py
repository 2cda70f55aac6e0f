"""MD with LEIGNN: calculator, MD driver, and the MDSim metrics on constructed cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import read

from leignn_ocp.md import metrics as M

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures
def _checkpoint(path: Path, model_kwargs: dict, energy=(-5.0, 2.0), forces_rmsd=0.5, seed=0) -> Path:
    from leignn_ocp.testing import untrained_checkpoint

    return untrained_checkpoint(path, model_kwargs, energy, forces_rmsd, seed)


# random energy readouts (zero_init_energy=False), so that energies are not trivially 0
KW_PBC = dict(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=4.0, max_neighbors=30, use_pbc=True,
              zero_init_energy=False)
KW_MOL = dict(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=4.0, max_neighbors=20, use_pbc=False,
              zero_init_energy=False)


@pytest.fixture(scope="module")
def ckpt_pbc(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "pbc.pt", KW_PBC)


@pytest.fixture(scope="module")
def ckpt_mol(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "mol.pt", KW_MOL)


def _model_prediction(ckpt_path: Path, atoms: Atoms):
    from leignn_ocp.batching import atoms_to_batch
    from leignn_ocp import LEIGNN

    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    kw = {k: v for k, v in ck["config"]["model"].items() if k != "name"}
    model = LEIGNN(**kw)
    model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
    model.eval()
    batch = atoms_to_batch(atoms)
    batch.pbc = torch.tensor([list(atoms.pbc)])
    out = model(batch)
    en, fn = ck["normalizers"]["energy"], ck["normalizers"]["forces"]
    e = float(out["energy"][0] * en["rmsd"] + en["mean"])
    f = (out["forces"] * fn["rmsd"] + fn["mean"]).detach().numpy()
    return e, f


# ----------------------------------------------------------------------------- calculator
def test_calculator_matches_model_periodic(ckpt_pbc):
    from leignn_ocp.md.calculator import LEIGNNCalculator

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.1, seed=1)
    calc = LEIGNNCalculator(ckpt_pbc)
    assert calc.direct_forces
    atoms.calc = calc
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    e_ref, f_ref = _model_prediction(ckpt_pbc, atoms)
    assert f.shape == (len(atoms), 3)
    assert e == pytest.approx(e_ref, abs=1e-4)
    np.testing.assert_allclose(f, f_ref, atol=1e-5)
    assert np.abs(f).max() > 1e-4  # not trivially zero

    # positions far outside the cell are wrapped: same energy/forces as the wrapped structure
    shifted = atoms.copy()
    shifted.positions += atoms.cell[0] * 3 - atoms.cell[2] * 2
    shifted.calc = calc
    assert shifted.get_potential_energy() == pytest.approx(e, abs=1e-4)
    np.testing.assert_allclose(shifted.get_forces(), f, atol=1e-4)
    np.testing.assert_allclose(shifted.positions, atoms.positions + atoms.cell[0] * 3 - atoms.cell[2] * 2)


def test_calculator_matches_model_molecule(ckpt_mol):
    from leignn_ocp.md.calculator import LEIGNNCalculator

    atoms = molecule("CH3CH2OH")
    atoms.calc = LEIGNNCalculator(ckpt_mol)
    e_ref, f_ref = _model_prediction(ckpt_mol, atoms)
    assert atoms.get_potential_energy() == pytest.approx(e_ref, abs=1e-4)
    np.testing.assert_allclose(atoms.get_forces(), f_ref, atol=1e-5)


@pytest.mark.parametrize("system", ["periodic", "molecule", "periodic, -dE/dx", "periodic, PaiNN (direct forces)"])
def test_reusing_the_batch_gives_fairchems_numbers_step_after_step(system, ckpt_pbc, ckpt_mol, tmp_path):
    """The kept batch (reuse=True, the default) against fairchem's own calculate on every call
    (reuse=False): identical energies and forces while atoms move (and leave the cell), and a new
    batch, not stale fields, when the cell, the elements or the fixed atoms change. LEIGNN's
    calculator and the plain one any fairchem model gets."""
    from ase.constraints import FixAtoms

    from leignn_ocp.md.calculator import LEIGNNCalculator, ReusingOCPCalculator
    from leignn_ocp.md.throughput import fresh_checkpoint
    from leignn_ocp.trainer import TRAINER_PATH

    calc = LEIGNNCalculator
    if system == "molecule":
        ckpt, atoms = ckpt_mol, molecule("CH3CH2OH")
    else:
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        if "PaiNN" in system:
            ckpt = fresh_checkpoint("painn_direct", REPO / "configs/s2ef/default", tmp_path / "painn.pt", atoms)
            calc = lambda path, **kw: ReusingOCPCalculator(checkpoint_path=str(path), trainer=TRAINER_PATH, **kw)  # noqa: E731
        else:
            ckpt = ckpt_pbc if system == "periodic" else _checkpoint(
                tmp_path / "cons.pt", {**KW_PBC, "direct_forces": False}, forces_rmsd=2.0)
    fast, plain = calc(ckpt), calc(ckpt, reuse=False)
    assert fast.reuse and not plain.reuse
    rng = np.random.default_rng(0)
    for step in range(12):
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        if step == 4 and system != "molecule":
            atoms.set_cell(atoms.cell * 1.02, scale_atoms=True)
        if step == 7:
            atoms.numbers[0] = 47 if system != "molecule" else 7
        if step == 9:
            atoms.set_constraint(FixAtoms(indices=[1]))
        got = [fast.get_property(p, atoms) for p in ("energy", "forces")]
        want = [plain.get_property(p, atoms) for p in ("energy", "forces")]
        assert got[0] == want[0], step
        np.testing.assert_array_equal(got[1], want[1])
        assert np.abs(got[1]).max() > 1e-5
    assert fast._template[1].natoms.tolist() == [len(atoms)]


def test_conservative_checkpoint_gives_gradient_forces(tmp_path):
    from leignn_ocp.md.calculator import LEIGNNCalculator

    ck = _checkpoint(tmp_path / "cons.pt", {**KW_MOL, "direct_forces": False}, energy=(0.0, 1.0), forces_rmsd=1.0)
    calc = LEIGNNCalculator(ck)
    assert not calc.direct_forces
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    f = atoms.get_forces()
    h = 1e-3
    for i, k in ((0, 0), (3, 2)):
        p, m = atoms.copy(), atoms.copy()
        p.positions[i, k] += h
        m.positions[i, k] -= h
        p.calc = m.calc = calc
        fd = -(p.get_potential_energy() - m.get_potential_energy()) / (2 * h)
        assert f[i, k] == pytest.approx(fd, abs=5e-3)


def test_conservative_checkpoint_with_unequal_scales_warns(tmp_path, caplog):
    from leignn_ocp.md.calculator import LEIGNNCalculator

    ck = _checkpoint(tmp_path / "bad.pt", {**KW_MOL, "direct_forces": False}, energy=(0.0, 2.0), forces_rmsd=0.5)
    with caplog.at_level("WARNING", logger="leignn_ocp.md.calculator"):
        LEIGNNCalculator(ck)
    assert "different scales" in caplog.text


# ----------------------------------------------------------------------------- MD driver
# the console command and the old spelling it replaces, both in a fresh process
MD_COMMANDS = {
    "leignn-md": [str(Path(sys.executable).parent / "leignn-md")],
    "scripts/run_md.py": [sys.executable, str(REPO / "scripts/run_md.py")],
}


@pytest.mark.parametrize("command", list(MD_COMMANDS))
def test_run_md_command_writes_readable_trajectory(command, ckpt_pbc, tmp_path):
    start = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    start.write(tmp_path / "start.traj")
    out = tmp_path / "md.traj"
    r = subprocess.run(
        [*MD_COMMANDS[command], "--checkpoint", str(ckpt_pbc), "--structure",
         str(tmp_path / "start.traj"), "--out", str(out), "--ensemble", "langevin", "--temperature-K", "300",
         "--timestep-fs", "1", "--steps", "6", "--save-every", "2", "--seed", "3", "--no-progress",
         "--max-force", "1e9", "--min-distance", "0.1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    frames = read(str(out), ":")
    assert len(frames) == 4  # steps 0, 2, 4, 6
    assert [a.info["time_fs"] for a in frames] == [0.0, 2.0, 4.0, 6.0]
    assert not np.allclose(frames[0].positions, frames[-1].positions)
    assert np.isfinite(frames[-1].get_forces()).all() and np.isfinite(frames[-1].get_potential_energy())
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps_done"] == 6 and summary["blew_up"] is False


@pytest.mark.parametrize("ensemble", ["nose-hoover", "bussi", "berendsen", "nve"])
def test_run_md_ensembles(ensemble, tmp_path):
    from leignn_ocp.md.run import run_md

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    s = run_md(atoms, EMT(), tmp_path / "x.traj", ensemble=ensemble, timestep_fs=2.0, temperature_K=500,
               steps=10, save_every=5, progress=False)
    assert s["steps_done"] == 10 and not s["blew_up"]
    assert len(read(str(tmp_path / "x.traj"), ":")) == 3


class _Exploding(EMT):
    """EMT that turns non-finite after a number of calls: a model that blows up."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.calls = after, 0

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.calls += 1
        if self.calls > self.after:
            self.results["forces"] = self.results["forces"] * np.nan


def test_run_md_stops_on_blowup(tmp_path):
    from leignn_ocp.md.run import run_md

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    s = run_md(atoms, _Exploding(after=7), tmp_path / "b.traj", ensemble="langevin", timestep_fs=1.0,
               temperature_K=300, steps=100, save_every=2, progress=False)
    assert s["blew_up"] and "non-finite" in s["blowup_reason"]
    assert s["steps_done"] < 100
    assert json.loads((tmp_path / "b.json").read_text())["blew_up"] is True


def test_run_md_flags_broken_bond(tmp_path):
    from leignn_ocp.md.run import BlowUp, BlowUpMonitor

    mol = molecule("CH3CH2OH")
    mon = BlowUpMonitor()
    mon.setup(mol)
    mol.calc = EMT()
    stretched = mol.copy()
    stretched.calc = EMT()
    stretched.positions[3] += (stretched.positions[3] - stretched.positions[2]) / np.linalg.norm(
        stretched.positions[3] - stretched.positions[2]) * 0.8  # O-H bond +0.8 A
    mon.check(mol, 0)
    with pytest.raises(BlowUp, match="bond 2-3"):
        mon.check(stretched, 5)


# ----------------------------------------------------------------------------- metrics
def _liquid_like(n_frames=30, seed=0):
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))  # 14.4 A box
    frames = []
    for t in range(n_frames):
        a = base.copy()
        a.positions += rng.normal(0, 0.12, a.positions.shape)
        a.info["time_fs"] = 100.0 * t
        frames.append(a)
    return frames


def test_rdf_identical_trajectory_zero_error_and_stable():
    frames = _liquid_like()
    r, g = M.rdf(frames)
    assert len(r) == 500 and r[-1] < 6.0
    # fcc first shell at a/sqrt(2) = 2.55 A, 12 neighbours: coordination from g(r)
    rho = len(frames[0]) / frames[0].get_volume()
    dr = r[1] - r[0]
    n1 = np.sum(4 * np.pi * r[r < 3.0] ** 2 * g[r < 3.0] * rho * dr)
    assert n1 == pytest.approx(12, rel=0.03)
    assert abs(r[np.argmax(g)] - 2.55) < 0.1
    t = M.frame_times_ps(frames)
    s = M.rdf_stability(frames, frames, t, window_ps=1.0, threshold=1.0)
    assert s["stable"] and s["first_unstable_window"] is None
    assert len(s["window_rdf_mae"]) == 2  # frames at 0..2.9 ps: two whole 1 ps windows
    assert M.curve_mae(g, M.rdf(frames)[1]) == 0.0


def test_rdf_small_cell_matches_minimum_image_and_images():
    """A cell narrower than 2 r_max counts every image; it must equal the big-cell g(r)
    (computed by minimum image) up to the N(N-1) normalisation, (N-1)/N = 0.8 % apart."""
    small = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))  # 10.8 A < 12 A
    big = small.repeat((2, 2, 2))
    rng = np.random.default_rng(0)
    small.positions += rng.normal(0, 0.1, small.positions.shape)
    big = small.repeat((2, 2, 2))
    g_small, g_big = M.rdf([small])[1], M.rdf([big])[1]
    n, n_big = len(small), len(big)
    np.testing.assert_allclose(g_small * (n - 1) / n, g_big * (n_big - 1) / n_big, atol=1e-9)


def test_rdf_stability_flags_collapse_window(tmp_path):
    frames = _liquid_like(50)
    ref = frames[:20]
    broken = [a.copy() for a in frames]
    rng = np.random.default_rng(1)
    for a in broken[25:]:  # from 2.5 ps: random gas -> RDF far from the crystal's
        a.set_scaled_positions(rng.random((len(a), 3)))
    res = M.evaluate_condensed(broken, ref, tmp_path, name="broken")
    assert res["stable"] is False
    assert res["window_start_ps"][2] == pytest.approx(2.0)
    assert res["stable_ps"] == pytest.approx(2.0)  # window [2, 3) ps has the first bad frames
    assert res["window_rdf_mae"][0] < 1.0 < res["window_rdf_mae"][2]
    assert (tmp_path / "broken_rdf.png").stat().st_size > 0
    assert (tmp_path / "broken_stability.png").stat().st_size > 0
    assert json.loads((tmp_path / "broken_metrics.json").read_text())["stable"] is False


def test_bond_stability_flags_stretched_bond_at_right_frame(tmp_path):
    mol = molecule("CH3CH2OH")
    frames = []
    for t in range(20):
        a = mol.copy()
        a.info["time_fs"] = 0.5 * t
        if t >= 13:  # stretch the C-C bond by 0.6 A from frame 13 on
            a.positions[1] += (a.positions[1] - a.positions[0]) / np.linalg.norm(a.positions[1] - a.positions[0]) * 0.6
        frames.append(a)
    res = M.bond_stability(frames, frames[:5])
    assert len(res["bonds"]) == 8  # C-C, C-O, O-H, 5 C-H
    assert res["first_unstable_frame"] == 13
    assert res["max_deviation"][12] == pytest.approx(0.0, abs=1e-9)
    ev = M.evaluate_molecule(frames, frames[:5], tmp_path, name="stretch")
    assert ev["first_unstable_frame"] == 13 and ev["stable_ps"] == pytest.approx(13 * 0.5e-3)
    same = M.evaluate_molecule(frames[:5], frames[:5], tmp_path, name="same")
    assert same["stable"] and same["hr_mae"] == 0.0


def test_diffusivity_random_walk_known_D():
    D = 0.3  # A^2/ps
    dt = 0.05  # ps between frames
    n_atoms, n_frames = 400, 400
    rng = np.random.default_rng(0)
    steps = rng.normal(0.0, np.sqrt(2 * D * dt), (n_frames - 1, n_atoms, 3))
    pos = np.concatenate([np.zeros((1, n_atoms, 3)), np.cumsum(steps, axis=0)]) + 10.0
    cell = np.eye(3) * 8.0  # the walkers cross the periodic box many times: wrapped positions
    frames = []
    for p in pos:
        a = Atoms("Li" * n_atoms, positions=p, cell=cell, pbc=True)
        a.wrap()
        frames.append(a)
    res = M.diffusivity(frames, np.arange(n_frames) * dt, species=["Li"])
    assert res["D_A2_per_ps"] == pytest.approx(D, rel=0.05)
    assert res["D_1e-5_cm2_per_s"] == pytest.approx(10 * res["D_A2_per_ps"])


def test_msd_linear_drift():
    v = np.array([0.1, -0.2, 0.05])
    pos = np.arange(20)[:, None, None] * v[None, None, :] * np.ones((1, 3, 1))
    m = M.msd(pos)
    np.testing.assert_allclose(m, (np.arange(20) ** 2) * (v @ v))


def test_nve_drift_of_emt_is_small(tmp_path):
    from leignn_ocp.md.run import run_md

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    run_md(atoms, EMT(), tmp_path / "nve.traj", ensemble="nve", timestep_fs=1.0, temperature_K=300,
           steps=100, save_every=5, progress=False)
    frames = read(str(tmp_path / "nve.traj"), ":")
    d = M.nve_energy_drift(frames, M.frame_times_ps(frames))
    assert abs(d["drift_meV_per_ps_per_atom"]) < 1.0 and d["max_abs_dev_meV_per_atom"] < 1.0


# ----------------------------------------------------------------------------- reference data
@pytest.fixture(scope="module")
def emt_reference(tmp_path_factory):
    """A tiny labelled reference trajectory (EMT Cu) and the LMDBs ``make_lmdbs`` makes of it."""
    from leignn_ocp.md.reference import SYSTEMS, make_lmdbs

    out = tmp_path_factory.mktemp("ref")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    rng = np.random.default_rng(0)
    frames = []
    for t in range(12):
        a = atoms.copy()
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.calc = EMT()
        a.get_forces()
        a.info["time_fs"] = 20.0 * t
        frames.append(a)
    from ase.io import write

    write(str(out / "reference.traj"), frames)
    stats = make_lmdbs("cu_liquid", out, SYSTEMS["cu_liquid"], seed=0, n_train=7, n_val=4, log=lambda *_: None)
    return out, frames, stats


def _lmdb(path: Path):
    from fairchem.core.datasets import LmdbDataset

    return LmdbDataset({"src": str(path)})


def test_reference_lmdbs_have_distinct_sids_of_their_frames(emt_reference):
    out, frames, stats = emt_reference
    train, val = _lmdb(out / "train"), _lmdb(out / "val")
    assert (len(train), len(val)) == (7, 4) and (stats["n_train"], stats["n_val"]) == (7, 4)
    sids = {name: [int(d.sid) for d in ds] for name, ds in (("train", train), ("val", val))}
    assert len(set(sids["train"])) == 7 and len(set(sids["val"])) == 4
    assert not set(sids["train"]) & set(sids["val"])
    for ds in (train, val):  # a frame's sid is its index in reference.traj
        for d in ds:
            ref = frames[int(d.sid)]
            assert float(d.energy) == pytest.approx(ref.get_potential_energy(), abs=1e-5)
            np.testing.assert_allclose(d.forces.numpy(), ref.get_forces(), atol=1e-5)


def test_frames_to_lmdb_refuses_repeated_sids(tmp_path, emt_reference):
    from leignn_ocp.md.reference import frames_to_lmdb

    frames = emt_reference[1][:2]
    with pytest.raises(ValueError, match="distinct sid"):
        frames_to_lmdb(frames, tmp_path / "x", sids=[5, 5])


@pytest.mark.parametrize("system", ["ethanol", "cu_liquid", "cu_solid"])
def test_conservative_config_fits_one_scale_for_energy_and_forces(system, emt_reference, monkeypatch):
    """Each system's conservative MD config is its direct config with gradient forces, and its
    normalizer is fitted at run time (energy mean from the data) with equal energy and force
    scales, so gradient forces stay -dE/dx."""
    from fairchem.core.common.utils import load_config
    from fairchem.core.modules.normalization.normalizer import load_normalizers_from_config

    out, frames, _ = emt_reference
    monkeypatch.chdir(REPO)  # fairchem resolves includes against the cwd first, as the benchmark runs it
    config = load_config(f"configs/md/{system}_leignn_conservative.yml")[0]
    direct = load_config(f"configs/md/{system}_leignn.yml")[0]
    assert config["model"] == {**direct["model"], "direct_forces": False} and direct["model"]["direct_forces"]
    assert config["dataset"]["train"]["src"] == direct["dataset"]["train"]["src"] == f"data/md/{system}/train"
    norm_cfg = config["dataset"]["train"]["transforms"]["normalizer"]
    norms = load_normalizers_from_config(norm_cfg, _lmdb(out / "train"))
    e_train = np.mean([float(d.energy) for d in _lmdb(out / "train")])
    assert float(norms["energy"].mean) == pytest.approx(e_train, rel=1e-5)
    assert float(norms["energy"].rmsd) == float(norms["forces"].rmsd)
    assert float(norms["forces"].mean) == 0.0


def test_tblite_calculator_from_a_fresh_process():
    """tblite must load its OpenMP runtime before torch; importing the package that way must work."""
    pytest.importorskip("tblite")
    code = ("from ase.build import molecule; import leignn_ocp.md.reference as r; import torch; "
            "a = molecule('H2O'); a.calc = r.make_calculator('ethanol'); print(a.get_potential_energy())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert -200 < float(r.stdout.split()[-1]) < -100  # GFN2-xTB water, about -137 eV


# ----------------------------------------------------------------------------- benchmark helpers
def test_benchmark_val_errors_and_existing_checkpoint(emt_reference, tmp_path):
    from leignn_ocp.md import benchmark as B

    frames = emt_reference[1]
    err = B.val_errors(EMT(), frames)
    assert err == {"energy_mae_meV_per_atom": pytest.approx(0.0, abs=1e-9),
                   "forces_mae_meV_per_A": pytest.approx(0.0, abs=1e-9)}

    class Shifted(EMT):  # EMT + 10 meV per atom, and + 6 meV/A on every x force component
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.results["energy"] += 0.010 * len(self.atoms)
            self.results["forces"] = self.results["forces"] + [0.006, 0.0, 0.0]

    err = B.val_errors(Shifted(), frames)  # the x shift is a third of the mean over x, y, z
    assert err == {"energy_mae_meV_per_atom": pytest.approx(10.0, rel=1e-6),
                   "forces_mae_meV_per_A": pytest.approx(2.0, rel=1e-6)}
    # a finished fairchem run is reused: no training command is started (the config does not exist)
    ckpt = tmp_path / "runs/checkpoints/2024-01-01-00-00-00-leignn/best_checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert B.train(tmp_path / "missing.yml", tmp_path / "runs", "leignn", epochs=1) == ckpt
    with pytest.raises(SystemExit, match="missing.yml not found"):
        B.train(tmp_path / "missing.yml", tmp_path / "runs", "leignn", epochs=1, retrain=True)


def _split_reference(tmp_path: Path, n: int, train: list[int], val: list[int]) -> Path:
    from leignn_ocp.md.reference import SPLIT_FRAMES

    tmp_path.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.positions[0, 0] += 0.01 * i  # frame i is told by its first atom
        frames.append(a)
    from ase.io import write

    write(str(tmp_path / "reference.traj"), frames)
    (tmp_path / SPLIT_FRAMES).write_text(json.dumps({"train": train, "val": val}))
    return tmp_path


def test_md_starts_from_a_test_frame_drawn_by_the_seed(tmp_path):
    from leignn_ocp.md.benchmark import start_frame

    ref = _split_reference(tmp_path, 20, train=list(range(0, 20, 2)), val=[1, 3, 5])
    picks = {seed: start_frame("cu_solid", ref, seed) for seed in range(12)}
    idx = {seed: a.info["reference_frame"] for seed, a in picks.items()}
    assert set(idx.values()) <= {7, 9, 11, 13, 15, 17, 19}  # in neither split
    assert len(set(idx.values())) > 2  # the seed draws it
    assert start_frame("cu_solid", ref, 3).info["reference_frame"] == idx[3]
    for seed, a in picks.items():
        assert a.positions[0, 0] == pytest.approx(0.01 * idx[seed])
    ref2 = _split_reference(tmp_path / "full", 3, train=[0, 1], val=[2])
    with pytest.raises(SystemExit, match="every reference frame is in train/ or val/"):
        start_frame("cu_solid", ref2, 0)
    (ref2 / "split_frames.json").unlink()
    with pytest.raises(SystemExit, match=r"split_frames.json not found.*leignn-md-reference --system cu_solid"):
        start_frame("cu_solid", ref2, 0)


def _run(variant: str, seed: int, **metrics) -> dict:
    return {"variant": variant, "seed": seed, "epochs": 6, "val_errors": {"forces_mae_meV_per_A": 20.0 + seed},
            "md": {"steps_requested": 25000}, "metrics": metrics}


def test_protocol_table_is_mean_and_sample_std_over_seeds():
    from leignn_ocp.md.benchmark import aggregate, protocol_markdown

    runs = [_run("direct", s, stable_ps=50.0 - 10 * s, rdf_mae=0.1 * (s + 1), **{"D_abs_error_1e-5_cm2_per_s": 0.3})
            for s in range(3)]
    runs.append(_run("conservative", 0, stable_ps=50.0, rdf_mae=0.05, **{"D_abs_error_1e-5_cm2_per_s": None}))
    rep = {"stable_ps": 50.0, "rdf_mae": 0.02, "D_abs_error_1e-5_cm2_per_s": 0.01, "length_ps": 50.0}
    table = aggregate("cu_liquid", runs, rep)
    d = table["direct"]
    assert d["stable_ps"] == {"mean": 40.0, "std": pytest.approx(10.0), "n": 3}  # ddof 1
    assert d["rdf_mae"]["mean"] == pytest.approx(0.2) and d["rdf_mae"]["std"] == pytest.approx(0.1)
    assert d["forces_mae_meV_per_A"]["mean"] == pytest.approx(21.0) and d["md_ps"] == 50.0
    assert table["conservative"]["D_abs_error_1e-5_cm2_per_s"] == {"mean": None, "std": None, "n": 0}
    md = protocol_markdown({"cu_liquid": {"table": table}, "nve_drift": {}})
    rows = md.splitlines()
    assert len(rows) == 5
    assert rows[2].startswith("| cu_liquid | LEIGNN, direct | 3 | 6 | 50 | 21.0 ± 1.0 | 40.0 ± 10.0 | 0.200 ± 0.100 | – |")
    assert rows[3] == "| cu_liquid | LEIGNN, conservative | 1 | 6 | 50 | 20.0 | 50.0 | 0.050 | – | – |"
    assert rows[4] == "| cu_liquid | reference replicate | – | – | 50 | – | 50.0 | 0.020 | – | 0.010 |"


def test_md_benchmark_end_to_end_on_a_tiny_solid(tmp_path, monkeypatch):
    """The real fairchem CLI trains one model per seed, MD starts from each seed's test frame,
    and summary.json / protocol.md / protocol.png come out; a second call reuses everything."""
    from leignn_ocp.md import benchmark as B
    from leignn_ocp.md.reference import SYSTEMS

    tiny = {**SYSTEMS["cu_solid"], "size": 2, "save_every": 2, "equil_ps": 0.02, "ref_ps": 0.4,
            "replicate_ps": 0.2, "n_train": 8, "n_val": 4}
    monkeypatch.setitem(SYSTEMS, "cu_solid", tiny)
    monkeypatch.chdir(REPO)
    kw = dict(systems=["cu_solid"], data=tmp_path / "data", runs=tmp_path / "runs", out=tmp_path / "out",
              epochs=1, md_ps=0.02, seeds=(0, 1), variants=("direct",), progress=False)
    summary = B.run_benchmark(**kw)
    entry = summary["cu_solid"]
    assert [(r["variant"], r["seed"]) for r in entry["runs"]] == [("direct", 0), ("direct", 1)]
    used = set(sum(json.loads((tmp_path / "data/cu_solid/split_frames.json").read_text()).values(), []))
    for r in entry["runs"]:
        ck = torch.load(r["checkpoint"], map_location="cpu", weights_only=False)
        assert ck["config"]["cmd"]["seed"] == r["seed"]  # one training per seed
        assert r["md"]["steps_done"] == 10 and r["md"]["start_reference_frame"] not in used
        m = r["metrics"]  # a 1-epoch model may leave the reference's RDF in the first window
        assert m["stable_ps"] == (pytest.approx(0.02) if m["stable"] else 0.0)
        assert (m["rdf_mae"] is None) == (not m["stable"]) and m["D_reference_1e-5_cm2_per_s"] is not None
        assert Path(r["md"]["trajectory"]).parent == tmp_path / f"out/cu_solid/direct/seed{r['seed']}"
    assert entry["table"]["direct"]["stable_ps"]["n"] == 2
    md = (tmp_path / "out/protocol.md").read_text()
    assert "| cu_solid | LEIGNN, direct | 2 | 1 | 0.02 |" in md and "| cu_solid | reference replicate |" in md
    assert (tmp_path / "out/protocol.png").stat().st_size > 0
    assert json.loads((tmp_path / "out/summary.json").read_text())["cu_solid"]["table"] == entry["table"]
    again = B.run_benchmark(**kw)  # nothing is trained or run again
    assert [r["checkpoint"] for r in again["cu_solid"]["runs"]] == [r["checkpoint"] for r in entry["runs"]]
    assert [r["md"]["wall_s"] for r in again["cu_solid"]["runs"]] == [r["md"]["wall_s"] for r in entry["runs"]]


def test_md_benchmark_refuses_a_bad_length(capsys):
    from leignn_ocp.md.benchmark import main

    with pytest.raises(SystemExit, match="--md-ps must be > 0 and --epochs >= 1, not 0.0 / None"):
        main(["--md-ps", "0"])


# ----------------------------------------------------------------------------- MD throughput
def test_md_throughput_command_times_every_mode_with_the_same_forces(tmp_path):
    """leignn-md-throughput on ethanol: a row per (model, mode), fairchem's path and the kept batch
    give the same first forces, and the files are written."""
    from leignn_ocp.md import throughput

    out = tmp_path / "thr"
    threads = torch.get_num_threads()
    try:
        assert throughput.main(["--models", "leignn", "painn_direct", "--systems", "ethanol", "--modes", "fairchem",
                                "reuse", "--steps", "3", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's
    import csv

    with open(out / "throughput.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("leignn", "fairchem"), ("leignn", "reuse"), ("painn_direct", "fairchem"), ("painn_direct", "reuse")]
    for r in rows:
        assert r["atoms"] == "9" and float(r["ms_per_step"]) > 0 and float(r["max_force_diff_vs_first_mode"]) == 0
    assert "| ethanol | 9 | LEIGNN | reuse |" in (out / "throughput.md").read_text()
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_md_throughput_refuses_a_bad_checkpoint_argument(tmp_path, capsys):
    from leignn_ocp.md import throughput

    with pytest.raises(SystemExit):
        throughput.main(["--checkpoint", f"leignn={tmp_path / 'missing.pt'}", "--out", str(tmp_path)])
    assert "expected KEY=PATH" in capsys.readouterr().err
