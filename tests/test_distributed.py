"""Beyond one process: fairchem's ``--submit`` (submitit), 2-rank CPU DDP, preemption and resume.

Real runs of the fairchem CLI on a tiny LMDB (16 EMT-labelled slabs, batch 4 -> 4 steps per epoch,
10 epochs = 40 steps; a LEIGNN of width 16). ``python -m leignn_ocp.launch`` is fairchem's own
``main()`` with the plugin's Runner (leignn_ocp/launch/); ``python -m leignn_ocp.cluster`` is its old
spelling. Without ``sbatch`` submitit's AutoExecutor picks its local executor, so ``--submit`` runs the
pickled job in a fresh process as a Slurm node would, including submitit's preemption signal handling
and requeue. Those end-to-end runs are marked slow; the in-process checks of the patches are not.
Every patch is applied inside ``patched_fairchem()`` only: no test leaves fairchem patched (checked
after each test by ``_fairchem_unpatched``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fairchem.core.common.utils import create_grid, load_config

from leignn_ocp.launch import patched_fairchem

from conftest import REPO, cli_env, emt_slab_frames, fairchem_cli, write_s2ef_lmdb

N_TRAIN, BATCH, EPOCHS = 16, 4, 10
STEPS = N_TRAIN // BATCH * EPOCHS  # 40 on one rank
EVAL_EVERY, CKPT_EVERY = 10, 4
PY = sys.executable
LAUNCHER = [PY, "-m", "leignn_ocp.launch"]  # the fairchem CLI + the leignn_ocp/launch/ fixes
OLD_LAUNCHER = [PY, "-m", "leignn_ocp.cluster"]  # its old spelling (a shim), still working
PROBE = "leignn_probe.ProbeLEIGNN"  # tests/leignn_probe.py: LEIGNN that signals itself at step k


def _patch_points() -> set:
    """Every (module or class, attribute) the launcher patches, listed here independently of it."""
    from fairchem.core import _cli
    from fairchem.core.common import utils
    from fairchem.core.trainers import base_trainer

    return {(collections, "MutableMapping"), (base_trainer, "save_checkpoint"), (utils, "save_checkpoint"),
            (base_trainer.BaseTrainer, "_get_timestamp"), (_cli, "Runner"), (_cli, "runner_wrapper"),
            (_cli, "build_config"), (_cli, "LaunchConfig")}


_MISSING = object()
_ORIGINAL = {point: vars(point[0]).get(point[1], _MISSING) for point in _patch_points()}  # fairchem's own


def _unpatched() -> list[str]:
    """The patch points that do not hold fairchem's original object (raw, e.g. the staticmethod)."""
    return [f"{t.__name__}.{a}" for (t, a), orig in _ORIGINAL.items() if vars(t).get(a, _MISSING) is not orig]


@pytest.fixture(autouse=True)
def _fairchem_unpatched():
    """After each test of this module fairchem is exactly as imported: later test modules see it unpatched."""
    assert not _unpatched()
    yield
    assert not _unpatched(), f"left patched: {_unpatched()}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with train/val LMDBs and cfg.yml: configs/s2ef/default/leignn.yml shrunk to seconds."""
    root = tmp_path_factory.mktemp("dist")
    write_s2ef_lmdb(emt_slab_frames(N_TRAIN, seed=0), root / "train")
    write_s2ef_lmdb(emt_slab_frames(4, seed=1), root / "val")
    cfg, _, _ = load_config(str(REPO / "configs/s2ef/default/leignn.yml"))
    norm = {"energy": {"mean": 0.0, "stdev": 1.0}, "forces": {"mean": 0.0, "stdev": 1.0}}
    cfg["dataset"] = {
        "train": {"format": "lmdb", "src": str(root / "train"), "transforms": {"normalizer": norm}},
        "val": {"src": str(root / "val")},  # no test split: py-lmdb >= 1.5 opens a file once per process
    }
    cfg["model"].update(hidden_channels=16, num_layers=2, num_rbf=8)
    # checkpoint every 4 steps (mid-epoch once DDP halves the epoch), validate (and step the
    # ReduceLROnPlateau scheduler) every 10
    cfg["optim"].update(batch_size=BATCH, eval_batch_size=BATCH, num_workers=0, max_epochs=EPOCHS,
                        eval_every=EVAL_EVERY, checkpoint_every=CKPT_EVERY)
    (root / "cfg.yml").write_text(yaml.safe_dump(cfg))
    return root


