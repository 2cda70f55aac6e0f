"""Table-1 metrics with fairchem's Evaluator: from arrays, and from a checkpoint on LMDB splits.

Metrics (free atoms only, as OC20 scores S2EF): energy MAE (meV), force MAE (meV/Å, over the
x/y/z components), force cosine similarity, and EFwT (% of structures with |dE| < 0.02 eV and
every free-atom |dF component| < 0.03 eV/Å).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from leignn_ocp.evaluation.checkpoints import close_lmdb, load_trainer, split_loader
from leignn_ocp.lineup import SPLITS

# fairchem Evaluator metrics for S2EF (as the configs' evaluation_metrics)
EVAL_METRICS = {
    "energy": ["mae"],
    "forces": ["mae", "cosine_similarity"],
    "misc": ["energy_forces_within_threshold"],
}
COLUMNS = ["energy_mae_meV", "forces_mae_meV_per_A", "forces_cos", "efwt_percent"]

log = logging.getLogger(__name__)


def metrics_from_arrays(
    energy_pred, energy_true, forces_pred, forces_true, natoms_free
) -> dict[str, float]:
    """Table-1 metrics of per-structure energies and free-atom forces, via fairchem's Evaluator.

    energy_*: [B] eV; forces_*: [sum(natoms_free), 3] eV/Å (free atoms only, structure by
    structure); natoms_free: [B]. Returns energy MAE in meV, force MAE in meV/Å, cosine, EFwT in %.
    """
    import torch
    from fairchem.core.modules.evaluator import Evaluator

    t = lambda x, dt=torch.float64: torch.as_tensor(np.asarray(x), dtype=dt)  # noqa: E731
    natoms = t(natoms_free, torch.long)
    pred = {"energy": t(energy_pred).reshape(-1), "forces": t(forces_pred).reshape(-1, 3), "natoms": natoms}
    true = {"energy": t(energy_true).reshape(-1), "forces": t(forces_true).reshape(-1, 3), "natoms": natoms}
    if pred["energy"].shape != true["energy"].shape or pred["forces"].shape != true["forces"].shape:
        raise ValueError(
            f"prediction/label shapes differ: energy {tuple(pred['energy'].shape)} vs "
            f"{tuple(true['energy'].shape)}, forces {tuple(pred['forces'].shape)} vs {tuple(true['forces'].shape)}"
        )
    m = Evaluator(task="s2ef", eval_metrics=EVAL_METRICS).eval(pred, true)
    return table_metrics(m)


def table_metrics(m: dict) -> dict[str, float]:
    """fairchem Evaluator output -> the table's units (meV, meV/Å, %) and the structure count."""
    return {
        "energy_mae_meV": 1000.0 * m["energy_mae"]["metric"],
        "forces_mae_meV_per_A": 1000.0 * m["forces_mae"]["metric"],
        "forces_cos": m["forces_cosine_similarity"]["metric"],
        "efwt_percent": 100.0 * m["energy_forces_within_threshold"]["metric"],
        "n_structures": m["energy_forces_within_threshold"]["numel"],
    }


def _direct(trainer) -> bool:
    m = trainer.config["model"]
    return bool(m.get("direct_forces", False)) or not m.get("regress_forces", True)


def evaluate_split(trainer, src: str | Path, batch_size: int | None = None) -> dict[str, float]:
    """One labelled split through the trainer's forward and metric code (as OCPTrainer.validate)."""
    import torch
    from fairchem.core.modules.evaluator import Evaluator

    loader = split_loader(trainer, src, batch_size)
    trainer.model.eval()
    if trainer.ema is not None:
        trainer.ema.store()
        trainer.ema.copy_to()
    evaluator = Evaluator(task="s2ef", eval_metrics=EVAL_METRICS)
    metrics: dict = {}
    try:
        for batch in loader:
            batch = batch.to(trainer.device)
            # conservative forces need autograd even at inference
            with torch.no_grad() if _direct(trainer) else torch.enable_grad():
                out = trainer._forward(batch)
            out = {k: v.detach() for k, v in out.items()}
            metrics = trainer._compute_metrics(out, batch, evaluator, metrics)
    finally:
        if trainer.ema is not None:
            trainer.ema.restore()
        close_lmdb(loader)
    return table_metrics(metrics)


def evaluate_checkpoint(
    checkpoint: str | Path, data_root: str | Path, prefix: str = "val_", cpu: bool = True, batch_size: int | None = None
) -> dict[str, dict[str, float]]:
    """The four splits ``<data_root>/<prefix>{id,ood_ads,ood_cat,ood_both}`` -> {split title: metrics}."""
    return evaluate_splits(load_trainer(checkpoint, cpu=cpu), data_root, prefix, batch_size, Path(checkpoint).name)


def evaluate_splits(trainer, data_root: str | Path, prefix: str = "val_", batch_size: int | None = None,
                    name: str = "") -> dict[str, dict[str, float]]:
    """:func:`evaluate_checkpoint` for a trainer already loaded (one load serves several uses)."""
    out = {}
    for _key, suffix, title in SPLITS:
        t0 = time.time()
        out[title] = evaluate_split(trainer, Path(data_root) / f"{prefix}{suffix}", batch_size)
        log.info(f"{name} {title}: {out[title]} ({time.time() - t0:.1f} s)")
    return out
