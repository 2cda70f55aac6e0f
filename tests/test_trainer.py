"""leignn_ocp.trainer.Trainer through the real ``fairchem`` CLI on tiny LMDBs: early stopping (the
stop, the count in the checkpoint, the count after a resume), patience absent = fairchem's
OCPTrainer step for step, and the refusal to train unfitted ScaleFactors (while fitting them works)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fairchem.core.common.registry import registry
from fairchem.core.trainers import OCPTrainer

from conftest import cli_env, emt_slab_frames, fairchem_cli, write_s2ef_lmdb
from leignn_ocp import lineup
from leignn_ocp import trainer as tr

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH = 8, 4  # 2 steps per epoch
STEPS_PER_EPOCH = N_TRAIN // BATCH


def _tiny(key: str) -> list[str]:
    return [f"--model.{k}={v}" for k, v in lineup.get(key).tiny.items()]


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    write_s2ef_lmdb(emt_slab_frames(N_TRAIN, seed=0), root / "train")
    write_s2ef_lmdb(emt_slab_frames(4, seed=1), root / "val")
    return {"train": root / "train", "val": root / "val", "root": root}


def _train(lmdbs, config: str, name: str, *extra: str, ok: bool = True, module: list[str] | None = None):
    """``fairchem --mode train --config-yml <repo config> --cpu`` on the tiny LMDBs, 1 thread; returns
    (log text, checkpoint folder)."""
    run_dir = lmdbs["root"] / name
    head = module or [fairchem_cli()]
    cmd = [*head, "--mode", "train", "--config-yml", config, "--cpu", "--run-dir", str(run_dir),
           "--identifier", name, f"--dataset.train.src={lmdbs['train']}", f"--dataset.val.src={lmdbs['val']}",
           f"--optim.batch_size={BATCH}", f"--optim.eval_batch_size={BATCH}", "--optim.num_workers=0", *extra]
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert (res.returncode == 0) == ok, f"rc {res.returncode}:\n{log[-6000:]}"
    folders = sorted(run_dir.glob("checkpoints/*"))
    return log, (folders[0] if len(folders) == 1 else None)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


LEIGNN_200K = "configs/s2ef/200k/leignn.yml"  # the paper's recipe: this trainer, patience 20 by default
FROZEN = ["--optim.lr_initial=0.0", "--optim.eval_every=1", "--optim.max_epochs=10", *_tiny("leignn")]


@pytest.fixture(scope="module")
def stopped(lmdbs):
    """Patience 1 on a run that cannot improve (lr 0: the weights, so val forces_mae, never change):
    validation at every step, 10 epochs = 20 steps allowed."""
    return _train(lmdbs, LEIGNN_200K, "stop", *FROZEN, "--optim.early_stopping_patience=1")


def test_registry_resolves_the_trainer():
    """In this process; a fresh one resolving the dotted name with nothing imported first is every
    `fairchem` run below (the "early stopping: on" line of the stopped run)."""
    assert registry.get_trainer_class(tr.TRAINER_PATH) is tr.Trainer
    assert registry.get_trainer_class(tr.REGISTERED_NAME) is tr.Trainer  # once imported
    assert issubclass(tr.Trainer, OCPTrainer) and registry.get_trainer_class("ocp") is OCPTrainer
    for size in lineup.SIZES:  # every config of the line-up selects it (common.yml)
        for key in lineup.KEYS:
            config = lineup.load_config(lineup.config_path(key, size, REPO / "configs" / "s2ef"))
            assert registry.get_trainer_class(config["trainer"]) is tr.Trainer, (size, key)


def test_settings_are_checked():
    assert tr.EarlyStopping.from_optim({}) == tr.EarlyStopping(0, 0.0) and not tr.EarlyStopping.from_optim({}).on
    assert tr.EarlyStopping.from_optim({"early_stopping_patience": 20, "early_stopping_min_delta": 1e-4}) == \
        tr.EarlyStopping(20, 1e-4)
    for bad in (-1, 2.5, True, "20"):
        with pytest.raises(ValueError, match="early_stopping_patience"):
            tr.EarlyStopping.from_optim({"early_stopping_patience": bad})
    for bad in (-0.1, math.nan, "0.1"):
        with pytest.raises(ValueError, match="early_stopping_min_delta"):
            tr.EarlyStopping.from_optim({"early_stopping_patience": 3, "early_stopping_min_delta": bad})


def test_improvement_rule():
    assert tr.improved(1.0, None, 0.0, True) and not tr.improved(math.nan, None, 0.0, True)
    assert tr.improved(0.99, 1.0, 0.0, True) and not tr.improved(1.0, 1.0, 0.0, True)
    assert not tr.improved(0.995, 1.0, 0.01, True) and tr.improved(0.98, 1.0, 0.01, True)
    assert tr.improved(0.5, 0.4, 0.05, False) and not tr.improved(0.42, 0.4, 0.05, False)
    assert tr.lower_is_better("forces_mae") and not tr.lower_is_better("energy_forces_within_threshold")


def test_patience_stops_a_run_that_cannot_improve(stopped):
    log, folder = stopped
    assert "early stopping: on, after 1 evaluations of val forces_mae" in log
    assert "early stopping: val forces_mae" in log and "0/1 evaluations without improvement" in log
    assert "1/1 evaluations without improvement" in log
    assert "Early stopping at step 2 (epoch 1.00): val forces_mae has not improved" in log
    assert log.count("Evaluating on val.") == 2  # not the 20 steps max_epochs allows
    ckpt = _load(folder / "checkpoint.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (2, 1.0)
    es = ckpt[tr.CKPT_KEY]
    assert (es["metric"], es["best_step"], es["wait"], es["stopped_step"]) == ("forces_mae", 1, 1, 2)
    assert es["best"] == ckpt["best_val_metric"]  # the count's best is fairchem's best checkpoint
    assert ckpt["scheduler"]["last_epoch"] == 2  # the stopping step's plateau step was taken
    assert (folder / "best_checkpoint.pt").is_file()


def test_a_resume_continues_the_count(lmdbs, stopped):
    """From the stopped checkpoint (1 evaluation without improvement) with patience 3: steps 3 and 4
    make it 2 and 3, so training stops at step 4 (a count restarted at 0 would stop at 5 or 6)."""
    _, folder = stopped
    log, resumed = _train(lmdbs, LEIGNN_200K, "resume", *FROZEN, "--optim.early_stopping_patience=3",
                          "--checkpoint", str(folder / "checkpoint.pt"))
    assert "early stopping: restored from the checkpoint (step 2)" in log and "1 evaluations without" in log
    assert "2/3 evaluations without improvement" in log and "0/3" not in log
    assert "Early stopping at step 4" in log
    ckpt = _load(resumed / "checkpoint.pt")
    assert ckpt["step"] == 4
    es = ckpt[tr.CKPT_KEY]
    assert (es["best_step"], es["wait"], es["stopped_step"]) == (1, 3, 4)


def test_checkpoint_of_an_early_stopped_run_evaluates(lmdbs, stopped):
    """leignn-evaluate's loader rebuilds the run from its checkpoint and scores a split with the
    numbers fairchem's own validation logged for that checkpoint."""
    from leignn_ocp.evaluation import evaluate_split, load_trainer

    _, folder = stopped
    best = _load(folder / "best_checkpoint.pt")
    trainer = load_trainer(folder / "best_checkpoint.pt", cpu=True)
    got = evaluate_split(trainer, lmdbs["val"])
    fm = best["val_metrics"]["forces_mae"]["metric"]
    assert got["forces_mae_meV_per_A"] == pytest.approx(1000.0 * fm, rel=1e-5), (got, fm)
    assert got["n_structures"] == 4


