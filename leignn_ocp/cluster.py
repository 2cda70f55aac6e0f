"""``fairchem`` with the fixes multi-process, Slurm and preempted runs need (fairchem-core 1.10).

    python -m leignn_ocp.cluster --mode train --config-yml configs/s2ef/200k/leignn.yml \\
        --submit --num-gpus 8 --num-nodes 2 --slurm-partition <p> --sweep-yml configs/sweeps/ablations.yml

takes exactly the flags of the ``fairchem`` console script and runs the same code
(:func:`fairchem.core._cli.main`: submitit ``AutoExecutor`` for ``--submit``, torch elastic launch for
``--num-gpus N`` without ``--submit``, one process otherwise). The plain ``fairchem`` CLI trains this
plugin too (``model.name: leignn_ocp.LEIGNN`` is imported by fairchem's registry in every process);
this launcher only swaps in :class:`Runner` and patches eight rough edges of fairchem 1.10:

1. ``--sweep-yml`` crashes on Python >= 3.10: ``create_grid`` tests ``collections.MutableMapping``,
   which Python 3.10 removed. :func:`patch_fairchem` restores the alias (to ``collections.abc``'s).
2. Preemption is handled at a *step boundary*. fairchem's ``Runner.checkpoint`` saves the trainer
   wherever ``SIGUSR2`` (Slurm's preemption / time-out signal, also sent by submitit's local
   executor) interrupts the main thread: almost always inside a training step, after
   ``trainer.step`` was advanced to N but before the optimizer applied batch N. The requeued job then
   continues at N + 1 and batch N is never trained on (measured: 40 steps, 39 optimizer updates,
   max |w - w_uninterrupted| = 1.4e-2); inside ``optimizer.step`` the saved moments and weights would
   even disagree. Here the signal only sets a flag; the next training ``_forward`` call (everything of
   step N done: update, EMA, logging, validation, LR scheduler) saves step N and hands over to
   submitit's requeue (measured: bit-identical to the uninterrupted run). If no boundary comes within
   ``LEIGNN_PREEMPT_GRACE_S`` seconds (default 60, inside submitit's 90 s Slurm signal delay; e.g. a
   long validation pass), fairchem's immediate save runs instead. A signal that arrives before
   training started requeues the job unchanged instead of crashing in ``checkpoint()``. The periodic
   ``optim.checkpoint_every`` save is repeated at the boundary too: fairchem writes it before that
   step's validation and ReduceLROnPlateau step, which a resume from it would otherwise skip.
3. Checkpoints are written atomically (temp file + ``os.replace``): fairchem's ``torch.save`` straight
   onto ``checkpoint.pt`` leaves a truncated file when the job is killed mid-write, and the requeued job
   then fails to load it instead of resuming.
4. ``--submit`` runs without Slurm-with-GPUs: fairchem 1.10 initialises ``torch.distributed`` for a
   submitted job only from Slurm variables and always with NCCL, so under submitit's local executor
   the job dies with ``KeyError: 'local_rank'`` and on CPU-only Slurm nodes NCCL fails. The Runner
   then takes the ranks from submitit's job environment instead (gloo for ``--cpu``); see
   :func:`_rendezvous_from_submitit`.
5. ``checkpoint.pt`` is saved once more when training ends: fairchem saves it only every
   ``optim.checkpoint_every`` steps (default: every ``eval_every``), so with a ``checkpoint_every`` that
   does not divide the total step count the last steps were never written.
6. Run timestamps (the checkpoint folder name) have one-second resolution again: fairchem 1.10
   rounds them to 128 s (float32), so two runs with the same ``--identifier`` and ``--run-dir``
   started within about two minutes share a folder and the second resumes the first.

7. Local multi-rank runs (``--num-gpus N`` without ``--submit``) keep ``optim.num_workers`` on
   Linux: fairchem 1.10 sets it to 0 there because torch elastic *spawns* the ranks, so their
   DataLoaders would spawn workers too and pickle the dataset's open LMDB environments, which cannot
   be pickled (pytorch/examples#526). Each rank here switches to the ``fork`` start method instead, so
   its workers inherit the LMDB files the rank opened, as in every single-process or Slurm run.
8. Local multi-rank runs meet on a free port. fairchem's torch elastic launch names no rendezvous
   endpoint, so every agent uses ``localhost:29400`` and, when it cannot bind that port, silently
   becomes a *client* of whatever holds it: a second local run on the node, a stale process or any
   other program there makes the run wait forever (measured: an idle listener on 29400 stalls
   ``fairchem --cpu --num-gpus 2`` with no error). Two such runs on one host (or in containers
   sharing a network) join one store, and the later one breaks when the first exits (measured: the
   second of two runs started 9 s apart exited with code 1). Here the agent hosts its own store on a
   free port and fails at once with a connection error if it cannot.

Multi-rank runs also log a replica check at the end: every rank compares its parameters with rank 0's
(``DDP replica check: ... max |param - rank-0 param| = 0``).
"""

