"""The patches to fairchem-core 1.10 (numbered as in the :mod:`leignn_ocp.launch` docstring), applied
only inside :func:`patched_fairchem`, only to the fairchem version they were written for."""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import datetime
import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Iterator

import torch
from fairchem.core import _cli
from fairchem.core.common import distutils
from fairchem.core.common import utils as fc_utils
from torch.distributed.elastic.utils.distributed import get_free_port
from torch.distributed.launcher.api import LaunchConfig

from leignn_ocp.launch.version import (
    VERSION_ENV,
    WRITTEN_FOR,
    installed_fairchem,
    is_supported,
    refuse_unless_overridden,
)

WORKERS_KEY = "leignn_num_workers"  # config key carrying optim.num_workers past fairchem's main()
_MISSING = object()
_fairchem_build_config = _cli.build_config  # fairchem's own, taken before any patch


def atomic_save_checkpoint(state, checkpoint_dir: str = "checkpoints/", checkpoint_file: str = "checkpoint.pt") -> str:
    """Fix 3: fairchem's ``save_checkpoint`` (same signature and return value), written to a temp file
    in the same folder and renamed into place, so a reader never sees a half-written checkpoint."""
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
    """Fix 6: fairchem's run timestamp (``YYYY-mm-dd-HH-MM-SS[-identifier]``, rank 0's clock broadcast to
    all ranks), carried in float64: fairchem 1.10 puts the epoch seconds in a float32 tensor, whose
    spacing near 1.8e9 is 128 s, so runs started within about two minutes of each other with the same
    ``--identifier`` and ``--run-dir`` get the same checkpoint folder, and the later one silently
    resumes from the earlier one's checkpoint.pt."""
    now = torch.tensor(datetime.datetime.now().timestamp(), dtype=torch.float64, device=device)
    distutils.broadcast(now, 0)
    stamp = datetime.datetime.fromtimestamp(now.item()).strftime("%Y-%m-%d-%H-%M-%S")
    return f"{stamp}-{suffix}" if suffix else stamp


def _build_config(*args, **kwargs) -> dict:
    """Fix 7: fairchem's ``build_config``, remembering ``optim.num_workers`` before ``main()`` zeroes it."""
    config = _fairchem_build_config(*args, **kwargs)
    config[WORKERS_KEY] = config.get("optim", {}).get("num_workers", 0)
    return config


def restore_num_workers(config: dict) -> None:
    """Fix 7, in a rank spawned by torch elastic: put back the ``optim.num_workers`` fairchem zeroed."""
    want = config.pop(WORKERS_KEY, None)
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
            logging.info(f"leignn_ocp.launch: keeping optim.num_workers={want} per rank (fork start method)")


def _own_rendezvous_launch_config(**kwargs):
    """Fix 8: torch elastic's ``LaunchConfig`` for fairchem's local multi-rank launch, hosting the c10d
    rendezvous store on a free port of this machine."""
    if not kwargs.get("rdzv_endpoint"):
        kwargs["rdzv_endpoint"] = f"localhost:{get_free_port()}"
        kwargs["rdzv_configs"] = {**kwargs.get("rdzv_configs", {}), "is_host": True}
        logging.info(f"leignn_ocp.launch: local rendezvous at {kwargs['rdzv_endpoint']}")
    return LaunchConfig(**kwargs)


@dataclass(frozen=True)
class Patch:
    """``target.attr = value`` while :func:`patched_fairchem` is active."""

    target: object  # a module or class of fairchem (or the stdlib it relies on)
    attr: str
    value: object
    fix: str  # why, in a few words (which numbered fix)
    written_for: str = WRITTEN_FOR  # fairchem-core series this patch replaces code of
    adds: bool = False  # the attribute may be absent originally (it is removed again on exit)


def fairchem_patches() -> list[Patch]:
    """Every patch the launcher applies, in order."""
    from fairchem.core.trainers import base_trainer

    from leignn_ocp.launch.runner import Runner, runner_wrapper  # runner imports this module

    return [
        Patch(collections, "MutableMapping", collections.abc.MutableMapping,
              "1: create_grid (--sweep-yml) on Python >= 3.10", adds=True),
        Patch(base_trainer, "save_checkpoint", atomic_save_checkpoint, "3: atomic checkpoints"),
        Patch(fc_utils, "save_checkpoint", atomic_save_checkpoint, "3: atomic checkpoints"),
        Patch(base_trainer.BaseTrainer, "_get_timestamp", staticmethod(_get_timestamp),
              "6: run timestamps to the second"),
        # fairchem's main() looks these names up at call time: --submit pickles Runner() by reference
        # (leignn_ocp.launch.runner.Runner, importable on the compute node from the installed
        # package, never __main__), and the elastic launcher pickles runner_wrapper into each rank
        Patch(_cli, "Runner", Runner, "2, 4, 5: the submitit Runner"),
        Patch(_cli, "runner_wrapper", runner_wrapper, "2, 4, 5, 7: what each local rank runs"),
        Patch(_cli, "build_config", _build_config, "7: keep optim.num_workers"),
        Patch(_cli, "LaunchConfig", _own_rendezvous_launch_config, "8: rendezvous on a free port"),
    ]


def check_patch(patch: Patch, found: str | None = None) -> None:
    """Fail unless ``patch`` was written for the installed fairchem-core and its target still exists."""
    found = installed_fairchem() if found is None else found
    t = patch.target
    where = t.__name__ if isinstance(t, types.ModuleType) else f"{t.__module__}.{t.__qualname__}"
    if not is_supported(found, patch.written_for):
        msg = (f"leignn_ocp.launch: the patch of {where}.{patch.attr} (fix {patch.fix}) was written for "
               f"fairchem-core {patch.written_for}.x, but fairchem-core {found} is installed. Install "
               f"fairchem-core=={patch.written_for}.* (the version pyproject.toml pins), use the plain "
               f"`fairchem` CLI without these fixes, or set {VERSION_ENV}=1 to patch anyway.")
        refuse_unless_overridden(RuntimeError(msg), stacklevel=4)
    if not patch.adds and patch.attr not in vars(patch.target):
        raise RuntimeError(f"leignn_ocp.launch: fairchem-core {found} has no {where}.{patch.attr} to patch "
                           f"(fix {patch.fix}, written for fairchem-core {patch.written_for}.x)")


@contextlib.contextmanager
def patched_fairchem() -> Iterator[None]:
    """Apply every :func:`fairchem_patches` entry (after checking all of them) and put back exactly what
    was there before on exit. Nests: an inner block restores the outer block's patches."""
    patches = fairchem_patches()
    found = installed_fairchem()
    for patch in patches:
        check_patch(patch, found)
    saved = []
    try:
        for patch in patches:
            saved.append((patch, vars(patch.target).get(patch.attr, _MISSING)))  # raw: keeps staticmethod
            setattr(patch.target, patch.attr, patch.value)
        yield
    finally:
        for patch, old in reversed(saved):
            if old is not _MISSING:
                setattr(patch.target, patch.attr, old)
            elif patch.attr in vars(patch.target):
                delattr(patch.target, patch.attr)
