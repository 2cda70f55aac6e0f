"""IS2RS / IS2RE benchmark: each (model, seed) trained by the line-up runner (or a given checkpoint),
relaxed by the real ``fairchem --mode run-relaxations`` on an IS2RS set, scored by fairchem's
evaluator and by the reference calculator that labelled the data.

Per (model, seed) one row file ``<out>/rows/<key>_s<seed>.json`` (resumable, like the line-up).
Metrics per row:
  adwt                 fairchem's is2rs ADwT (free atoms, minimum image), from its tensorboard log
  energy_mae           mean |E_model(relaxed) - y_relaxed| per system (eV), from fairchem's trajectories;
                       fairchem 1.10's own is2re_energy_mae broadcasts [B, 1] against [B] and averages
                       over every pair of a batch, so it is kept as fairchem_is2re_energy_mae only
  converged            share of systems that stopped under task.relaxation_fmax before the step cap
  lowered              share with E_ref(model-relaxed) < E_ref(initial)
  dE_mean, dE_median   E_ref(model-relaxed) - E_ref(reference-relaxed) (eV)
  within_0.1           share with that difference under DE_THRESHOLD eV
  f_mae_at_minimum     the model's free-atom force MAE (meV/A, per component) at the reference minima
                       pos_relaxed, where the reference forces are under its fmax: how well the model
                       knows where forces vanish (issue 15's symptom); a row written before this metric
                       existed gets it added on the next call, without relaxing again
  fmax_at_minimum      median over systems of the model's largest free-atom force there (eV/A)
  false_descent        share of systems the reference calculator puts higher at the end than at the start
                       while the model puts them lower: the model's own energy surface led uphill, so
                       forces that are its exact gradient would have gone there too (per system:
                       ref_path, model_path = E(model-relaxed) - E(initial), eV); a row written before
                       this metric existed gets it on the next call, from the relaxation's saved positions
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leignn_ocp import lineup
from leignn_ocp.data.is2rs import read_is2rs, record_atoms, validate_is2rs
from leignn_ocp.evaluation.checkpoints import load_trainer
from leignn_ocp.evaluation.runs import fairchem_cli, learning_curve, lineup_keys, run_logged

log = logging.getLogger(__name__)
DE_THRESHOLD = 0.1  # eV
METRICS = ("adwt", "energy_mae", "converged", "lowered", "dE_mean", "dE_median", "within_0.1", "f_mae_at_minimum",
           "fmax_at_minimum", "false_descent")


def reference_scores(records: Sequence, positions: Sequence[np.ndarray], reference) -> dict:
    """The reference calculator at each model-relaxed structure, against itself at the record's (float32)
    start and against the reference-relaxed energy y_relaxed + energy_offset (its total energy)."""
    path, de = [], []
    for d, pos in zip(records, positions):
        atoms = record_atoms(d, pos)
        atoms.calc = reference
        e = float(atoms.get_potential_energy())  # [eV] total
        start = record_atoms(d)
        start.calc = reference
        path.append(e - float(start.get_potential_energy()))  # the same float32 start fairchem relaxed from
        de.append(e - (d.y_relaxed + d.energy_offset))
    de, path = np.array(de), np.array(path)
    return {"lowered": float(np.mean(path < 0)), "dE_mean": float(de.mean()), "dE_median": float(np.median(de)),
            "within_0.1": float(np.mean(np.abs(de) < DE_THRESHOLD)), "dE": de.tolist(), "ref_path": path.tolist()}


def descent_scores(trainer, records: Sequence, e_end: np.ndarray, ref_path: Sequence[float]) -> dict:
    """false_descent and model_path of the module docstring: which way the model's own energy went
    (``e_end``: [B] eV, the model at the relaxed structures, which the caller has already)."""
    model_path = np.asarray(e_end) - model_energies(trainer, records, [d.pos for d in records])  # [B] eV
    false = (np.asarray(ref_path) > 0) & (model_path < 0)
    return {"false_descent": float(false.mean()), "model_path": model_path.tolist()}


def _positions_file(work: Path) -> Path:
    return work / "results" / "relax" / "relaxed_positions.npz"


def relaxed_positions(work: Path, records: Sequence) -> list[np.ndarray]:
    """B x [N, 3]: the positions fairchem wrote for each record (``write_pos``), in the records' order."""
    z = np.load(_positions_file(work))
    by_sid = dict(zip(z["ids"].tolist(), np.split(z["pos"], z["chunk_idx"])))  # sid -> [N, 3]
    missing = [d.sid for d in records if str(d.sid) not in by_sid]
    if missing:
        raise RuntimeError(f"fairchem wrote no relaxed positions for sids {missing} ({work})")
    return [by_sid[str(d.sid)] for d in records]


