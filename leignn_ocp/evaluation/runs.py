"""The line-up: every model of a config folder trained by the real ``fairchem`` CLI, once per seed, for one shared
budget on the same (optionally subset) data, then scored on the four val splits.

Training runs ``fairchem --mode train`` as a subprocess, as a user would; ScaleFactor fitting runs
as ``python -m leignn_ocp.evaluation fit-scales`` in its own process (fairchem keeps global state:
registry, distributed setup). Both get the same argument list from :func:`train_args`. Relative
paths (configs, data, output) are relative to the current working directory, for the subprocesses too.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from leignn_ocp import lineup
from leignn_ocp.evaluation.checkpoints import find_checkpoint, load_trainer
from leignn_ocp.evaluation.metrics import evaluate_splits
from leignn_ocp.evaluation.scales import has_scale_factors
from leignn_ocp.evaluation.tables import write_outputs

log = logging.getLogger(__name__)


def subset_data(data_root: Path, out: Path, train_size: int | None, eval_size: int | None, seed: int) -> Path:
    """Seeded random subsets of the train split (train_size structures) and of each of the four
    val splits (eval_size structures) under <out>/data, for a line-up that must fit a CPU budget.
    Records are copied byte for byte (leignn_ocp.data.splits). Returns the data root to use."""
    data_root, out = Path(data_root), Path(out)
    if train_size is None and eval_size is None:
        return data_root
    from leignn_ocp.data.lmdb_io import validate_lmdb
    from leignn_ocp.data.splits import split_lmdb

    dst = out / "data"
    spec = {"source": str(data_root), "train_size": train_size, "eval_size": eval_size, "seed": seed}
    stamp = dst / "subset.json"
    if stamp.is_file() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in spec} == spec:
        return dst  # the same subsets (the stamp also records their sizes, n_<split>)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for split in ["train", *(f"val_{s}" for _, s, _ in lineup.SPLITS)]:
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


def fairchem_cli() -> str:
    """The ``fairchem`` console script of this interpreter's environment, else the one on PATH."""
    exe = Path(sys.executable).with_name("fairchem")
    found = str(exe) if exe.exists() else shutil.which("fairchem")
    if not found:
        raise SystemExit("the fairchem command is not installed (pip install fairchem-core)")
    return found


def train_args(config: Path, run_dir: Path, timestamp_id: str, identifier: str, *, seed: int = 0,
               epochs: int | None = None, data: Path | None = None, cpu: bool = True,
               extra: Sequence[str] = ()) -> list[str]:
    """The arguments of ``fairchem`` that train one config of a line-up.

    epochs: the shared budget (``--optim.max_epochs``; None keeps the config's own).
    data: a data root whose ``train`` and ``val_id`` replace the config's train / val sources.
    extra: further fairchem overrides, as given on the command line.
    """
    args = ["--mode", "train", "--config-yml", str(config), "--run-dir", str(run_dir),
            "--timestamp-id", timestamp_id, "--identifier", identifier, "--seed", str(seed),
            "--print-every", "50"]
    if epochs is not None:
        args.append(f"--optim.max_epochs={epochs}")
    if data is not None:
        args += [f"--dataset.train.src={Path(data) / 'train'}", f"--dataset.val.src={Path(data) / 'val_id'}"]
    args += list(extra)
    if cpu:
        args.append("--cpu")
    return args


def run_logged(cmd: Sequence[str], logfile: Path) -> None:
    """Run a command with its output in ``logfile``; on failure raise with the log's tail."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log.info(" ".join(map(str, cmd)))
    with open(logfile, "w") as f:
        p = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        tail = "".join(open(logfile).readlines()[-30:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}); log {logfile}:\n{tail}")


def lineup_keys(config_dir: Path, models: Sequence[str] | None = None) -> list[str]:
    """Config stems to train: ``models`` (keys, aliases or labels of leignn_ocp.lineup; other names
    are taken as config stems) or every registry entry that has a config in ``config_dir``."""
    if not models:
        return [k for k in lineup.KEYS if (config_dir / f"{k}.yml").is_file()]
    keys = []
    for name in models:
        try:
            keys.append(lineup.get(name).key)
        except KeyError:
            keys.append(name)  # a config of the user's own, checked below
    unknown = [k for k in keys if not (config_dir / f"{k}.yml").is_file()]
    if unknown:
        raise SystemExit(f"no config {', '.join(str(config_dir / f'{k}.yml') for k in unknown)} "
                         f"(the line-up has {', '.join(lineup.KEYS)})")
    return keys


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a fairchem checkpoint was saved at (inference loading does not restore it)."""
    import torch

    return int(torch.load(str(ckpt), map_location="cpu", weights_only=False).get("step", 0))