def test_without_patience_it_is_fairchems_trainer_step_for_step(lmdbs, stopped):
    """The 200K recipe with early_stopping_patience deleted (fairchem's own load_config, written
    back): the same run with trainer: ocp (fairchem's OCPTrainer) ends at the same step with
    bit-identical weights, EMA, optimizer, LR scheduler and best metric."""
    from fairchem.core.common.utils import load_config

    config, _, _ = load_config(str(REPO / LEIGNN_200K))
    del config["optim"][tr.PATIENCE_KEY]
    cfg = lmdbs["root"] / "no_patience.yml"
    cfg.write_text(yaml.safe_dump(config))
    common = ["--optim.eval_every=1", "--optim.max_epochs=2", *_tiny("leignn")]
    ours_log, ours = _train(lmdbs, str(cfg), "ours", *common)
    _, theirs = _train(lmdbs, str(cfg), "fairchem", *common, "--trainer=ocp")
    assert "early stopping" not in ours_log.lower()
    a, b = _load(ours / "checkpoint.pt"), _load(theirs / "checkpoint.pt")
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    assert tr.CKPT_KEY not in a
    assert a["best_val_metric"] == b["best_val_metric"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]))
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), i
    assert a["scheduler"] == b["scheduler"]
    # the weights did train (same seed, same initial weights as the lr-0 run, which never moved)
    frozen = _load(stopped[1] / "checkpoint.pt")["state_dict"]
    assert not all(torch.equal(a["state_dict"][k], frozen[k]) for k in frozen)


