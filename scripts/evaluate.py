#!/usr/bin/env python
"""The paper's Table 1 with fairchem's trainer and evaluator, and OC20 leaderboard files.

Sub-commands (``python scripts/evaluate.py <cmd> -h`` for the options):

  quick    one checkpoint (or run directory) -> its 4-split table printed (and --out files)
             python scripts/evaluate.py quick runs/default/checkpoints/leignn
  table    several checkpoints / run directories -> Table 1 as Markdown, CSV and a grouped bar PNG
             python scripts/evaluate.py table --run LEIGNN=<ckpt|dir> --run PaiNN=<ckpt|dir> ... --out results/table1
  lineup   train every config of a folder with the fairchem CLI for one shared budget, then `table`
             python scripts/evaluate.py lineup --config-dir configs/s2ef/default --epochs 5 \\
                 --train-size 1000 --eval-size 100 --out results/default_lineup   # CPU, embedded data
             python scripts/evaluate.py lineup --config-dir configs/s2ef/200k --which best \\
                 --data-root data/s2ef/all --gpu --out results/oc20_200k           # the paper's Table 1
  predict  fairchem's predict mode (trainer.predict, what `fairchem --mode predict` runs) on the four
           test splits + the S2EF submission file in the format of fairchem's make_submission_file
             python scripts/evaluate.py predict <ckpt> --data-root data/s2ef/all --split-prefix test_ --out sub/
  fit-scales  fit PaiNN / GemNet ScaleFactors on a config's training data -> --model.scale_file=<json>
             python scripts/evaluate.py fit-scales --out gemnet_dt.json --mode train \\
                 --config-yml configs/s2ef/200k/gemnet_dt.yml
  score    the local scorer: a submission .npz against labelled LMDBs, with fairchem's Evaluator
             python scripts/evaluate.py score sub/submission.npz --data-root data/default/s2ef

Splits: ID, OOD-Ads, OOD-Cat, OOD-Both are the LMDB folders <data-root>/<prefix>{id,ood_ads,ood_cat,ood_both}
(prefix ``val_`` for the labelled S2EF validation sets, ``test_`` for the leaderboard test sets).
Metrics (fairchem's ``Evaluator``, free atoms only, as OC20 scores S2EF): energy MAE (meV),
force MAE (meV/A, over the x/y/z components), force cosine similarity, and EFwT (% of structures
with |dE| < 0.02 eV and every free-atom |dF component| < 0.03 eV/A).
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (submission key, LMDB folder suffix, column title)
SPLITS: list[tuple[str, str, str]] = [
    ("id", "id", "ID"),
    ("ood_ads", "ood_ads", "OOD-Ads"),
    ("ood_cat", "ood_cat", "OOD-Cat"),
    ("ood_both", "ood_both", "OOD-Both"),
]
# config file stem -> row name, in the paper's Table 1 order
MODEL_NAMES: dict[str, str] = {
    "schnet": "SchNet",
    "painn": "PaiNN",
    "painn_direct": "PaiNN (direct forces)",
    "dimenet_plus_plus": "DimeNet++",
    "gemnet_dt": "GemNet-dT",
    "vanilla": "Vanilla",
    "vanilla_nmu": "Vanilla + NMU",
    "leignn": "LEIGNN",
}
# fairchem Evaluator metrics for S2EF (as the configs' evaluation_metrics)
EVAL_METRICS = {
    "energy": ["mae"],
    "forces": ["mae", "cosine_similarity"],
    "misc": ["energy_forces_within_threshold"],
}
COLUMNS = ["energy_mae_meV", "forces_mae_meV_per_A", "forces_cos", "efwt_percent"]

log = logging.getLogger("evaluate")


# ----------------------------------------------------------------------------- metrics
def metrics_from_arrays(
    energy_pred, energy_true, forces_pred, forces_true, natoms_free
) -> dict[str, float]:
    """Table-1 metrics of per-structure energies and free-atom forces, via fairchem's Evaluator.

    energy_*: [B] eV; forces_*: [sum(natoms_free), 3] eV/A (free atoms only, structure by
    structure); natoms_free: [B]. Returns energy MAE in meV, force MAE in meV/A, cosine, EFwT in %.
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
    return _table_metrics(m)