def learning_curve(logs_dir: Path, tag: str = "val/forces_mae") -> list[tuple[int, float]]:
    """(step, value) of one scalar that fairchem's tensorboard logger wrote during training."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]


def run_lineup(config_dir: Path, out: Path, *, epochs: int | None = None, data_root: Path = Path("data/default/s2ef"),
               models: Sequence[str] | None = None, cpu: bool = True, seeds: Sequence[int] = (0,), data_seed: int = 0,
               fit_scales: bool = True, extra_args: Sequence[str] = (), train_size: int | None = None,
               eval_size: int | None = None, scale_batches: int = 16, which: str = "final",
               overwrite: bool = False, train: bool = True) -> dict:
    """Train each config with the fairchem CLI once per seed, for the same number of epochs on the
    same data, then evaluate every checkpoint (``which``: final or best) on the four val splits of
    ``data_root`` (or of their subsets, drawn with ``data_seed``).

    The seed sets fairchem's ``--seed`` (weights, shuffling); the data stay the same. Each finished
    (model, seed) is saved as ``<out>/rows/<key>_s<seed>.json`` (metrics, params, train_s, eval_s and
    the val force-MAE learning curve) and skipped by a later call unless ``overwrite``: an interrupted
    line-up resumes, and several line-up processes with disjoint ``models`` may share one ``out``.
    ``train=False`` trains nothing and only collects the row files there are.

    Returns {"rows": every row file of ``out`` (this call's and earlier ones), "data", "wall_s"}.
    """
    config_dir, out, data_root = Path(config_dir), Path(out), Path(data_root)
    keys = lineup_keys(config_dir, models)
    data = subset_data(data_root, out, train_size, eval_size, data_seed)
    runs = out / "runs"
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    for key in keys:
        cfg = config_dir / f"{key}.yml"
        for seed in seeds:
            row_file = rows_dir / f"{key}_s{seed}.json"
            if row_file.is_file() and not overwrite:
                log.info(f"{key} seed {seed}: done before ({row_file})")
                continue
            if not train:
                log.info(f"{key} seed {seed}: not trained yet (--report-only)")
                continue
            run_id = f"{key}_s{seed}"
            args = functools.partial(train_args, run_dir=runs, seed=seed, epochs=epochs,
                                     data=data, cpu=cpu, extra=extra_args)  # --data-root always wins over the config's sources
            ckpt_dir = runs / "checkpoints" / run_id
            if ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)
            train = [fairchem_cli(), *args(cfg, timestamp_id=run_id, identifier=key)]
            t0 = time.time()
            # fitted once per model, for the first seed's initial weights: the factors normalise
            # activation variances, which depend on the data and the architecture, hardly the seed
            scale_json = runs / "scale_factors" / f"{key}.json"
            refit = overwrite and seed == seeds[0]
            if fit_scales and (refit or not scale_json.is_file()) and has_scale_factors(cfg):
                run_logged([sys.executable, "-m", "leignn_ocp.evaluation", "fit-scales", "--out", str(scale_json),
                            "--num-batches", str(scale_batches),
                            *args(cfg, timestamp_id=f"{run_id}_fit", identifier=key)],
                           runs / f"{run_id}_fit_scales.log")
            if fit_scales and scale_json.is_file():
                train.append(f"--model.scale_file={scale_json}")
            elif not fit_scales:  # --no-fit-scales: fairchem's warning, not leignn_ocp.trainer's refusal
                train.append("--optim.allow_unfitted_scale_factors=True")
            fit_s = time.time() - t0
            t0 = time.time()
            run_logged(train, runs / f"{run_id}.log")
            train_s = time.time() - t0
            ckpt = find_checkpoint(ckpt_dir, which)
            t0 = time.time()
            trainer = load_trainer(ckpt, cpu=cpu)
            row = {"key": key, "label": lineup.label(key), "seed": seed, "config": str(cfg),
                   "results": evaluate_splits(trainer, data, "val_", name=f"{ckpt.name} seed {seed}"),
                   "params": lineup.count_params(trainer.model), "steps": checkpoint_step(ckpt),
                   "train_s": round(train_s, 1), "fit_scales_s": round(fit_s, 1), "eval_s": round(time.time() - t0, 1),
                   "curve": learning_curve(runs / "logs" / "tensorboard" / run_id)}
            tmp = row_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(row, indent=1))
            tmp.rename(row_file)  # a row file is whole or absent
            log.info(f"{row['label']} seed {seed}: trained in {train_s:.0f} s, evaluated in {row['eval_s']:.0f} s")
    rows = [json.loads(f.read_text()) for f in sorted(rows_dir.glob("*.json"))]
    return {"rows": rows, "data": data, "wall_s": time.time() - t_all}