GEMNET_200K = "configs/s2ef/200k/gemnet_dt.yml"
GEMNET = [*_tiny("gemnet_dt"), "--optim.max_epochs=1"]


def test_unfitted_scale_factors_are_refused_and_fitting_still_works(lmdbs):
    # --model.scale_file=None: whatever file the recipe names, the tiny model's factors are unfitted
    log, _ = _train(lmdbs, GEMNET_200K, "unfitted", *GEMNET, "--model.scale_file=None", ok=False)
    assert "UnfittedScaleFactorsError: refusing to train gemnet_t" in log
    msg = log[log.index("UnfittedScaleFactorsError: refusing"):]
    assert "ScaleFactors are not fitted" in msg
    # the exact command to fit them, with this run's config and overrides
    assert f"leignn-evaluate fit-scales --out scales/gemnet_t.json --mode train --config-yml {GEMNET_200K}" in msg
    assert f"--dataset.train.src={lmdbs['train']}" in msg and "--model.num_blocks=1" in msg
    assert "--model.scale_file=scales/gemnet_t.json" in msg
    assert "Evaluating on val." not in log and "is not fitted. Please make sure" not in log  # no step, no warning

    # fitting goes through the same config (this trainer) and its factors then pass the check
    out = lmdbs["root"] / "gemnet_scales.json"
    fit = [sys.executable, "-m", "leignn_ocp.evaluation", "fit-scales", "--out", str(out), "--num-batches", "1"]
    _train(lmdbs, GEMNET_200K, "fit", *GEMNET, "--model.scale_file=None", module=fit)
    scales = json.loads(out.read_text())
    names = {k for k in scales if k != "comment"}
    assert names and all(v > 0 and math.isfinite(v) for k, v in scales.items() if k != "comment")
    unfitted = msg.split("ScaleFactors are not fitted (", 1)[1].split(")", 1)[0].split(", ")
    assert set(unfitted) == names  # the error named exactly the factors fitting fits
    from leignn_ocp.evaluation.scales import scale_factor_status

    cfg = lineup.load_config(REPO / GEMNET_200K)["model"]
    cfg.update(lineup.get("gemnet_dt").tiny, scale_file=str(out))
    status = scale_factor_status(cfg)
    assert set(status["fitted"]) == names and status["unfitted"] == []


def test_fit_command_without_a_command_line():
    cmd = tr.fit_command("painn", argv=["-m", "submitit", "--x.y=1"])  # not a fairchem command line
    assert cmd.splitlines()[0] == ("leignn-evaluate fit-scales --out scales/painn.json --mode train "
                                   "--config-yml <this run's config.yml>")
    cmd = tr.fit_command("painn", argv=["--mode", "train", "--config-yml", "c.yml", "--cpu",
                                        "--model.scale_file=x.json", "--optim.batch_size=4", "--seed", "1"])
    first = cmd.splitlines()[0]
    assert first == "leignn-evaluate fit-scales --out scales/painn.json --mode train --config-yml c.yml " \
                    "--optim.batch_size=4 --cpu"