def relax_overrides(ckpt: Path, extra: Sequence[str] = ()) -> list[str]:
    """``extra`` plus the ScaleFactors file the checkpoint was trained with, unless ``extra`` names one:
    the config's own file may hold other factors (a line-up refits them on its data), and fairchem
    refuses to load a checkpoint whose fitted factors differ from the model's."""
    from leignn_ocp.trainer import model_config, read_checkpoint

    scale = model_config(read_checkpoint(ckpt).get("config") or {})[1].get("scale_file")
    if scale and not any(str(a).startswith("--model.scale_file=") for a in extra):
        return [*extra, f"--model.scale_file={scale}"]
    return list(extra)


def relax_checkpoint(ckpt: Path, config: Path, is2rs: Path, work: Path, reference, extra: Sequence[str] = (),
                     cpu: bool = True) -> dict:
    """One ``fairchem --mode run-relaxations`` run and every metric of the module docstring."""
    if work.exists():
        shutil.rmtree(work)  # fairchem skips structures whose trajectory exists
    extra = relax_overrides(ckpt, extra)
    trajs = work / "trajs"
    cmd = [fairchem_cli(), "--mode", "run-relaxations", "--config-yml", str(config), "--checkpoint", str(ckpt),
           "--run-dir", str(work), "--timestamp-id", "relax", f"--dataset.relax.src={is2rs}",
           f"--task.relax_opt.traj_dir={trajs}", *extra, *(["--cpu"] if cpu else [])]
    t0 = time.time()
    run_logged(cmd, work / "relax.log")
    records = [d for _, d in read_is2rs(is2rs)]
    positions = relaxed_positions(work, records)
    from ase.io import read

    from leignn_ocp.lineup import load_config

    steps = int(load_config(config)["task"].get("relaxation_steps", 300))
    for arg in extra:  # a command-line override wins, as in fairchem
        if arg.startswith("--task.relaxation_steps="):
            steps = int(arg.split("=", 1)[1])
    frames = [read(trajs / f"{d.sid}.traj", ":") for d in records]  # empty when converged at step 0
    trainer = load_trainer(ckpt, cpu=cpu, run_dir=work / "predict")
    e_model = model_energies(trainer, records, positions)  # [B] eV, the model at what it relaxed to
    y = np.array([d.y_relaxed for d in records])
    tb = work / "logs" / "tensorboard" / "relax"
    fairchem = {tag.split("/", 1)[1]: v[-1][1] for tag in
                ("val/is2rs_positions_average_distance_within_threshold", "val/is2rs_positions_mae",
                 "val/is2re_energy_mae", "val/is2re_energy_within_threshold")
                if (v := learning_curve(tb, tag))}
    # a system that converged at step k < steps has k frames (the final write skips converged systems)
    row = {"adwt": fairchem["is2rs_positions_average_distance_within_threshold"],
           "energy_mae": float(np.abs(e_model - y).mean()),
           "converged": float(np.mean([len(f) <= steps for f in frames])),
           "fairchem": fairchem, "relax_s": round(time.time() - t0, 1), "n": len(records)}
    row.update(reference_scores(records, positions, reference))
    row.update(minimum_forces(trainer, records))
    row.update(descent_scores(trainer, records, e_model, row["ref_path"]))
    return row


