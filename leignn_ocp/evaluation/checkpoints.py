"""Checkpoints back into fairchem trainers, and the loaders that feed them one LMDB split."""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def resolve_device(cpu: bool = False, gpu: bool = False) -> str:
    """'cuda' when torch sees a GPU, else 'cpu'; ``cpu`` forces the CPU. ``gpu`` (the old opt-in
    flag, now the default) turns "no GPU visible" into an error instead of a silent CPU run."""
    import torch

    if cpu and gpu:
        raise ValueError("--cpu and --gpu exclude each other")
    if cpu:
        device, why = "cpu", "--cpu given"
    elif torch.cuda.is_available():
        device, why = "cuda", "a GPU is visible; --cpu to run on the CPU"
    elif gpu:
        raise ValueError("--gpu given but torch.cuda.is_available() is False (no visible GPU, or a CPU-only "
                         "torch); leave out --gpu or give --cpu to run on the CPU")
    else:
        device, why = "cpu", "no GPU visible (torch.cuda.is_available() is False)"
    log.info(f"device: {device} ({why})")
    return device


def require_splits(data_root: str | Path, prefix: str) -> list[Path]:
    """The four split folders <data_root>/<prefix>{id,ood_ads,ood_cat,ood_both}; one error naming every
    missing one (before minutes of model loading), with the download command for OC20's."""
    from leignn_ocp.lineup import SPLITS

    paths = [Path(data_root) / f"{prefix}{suffix}" for _, suffix, _ in SPLITS]
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        hint = {"test_": "the OC20 S2EF test splits: `leignn-oc20-data download --split test --data-path DATA` "
                         "writes DATA/s2ef/all/test_{id,ood_ads,ood_cat,ood_both}; use --data-root DATA/s2ef/all",
                "val_": "the OC20 S2EF val splits: `leignn-oc20-data download --split val --data-path DATA` "
                        "writes DATA/s2ef/all/val_{id,ood_ads,ood_cat,ood_both}"}.get(prefix, "")
        raise FileNotFoundError(
            f"missing split folder(s) {', '.join(map(str, missing))} (--data-root {data_root}, --split-prefix "
            f"{prefix})" + (f"; for {hint}" if hint else ""))
    return paths


def find_checkpoint(path: str | Path, which: str = "final") -> Path:
    """A checkpoint file, or the checkpoint inside a fairchem run / checkpoint directory.

    which: "final" -> checkpoint.pt (end of training), "best" -> best_checkpoint.pt (best val).
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint or run directory at {p}")
    names = ["checkpoint.pt", "best_checkpoint.pt"]
    if which == "best":
        names.reverse()
    for name in names:
        hits = sorted(p.rglob(name), key=lambda f: f.stat().st_mtime)
        if hits:
            if len(hits) > 1:
                log.warning(f"{len(hits)} {name} under {p}; using the newest, {hits[-1]}")
            return hits[-1]
    raise FileNotFoundError(f"no checkpoint.pt / best_checkpoint.pt under {p}")


def load_trainer(checkpoint: str | Path, cpu: bool = True, run_dir: str | Path | None = None):
    """fairchem OCPTrainer rebuilt from a checkpoint's own config, weights + EMA + normalizers loaded.

    Built as fairchem's OCPCalculator builds it (inference_only: no datasets, loss or optimizer; the
    normalizers come from the checkpoint). A checkpoint.pt stores the raw weights and their EMA; the
    EMA is restored here so evaluation sees the weights fairchem's own validation sees.
    With run_dir=None the trainer is in debug mode (writes nothing); predict() needs a run_dir.
    A file that is not a readable fairchem checkpoint (missing, truncated, no config, weights that do not
    fit the model its config builds) raises :class:`leignn_ocp.trainer.CheckpointError` naming it.
    """
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports, update_config
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    import leignn_ocp  # noqa: F401  (registers the model)
    from leignn_ocp.trainer import (CheckpointError, Trainer, check_checkpoint, model_class, model_config,
                                    read_checkpoint)

    setup_imports()
    ckpt = read_checkpoint(checkpoint)  # names the file: missing, empty, truncated, not a checkpoint
    if not isinstance(ckpt.get("config"), dict) or model_config(ckpt["config"])[0] is None:
        raise CheckpointError(f"checkpoint {checkpoint} has no config with a model name (fairchem writes the run's "
                              "config into every checkpoint it saves), so its model cannot be rebuilt")
    name = model_config(ckpt["config"])[0]
    if model_class(name) is None:
        raise CheckpointError(f"checkpoint {checkpoint} is of model {name!r}, which fairchem's registry does not "
                              "know here (a plugin that is not installed?)")
    config = update_config(copy.deepcopy(ckpt["config"]))
    model = dict(config["model"])
    model.pop("scale_file", None)  # the fitted scale factors are in the state dict
    train = dict(config.get("dataset") or {})
    data_cfg = {k: v for k, v in train.items() if k in ("format", "key_mapping", "a2g_args")}
    data_cfg.setdefault("format", "lmdb")
    trainer = registry.get_trainer_class(config.get("trainer", "ocp"))(
        task=config.get("task", {}),
        model=model,
        outputs=config["outputs"],
        dataset={"train": data_cfg},
        optimizer=config["optim"],
        loss_functions=config["loss_functions"],
        evaluation_metrics=config.get("evaluation_metrics", {}),
        identifier="evaluate",
        local_rank=0,
        timestamp_id="evaluate",
        run_dir=str(run_dir) if run_dir is not None else None,
        is_debug=run_dir is None,
        logger=config.get("logger", "tensorboard"),
        cpu=cpu,
        amp=False,
        print_every=10**9,
        seed=config.get("cmd", {}).get("seed", 0) or 0,
        inference_only=True,
    )
    # set by load_datasets, which inference_only skips
    trainer.collater = functools.partial(data_list_collater, otf_graph=trainer.config["model"].get("otf_graph", False))
    if ckpt.get("ema") is not None:
        decay = config["optim"].get("ema_decay") or 0.999  # load_state_dict restores the decay
        trainer.ema = ExponentialMovingAverage(trainer.model.parameters(), decay)
    if not isinstance(trainer, Trainer):  # fairchem's own trainer: the same checks before its load
        check_checkpoint(trainer, ckpt, checkpoint, inference_only=True)
    trainer.load_checkpoint(str(checkpoint), checkpoint=ckpt, inference_only=True)
    return trainer


def split_loader(trainer, src: str | Path, batch_size: int | None = None):
    """A fairchem dataset + loader for one LMDB folder, with the checkpoint's data settings."""
    from fairchem.core.datasets.base_dataset import create_dataset

    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"split {src} does not exist")
    cfg = {k: v for k, v in trainer.config["dataset"].items() if k != "transforms"}
    cfg["src"] = str(src)
    ds = create_dataset(cfg, "test")
    bs = batch_size or trainer.config["optim"].get("eval_batch_size", trainer.config["optim"].get("batch_size", 8))
    sampler = trainer.get_sampler(ds, bs, shuffle=False)
    return trainer.get_dataloader(ds, sampler)


def close_lmdb(obj) -> None:
    """Close the LMDB environments of a loader or dataset (and of the datasets it wraps) now:
    py-lmdb refuses to open one folder twice in a process."""
    ds, seen = obj, 0
    while ds is not None and seen < 9:
        for env in [getattr(ds, "env", None), *(getattr(ds, "envs", None) or [])]:
            if env is not None:
                env.close()
        ds, seen = getattr(ds, "dataset", None), seen + 1