from __future__ import annotations

import collections
import collections.abc
import logging
import os
import signal
import sys

import torch
from fairchem.core import _cli
from torch.distributed.elastic.utils.distributed import get_free_port
from torch.distributed.launcher.api import LaunchConfig
from fairchem.core.common import distutils
from fairchem.core.common import utils as fc_utils

__all__ = ["Runner", "atomic_save_checkpoint", "main", "patch_fairchem", "runner_wrapper"]

GRACE_ENV = "LEIGNN_PREEMPT_GRACE_S"
_FairchemRunner = _cli.Runner  # fairchem's own class, kept before patch_fairchem() rebinds the name


def atomic_save_checkpoint(state, checkpoint_dir: str = "checkpoints/", checkpoint_file: str = "checkpoint.pt") -> str:
    """fairchem's ``save_checkpoint`` (same signature and return value), written to a temp file in the
    same folder and renamed into place, so a reader never sees a half-written checkpoint."""
    filename = os.path.join(checkpoint_dir, checkpoint_file)
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return filename


def _get_timestamp(device: torch.device, suffix: str | None) -> str:
    """fairchem's run timestamp (``YYYY-mm-dd-HH-MM-SS[-identifier]``, rank 0's clock broadcast to all
    ranks), carried in float64: fairchem 1.10 puts the epoch seconds in a float32 tensor, whose spacing
    near 1.8e9 is 128 s, so runs started within about two minutes of each other with the same
    ``--identifier`` and ``--run-dir`` get the same checkpoint folder, and the later one silently
    resumes from the earlier one's checkpoint.pt."""
    import datetime

    now = torch.tensor(datetime.datetime.now().timestamp(), dtype=torch.float64, device=device)
    distutils.broadcast(now, 0)
    stamp = datetime.datetime.fromtimestamp(now.item()).strftime("%Y-%m-%d-%H-%M-%S")
    return f"{stamp}-{suffix}" if suffix else stamp


_WORKERS_KEY = "leignn_num_workers"
_fairchem_build_config = _cli.build_config


def _build_config(*args, **kwargs) -> dict:
    """fairchem's ``build_config``, remembering ``optim.num_workers`` before ``main()`` zeroes it."""
    config = _fairchem_build_config(*args, **kwargs)
    config[_WORKERS_KEY] = config.get("optim", {}).get("num_workers", 0)
    return config


def _restore_num_workers(config: dict) -> None:
    want = config.pop(_WORKERS_KEY, None)
    optim = config.get("optim", {})
    if not want or optim.get("num_workers", 0) == want:
        return
    import multiprocessing as mp

    if sys.platform.startswith("linux"):
        # torch elastic spawned this rank, which makes "spawn" its default start method, and the
        # DataLoader would pickle the dataset (LMDB handles) into each worker: fork them instead,
        # as in a torchrun- or srun-started rank
        mp.set_start_method("fork", force=True)
        optim["num_workers"] = want
        if os.environ.get("RANK", "0") == "0":
            fc_utils.setup_logging()
            logging.info(f"leignn_ocp.cluster: keeping optim.num_workers={want} per rank (fork start method)")


def patch_fairchem() -> None:
    """Apply the fixes listed in the module docstring to the imported fairchem (idempotent)."""
    if not hasattr(collections, "MutableMapping"):  # fairchem 1.10 create_grid, Python >= 3.10
        collections.MutableMapping = collections.abc.MutableMapping
    from fairchem.core.trainers import base_trainer

    base_trainer.save_checkpoint = atomic_save_checkpoint
    fc_utils.save_checkpoint = atomic_save_checkpoint
    base_trainer.BaseTrainer._get_timestamp = staticmethod(_get_timestamp)
    # fairchem's main() looks these names up at call time: --submit pickles Runner() by reference
    # (leignn_ocp.cluster.Runner, importable on the compute node from the installed package), and the
    # elastic launcher pickles runner_wrapper into each spawned rank
    _cli.Runner = Runner
    _cli.runner_wrapper = runner_wrapper
    _cli.build_config = _build_config
    _cli.LaunchConfig = _own_rendezvous_launch_config