def _table_metrics(m: dict) -> dict[str, float]:
    return {
        "energy_mae_meV": 1000.0 * m["energy_mae"]["metric"],
        "forces_mae_meV_per_A": 1000.0 * m["forces_mae"]["metric"],
        "forces_cos": m["forces_cosine_similarity"]["metric"],
        "efwt_percent": 100.0 * m["energy_forces_within_threshold"]["metric"],
        "n_structures": m["energy_forces_within_threshold"]["numel"],
    }


# ----------------------------------------------------------------------------- checkpoints
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
    """
    import torch
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports, update_config
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    import leignn_ocp  # noqa: F401  (registers the model)

    setup_imports()
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
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
    trainer.load_checkpoint(str(checkpoint), checkpoint=ckpt, inference_only=True)
    return trainer


def _loader(trainer, src: str | Path, batch_size: int | None = None):
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


def evaluate_split(trainer, src: str | Path, batch_size: int | None = None) -> dict[str, float]:
    """One labelled split through the trainer's forward and metric code (as OCPTrainer.validate)."""
    import torch

    from fairchem.core.modules.evaluator import Evaluator

    loader = _loader(trainer, src, batch_size)
    trainer.model.eval()
    if trainer.ema is not None:
        trainer.ema.store()
        trainer.ema.copy_to()
    evaluator = Evaluator(task="s2ef", eval_metrics=EVAL_METRICS)
    metrics: dict = {}
    try:
        for batch in loader:
            batch = batch.to(trainer.device)
            with torch.no_grad() if _direct(trainer) else torch.enable_grad():
                out = trainer._forward(batch)
            out = {k: v.detach() for k, v in out.items()}
            metrics = trainer._compute_metrics(out, batch, evaluator, metrics)
    finally:
        if trainer.ema is not None:
            trainer.ema.restore()
        _close(loader)
    return _table_metrics(metrics)


def _close(obj) -> None:
    """Close the LMDB environments of a loader or dataset (and of the datasets it wraps) now:
    py-lmdb refuses to open one folder twice in a process."""
    ds, seen = obj, 0
    while ds is not None and seen < 9:
        for env in [getattr(ds, "env", None), *(getattr(ds, "envs", None) or [])]:
            if env is not None:
                env.close()
        ds, seen = getattr(ds, "dataset", None), seen + 1


def _direct(trainer) -> bool:
    m = trainer.config["model"]
    return bool(m.get("direct_forces", False)) or not m.get("regress_forces", True)


def evaluate_checkpoint(
    checkpoint: str | Path, data_root: str | Path, prefix: str = "val_", cpu: bool = True, batch_size: int | None = None
) -> dict[str, dict[str, float]]:
    trainer = load_trainer(checkpoint, cpu=cpu)
    out = {}
    for key, suffix, title in SPLITS:
        t0 = time.time()
        out[title] = evaluate_split(trainer, Path(data_root) / f"{prefix}{suffix}", batch_size)
        log.info(f"{Path(checkpoint).name} {title}: {out[title]} ({time.time() - t0:.1f} s)")
    return out