def _env(**extra) -> dict:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 400, cwd: Path = REPO, **env) -> str:
    """Run ``cmd``; if it stalls, fail with every process's Python stack (faulthandler on SIGABRT)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         env=_env(PYTHONFAULTHANDLER="1", **env), start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)  # each Python process of the group prints its threads' stacks
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        err = "\n".join(ln for ln in err.splitlines()
                       if not any(k in ln for k in ("Warning", "torch.load(", "Extension modules:")))
        pytest.fail(f"{cmd} still running after {timeout} s\n--- stdout (end) ---\n{out[-3000:]}\n"
                    f"--- stderr without warnings (end) ---\n{err[-12000:]}")
    log = out + err
    assert p.returncode == 0, f"{cmd}\n{log[-6000:]}"
    return log


def _train_args(tiny: Path, run_dir: Path, ident: str) -> list[str]:
    return ["--mode", "train", "--config-yml", str(tiny / "cfg.yml"), "--cpu", "--run-dir", str(run_dir),
            "--identifier", ident, "--print-every", "1"]


def _ckpts(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoints/*/checkpoint.pt"))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _adam_updates(ckpt: dict) -> int:
    """Optimizer updates actually applied (AdamW's per-parameter step counter)."""
    return int(next(iter(ckpt["optimizer"]["state"].values()))["step"])


def _max_diff(a: dict, b: dict) -> float:
    """max |a - b| over the model weights and the EMA shadow weights of two checkpoints."""
    diffs = [(a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"]]
    diffs += [(x.double() - y.double()).abs().max().item()
              for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"])]
    return max(diffs)


@pytest.fixture(scope="module")
def reference(tiny) -> dict:
    """An uninterrupted single-process run with the plain fairchem CLI: its final checkpoint."""
    run_dir = tiny / "run_reference"
    t0 = time.time()
    log = _run([fairchem_cli(), *_train_args(tiny, run_dir, "reference")])
    assert "Loaded LEIGNN with" in log
    (ckpt,) = _ckpts(run_dir)
    state = _load(ckpt)
    print(f"\nreference: {ckpt} step {state['step']} ({time.time() - t0:.1f} s)")
    assert state["step"] == STEPS and _adam_updates(state) == STEPS
    return state


# ---------------------------------------------------------------------------------------------
# submitit: fairchem --submit with the local executor


def _require_local_executor() -> None:
    if shutil.which("srun") or shutil.which("sbatch"):
        pytest.skip("Slurm is installed here: --submit would queue a real job")


def _submitted_job(log: str, logdir: Path) -> tuple[str, Path]:
    m = re.search(r"Submitted jobs: (\S+)", log)
    assert m, log[-3000:]
    job_id = m.group(1).split(",")[0]
    return job_id, logdir / job_id


def _wait_result(job_dir: Path, job_id: str, timeout: float = 400) -> tuple[str, object]:
    """Block until the submitit job pickles its result (it runs in a detached controller process)."""
    result = job_dir / f"{job_id}_0_result.pkl"
    t0 = time.time()
    while not result.exists():
        assert time.time() - t0 < timeout, f"no result after {timeout} s:\n{_job_log(job_dir, job_id)[-4000:]}"
        time.sleep(0.5)
    time.sleep(0.2)
    with result.open("rb") as f:
        return pickle.load(f)


def _job_log(job_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(job_dir.glob(f"{job_id}_0_log.*")))


def _submit_args(tiny: Path, run_dir: Path, logdir: Path, ident: str) -> list[str]:
    # fairchem's Slurm flags; the local executor reads the time limit, GPUs and tasks per node
    return [*_train_args(tiny, run_dir, ident), "--submit", "--logdir", str(logdir),
            "--slurm-partition", "debug", "--num-nodes", "1", "--num-gpus", "1",
            "--slurm-timeout", "1", "--slurm-mem", "4"]


@pytest.mark.slow
def test_fairchem_submit_runs_the_plugin_job(tiny, reference):
    """fairchem's --submit path (its main(): AutoExecutor, map_array, experiment log) with the plugin's
    Runner: the pickled job is unpickled in a fresh process, imports leignn_ocp and trains.

    (Plain `fairchem --submit` gets this far too, then fairchem 1.10 stops without Slurm variables:
    KeyError 'local_rank'; leignn_ocp.launch.Runner takes the ranks from submitit instead.)
    Run through the old spelling `python -m leignn_ocp.cluster`: the job pickled in that __main__
    must still unpickle on the "node" (it references leignn_ocp.launch.runner.Runner)."""
    _require_local_executor()
    run_dir, logdir = tiny / "run_submit", tiny / "slurm_logs"
    t0 = time.time()
    # no PYTHONPATH, outside the repo: the job imports leignn_ocp from the venv's (editable) install
    log = _run([*OLD_LAUNCHER, *_submit_args(tiny, run_dir, logdir, "submit")], cwd=tiny, PYTHONPATH="")
    assert "Submitting 1 jobs" in log
    job_id, job_dir = _submitted_job(log, logdir)
    assert (job_dir / f"{job_id}_submitted.pkl").exists()
    pickled = (job_dir / f"{job_id}_submitted.pkl").read_bytes()
    assert b"leignn_ocp.launch.runner" in pickled and b"__main__" not in pickled
    status, value = _wait_result(job_dir, job_id)
    job_log = _job_log(job_dir, job_id)
    assert status == "success", job_log[-4000:]
    assert "Loaded LEIGNN with" in job_log  # model built on the "node" from its import path
    (ckpt,) = _ckpts(run_dir)
    state = _load(ckpt)
    print(f"\nsubmit: job {job_id} -> {ckpt} step {state['step']} ({time.time() - t0:.1f} s)")
    assert state["step"] == STEPS and _adam_updates(state) == STEPS
    assert state["config"]["model"]["name"] == "leignn_ocp.LEIGNN"
    assert "submitit job" in job_log and "rank 0/1" in job_log
    assert _max_diff(state, reference) == 0.0  # same seed, same data order, same machine
    assert list((logdir / "exp").glob("*.log"))  # fairchem's experiment log


@pytest.mark.slow
def test_submitit_preemption_requeues_and_finishes(tiny, reference):
    """SIGUSR2 (Slurm's preemption / time-out signal) in the middle of step 7: the job checkpoints
    step 7 at the step boundary, submitit requeues it, the new process resumes and finishes."""
    _require_local_executor()
    run_dir, logdir = tiny / "run_preempt", tiny / "slurm_logs_preempt"
    marker = tiny / "preempt.marker"
    t0 = time.time()
    log = _run([*LAUNCHER, *_submit_args(tiny, run_dir, logdir, "preempt"), f"--model.name={PROBE}"],
               LEIGNN_PROBE_SIGNAL=f"SIGUSR2:7:{marker}")
    job_id, job_dir = _submitted_job(log, logdir)
    status, value = _wait_result(job_dir, job_id)
    job_log = _job_log(job_dir, job_id)
    assert status == "success", job_log[-4000:]
    assert marker.exists()
    assert "Caught SIGUSR2 at step 7" in job_log
    assert "Preemption: checkpointing at step 7 (step boundary)" in job_log
    assert "Requeued job" in job_log and job_log.count("Loaded ProbeLEIGNN with") == 2  # ran twice
    (ckpt,) = _ckpts(run_dir)  # the requeued job continued in the same checkpoint folder
    state = _load(ckpt)
    diff = _max_diff(state, reference)
    print(f"\npreempt: SIGUSR2 in step 7 -> checkpoint at step 7, requeued, final step {state['step']}, "
          f"{_adam_updates(state)} optimizer updates, max |w - w_ref| = {diff:.3e} ({time.time() - t0:.1f} s)")
    assert state["step"] == STEPS and _adam_updates(state) == STEPS  # no batch skipped or repeated
    assert diff == 0.0


# ---------------------------------------------------------------------------------------------
# multi-process data parallel through fairchem's own launcher (torch elastic, gloo on CPU)


ELASTIC_DEFAULT_PORT = 29400  # torch elastic's c10d rendezvous port when no endpoint is given


@contextlib.contextmanager
def _idle_listener(port: int):
    """A process-local socket that listens on ``port`` and never answers (None if the port is taken)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
        s.listen(8)
    except OSError:
        s.close()
        yield None
        return
    try:
        yield s
    finally:
        s.close()


@pytest.mark.slow
def test_two_rank_cpu_ddp(tiny):
    """`--cpu --num-gpus 2`: fairchem's main() starts 2 ranks with torch elastic, gloo backend; each
    rank keeps one DataLoader worker (fairchem 1.10 alone would force num_workers to 0).

    Port 29400, where the plain ``fairchem`` CLI's rendezvous always meets, is held by an idle
    listener meanwhile: the launcher must not touch it. The plain CLI's own multi-rank run is not
    tested here: with 29400 shared by every run on the host (or container network), two concurrent
    runs join one store and the later one hangs or fails when the first exits (fix 8)."""
    run_dir = tiny / "run_ddp"
    t0 = time.time()
    with _idle_listener(ELASTIC_DEFAULT_PORT):
        log = _run([*LAUNCHER, *_train_args(tiny, run_dir, "ddp"), "--num-gpus", "2", "--optim.num_workers=1"],
                   timeout=200)
    assert "Running in local mode with 2 ranks" in log
    m = re.search(r"leignn_ocp.launch: local rendezvous at localhost:(\d+)", log)
    assert m and int(m.group(1)) != ELASTIC_DEFAULT_PORT
    assert "keeping optim.num_workers=1 per rank" in log
    assert "rank: 1: Sampler created" in log  # the second rank built its own sampler shard
    m = re.search(r"DDP replica check: 2 ranks, (\d+) parameters, max \|param - rank-0 param\| = (\S+)", log)
    assert m, log[-4000:]
    (ckpt,) = _ckpts(run_dir)
    state = _load(ckpt)
    print(f"\nddp: {ckpt} step {state['step']}, replica max diff {m.group(2)} ({time.time() - t0:.1f} s)")
    assert float(m.group(2)) == 0.0  # DDP kept every rank's weights identical
    steps = N_TRAIN // (2 * BATCH) * EPOCHS  # each rank sees half of every epoch
    assert state["step"] == steps and _adam_updates(state) == steps
    assert state["config"]["optim"]["num_workers"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


# ---------------------------------------------------------------------------------------------
# kill -9 mid-training, resume with --checkpoint


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tiny, reference):
    """Plain fairchem CLI: SIGKILL in the middle of step 10 (last checkpoint: step 8, mid-epoch 3),
    then `--checkpoint .../checkpoint.pt --timestamp-id <same>` runs to the end."""
    run_dir = tiny / "run_killed"
    marker = tiny / "kill.marker"
    t0 = time.time()
    args = [*_train_args(tiny, run_dir, "killed"), f"--model.name={PROBE}"]
    p = subprocess.run([fairchem_cli(), *args], capture_output=True, text=True, cwd=REPO, timeout=400,
                       env=_env(LEIGNN_PROBE_SIGNAL=f"SIGKILL:10:{marker}"))
    assert p.returncode == -signal.SIGKILL and marker.exists(), (p.stdout + p.stderr)[-4000:]
    (ckpt,) = _ckpts(run_dir)
    killed = _load(ckpt)
    assert killed["step"] == 8 and _adam_updates(killed) == 8  # checkpoint_every = 4

    timestamp_id = ckpt.parent.name  # continue in the same folder (and tensorboard run)
    log = _run([fairchem_cli(), *args, "--checkpoint", str(ckpt), "--timestamp-id", timestamp_id])
    assert f"Loading checkpoint from: {ckpt}" in log
    (final,) = _ckpts(run_dir)
    state = _load(final)
    diff = _max_diff(state, reference)
    print(f"\nkill -9 in step 10, resumed from step {killed['step']} ({ckpt}) with plain fairchem "
          f"--checkpoint: final step {state['step']}, {_adam_updates(state)} optimizer updates, "
          f"max |w - w_ref| = {diff:.3e} ({time.time() - t0:.1f} s)")
    assert state["step"] == STEPS and _adam_updates(state) == STEPS
    assert diff == 0.0  # fairchem's sampler re-derives the epoch's order and skips the done batches


# ---------------------------------------------------------------------------------------------
# the ablation sweep file


@pytest.mark.slow  # a fresh interpreter importing fairchem: seconds
def test_ablation_sweep_grid():
    base, _, _ = load_config(str(REPO / "configs/s2ef/200k/leignn.yml"))
    base["identifier"] = "ablation"
    sweep = REPO / "configs/sweeps/ablations.yml"
    # fairchem 1.10 as installed: create_grid needs collections.MutableMapping (gone in Python 3.10)
    probe = subprocess.run(
        [PY, "-c", "import sys; from fairchem.core.common.utils import create_grid; "
                   f"create_grid({{'model': {{}}, 'identifier': 'x'}}, {str(sweep)!r})"],
        capture_output=True, text=True, env=_env(), timeout=120)
    if sys.version_info >= (3, 10):
        assert probe.returncode != 0 and "MutableMapping" in probe.stderr
    with patched_fairchem():
        configs = create_grid(base, str(sweep))
    got = [(c["identifier"], c["model"]["update"], c["model"]["global_messages"]) for c in configs]
    assert got == [("ablation_run0", "nmu", False),   # Vanilla + NMU
                   ("ablation_run1", "nmu", True),    # LEIGNN
                   ("ablation_run2", "painn", False),  # Vanilla
                   ("ablation_run3", "painn", True)]  # not a paper variant (documented in the file)
    for c in configs:  # nothing else changes
        assert {k: v for k, v in c["model"].items() if k not in ("update", "global_messages")} == \
            {k: v for k, v in base["model"].items() if k not in ("update", "global_messages")}


def test_run_timestamps_have_second_resolution():
    """fairchem 1.10 rounds run timestamps (checkpoint folder names) to 128 s via float32."""
    from datetime import datetime

    from fairchem.core.trainers.base_trainer import BaseTrainer

    with patched_fairchem():
        stamp = BaseTrainer._get_timestamp(torch.device("cpu"), "x")
    assert stamp.endswith("-x")
    t = datetime.strptime(stamp[:-2], "%Y-%m-%d-%H-%M-%S")
    assert abs((datetime.now() - t).total_seconds()) < 3


def test_preemption_before_training_requeues_the_job_unchanged():
    """A signal while the trainer is still being built: fairchem's checkpoint() would raise
    (no trainer yet); the plugin's Runner requeues the same config with a fresh Runner."""
    from leignn_ocp.launch import Runner

    config = {"mode": "train", "checkpoint": None, "identifier": "x"}
    delayed = Runner().checkpoint(config)
    assert isinstance(delayed.function, Runner) and delayed.args == (config,)


# ---------------------------------------------------------------------------------------------
# the patches themselves: scoped, reversible, version-guarded (in-process, fast)


def test_patches_are_undone_on_exit():
    """Inside patched_fairchem() every patch point holds the launcher's object; on exit (normal, nested
    or by an exception) each holds fairchem's original object again."""
    from fairchem.core import _cli

    from leignn_ocp.launch import Runner, runner_wrapper
    from leignn_ocp.launch.patches import fairchem_patches

    assert {(p.target, p.attr) for p in fairchem_patches()} == _patch_points()  # nothing unlisted
    with patched_fairchem():
        assert sorted(_unpatched()) == sorted(f"{t.__name__}.{a}" for t, a in _patch_points())
        assert _cli.Runner is Runner and _cli.runner_wrapper is runner_wrapper
        assert collections.MutableMapping is collections.abc.MutableMapping
        with patched_fairchem():
            pass
        assert len(_unpatched()) == len(_patch_points())  # the inner exit put back the outer patches
    assert not _unpatched()
    assert _cli.Runner is not Runner and not issubclass(_cli.Runner, Runner)
    with pytest.raises(ValueError, match="inside"):
        with patched_fairchem():
            raise ValueError("inside")
    assert not _unpatched()


def test_patches_refuse_another_fairchem_version(monkeypatch):
    """Each patch names the fairchem-core series it was written for; another installed version fails
    before anything is patched, with both versions in the message (unless explicitly overridden)."""

    from fairchem.core import _cli

    from leignn_ocp.launch import Runner, patches

    assert patches.installed_fairchem().startswith(patches.WRITTEN_FOR + ".")  # what the tests run on
    monkeypatch.setattr(patches, "installed_fairchem", lambda: "2.3.0")
    monkeypatch.delenv(patches.VERSION_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"written for fairchem-core 1\.10\.x, but fairchem-core 2\.3\.0 is installed"):
        with patched_fairchem():
            pytest.fail("patched an unsupported fairchem")
    assert not _unpatched()
    monkeypatch.setenv(patches.VERSION_ENV, "1")
    with pytest.warns(UserWarning, match="fairchem-core 2.3.0"):
        with patched_fairchem():
            assert _cli.Runner is Runner
    assert not _unpatched()
    missing = patches.Patch(_cli, "no_such_attribute", None, "test")
    with pytest.raises(RuntimeError, match=r"no fairchem\.core\._cli\.no_such_attribute to patch"):
        patches.check_patch(missing, "1.10.0")


def test_runner_is_pickled_by_package_reference():
    """--submit pickles fairchem's ``Runner()`` (cloudpickle, as submitit does) and torch elastic pickles
    ``runner_wrapper``: both must name leignn_ocp.launch.runner, which a compute node imports from the
    installed package (an object of ``__main__`` would not unpickle there)."""
    import pickle

    import cloudpickle
    from fairchem.core import _cli

    from leignn_ocp.launch import Runner, runner_wrapper

    with patched_fairchem():
        job, wrapper = cloudpickle.dumps(_cli.Runner()), pickle.dumps(_cli.runner_wrapper)
    for blob in (job, wrapper):
        assert b"leignn_ocp.launch.runner" in blob and b"__main__" not in blob
    assert type(pickle.loads(job)) is Runner and pickle.loads(wrapper) is runner_wrapper
