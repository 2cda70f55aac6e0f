"""The ``fairchem`` CLI with the fixes multi-process, Slurm and preempted runs need (fairchem-core 1.10).

    leignn-launch --mode train --config-yml configs/s2ef/200k/leignn.yml \\
        --submit --num-gpus 8 --num-nodes 2 --slurm-partition <p> --sweep-yml configs/sweeps/ablations.yml \\
        --scale-recipe-to-world-size

(also ``python -m leignn_ocp.launch ...`` and the old spelling ``python -m leignn_ocp.cluster ...``)
takes exactly the flags of the ``fairchem`` console script and runs the same code
(:func:`fairchem.core._cli.main`: submitit ``AutoExecutor`` for ``--submit``, torch elastic launch for
``--num-gpus N`` without ``--submit``, one process otherwise). The plain ``fairchem`` CLI trains this
plugin too (``model.name: leignn_ocp.LEIGNN`` is imported by fairchem's registry in every process);
this launcher only swaps in :class:`Runner` and patches eight rough edges of fairchem 1.10, inside
:func:`patched_fairchem` (a context manager: every patched attribute is fairchem's own again on exit).
It is written for fairchem-core 1.10.x only: importing this package with another fairchem-core raises
an ImportError naming both versions (``LEIGNN_LAUNCH_ANY_FAIRCHEM=1`` warns instead, see
:mod:`.version`), and every patch checks its target again when applied. ``import leignn_ocp`` (the
model plugin) does not import this package and works with the plain ``fairchem`` CLI regardless.

Two additions of its own (:mod:`.cli`): a leading ``main`` (``leignn-launch main --mode train ...``,
OCP's old ``python main.py`` habit) is dropped with a note, where plain fairchem 1.10 fails with
``ValueError: not enough values to unpack``; and ``--scale-recipe-to-world-size`` [``--scale-lr
{none,linear,sqrt}``] (off by default) rescales a one-GPU recipe's step-counted schedule to
``--num-nodes`` x ``--num-gpus`` ranks (:func:`rescale_for_world_size`, every change logged).

The fixes:

1. ``--sweep-yml`` crashes on Python >= 3.10: ``create_grid`` tests ``collections.MutableMapping``,
   which Python 3.10 removed. The alias is restored (to ``collections.abc``'s).
2. Preemption is handled at a *step boundary*. fairchem's ``Runner.checkpoint`` saves the trainer
   wherever ``SIGUSR2`` (Slurm's preemption / time-out signal, also sent by submitit's local
   executor) interrupts the main thread: almost always inside a training step, after
   ``trainer.step`` was advanced to N but before the optimizer applied batch N, so the requeued job
   continues at N + 1 and batch N is never trained on; inside ``optimizer.step`` the saved moments
   and weights would even disagree. Here the signal only sets a flag; the next training ``_forward``
   call (everything of step N done: update, EMA, logging, validation, LR scheduler) saves step N and
   hands over to submitit's requeue. If no boundary comes within ``LEIGNN_PREEMPT_GRACE_S`` seconds
   (default 60, inside submitit's 90 s Slurm signal delay; e.g. a long validation pass), fairchem's
   immediate save runs instead. A signal that arrives before training started requeues the job
   unchanged instead of crashing in ``checkpoint()``. The periodic ``optim.checkpoint_every`` save is
   repeated at the boundary too: fairchem writes it before that step's validation and
   ReduceLROnPlateau step, which a resume from it would otherwise skip.
3. Checkpoints are written atomically (temp file + ``os.replace``): fairchem's ``torch.save`` straight
   onto ``checkpoint.pt`` leaves a truncated file when the job is killed mid-write, and the requeued job
   then fails to load it instead of resuming.
4. ``--submit`` runs without Slurm-with-GPUs: fairchem 1.10 initialises ``torch.distributed`` for a
   submitted job only from Slurm variables and always with NCCL, so under submitit's local executor
   the job dies with ``KeyError: 'local_rank'`` and on CPU-only Slurm nodes NCCL fails. The Runner
   then takes the ranks from submitit's job environment instead (gloo for ``--cpu``).
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
   other program there makes the run wait forever with no error, and two such runs on one host (or
   in containers sharing a network) join one store, and the later one breaks when the first exits.
   Here the agent hosts its own store on a free port and fails at once with a connection error if it
   cannot.

Multi-rank runs also log a replica check at the end: every rank compares its parameters with rank 0's
(``DDP replica check: ... max |param - rank-0 param| = 0``). What was measured for each fix:
docs/notes/launch.md.

Modules: :mod:`.version` (the fairchem-core version guard, run first), :mod:`.patches` (the patch
table and fixes 1, 3, 6, 7, 8), :mod:`.runner` (the submitit ``Runner``: fixes 2, 4, 5), :mod:`.recipe`
(world-size rescaling), :mod:`.cli` (``main``, the leading ``main``, the launcher's flags).
"""

from leignn_ocp.launch.version import check_fairchem_version

check_fairchem_version()  # before importing fairchem internals another version may not have

from leignn_ocp.launch.cli import main  # noqa: E402
from leignn_ocp.launch.patches import atomic_save_checkpoint, patched_fairchem  # noqa: E402
from leignn_ocp.launch.recipe import rescale_for_world_size  # noqa: E402
from leignn_ocp.launch.runner import Runner, runner_wrapper  # noqa: E402

__all__ = ["Runner", "atomic_save_checkpoint", "main", "patched_fairchem", "rescale_for_world_size",
           "runner_wrapper"]