# ----------------------------------------------------------------------------- tables
def markdown_table(results: dict[str, dict[str, dict[str, float]]], extra: dict[str, dict] | None = None) -> str:
    """results[model][split title] -> metrics. Table 1 (E meV / F meV/A) + cosine / EFwT table."""
    titles = [t for _, _, t in SPLITS]
    lines = ["| model | " + " | ".join(f"{t} E | {t} F" for t in titles) + " |",
             "|---|" + "---|---|" * len(titles)]
    for model, res in results.items():
        cells = []
        for t in titles:
            r = res.get(t)
            cells += [f"{r['energy_mae_meV']:.1f}", f"{r['forces_mae_meV_per_A']:.1f}"] if r else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| model | " + " | ".join(f"{t} cos | {t} EFwT %" for t in titles) + " |",
              "|---|" + "---|---|" * len(titles)]
    for model, res in results.items():
        cells = []
        for t in titles:
            r = res.get(t)
            cells += [f"{r['forces_cos']:.3f}", f"{r['efwt_percent']:.2f}"] if r else ["-", "-"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if extra:
        keys = sorted({k for v in extra.values() for k in v})
        lines += ["", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for model, v in extra.items():
            lines.append(f"| {model} | " + " | ".join(_fmt(v.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "split", *COLUMNS, "n_structures"])
        for model, res in results.items():
            for _, _, t in SPLITS:
                if t in res:
                    r = res[t]
                    w.writerow([model, t, *(f"{r[c]:.6g}" for c in COLUMNS), r.get("n_structures", "")])


def read_csv(path: Path) -> dict:
    results: dict = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            results.setdefault(row["model"], {})[row["split"]] = {c: float(row[c]) for c in COLUMNS}
    return results


def bar_chart(results: dict, path: Path, title: str = "") -> None:
    """Grouped bars: energy MAE and force MAE per split, one bar per model (log axis when the
    values span more than 30x, as an untrained or diverged model would otherwise flatten the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = [t for _, _, t in SPLITS]
    models = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(titles))
    for ax, key, ylabel in ((axes[0], "energy_mae_meV", "energy MAE (meV)"),
                            (axes[1], "forces_mae_meV_per_A", "force MAE (meV/Å)")):
        allv = []
        for i, m in enumerate(models):
            vals = [results[m].get(t, {}).get(key, np.nan) for t in titles]
            allv += [v for v in vals if np.isfinite(v) and v > 0]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=m, color=f"C{i % 10}")
        if allv and max(allv) / min(allv) > 30:
            ax.set_yscale("log")
            ylabel += ", log scale"
        ax.set_xticks(x, titles)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(models), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    rows = (len(models) + 3) // 4
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_outputs(results: dict, out: Path, title: str = "", extra: dict | None = None, note: str = "") -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = (f"# {title}\n\n" if title else "") + (note + "\n\n" if note else "") + markdown_table(results, extra)
    (out / "table1.md").write_text(md)
    write_csv(results, out / "table1.csv")
    bar_chart(results, out / "table1.png", title)
    (out / "table1.json").write_text(json.dumps({"results": results, "extra": extra or {}}, indent=1))
    return md


# ----------------------------------------------------------------------------- predictions / submission
def predict_splits(checkpoint, data_root, out: Path, prefix: str = "test_", cpu: bool = True,
                   batch_size: int | None = None) -> dict[str, Path]:
    """fairchem's predict mode on each split -> <out>/<split>_predictions.npz (ids, energy, forces, chunk_idx)."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = load_trainer(checkpoint, cpu=cpu, run_dir=out / "fairchem")
    files = {}
    for key, suffix, title in SPLITS:
        loader = _loader(trainer, Path(data_root) / f"{prefix}{suffix}", batch_size)
        try:
            trainer.predict(loader, results_file=f"{key}_predictions", disable_tqdm=True)
        finally:
            _close(loader)
        produced = Path(trainer.config["cmd"]["results_dir"]) / f"{trainer.name}_{key}_predictions.npz"
        files[key] = out / f"{key}_predictions.npz"
        shutil.copyfile(produced, files[key])
        log.info(f"{title}: {files[key]}")
    return files


def make_submission(files: dict[str, Path], out_path: Path) -> Path:
    """The S2EF submission file via fairchem's make_submission_file (keys <split>_<field>)."""
    from fairchem.core.scripts import make_submission_file as msf

    args = argparse.Namespace(
        dataset="OC20", out_path=str(out_path), is2re_relaxations=False, hybrid=False,
        **{k: str(files[k]) for k, _, _ in SPLITS},
    )
    msf.main(args)
    return Path(args.out_path)


def read_labels(src: str | Path, key_mapping: dict | None = None) -> dict[str, np.ndarray]:
    """Labels of one LMDB split as a submission stores predictions: ids, energy, free-atom forces."""
    from fairchem.core.datasets import LmdbDataset

    key_mapping = key_mapping or {"y": "energy", "force": "forces"}
    ds = LmdbDataset({"src": str(src), "key_mapping": key_mapping})
    ids, energy, forces, nfree = [], [], [], []
    for i in range(len(ds)):
        d = ds[i]
        if "energy" not in d or "forces" not in d:
            raise ValueError(f"{src}: structure {i} has no energy/forces labels, cannot score")
        fixed = d.fixed if "fixed" in d else np.zeros(d.natoms)
        free = np.asarray(fixed).reshape(-1) == 0
        sid = d.sid.item() if hasattr(d.sid, "item") else d.sid
        ids.append(f"{sid}_{d.fid.item() if hasattr(d.fid, 'item') else d.fid}" if "fid" in d else f"{sid}")
        energy.append(float(np.asarray(d.energy).reshape(-1)[0]))
        f = np.asarray(d.forces, dtype=np.float64).reshape(-1, 3)[free]
        forces.append(f)
        nfree.append(int(free.sum()))
    _close(ds)
    return {"ids": np.array(ids), "energy": np.array(energy), "forces": forces, "natoms_free": np.array(nfree)}


def score_submission(submission: str | Path, data_root, prefix: str = "val_") -> dict[str, dict[str, float]]:
    """Local scorer: match ids of the submission to the labelled splits, metrics via fairchem's Evaluator."""
    sub = np.load(submission, allow_pickle=True)
    results = {}
    for key, suffix, title in SPLITS:
        if f"{key}_ids" not in sub:
            raise KeyError(f"{submission}: no {key}_ids (has {sorted(sub.files)})")
        lab = read_labels(Path(data_root) / f"{prefix}{suffix}")
        ids = [str(i) for i in sub[f"{key}_ids"]]
        chunks = np.split(np.asarray(sub[f"{key}_forces"], dtype=np.float64), sub[f"{key}_chunk_idx"])
        pos = {i: n for n, i in enumerate(ids)}
        missing = [i for i in lab["ids"] if i not in pos]
        if missing:
            raise ValueError(f"{key}: {len(missing)} labelled structures missing from the submission, e.g. {missing[:3]}")
        order = [pos[i] for i in lab["ids"]]
        e_pred = np.asarray(sub[f"{key}_energy"], dtype=np.float64)[order]
        f_pred = [chunks[j] for j in order]
        for j, (fp, ft) in enumerate(zip(f_pred, lab["forces"])):
            if fp.shape != ft.shape:
                raise ValueError(f"{key}: structure {lab['ids'][j]} has {len(fp)} predicted free atoms, {len(ft)} labelled")
        results[title] = metrics_from_arrays(
            e_pred, lab["energy"], np.concatenate(f_pred), np.concatenate(lab["forces"]), lab["natoms_free"]
        )
    return results


# ----------------------------------------------------------------------------- line-up
def subset_data(data_root: Path, out: Path, train_size: int | None, eval_size: int | None, seed: int) -> Path:
    """Seeded random subsets of the train split (train_size structures) and of each of the four
    val splits (eval_size structures) under <out>/data, for a line-up that must fit a CPU budget.
    Records are copied byte for byte (leignn_ocp.data.splits). Returns the data root to use."""
    if train_size is None and eval_size is None:
        return data_root
    from leignn_ocp.data.lmdb_io import validate_lmdb
    from leignn_ocp.data.splits import split_lmdb

    dst = out / "data"
    spec = {"source": str(data_root), "train_size": train_size, "eval_size": eval_size, "seed": seed}
    stamp = dst / "subset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for split in ["train", *(f"val_{s}" for _, s, _ in SPLITS)]:
        src = data_root / split
        size = train_size if split == "train" else eval_size
        n = validate_lmdb(src, required=(), max_check=1)
        frac = 1.0 if size is None or size >= n else size / n
        staging = dst / f".{split}"
        split_lmdb(src, staging, (split,), (1.0,), seed=seed, subset_frac=frac, overwrite=True)
        (staging / split).rename(dst / split)
        shutil.rmtree(staging)
        spec[f"n_{split}"] = validate_lmdb(dst / split, required=(), max_check=1)
    stamp.write_text(json.dumps(spec, indent=1))
    log.info(f"line-up data subsets in {dst}: {spec}")
    return dst


def lineup(config_dir: Path, out: Path, epochs: int | None, data_root: Path, models: Sequence[str] | None,
           cpu: bool, seed: int, fit_scales: bool, extra_args: Sequence[str],
           train_size: int | None = None, eval_size: int | None = None, scale_batches: int = 16,
           which: str = "final") -> dict:
    """Train each config with the fairchem CLI for the same number of epochs on the same data, then
    evaluate every final checkpoint on the four val splits of `data_root` (or of their subsets)."""
    fairchem = shutil.which("fairchem") or str(Path(sys.executable).with_name("fairchem"))
    names = list(models) if models else [m for m in MODEL_NAMES if (config_dir / f"{m}.yml").exists()]
    unknown = [n for n in names if not (config_dir / f"{n}.yml").is_file()]
    if unknown:
        raise SystemExit(f"no config {', '.join(str(config_dir / f'{n}.yml') for n in unknown)}")
    data = subset_data(data_root, out, train_size, eval_size, seed)
    runs = out / "runs"
    results, extra = {}, {}
    t_all = time.time()
    for name in names:
        cfg = config_dir / f"{name}.yml"
        ckpt_dir = runs / "checkpoints" / name
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        cmd = [fairchem, "--mode", "train", "--config-yml", str(cfg), "--run-dir", str(runs),
               "--timestamp-id", name, "--identifier", name, "--seed", str(seed),
               "--print-every", "50"]
        if epochs is not None:
            cmd.append(f"--optim.max_epochs={epochs}")
        if data != data_root:
            cmd += [f"--dataset.train.src={data / 'train'}", f"--dataset.val.src={data / 'val_id'}"]
        cmd += list(extra_args)
        if cpu:
            cmd.append("--cpu")
        t0 = time.time()
        if fit_scales and _has_scale_factors(cfg):
            scale_json = runs / "scale_factors" / f"{name}.json"
            fit = [sys.executable, str(Path(__file__).resolve()), "fit-scales", "--out", str(scale_json),
                   "--num-batches", str(scale_batches), *cmd[1:]]
            fit[fit.index("--timestamp-id") + 1] = f"{name}_fit"
            log.info("fitting scale factors: " + " ".join(fit))
            _run(fit, runs / f"{name}_fit_scales.log")
            cmd.append(f"--model.scale_file={scale_json}")
        log.info("training: " + " ".join(cmd))
        _run(cmd, runs / f"{name}.log")
        train_s = time.time() - t0
        ckpt = find_checkpoint(ckpt_dir, which)
        row = MODEL_NAMES.get(name, name)
        t0 = time.time()
        results[row] = evaluate_checkpoint(ckpt, data, "val_", cpu=cpu)
        extra[row] = {"params": _n_params(ckpt), "train_s": round(train_s, 1), "eval_s": round(time.time() - t0, 1)}
        log.info(f"{row}: trained in {train_s:.0f} s, evaluated in {extra[row]['eval_s']:.0f} s")
        write_outputs(results, out, extra=extra)  # partial table after every model
    return {"results": results, "extra": extra, "data": data, "wall_s": time.time() - t_all}


def _run(cmd: list[str], logfile: Path) -> None:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(logfile, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if p.returncode:
        tail = "".join(open(logfile).readlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); log {logfile}:\n{tail}")


def _has_scale_factors(cfg: Path) -> bool:
    from fairchem.core.common.utils import load_config

    name = load_config(str(cfg))[0]["model"]["name"]
    return name in ("painn", "gemnet_t")


def fit_scales(fairchem_argv: Sequence[str], out_json: Path, num_batches: int = 16) -> Path:
    """Fit a model's ScaleFactors (PaiNN, GemNet) with fairchem's compute_scaling_factors on the
    config's training data and write a `scale_file` for `--model.scale_file=`.

    fairchem_argv: the arguments of `fairchem --mode train ...` (config, overrides, --cpu). fairchem
    1.10's own `python -m fairchem.core.modules.scaling.fit` cannot run (its __main__ reads a flag the
    parser lacks) and saves the factors keyed by module path, while models load a scale_file keyed by
    ScaleFactor name; this wrapper runs the same fitting code and writes {name: value} JSON.
    """
    import torch
    from fairchem.core.common import distutils
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config
    from fairchem.core.modules.scaling import ScaleFactor
    from fairchem.core.modules.scaling.fit import compute_scaling_factors

    import leignn_ocp  # noqa: F401

    args, overrides = flags.get_parser().parse_known_args(list(fairchem_argv))
    config = build_config(args, overrides)
    config["model"].pop("scale_file", None)  # fit all factors from scratch, no interactive prompt
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    raw = out_json.with_suffix(".by_path.pt")
    if raw.exists():
        raw.unlink()  # fairchem asks before overwriting
    config["checkpoint"] = str(raw)
    config["is_debug"] = True  # nothing but the scale file is written
    distutils.setup_env_local()
    compute_scaling_factors(config, num_batches=num_batches)
    by_path = {k: float(v) for k, v in torch.load(str(raw), map_location="cpu", weights_only=False).items()}

    model = _build_model(config["model"])
    scales = {}
    for path, module in model.named_modules():
        if isinstance(module, ScaleFactor):
            if path not in by_path:
                raise KeyError(f"{raw}: no fitted value for {path} (have {sorted(by_path)[:5]} ...)")
            scales[module.name or path] = by_path[path]
    if not scales:
        raise ValueError(f"model {config['model']['name']} has no ScaleFactor modules")
    out_json.write_text(json.dumps({"comment": f"fairchem compute_scaling_factors, {num_batches} batches of "
                                                f"{config['dataset']['train'].get('src')}", **scales}, indent=1))
    log.info(f"scale factors -> {out_json}: " + ", ".join(f"{k} {v:.3f}" for k, v in scales.items()))
    return out_json


def _build_model(model_cfg: dict):
    """The model a config's ``model`` block describes, with fresh weights (no scale_file read)."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    import leignn_ocp  # noqa: F401  (registers the model)

    setup_imports()
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("name", "scale_file")}
    return registry.get_model_class(model_cfg["name"])(**kwargs)


def _n_params(ckpt: Path) -> int:
    """Trainable parameters of the checkpoint's model (rebuilt from its config; buffers not counted)."""
    import torch

    from leignn_ocp.bench import count_params

    return count_params(_build_model(torch.load(str(ckpt), map_location="cpu", weights_only=False)["config"]["model"]))


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, default_prefix="val_"):
        p.add_argument("--data-root", "--data", default="data/default/s2ef",
                       help="folder holding <prefix>{id,ood_ads,ood_cat,ood_both} (OC20: data/s2ef/all)")
        p.add_argument("--split-prefix", default=default_prefix)
        p.add_argument("--gpu", action="store_true", help="evaluate on the GPU (default: CPU)")
        p.add_argument("--batch-size", type=int, default=None)

    p = sub.add_parser("quick", help="one checkpoint -> 4-split table on stdout (the default command)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint file or fairchem run/checkpoint directory")
    p.add_argument("--checkpoint", dest="checkpoint_opt", default=None, help="same as the positional")
    p.add_argument("--which", choices=["final", "best"], default="final")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None, help="also write table1.{md,csv,png,json} here")
    common(p)

    p = sub.add_parser("table", help="checkpoints / run dirs -> Table 1 (md, csv, png)")
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--which", choices=["final", "best"], default="final")
    p.add_argument("--out", default="results/table1")
    p.add_argument("--title", default="")
    common(p)

    p = sub.add_parser("lineup", help="train every config of a folder for an equal budget, then Table 1")
    p.add_argument("--config-dir", default="configs/s2ef/default")
    p.add_argument("--epochs", type=int, default=None,
                   help="the shared budget: epochs of the train split for every model (default: each "
                        "config's own optim.max_epochs, i.e. each model's published recipe)")
    p.add_argument("--which", choices=["final", "best"], default="final",
                   help="checkpoint scored: final (default data, whose val is val_id) or best on the internal "
                        "validation split (the paper's OC20-200K/50K protocol)")
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODEL_NAMES)}")
    p.add_argument("--out", default="results/default_lineup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fit-scales", action="store_true", help="leave PaiNN/GemNet ScaleFactors unfitted")
    p.add_argument("--scale-batches", type=int, default=None,
                   help="batches per ScaleFactor fit (fairchem's default 16; lineup default 4 on CPU, 16 on GPU)")
    p.add_argument("--data-root", default="data/default/s2ef")
    p.add_argument("--train-size", type=int, default=None,
                   help="train every model on the same seeded random subset of this many structures of "
                        "<data-root>/train (meant for the embedded data; with OC20 configs leave it out)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="validate / test on seeded random subsets of this many structures per val split")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("fairchem_args", nargs="*", help="extra fairchem CLI overrides, after --")

    p = sub.add_parser("predict", help="predict mode on the 4 test splits + S2EF submission file")
    p.add_argument("checkpoint")
    p.add_argument("--which", choices=["final", "best"], default="best")
    p.add_argument("--out", default="results/submission")
    common(p, default_prefix="test_")

    p = sub.add_parser("score", help="local scorer: submission .npz vs labelled splits")
    p.add_argument("submission")
    p.add_argument("--out", default=None)
    common(p)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit-scales":
        # fit-scales --out FILE.json <the arguments of `fairchem --mode train`>
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        fp = argparse.ArgumentParser(prog="evaluate.py fit-scales", description=fit_scales.__doc__)
        fp.add_argument("--out", required=True, help="scale file to write (.json)")
        fp.add_argument("--num-batches", type=int, default=16)
        fa, rest = fp.parse_known_args(argv[1:])
        fit_scales(rest, Path(fa.out), fa.num_batches)
        return 0
    if argv and argv[0] not in sub.choices and argv[0] not in ("-h", "--help"):
        argv = ["quick", *argv]  # `evaluate.py --checkpoint CKPT ...` = quick
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("matplotlib",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cpu = not getattr(a, "gpu", False)

    if a.cmd == "quick":
        if not (a.checkpoint or a.checkpoint_opt):
            raise SystemExit("quick: give a checkpoint file or run directory")
        ckpt = find_checkpoint(a.checkpoint or a.checkpoint_opt, a.which)
        name = a.name or ckpt.parent.name
        res = {name: evaluate_checkpoint(ckpt, a.data_root, a.split_prefix, cpu, a.batch_size)}
        print(markdown_table(res), end="")
        if a.out:
            write_outputs(res, Path(a.out), title=f"{name}: {ckpt}")
    elif a.cmd == "table":
        results = {}
        for spec in a.run:
            if "=" not in spec:
                raise SystemExit(f"--run expects NAME=PATH, got {spec!r}")
            name, path = spec.split("=", 1)
            results[name] = evaluate_checkpoint(find_checkpoint(path, a.which), a.data_root, a.split_prefix, cpu,
                                                a.batch_size)
        print(write_outputs(results, Path(a.out), a.title), end="")
        print(f"wrote {a.out}/table1.{{md,csv,png,json}}")
    elif a.cmd == "lineup":
        out = Path(a.out)
        r = lineup(Path(a.config_dir), out, a.epochs, Path(a.data_root), a.models, cpu, a.seed,
                   not a.no_fit_scales, a.fairchem_args, a.train_size, a.eval_size,
                   a.scale_batches or (4 if cpu else 16), a.which)
        sizes = ""
        if r["data"] != Path(a.data_root):
            spec = json.loads((Path(r["data"]) / "subset.json").read_text())
            sizes = (f" Data: seeded random subsets of {a.data_root} (seed {a.seed}): "
                     + ", ".join(f"{k[2:]} {v}" for k, v in spec.items() if k.startswith("n_")) + " structures.")
        budget = f"for {a.epochs} epoch(s)" if a.epochs is not None else "for its config's own optim.max_epochs"
        note = (f"Budget: every model trained with `{Path(a.config_dir)}/<model>.yml` {budget} "
                f"on the same training set (seed {a.seed}, {'GPU' if not cpu else 'CPU'}"
                f"{', extra args ' + ' '.join(a.fairchem_args) if a.fairchem_args else ''}); the {a.which} checkpoint "
                f"(EMA weights) evaluated on {r['data']}/val_{{id,ood_ads,ood_cat,ood_both}}.{sizes} "
                f"Line-up wall time {r['wall_s'] / 60:.1f} min. Energy MAE meV, force MAE meV/Å "
                f"(free atoms), force cosine, EFwT %; params = trainable parameters, train_s includes "
                f"process start, normalizer and scale-factor fitting and any per-epoch validation.")
        cmdline = "python scripts/evaluate.py " + " ".join(argv)
        note += f"\n\nCommand: `{cmdline}`"
        print(write_outputs(r["results"], out, "Table 1 on the embedded data", r["extra"], note), end="")
        print(f"wrote {out}/table1.{{md,csv,png,json}}")
    elif a.cmd == "predict":
        ckpt = find_checkpoint(a.checkpoint, a.which)
        files = predict_splits(ckpt, a.data_root, Path(a.out), a.split_prefix, cpu, a.batch_size)
        path = make_submission(files, Path(a.out) / "submission.npz")
        print(f"submission file: {path}")
    elif a.cmd == "score":
        res = {Path(a.submission).stem: score_submission(a.submission, a.data_root, a.split_prefix)}
        print(markdown_table(res), end="")
        if a.out:
            write_outputs(res, Path(a.out), title=f"score of {a.submission}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