def test_early_stopping_needs_a_validation_set(lmdbs, tmp_path):
    """In process, as fairchem's new_trainer_context builds it: no dataset.val, patience 2 -> a clear error."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config, setup_imports

    from leignn_ocp.evaluation.checkpoints import close_lmdb

    argv = ["--mode", "train", "--config-yml", str(REPO / LEIGNN_200K), "--cpu", "--debug", "--run-dir", str(tmp_path),
            f"--dataset.train.src={lmdbs['train']}", "--optim.num_workers=0", "--optim.early_stopping_patience=2",
            *_tiny("leignn")]
    args, override = flags.get_parser().parse_known_args(argv)
    c = build_config(args, override)
    del c["dataset"]["val"]
    setup_imports(c)
    t = registry.get_trainer_class(c["trainer"])(
        task={}, model=c["model"], outputs=c["outputs"], dataset=c["dataset"], optimizer=c["optim"],
        loss_functions=c["loss_functions"], evaluation_metrics=c["evaluation_metrics"], identifier="noval",
        run_dir=str(tmp_path), is_debug=True, logger=c["logger"], local_rank=0, cpu=True)
    try:
        with pytest.raises(ValueError, match="needs a validation set"):
            t.train()
        assert t.step == 0
    finally:
        close_lmdb(t.train_loader)
    assert os.listdir(tmp_path) == []  # debug: nothing written


def test_bad_data_stops_the_run_before_training(lmdbs, tmp_path):
    """A NaN force label in record 5 of the training LMDB: the real CLI stops before the first step,
    naming the split, the file and the record (fairchem alone would train on a NaN loss)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = emt_slab_frames(N_TRAIN, seed=0)
    f = frames[5].get_forces()
    f[2, 1] = np.nan
    frames[5].calc = SinglePointCalculator(frames[5], energy=frames[5].get_potential_energy(), forces=f)
    write_s2ef_lmdb(frames, tmp_path / "bad")
    bad = {**lmdbs, "train": tmp_path / "bad", "root": tmp_path}
    log, ckpt = _train(bad, LEIGNN_200K, "bad", *_tiny("leignn"), ok=False)
    assert re.search(r"dataset\.train \(lmdb\): \S+/bad/data\.lmdb: record 5 label 'forces' is non-finite values \(atom 2: ", log), log[-3000:]
    assert ckpt is None and "energy_mae" not in log
    log, _ = _train(lmdbs, LEIGNN_200K, "badopt", *_tiny("leignn"), "--optim.check_data=sometimes", ok=False)
    assert "optim.check_data must be one of ('auto', 'full', 'sample', 'off'), got 'sometimes'" in log