def _predict(trainer, records: Sequence, positions: Sequence[np.ndarray]) -> dict:
    """What OptimizableBatch asks of the trainer at every relaxation step (EMA weights, denormalised,
    references added), at the given positions: energy [B] eV, forces [sum N, 3] eV/A."""
    import torch
    from fairchem.core.datasets import data_list_collater

    batch = []
    for d, pos in zip(records, positions):
        d = d.clone()
        d.pos = torch.as_tensor(np.asarray(pos), dtype=d.pos.dtype)  # [N, 3]
        batch.append(d)
    out = trainer.predict(data_list_collater(batch, otf_graph=True), per_image=False, disable_tqdm=True)
    return {k: out[k].detach().cpu().double() for k in ("energy", "forces")}


def model_energies(trainer, records: Sequence, positions: Sequence[np.ndarray]) -> np.ndarray:
    """The model's energy (eV) at each relaxed structure: fairchem writes positions only, and the last
    trajectory frame of a converged system is one step before the end."""
    return _predict(trainer, records, positions)["energy"].numpy().reshape(-1)  # [B]


def minimum_forces(trainer, records: Sequence) -> dict:
    """f_mae_at_minimum and fmax_at_minimum of the module docstring (free atoms only)."""
    forces = _predict(trainer, records, [d.pos_relaxed for d in records])["forces"]  # [sum N, 3]
    per_system = forces.split([int(d.natoms) for d in records])  # B x [N, 3]
    free = [d.fixed.numpy() == 0 for d in records]  # B x [N]
    comps = np.concatenate([f.numpy()[m].ravel() for f, m in zip(per_system, free)])
    fmax = [float(np.linalg.norm(f.numpy()[m], axis=1).max()) for f, m in zip(per_system, free)]
    return {"f_mae_at_minimum": float(np.abs(comps).mean() * 1000), "fmax_at_minimum": float(np.median(fmax)),
            "fmax_at_minimum_per_system": fmax}


def write_tables(rows: list[dict], out: Path) -> str:
    """table.{md,csv,json,png}: mean ± std (ddof 1) over seeds per model; one seed without ±."""
    import csv

    by = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)

    def stat(vals):  # (mean, std over seeds or None); (nan, None) for a metric no row of the model has
        if not vals:
            return float("nan"), None
        return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None

    agg = {lab: {m: stat([r[m] for r in rs if m in r]) for m in METRICS} | {"seeds": sorted(r["seed"] for r in rs)}
           for lab, rs in by.items()}
    cell = lambda m, s: "–" if np.isnan(m) else f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"  # noqa: E731
    md = ("| model | seeds | " + " | ".join(METRICS) + " |\n|" + "---|" * (len(METRICS) + 2) + "\n"
          + "".join(f"| {lab} | {len(a['seeds'])} | " + " | ".join(cell(*a[m]) for m in METRICS) + " |\n"
                    for lab, a in agg.items()))
    (out / "table.md").write_text(md)
    nan_none = lambda x: None if isinstance(x, float) and np.isnan(x) else x  # noqa: E731
    (out / "table.json").write_text(json.dumps({lab: {m: [nan_none(x) for x in v] if m != "seeds" else v
                                                      for m, v in a.items()} for lab, a in agg.items()}, indent=1))
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seeds", *(x for m in METRICS for x in (m, f"{m}_std"))])
        for lab, a in agg.items():
            w.writerow([lab, len(a["seeds"]), *(x for m in METRICS for x in a[m])])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3 * len(METRICS), 3.5))
    for ax, m in zip(axes, METRICS):
        labs = list(agg)
        ax.bar(range(len(labs)), [agg[l][m][0] for l in labs], yerr=[agg[l][m][1] or 0 for l in labs], capsize=3)
        ax.set_xticks(range(len(labs)), labs, rotation=60, ha="right", fontsize=7)
        ax.set_title(m)
    fig.tight_layout()
    fig.savefig(out / "table.png", dpi=120)
    plt.close(fig)
    return md