def _own_rendezvous_launch_config(**kwargs):
    """torch elastic's ``LaunchConfig`` for fairchem's local multi-rank launch, hosting the c10d
    rendezvous store on a free port of this machine (fix 8)."""
    if not kwargs.get("rdzv_endpoint"):
        kwargs["rdzv_endpoint"] = f"localhost:{get_free_port()}"
        kwargs["rdzv_configs"] = {**kwargs.get("rdzv_configs", {}), "is_host": True}
        logging.info(f"leignn_ocp.cluster: local rendezvous at {kwargs['rdzv_endpoint']}")
    return LaunchConfig(**kwargs)


class Runner(_FairchemRunner):
    """fairchem's submitit ``Runner`` (a ``Checkpointable``) with step-boundary checkpoints and
    preemption, a final checkpoint and the multi-rank replica check."""

    def __call__(self, config: dict) -> None:
        patch_fairchem()  # this may be a fresh process on a compute node
        fc_utils.setup_logging()
        config = {k: v for k, v in config.items() if k != _WORKERS_KEY}
        self._preempt: int | None = None
        self._ready = False
        try:
            with fc_utils.new_trainer_context(config=_rendezvous_from_submitit(config)) as ctx:
                self.config = config  # as submitted: a requeued job sets up its ranks again
                self.task = ctx.task
                self.trainer = ctx.trainer
                self.task.setup(self.trainer)
                if self.config.get("mode") == "train":
                    self._hook_step_boundary()
                self._ready = True
                self.task.run()
                if self.config.get("mode") == "train":
                    self.trainer.save(checkpoint_file="checkpoint.pt", training_state=True)
                    self._check_replicas()
        finally:
            signal.alarm(0)

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption/time-out hook: save, then return the job to requeue."""
        if not getattr(self, "_ready", False):
            # signal before training started (data loading, normalizer fitting, checkpoint loading):
            # nothing new to save, so requeue the job as it was submitted
            logging.warning("Preempted before training started: requeueing the job unchanged")
            from submitit.helpers import DelayedSubmission

            return DelayedSubmission(type(self)(), *args, **kwargs)
        delayed = super().checkpoint(*args, **kwargs)  # saves checkpoint.pt, points config at it
        delayed.function = type(self)()  # requeue with this Runner, not fairchem's
        return delayed

    def _hook_step_boundary(self) -> None:
        """Run code between training steps: wrap ``trainer._forward``, whose first call in training
        mode after step N comes when everything of step N is done (update, EMA, logging, periodic
        checkpoint, eval, scheduler) and ``trainer.step`` already reads N + 1.

        There: (a) a pending preemption signal saves step N and hands over to submitit's requeue;
        (b) every ``optim.checkpoint_every`` steps ``checkpoint.pt`` is saved again, since fairchem
        saves it before that step's eval and LR-scheduler step, which a resume would then skip."""
        trainer = self.trainer
        every = int(trainer.config["optim"].get("checkpoint_every", 0) or 0)
        saved = {"step": -1}
        submitit_handler = None
        try:
            from submitit import JobEnvironment

            sig = JobEnvironment._usr_sig()
            # inside a submitit job (Slurm or local executor), on its task 0: submitit's handler
            # ignores the signal on the other tasks, which end when the requeue stops the job
            if callable(signal.getsignal(sig)) and JobEnvironment().global_rank == 0:
                submitit_handler = signal.getsignal(sig)
        except Exception:  # noqa: BLE001 - submitit missing or unknown signal: no preemption hook
            submitit_handler = None

        def at_step(done: int, fn) -> None:
            """Run fn() with trainer.step / epoch set to the last finished step ``done``."""
            step, epoch = trainer.step, trainer.epoch
            trainer.step, trainer.epoch = done, done / len(trainer.train_loader)
            try:
                fn()
            finally:
                trainer.step, trainer.epoch = step, epoch

        def hand_over(reason: str) -> None:
            signal.alarm(0)
            logging.warning(f"Preemption: checkpointing at step {trainer.step} ({reason})")
            submitit_handler(self._preempt, None)  # -> self.checkpoint(), dump, requeue, exit

        forward = trainer._forward

        def forward_at_boundary(batch):
            if trainer.model.training:
                done = trainer.step - 1
                if self._preempt is not None:
                    at_step(done, lambda: hand_over("step boundary"))  # exits unless requeue failed
                if every > 0 and done > 0 and done % every == 0 and saved["step"] != done:
                    at_step(done, lambda: trainer.save(checkpoint_file="checkpoint.pt", training_state=True))
                    saved["step"] = done
            return forward(batch)

        trainer._forward = forward_at_boundary
        if submitit_handler is None:
            return
        grace = int(float(os.environ.get(GRACE_ENV, "60")))

        def on_signal(signum, frame) -> None:
            if self._preempt is not None:
                return
            self._preempt = signum
            logging.warning(
                f"Caught {signal.Signals(signum).name} at step {trainer.step}: checkpointing at the next "
                f"step boundary (at most {grace} s)"
            )
            signal.signal(signal.SIGALRM, lambda *_: hand_over("grace period over, mid-step state"))
            signal.alarm(max(grace, 1))

        signal.signal(sig, on_signal)

    def _check_replicas(self) -> None:
        """Multi-rank runs: log max |param - rank-0 param| over all ranks (0 when DDP kept them in sync)."""
        if not distutils.initialized() or distutils.get_world_size() < 2:
            return
        import torch.distributed as dist

        params = [p.detach().reshape(-1) for p in self.trainer._unwrapped_model.parameters()]
        mine = torch.cat(params).double()  # [n_params]
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = (mine - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if distutils.is_master():
            logging.info(
                f"DDP replica check: {distutils.get_world_size()} ranks, {mine.numel()} parameters, "
                f"max |param - rank-0 param| = {diff.item():.3e}"
            )


def _rendezvous_from_submitit(config: dict) -> dict:
    """The config to build the trainer from, after preparing ``torch.distributed`` for a submitit job.

    For ``--submit`` fairchem 1.10's ``distutils.setup`` knows only Slurm with NCCL: it reads the node
    list with ``scontrol`` and always calls ``init_process_group("nccl")``. Under any other submitit
    executor (the local one: no Slurm variables) it initialises nothing and the trainer then fails with
    ``KeyError: 'local_rank'``; on Slurm CPU nodes (``--cpu``) NCCL has no GPU to use. In those two
    cases the rank layout is taken from submitit's job environment (``RANK``/``LOCAL_RANK``/
    ``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, what torchrun sets) and the job goes through
    fairchem's non-Slurm branch, which uses gloo for ``--cpu``. Slurm GPU jobs are left to fairchem.
    """
    if not config.get("submit"):
        return config
    on_slurm = bool(os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST"))
    if on_slurm and not config.get("cpu"):
        return config
    from submitit import JobEnvironment

    env = JobEnvironment()
    if env.num_tasks != config["world_size"]:
        raise RuntimeError(
            f"submitit job has {env.num_tasks} tasks but fairchem expects world_size={config['world_size']} "
            "(--num-nodes x --num-gpus)"
        )
    os.environ["RANK"] = str(env.global_rank)
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    os.environ["WORLD_SIZE"] = str(env.num_tasks)
    os.environ["MASTER_ADDR"] = env.hostnames[0] if on_slurm else "localhost"
    if env.num_tasks == 1:
        os.environ["MASTER_PORT"] = str(get_free_port())
    else:  # every task derives the same port from the job id (Slurm: unique per array task)
        digits = "".join(c for c in str(env.raw_job_id) if c.isdigit()) or "0"
        os.environ["MASTER_PORT"] = str(20000 + int(digits) % 20000)
    logging.info(
        f"submitit job {env.job_id}: rank {env.global_rank}/{env.num_tasks} via "
        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({config['distributed_backend']})"
    )
    return {**config, "submit": False}


def runner_wrapper(config: dict) -> None:
    """What each rank of a local multi-rank run executes (fairchem's ``runner_wrapper``, our Runner)."""
    patch_fairchem()
    _restore_num_workers(config)
    Runner()(config)


def main(argv: list[str] | None = None) -> None:
    """``fairchem`` CLI (``fairchem.core._cli.main``) with :func:`patch_fairchem` applied."""
    patch_fairchem()
    if argv is None:
        _cli.main()
    else:
        parser = _cli.flags.get_parser()
        args, override_args = parser.parse_known_args(argv)
        _cli.main(args, override_args)


if __name__ == "__main__":
    # run through the package module so that pickled references say leignn_ocp.cluster, not __main__
    from leignn_ocp import cluster as _cluster

    sys.exit(_cluster.main())