@pytest.mark.parametrize("tie", [True, False])
def test_tie_force_normalizer(lmdbs, tmp_path, tie):
    """As fairchem's new_trainer_context builds it, on the default protocol's SchNet: with the tie the
    force normaliser's rmsd is the fitted energy rmsd, without it the forces' own."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config, setup_imports

    from leignn_ocp.evaluation.checkpoints import close_lmdb

    argv = ["--mode", "train", "--config-yml", str(REPO / "configs/s2ef/default/schnet.yml"), "--cpu", "--debug",
            "--run-dir", str(tmp_path), f"--dataset.train.src={lmdbs['train']}", f"--dataset.val.src={lmdbs['val']}",
            "--optim.num_workers=0", f"--optim.tie_force_normalizer={tie}", *_tiny("schnet")]
    args, override = flags.get_parser().parse_known_args(argv)
    c = build_config(args, override)
    setup_imports(c)
    t = registry.get_trainer_class(c["trainer"])(
        task={}, model=c["model"], outputs=c["outputs"], dataset=c["dataset"], optimizer=c["optim"],
        loss_functions=c["loss_functions"], evaluation_metrics=c["evaluation_metrics"], identifier="tie",
        run_dir=str(tmp_path), is_debug=True, logger=c["logger"], local_rank=0, cpu=True, seed=0)
    try:
        e, f = t.normalizers["energy"], t.normalizers["forces"]
        assert float(f.mean) == 0.0
        assert (float(f.rmsd) == float(e.rmsd)) is tie
    finally:
        close_lmdb(t.train_loader)


DEFAULT = "configs/s2ef/default/leignn.yml"  # the default protocol: ReduceLROnPlateau
COSINE = {"lambda_type": "cosine", "warmup_epochs": 0.1, "warmup_factor": 0.2, "lr_min_factor": 0.01}


@pytest.fixture(scope="module")
def cosine(lmdbs) -> str:
    """The default protocol with the cosine of docs/results/is2rs_leignn_cosine/ instead of its plateau."""
    from fairchem.core.common.utils import load_config

    config, _, _ = load_config(str(REPO / DEFAULT))
    optim = config["optim"]
    for key in ("mode", "factor", "patience", "min_lr"):
        del optim[key]
    optim.update(scheduler="LambdaLR", scheduler_params=dict(COSINE))
    cfg = lmdbs["root"] / "cosine.yml"
    cfg.write_text(yaml.safe_dump(config))
    return str(cfg)


@pytest.fixture(scope="module")
def cosine_run(lmdbs, cosine):
    """3 epochs of 2 steps on the cosine, every step's lr logged: (log, checkpoint folder)."""
    return _train(lmdbs, cosine, "cosine", "--optim.max_epochs=3", "--print-every", "1", *_tiny("leignn"))


def test_an_epoch_counted_cosine_decays_the_lr_over_this_runs_epochs(cosine_run):
    """The real CLI, 3 epochs of 2 steps: fairchem's CosineLRLambda gets this run's 6 steps, the
    0.1-epoch warm-up (under one step here) becomes one step and says so, every step trains at
    lr_initial x lambda(step - 1), the schedule ends at lr_min_factor, and the checkpoint keeps the
    schedule in epochs (a resume converts it once, with its own loader)."""
    from fairchem.core.modules.scheduler import CosineLRLambda

    log, folder = cosine_run
    assert "LR warm-up: 0.1 epochs is under one step of this run's 2 per epoch; warming up for one step" in log
    ckpt = _load(folder / "checkpoint.pt")
    assert ckpt["step"] == 3 * STEPS_PER_EPOCH
    lam = ckpt["scheduler"]["lr_lambdas"][0]
    assert lam == {"warmup_epochs": 1, "lr_warmup_factor": 0.2, "max_epochs": 3 * STEPS_PER_EPOCH, "lr_min_factor": 0.01}
    expect = CosineLRLambda(1, 0.2, 3 * STEPS_PER_EPOCH, 0.01)
    logged = [float(x) for x in re.findall(r"lr: ([0-9.e+-]+), epoch", log)]
    assert logged == [float(f"{1e-3 * expect(k):.2e}") for k in range(3 * STEPS_PER_EPOCH)]
    # saved before the last step's scheduler step: the lr the last step trained with, one step short of the floor
    assert ckpt["scheduler"]["_last_lr"] == [pytest.approx(1e-3 * expect(3 * STEPS_PER_EPOCH - 1))]
    assert expect(3 * STEPS_PER_EPOCH) == 0.01
    assert ckpt["config"]["optim"]["scheduler_params"] == COSINE