def _write_row(path: Path, row: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.rename(path)


def _backfill(row: dict, is2rs: Path, work: Path, reference, cpu: bool) -> bool:
    """Add the metrics a row written before they existed lacks, without relaxing again; False: nothing
    added. false_descent needs the relaxation's own positions (``work``); without them it stays out."""
    todo_min = "f_mae_at_minimum" not in row
    todo_descent = "false_descent" not in row and _positions_file(work).is_file()
    if "false_descent" not in row and not todo_descent:
        log.warning(f"{row.get('key')} seed {row.get('seed')}: no relaxed positions in {work}; false_descent left out")
    if not (todo_min or todo_descent):
        return False
    records = [d for _, d in read_is2rs(is2rs)]
    trainer = load_trainer(row["checkpoint"], cpu=cpu, run_dir=work / "predict")
    if todo_min:
        row.update(minimum_forces(trainer, records))
    if todo_descent:
        positions = relaxed_positions(work, records)
        ref_path = reference_scores(records, positions, reference)["ref_path"]
        row.update(ref_path=ref_path,
                   **descent_scores(trainer, records, model_energies(trainer, records, positions), ref_path))
    return True


def run_relaxation_benchmark(config_dir: Path, is2rs: Path, out: Path, *, models=None, seeds=(0,),
                             checkpoints: dict | None = None, reference: str = "emt", is2rs_config_dir: Path =
                             Path("configs/is2rs/default"), relax_args: Sequence[str] = (), cpu: bool = True,
                             **lineup_kwargs) -> list[dict]:
    """Train what has no checkpoint (run_lineup), relax every (model, seed), write rows and tables."""
    from leignn_ocp.evaluation.runs import run_lineup
    from leignn_ocp.md.relax import reference_calculator

    validate_is2rs(is2rs)  # before anything long: a missing set, or one without pos_relaxed, stops here
    keys = lineup_keys(Path(config_dir), models)
    missing = [str(Path(is2rs_config_dir) / f"{k}.yml") for k in keys if not (Path(is2rs_config_dir) / f"{k}.yml").is_file()]
    if missing:
        raise SystemExit(f"no IS2RS config {', '.join(missing)}")
    checkpoints = dict(checkpoints or {})
    for spec, path in checkpoints.items():
        if not Path(path).is_file():
            raise SystemExit(f"checkpoint {spec}={path} does not exist")
    calc = reference_calculator(reference)
    rows_dir = Path(out) / "relax_rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for key in keys:
        for seed in seeds:
            row_file = rows_dir / f"{key}_s{seed}.json"
            if row_file.is_file():
                log.info(f"{key} seed {seed}: relaxed before ({row_file})")
                row = json.loads(row_file.read_text())
                if _backfill(row, Path(is2rs), Path(out) / "relax" / f"{key}_s{seed}", calc, cpu):
                    _write_row(row_file, row)
                continue
            ckpt = checkpoints.get(f"{key}:{seed}")
            found = Path(out) / "runs" / "checkpoints" / f"{key}_s{seed}" / "checkpoint.pt"
            if ckpt is None and not found.is_file():
                log.info(f"{key} seed {seed}: training (line-up runner)")
                run_lineup(Path(config_dir), Path(out), models=[key], seeds=[seed], cpu=cpu, **lineup_kwargs)
            ckpt = Path(ckpt or found)
            log.info(f"{key} seed {seed}: relaxing {is2rs} with {ckpt}")
            row = relax_checkpoint(ckpt, Path(is2rs_config_dir) / f"{key}.yml", Path(is2rs),
                                   Path(out) / "relax" / f"{key}_s{seed}", calc, relax_args, cpu)
            row.update(key=key, label=lineup.label(key), seed=seed, checkpoint=str(ckpt))
            _write_row(row_file, row)
            log.info(f"{key} seed {seed}: ADwT {row['adwt']:.3f}, lowered {row['lowered']:.2f}, "
                     f"dE median {row['dE_median']:+.3f} eV, force MAE at the minima "
                     f"{row['f_mae_at_minimum']:.1f} meV/A ({row['relax_s']:.0f} s)")
    rows = [json.loads(f.read_text()) for f in sorted(rows_dir.glob("*.json"))]
    print(write_tables(rows, Path(out)), end="")
    return rows
