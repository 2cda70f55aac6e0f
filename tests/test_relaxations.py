"""IS2RS records and fairchem's own `--mode run-relaxations` on them (configs/is2rs/default)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import read
from ase.optimize import BFGS

from leignn_ocp.data.is2rs import IS2RSValidationError, is2rs_data, read_is2rs, validate_is2rs, write_is2rs
from leignn_ocp.testing import cli_env, emt_slab_frames, fairchem_cli, oc20_slab, untrained_checkpoint, write_s2ef_lmdb

OFFSET = 10.0  # eV: y = E_EMT - OFFSET
TINY = dict(hidden_channels=16, num_layers=1, num_rbf=8, cutoff=5.0, max_neighbors=20, use_pbc=True,
            otf_graph=True, regress_forces=True, direct_forces=True)
STEPS = 4


@pytest.fixture(scope="module")
def is2rs_set(tmp_path_factory) -> tuple[Path, list]:
    """Two real EMT relaxations (O and H on a 2x2x2 Cu(111) slab) as an IS2RS folder."""
    root = tmp_path_factory.mktemp("is2rs")
    recs = []
    for sid, (ads, seed) in enumerate([("O", 1), ("H", 2)]):
        init = oc20_slab(size=(2, 2, 2), seed=seed, ads=ads, vacuum=5.0)
        init.calc = EMT()
        relaxed = init.copy()
        relaxed.calc = EMT()
        BFGS(relaxed, logfile=None).run(fmax=0.01, steps=200)
        recs.append(is2rs_data(init, relaxed.positions, init.get_potential_energy() - OFFSET,
                               relaxed.get_potential_energy() - OFFSET, OFFSET, sid))
    write_is2rs(root / "is2rs", recs)
    return root / "is2rs", recs


def test_record_fields(is2rs_set):
    path, recs = is2rs_set
    assert validate_is2rs(path) == 2
    for (i, d), ref in zip(read_is2rs(path), recs):
        assert d.pos.dtype == torch.float32 and d.pos_relaxed.shape == d.pos.shape and d.cell.shape == (1, 3, 3)
        assert d.tags.dtype == torch.long and d.sid == i and d.energy_relaxed == d.y_relaxed
        assert d.y_relaxed < d.y_init and d.energy_offset == OFFSET
        assert torch.equal(d.pos[d.fixed == 1], d.pos_relaxed[d.fixed == 1])  # FixAtoms held in the reference


def test_s2ef_set_is_refused(tmp_path):
    write_s2ef_lmdb(emt_slab_frames(2, 0), tmp_path / "s2ef")
    with pytest.raises(IS2RSValidationError, match=r"record 0 has no 'pos_relaxed', 'energy_relaxed', 'y_init', "
                                                    r"'y_relaxed', 'energy_offset': not an IS2RS set"):
        validate_is2rs(tmp_path / "s2ef")
    with pytest.raises(IS2RSValidationError, match=r"IS2RS set .*nowhere does not exist"):
        validate_is2rs(tmp_path / "nowhere")


def adwt(pred: np.ndarray, ref: np.ndarray, cell: np.ndarray) -> float:
    """OC20's ADwT of one structure's free atoms: share of thresholds 0.01..0.5 A (step 0.001) above
    the mean minimum-image distance between predicted and reference positions."""
    frac = np.linalg.solve(cell.T, (pred - ref).T).T
    frac -= np.round(frac)  # minimum image, every axis periodic
    d = np.linalg.norm(frac @ cell, axis=1).mean()
    return float((d < np.arange(0.01, 0.5, 0.001)).mean())


@pytest.mark.slow
def test_fairchem_run_relaxations(is2rs_set, tmp_path, repo):
    """The plain fairchem CLI on the IS2RS config: steps and fmax as configured, every sid written,
    fixed atoms still, and the ADwT it logs equals OC20's definition recomputed here."""
    path, recs = is2rs_set
    write_s2ef_lmdb(emt_slab_frames(2, 0), tmp_path / "train")
    write_s2ef_lmdb(emt_slab_frames(2, 1), tmp_path / "val")  # one LMDB folder cannot be opened twice
    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt", TINY)
    sizes = [f"--model.{k}={v}" for k, v in TINY.items() if k in ("hidden_channels", "num_layers", "num_rbf",
                                                                    "cutoff", "max_neighbors")]
    cmd = [fairchem_cli(), "--mode", "run-relaxations", "--config-yml", "configs/is2rs/default/leignn.yml",
           "--checkpoint", str(ckpt), "--cpu", "--run-dir", str(tmp_path / "run"), "--timestamp-id", "t",
           f"--dataset.relax.src={path}", f"--dataset.train.src={tmp_path / 'train'}",
           f"--dataset.val.src={tmp_path / 'val'}", f"--task.relaxation_steps={STEPS}",
           "--task.relaxation_fmax=1e-5", f"--task.relax_opt.traj_dir={tmp_path / 'trajs'}", *sizes]
    p = subprocess.run(cmd, cwd=repo, env=cli_env(repo), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    z = np.load(tmp_path / "run" / "results" / "t" / "relaxed_positions.npz")
    assert list(z["ids"]) == ["0", "1"]
    pos = np.split(z["pos"], z["chunk_idx"])
    scores = []
    for d, p_ in zip(recs, pos):
        fixed = d.fixed.numpy() == 1
        np.testing.assert_array_equal(p_[fixed], d.pos.numpy()[fixed])  # FixAtoms: not moved
        assert np.abs(p_[~fixed] - d.pos.numpy()[~fixed]).max() > 0  # free atoms moved
        frames = read(tmp_path / "trajs" / f"{d.sid}.traj", ":")
        assert len(frames) == STEPS + 1  # never converged at fmax 1e-5: the step cap, then the final frame
        np.testing.assert_allclose(frames[-1].positions, p_, atol=1e-5)
        scores.append(adwt(p_[~fixed], d.pos_relaxed.numpy()[~fixed], d.cell.numpy()[0]))
    from leignn_ocp.evaluation.runs import learning_curve

    logged = learning_curve(tmp_path / "run" / "logs" / "tensorboard" / "t",
                            "val/is2rs_positions_average_distance_within_threshold")
    assert len(logged) == 1 and logged[0][1] == pytest.approx(np.mean(scores), abs=1e-6)
    # fairchem 1.10's IS2RE energy MAE: prediction energy [B, 1] minus target [B] broadcasts to [B, B],
    # so what it logs is the mean over every (prediction, target) pair, not per system
    e_model = np.array([read(tmp_path / "trajs" / f"{d.sid}.traj", -1).get_potential_energy() for d in recs])
    y = np.array([d.y_relaxed for d in recs])
    (_, logged_mae), = learning_curve(tmp_path / "run" / "logs" / "tensorboard" / "t", "val/is2re_energy_mae")
    assert logged_mae == pytest.approx(np.abs(e_model[:, None] - y[None, :]).mean(), rel=1e-5)


def test_reference_scores_at_the_reference_minimum(is2rs_set):
    """Fed the reference relaxed positions themselves: every system lowered, ΔE = 0 to float32 round-off."""
    from leignn_ocp.evaluation.relaxations import reference_scores

    _, recs = is2rs_set
    s = reference_scores(recs, [d.pos_relaxed.numpy() for d in recs], EMT())
    assert s["lowered"] == 1.0 and s["within_0.1"] == 1.0
    assert abs(s["dE_mean"]) < 1e-4 and abs(s["dE_median"]) < 1e-4
    s = reference_scores(recs, [d.pos.numpy() for d in recs], EMT())  # the start itself: not lowered
    assert s["lowered"] == 0.0 and s["dE_mean"] == pytest.approx(np.mean([d.y_init - d.y_relaxed for d in recs]),
                                                                 abs=1e-4)


def test_minimum_forces_are_the_models_free_atom_forces_at_the_reference_minima(is2rs_set):
    """A stand-in trainer that answers with EMT's forces (plus 1 eV/A on fixed atoms, which must not
    count) gives what the reference relaxation left (under its fmax 0.01); one that answers 0.1 eV/A
    on every component gives exactly 100 meV/A."""
    from leignn_ocp.data.is2rs import record_atoms
    from leignn_ocp.evaluation.relaxations import minimum_forces

    _, recs = is2rs_set

    class Emt:
        def predict(self, batch, per_image, disable_tqdm):
            out = []
            for d in batch.to_data_list():
                atoms = record_atoms(d)
                atoms.calc = EMT()
                f = torch.as_tensor(atoms.get_forces(apply_constraint=False))  # [N, 3]
                out.append(f + 1.0 * d.fixed[:, None])
            return {"energy": torch.zeros(len(out)), "forces": torch.cat(out)}

    class Constant:
        def predict(self, batch, per_image, disable_tqdm):
            return {"energy": torch.zeros(batch.num_graphs), "forces": torch.full((batch.pos.shape[0], 3), 0.1)}

    m = minimum_forces(Emt(), recs)
    assert 0 < m["f_mae_at_minimum"] < 10 and 0 < m["fmax_at_minimum"] < 0.01
    assert len(m["fmax_at_minimum_per_system"]) == len(recs) and max(m["fmax_at_minimum_per_system"]) < 0.01
    m = minimum_forces(Constant(), recs)
    assert m["f_mae_at_minimum"] == pytest.approx(100.0, rel=1e-6)
    assert m["fmax_at_minimum"] == pytest.approx(0.1 * 3 ** 0.5, rel=1e-6)


def test_relaxations_load_the_scale_factors_the_checkpoint_was_trained_with(tmp_path):
    """A line-up refits PaiNN's / GemNet-dT's ScaleFactors into its own file; relaxing with the config's
    file instead made fairchem refuse the checkpoint (inconsistent scale factor)."""
    from leignn_ocp.evaluation.relaxations import relax_overrides

    ckpt = tmp_path / "c.pt"
    bare = {"state_dict": {"w": torch.zeros(1)}, "normalizers": {}}  # what read_checkpoint asks of a checkpoint
    torch.save({**bare, "config": {"model": {"name": "painn", "scale_file": "runs/scale_factors/painn.json"}}}, ckpt)
    assert relax_overrides(ckpt, ["--x=1"]) == ["--x=1", "--model.scale_file=runs/scale_factors/painn.json"]
    assert relax_overrides(ckpt, ["--model.scale_file=mine.json"]) == ["--model.scale_file=mine.json"]
    torch.save({**bare, "config": {"model": {"name": "leignn_ocp.LEIGNN"}}}, ckpt)
    assert relax_overrides(ckpt, ()) == []


def _evaluate(*args):
    from leignn_ocp.evaluation.cli import main

    return main(["relaxations", *map(str, args)])


def test_benchmark_bad_input(is2rs_set, tmp_path):
    write_s2ef_lmdb(emt_slab_frames(2, 0), tmp_path / "s2ef")
    with pytest.raises(SystemExit, match=f"^leignn-evaluate relaxations: error: IS2RS set {tmp_path}/none does not exist$"):
        _evaluate("--is2rs", tmp_path / "none")
    with pytest.raises(SystemExit, match=r"record 0 has no 'pos_relaxed', .*not an IS2RS set"):
        _evaluate("--is2rs", tmp_path / "s2ef")
    path, _ = is2rs_set
    with pytest.raises(SystemExit, match=r"^no config configs/s2ef/default/nomodel.yml"):
        _evaluate("--is2rs", path, "--models", "nomodel")
    with pytest.raises(SystemExit, match=f"^checkpoint leignn:0={tmp_path}/x.pt does not exist$"):
        _evaluate("--is2rs", path, "--models", "leignn", "--checkpoint", f"leignn:0={tmp_path}/x.pt", "--cpu")


@pytest.mark.slow
def test_benchmark_end_to_end(is2rs_set, tmp_path, monkeypatch, repo):
    """`leignn-evaluate relaxations` with a given checkpoint: rows, tables, and an energy MAE that is
    the per-system one (the last trajectory frame of a structure that never converged)."""
    monkeypatch.chdir(repo)
    path, recs = is2rs_set
    write_s2ef_lmdb(emt_slab_frames(2, 0), tmp_path / "d" / "train")
    write_s2ef_lmdb(emt_slab_frames(2, 1), tmp_path / "d" / "val_id")
    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt", TINY)
    sizes = [f"--relax-arg=--model.{k}={TINY[k]}" for k in ("hidden_channels", "num_layers", "num_rbf", "cutoff",
                                                            "max_neighbors")]
    out = tmp_path / "out"
    _evaluate("--is2rs", path, "--models", "leignn", "--data-root", tmp_path / "d", "--out", out, "--cpu",
              "--checkpoint", f"leignn:0={ckpt}", f"--relax-arg=--task.relaxation_steps={STEPS}",
              "--relax-arg=--task.relaxation_fmax=1e-5", *sizes)
    row = __import__("json").loads((out / "relax_rows" / "leignn_s0.json").read_text())
    e_last = [read(out / "relax" / "leignn_s0" / "trajs" / f"{d.sid}.traj", -1).get_potential_energy() for d in recs]
    assert row["energy_mae"] == pytest.approx(np.mean(np.abs(np.array(e_last) - [d.y_relaxed for d in recs])),
                                              rel=1e-5)
    assert row["converged"] == 0.0 and row["n"] == 2
    for f in ("table.md", "table.csv", "table.json", "table.png"):
        assert (out / f).is_file()
    assert "| LEIGNN | 1 |" in (out / "table.md").read_text() and "±" not in (out / "table.md").read_text()
    # a row written before f_mae_at_minimum existed gets it on the next call, without relaxing again
    row_file = out / "relax_rows" / "leignn_s0.json"
    old = {k: v for k, v in row.items() if not k.startswith(("f_mae_at", "fmax_at"))}
    row_file.write_text(__import__("json").dumps(old))
    shutil.rmtree(out / "relax" / "leignn_s0" / "trajs")
    _evaluate("--is2rs", path, "--models", "leignn", "--data-root", tmp_path / "d", "--out", out, "--cpu",
              "--checkpoint", f"leignn:0={ckpt}", *sizes)
    again = __import__("json").loads(row_file.read_text())
    assert again["f_mae_at_minimum"] == pytest.approx(row["f_mae_at_minimum"], rel=1e-6) and row["f_mae_at_minimum"] > 0
    assert not (out / "relax" / "leignn_s0" / "trajs").exists()


@pytest.mark.parametrize("key", sorted(p.stem for p in Path(__file__).parents[1].glob("configs/is2rs/default/*.yml")
                                       if p.stem != "base"))
def test_is2rs_configs_merge(key, repo, monkeypatch):
    """fairchem's loader merges each IS2RS config into its S2EF model config plus the relaxation block."""
    from leignn_ocp.lineup import load_config

    monkeypatch.chdir(repo)
    cfg, s2ef = load_config(f"configs/is2rs/default/{key}.yml"), load_config(f"configs/s2ef/default/{key}.yml")
    assert cfg["model"] == s2ef["model"] and cfg["trainer"] == s2ef["trainer"]
    assert cfg["dataset"]["relax"] == {"format": "lmdb", "src": "data/default/is2rs", "use_train_settings": False}
    assert cfg["task"] == {"relaxation_steps": 300, "relaxation_fmax": 0.02, "write_pos": True,
                           "relax_opt": {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}}


def test_reference_trainer_error_sizes():
    """The added error has the force MAE asked for; `fixed` repeats one draw, `fresh` draws anew."""
    from leignn_ocp.evaluation.relax_ceiling import ReferenceTrainer

    fixed, fresh = ReferenceTrainer(EMT(), 0.1, "fixed", 0), ReferenceTrainer(EMT(), 0.1, "fresh", 0)
    a, b = fixed._error(20000), fixed._error(20000)
    assert a is b and np.abs(a).mean() == pytest.approx(0.1, rel=0.02)
    c, d = fresh._error(20000), fresh._error(20000)
    assert not np.array_equal(c, d) and np.abs(c).mean() == pytest.approx(0.1, rel=0.02)
    assert not ReferenceTrainer(EMT(), 0.0)._error(10).any()
    with pytest.raises(ValueError, match=r"^noise kind must be one of \('fixed', 'fresh'\), got 'pink'$"):
        ReferenceTrainer(EMT(), 0.1, "pink")
    with pytest.raises(ValueError, match=r"^sigma must be a finite force MAE >= 0 \(eV/Å\), got nan$"):
        ReferenceTrainer(EMT(), float("nan"))


def test_relaxation_ceiling(is2rs_set, tmp_path, repo, monkeypatch):
    """fairchem's LBFGS with the configured settings and EMT's own forces reaches EMT's minima (every system
    lowered, within 0.1 eV, ADwT near 1, converged); a fixed error of 0.3 eV/Å per component ends higher."""
    from leignn_ocp.evaluation.relax_ceiling import run_ceiling

    monkeypatch.chdir(repo)
    path, _ = is2rs_set
    exact, noisy = run_ceiling(path, tmp_path, [0.0, 0.3], kinds=["fixed"], seeds=[0])
    assert exact["lowered"] == 1.0 and exact["within_0.1"] == 1.0 and exact["converged"] == 1.0
    assert exact["adwt"] > 0.9 and abs(exact["dE_mean"]) < 0.02
    assert noisy["sigma"] == 0.3 and noisy["dE_mean"] > exact["dE_mean"] + 0.01 and noisy["adwt"] < exact["adwt"]
    table = (tmp_path / "ceiling.md").read_text()
    assert "| none | 0 | 1 |" in table and "| fixed | 0.3 | 1 |" in table
    assert (tmp_path / "ceiling.png").stat().st_size > 0
    with pytest.raises(SystemExit, match=r"^leignn-evaluate relax-ceiling: error: --sigma must be force MAEs >= 0 "
                                         r"\(eV/Å\), got \[-0.1\]$"):
        __import__("leignn_ocp.evaluation.cli", fromlist=["main"]).main(["relax-ceiling", "--sigma", "0", "-0.1"])


def test_false_descent_counts_the_uphill_relaxations_the_models_own_energy_calls_downhill(is2rs_set):
    """Ends with the adsorbate 0.7 A above a surface atom (EMT: far uphill) and the reference minima, scored
    with a stand-in model whose energy is EMT's and with one whose energy is minus EMT's: only the
    inverted model on the uphill ends is a false descent, and model_path is its energy change exactly."""
    from leignn_ocp.data.is2rs import record_atoms
    from leignn_ocp.evaluation.relaxations import descent_scores, model_energies, reference_scores

    _, recs = is2rs_set

    class Energy:
        def __init__(self, sign):
            self.sign = sign

        def predict(self, batch, per_image, disable_tqdm):
            e = []
            for d in batch.to_data_list():
                atoms = record_atoms(d)
                atoms.calc = EMT()
                e.append(self.sign * atoms.get_potential_energy())
            return {"energy": torch.tensor(e), "forces": torch.zeros(batch.pos.shape[0], 3)}

    pushed = []
    for d in recs:
        pos = d.pos.numpy().copy()
        top = int(np.argmax(np.where(d.tags.numpy() == 2, -np.inf, pos[:, 2])))  # the highest slab atom
        pos[d.tags.numpy() == 2] = pos[top] + [0.0, 0.0, 0.7]  # the adsorbate 0.7 A above it: far too close
        pushed.append(pos)
    up = reference_scores(recs, pushed, EMT())
    assert min(up["ref_path"]) > 1.0 and up["lowered"] == 0.0
    def scores(model, positions, ref_path):  # the model's energies at the ends, as relax_checkpoint has them
        return descent_scores(model, recs, model_energies(model, recs, positions), ref_path)

    assert scores(Energy(1.0), pushed, up["ref_path"])["false_descent"] == 0.0
    inverted = scores(Energy(-1.0), pushed, up["ref_path"])
    assert inverted["false_descent"] == 1.0
    np.testing.assert_allclose(inverted["model_path"], [-x for x in up["ref_path"]], atol=1e-3)  # float32 positions
    down = [d.pos_relaxed.numpy() for d in recs]
    faithful = scores(Energy(1.0), down, reference_scores(recs, down, EMT())["ref_path"])
    assert max(faithful["model_path"]) < 0 and faithful["false_descent"] == 0.0  # both went down: a true descent