@pytest.mark.parametrize("change, message", [
    ({"scheduler": "ReduceLROnPlateau"},
     "optim.scheduler_params is read by scheduler: LambdaLR only, not 'ReduceLROnPlateau'; set optim.scheduler: "
     "LambdaLR or remove scheduler_params"),
    ({"lambda_type": "linear"}, "optim.scheduler_params.lambda_type must be one of ['cosine', 'multistep'], not 'linear'"),
    ({"lr_min_factor": None}, "optim.scheduler_params.lr_min_factor must be a number, not None"),
    ({"lr_min_factor": 0.0}, "optim.scheduler_params.lr_min_factor=0.0 must lie in (0, 1]"),
    ({"warmup_factor": 2}, "optim.scheduler_params.warmup_factor=2 must lie in (0, 1]"),
    ({"warmup_epochs": -1}, "optim.scheduler_params.warmup_epochs=-1 must be >= 0"),
    ({"lambda_type": "multistep"}, "optim.scheduler_params (multistep) lacks decay_epochs, decay_rate"),
])
def test_bad_schedules_are_named(change, message):
    optim = {"scheduler": "LambdaLR", "scheduler_params": dict(COSINE)}
    if "scheduler" in change:
        optim["scheduler"] = change["scheduler"]
    else:
        optim["scheduler_params"].update(change)
    with pytest.raises(tr.ScheduleError) as err:
        tr.check_schedule(optim)
    assert str(err.value) == message


def test_a_bad_schedule_stops_the_cli_before_training(lmdbs, cosine):
    log, folder = _train(lmdbs, cosine, "badcos", "--optim.max_epochs=1", *_tiny("leignn"),
                         "--optim.scheduler_params.lambda_type=cos", ok=False)
    assert "ScheduleError: optim.scheduler_params.lambda_type must be one of ['cosine', 'multistep'], not 'cos'" in log
    assert "lr: " not in log and (folder is None or not any(folder.iterdir()))  # before the normalizer fit


def test_a_plateau_checkpoint_resumes_on_the_cosine_schedule_at_its_step(lmdbs, cosine):
    """A checkpoint of the default (plateau) protocol resumed, or relaxed, with a cosine config:
    torch would fail on the other scheduler's state; it is left out, said so, and the cosine
    continues at the step."""
    from fairchem.core.modules.scheduler import CosineLRLambda

    _, plateau = _train(lmdbs, DEFAULT, "plateau", "--optim.max_epochs=1", *_tiny("leignn"))
    log, resumed = _train(lmdbs, cosine, "oncosine", "--optim.max_epochs=3", "--print-every", "1", *_tiny("leignn"),
                          "--checkpoint", str(plateau / "checkpoint.pt"))
    expect = CosineLRLambda(1, 0.2, 3 * STEPS_PER_EPOCH, 0.01)
    assert (f"{plateau / 'checkpoint.pt'}: its LR scheduler state is another scheduler's than this run's LambdaLR: "
            f"not restored; the schedule continues at step {STEPS_PER_EPOCH} (lr {1e-3 * expect(STEPS_PER_EPOCH):.3g})") in log
    logged = [float(x) for x in re.findall(r"lr: ([0-9.e+-]+), epoch", log)]
    assert logged == [float(f"{1e-3 * expect(k):.2e}") for k in range(STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH)]
    assert _load(resumed / "checkpoint.pt")["step"] == 3 * STEPS_PER_EPOCH


def test_a_resume_takes_the_lr_step_its_checkpoint_was_saved_before(lmdbs, cosine, cosine_run):
    """fairchem saves checkpoint.pt inside step N, before that step's scheduler step. Resumed from
    the 6-step cosine run's last checkpoint (saved inside step 6) for one more epoch, steps 7 and 8
    train at lambda(6) and lambda(7), both the floor (torch restores the checkpoint's 6-step lambda);
    without the step taken on load, step 7 would train at lambda(5), 7.6x the floor."""
    _, done = cosine_run
    saved = _load(done / "checkpoint.pt")
    assert (saved["step"], saved["scheduler"]["last_epoch"]) == (6, 5)
    log, more = _train(lmdbs, cosine, "cosine_more", "--optim.max_epochs=4", "--print-every", "1", *_tiny("leignn"),
                       "--checkpoint", str(done / "checkpoint.pt"))
    assert [float(x) for x in re.findall(r"lr: ([0-9.e+-]+), epoch", log)] == [1e-5, 1e-5]
    assert _load(more / "checkpoint.pt")["step"] == 8
