"""fairchem's submitit ``Runner`` with step-boundary preemption (fix 2), ranks from submitit (fix 4), a
final checkpoint (fix 5) and the multi-rank replica check; ``runner_wrapper`` for each local rank.

submitit and torch elastic pickle these by reference: they must stay importable as
``leignn_ocp.launch.runner.Runner`` / ``.runner_wrapper`` (never defined in a ``__main__``)."""

from __future__ import annotations

import logging
import os
import signal

import torch
from fairchem.core._cli import Runner as _FairchemRunner  # imported before any patch rebinds _cli.Runner
from fairchem.core.common import distutils
from fairchem.core.common import utils as fc_utils
from torch.distributed.elastic.utils.distributed import get_free_port

from leignn_ocp.launch.patches import WORKERS_KEY, patched_fairchem, restore_num_workers

GRACE_ENV = "LEIGNN_PREEMPT_GRACE_S"


class Runner(_FairchemRunner):
    """fairchem's submitit ``Runner`` (a ``Checkpointable``) with step-boundary checkpoints and
    preemption, a final checkpoint and the multi-rank replica check."""

    def __call__(self, config: dict) -> None:
        with patched_fairchem():  # this may be a fresh process on a compute node
            fc_utils.setup_logging()
            config = {k: v for k, v in config.items() if k != WORKERS_KEY}
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
                        self.trainer.save(checkpoint_file="checkpoint.pt", training_state=True)  # fix 5
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
    """Fix 4: the config to build the trainer from, after preparing ``torch.distributed`` for a
    submitit job.

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
    with patched_fairchem():  # a rank spawned by torch elastic starts unpatched
        restore_num_workers(config)
        Runner()(config)
