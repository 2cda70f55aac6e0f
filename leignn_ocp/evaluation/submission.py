"""OC20 S2EF leaderboard files: fairchem's predict mode on the four test splits, the submission
file (fairchem's make_submission_file), and a local scorer for splits that have labels.

Predictions are stored as float16 by default, as fairchem's ``trainer.predict`` does unless a
config asks for float32 (``outputs.<target>.prediction_dtype``): half the size of float32, and the
precision of the files fairchem's own predict mode makes for the OC20 EvalAI server."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np

from leignn_ocp.evaluation.checkpoints import close_lmdb, load_trainer, require_splits, split_loader
from leignn_ocp.evaluation.metrics import metrics_from_arrays
from leignn_ocp.lineup import SPLITS

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
DEFAULT_DTYPE = "float16"  # fairchem's trainer.predict default


def set_prediction_dtype(config: dict, dtype: str) -> None:
    """Make trainer.predict store every output as ``dtype``: it writes float32 when either the
    output's or the task's ``prediction_dtype`` says so (the configs here say float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"prediction dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    for target in config["outputs"].values():
        target["prediction_dtype"] = dtype
    config.setdefault("task", {})["prediction_dtype"] = dtype


def predict_splits(checkpoint, data_root, out: Path, prefix: str = "test_", cpu: bool = True,
                   batch_size: int | None = None, dtype: str = DEFAULT_DTYPE) -> dict[str, Path]:
    """fairchem's predict mode (trainer.predict, what ``fairchem --mode predict`` runs) on each split
    -> <out>/<split>_predictions.npz (ids, energy and free-atom forces as ``dtype``, chunk_idx)."""
    require_splits(data_root, prefix)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = load_trainer(checkpoint, cpu=cpu, run_dir=out / "fairchem")
    set_prediction_dtype(trainer.config, dtype)
    files = {}
    for key, suffix, title in SPLITS:
        loader = split_loader(trainer, Path(data_root) / f"{prefix}{suffix}", batch_size)
        try:
            trainer.predict(loader, results_file=f"{key}_predictions", disable_tqdm=True)
        finally:
            close_lmdb(loader)
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
        forces.append(np.asarray(d.forces, dtype=np.float64).reshape(-1, 3)[free])  # [n_free, 3]
        nfree.append(int(free.sum()))
    close_lmdb(ds)
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
