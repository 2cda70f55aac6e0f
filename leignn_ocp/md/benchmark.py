"""The LEIGNN MD benchmark end to end: the MDSim protocol at the paper's length (50 ps).

For each system (``ethanol``: GFN2-xTB molecule, MD17-like; ``cu_liquid``: EMT liquid
copper, LiPS-like; ``cu_solid``: EMT fcc copper at 800 K; see :mod:`leignn_ocp.md.reference`):

1. reference data (:func:`ensure_reference`) unless ``<data>/<system>`` has it;
2. for every variant (direct forces, conservative -dE/dx) and seed, LEIGNN trained on
   reference frames by the ``fairchem`` CLI with that seed (:func:`train`,
   ``<configs>/<system>_leignn[_conservative].yml``);
3. MD with ``LEIGNNCalculator`` under the reference protocol, from a random test frame of
   the reference (drawn by the seed, as MDSim starts), fresh velocities from the same seed;
4. metrics against the reference trajectory - stability, RDF / h(r) MAE, diffusivity - for
   every run and for an independent reference replicate (the noise floor), then mean ± std
   over seeds (:func:`aggregate`); for the molecule also the h(r) MAE of each run's first
   5 ps, the length runs had before;
5. (``ethanol``) NVE energy drift of the first seed's direct and conservative models beside
   the reference calculator (:func:`nve_comparison`).

Writes ``<out>/summary.json``, ``<out>/protocol.md`` (the table), ``<out>/protocol.png`` and
``<out>/<system>/<variant>/seed<k>/`` (trajectory, metrics JSON, PNGs). Paths are relative
to the current directory, as for ``fairchem`` itself: run it from the repository root (where
``configs/md`` is) or pass ``--configs``::

    leignn-md-benchmark                                  # 3 systems x 2 variants x 3 seeds, 50 ps
    leignn-md-benchmark --systems ethanol --variants direct --seeds 0 --epochs 10 --md-ps 2

The same runs as ``python scripts/md_benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leignn_ocp.evaluation.runs import fairchem_cli
from leignn_ocp.md import metrics as M
from leignn_ocp.md.reference import SPLIT_FRAMES, SYSTEMS, make_calculator, make_lmdbs, make_trajectories

MD_PS = 50.0  # the paper's length of every model run
SHORT_PS = 5.0  # the length this benchmark ran before: the molecule's h(r) MAE is also given over it
EPOCHS = {"ethanol": 30, "cu_liquid": 6, "cu_solid": 6}
SPECIES = {"cu_liquid": ["Cu"], "cu_solid": ["Cu"]}  # the diffusing species (None: all atoms)
# variant -> (config suffix: configs/md/<system>_leignn<suffix>.yml, run identifier)
VARIANTS = {"direct": ("", "leignn"), "conservative": ("_conservative", "leignn_conservative")}
_CURVE_KEY = {True: "rdf_mae", False: "hr_mae"}  # periodic -> the metric's key



def find_checkpoint(run_dir: Path, identifier: str) -> Path | None:
    """The newest ``best_checkpoint.pt`` of a fairchem run ``<run_dir>/checkpoints/<time>-<identifier>``."""
    found = sorted(Path(run_dir).glob(f"checkpoints/*-{identifier}/best_checkpoint.pt"), key=os.path.getmtime)
    return found[-1] if found else None


def train(config: str | Path, run_dir: str | Path, identifier: str, epochs: int,
          data_dir: str | Path | None = None, seed: int = 0, retrain: bool = False) -> Path:
    """Train with ``fairchem --mode train`` unless a finished run exists; return its best checkpoint.

    ``data_dir`` (``<data>/<system>``) replaces the config's ``dataset.{train,val}.src``, so
    that the data the benchmark made is the data it trains on. The fairchem log goes to
    ``<run_dir>/train_<identifier>.log``.
    """
    config, run_dir = Path(config), Path(run_dir)
    ckpt = find_checkpoint(run_dir, identifier)
    if ckpt is not None and not retrain:
        print(f"  using existing {ckpt}")
        return ckpt
    if not config.exists():
        raise SystemExit(f"{config} not found: run from the repository root or pass --configs")
    cmd = [fairchem_cli(), "--mode", "train", "--config-yml", str(config), "--cpu", "--run-dir", str(run_dir),
           "--identifier", identifier, "--seed", str(seed), f"--optim.max_epochs={epochs}"]
    if data_dir is not None:
        cmd += [f"--dataset.train.src={Path(data_dir) / 'train'}", f"--dataset.val.src={Path(data_dir) / 'val'}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"train_{identifier}.log"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    t = time.perf_counter()
    with open(log_path, "w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    ckpt = find_checkpoint(run_dir, identifier)
    if r.returncode or ckpt is None:
        raise SystemExit(f"training failed ({r.returncode}), see {log_path}: {' '.join(cmd)}")
    print(f"  trained {config.name} ({epochs} epochs) in {time.perf_counter() - t:.0f} s -> {ckpt}")
    return ckpt


def val_errors(calc, frames) -> dict:
    """Energy (meV/atom) and force (meV/A) MAE of ``calc`` on labelled frames."""
    de, df = [], []
    for a in frames:
        b = a.copy()
        b.calc = calc
        de.append(abs(b.get_potential_energy() - a.get_potential_energy()) / len(a))
        df.append(np.abs(b.get_forces() - a.get_forces()).mean())
    return {"energy_mae_meV_per_atom": 1000 * float(np.mean(de)), "forces_mae_meV_per_A": 1000 * float(np.mean(df))}


def ensure_reference(system: str, data_dir: str | Path, seed: int = 0) -> Path:
    """Make the reference trajectories and LMDBs of ``system`` in ``data_dir`` unless they exist."""
    data_dir = Path(data_dir)
    if not (data_dir / "reference.traj").exists() or not (data_dir / "train").exists():
        spec = SYSTEMS[system]
        meta = dict(system=system, seed=seed, protocol=spec,
                    frame_interval_fs=spec["timestep_fs"] * spec["save_every"],
                    timings=make_trajectories(system, data_dir, spec, seed))
        meta["lmdb"] = make_lmdbs(system, data_dir, spec, seed)
        (data_dir / "reference.json").write_text(json.dumps(meta, indent=2))
    return data_dir


def evaluate_run(system: str, traj: str | Path, reference: Sequence, out_dir: Path, name: str,
                 reference_diffusivity: dict | None = None) -> dict:
    """The MDSim metrics of one trajectory of ``system`` against the reference frames."""
    if SYSTEMS[system]["periodic"]:
        return M.evaluate_condensed(traj, reference, out_dir, name=name, species=SPECIES.get(system),
                                    reference_diffusivity=reference_diffusivity)
    return M.evaluate_molecule(traj, reference, out_dir, name=name)


def start_frame(system: str, data_dir: str | Path, seed: int, frames: Sequence | None = None):
    """MDSim starts every run from a random test configuration: a ``reference.traj`` frame in
    neither LMDB, drawn by ``seed`` (its velocities are drawn again by :func:`run_md`).
    ``frames``: ``reference.traj`` already loaded (default: read here)."""
    data_dir = Path(data_dir)
    split = data_dir / SPLIT_FRAMES
    if not split.exists():
        raise SystemExit(f"{split} not found: these reference data predate it; make them again with "
                         f"leignn-md-reference --system {system} --out {data_dir.parent}")
    used = {int(i) for part in json.loads(split.read_text()).values() for i in part}
    frames = M.load_frames(str(data_dir / "reference.traj")) if frames is None else frames
    test = [i for i in range(len(frames)) if i not in used]
    if not test:
        raise SystemExit(f"{system}: every reference frame is in train/ or val/; no test frame to start from")
    i = test[int(np.random.default_rng(seed).integers(len(test)))]
    atoms = frames[i].copy()
    atoms.info = {"reference_frame": i}
    return atoms


def run_seed(system: str, variant: str, seed: int, data_dir: Path, runs_dir: Path, out_dir: Path,
             config_dir: str | Path, epochs: int, md_ps: float, ref_frames: Sequence, ref_d: dict | None,
             h_ref: np.ndarray | None = None, retrain: bool = False, rerun_md: bool = False,
             progress: bool = True) -> dict:
    """Train one (variant, seed) model, run its MD from the seed's test frame, score it.
    ``h_ref``: the reference's h(r) (molecules; from :func:`metrics.distance_histogram`)."""
    from ase.io import read

    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.run import run_md

    spec = SYSTEMS[system]
    suffix, ident = VARIANTS[variant]
    ckpt = train(Path(config_dir) / f"{system}_leignn{suffix}.yml", runs_dir, f"{ident}_e{epochs}_s{seed}", epochs,
                 data_dir=data_dir, seed=seed, retrain=retrain)
    calc = LEIGNNCalculator(ckpt, seed=seed)
    res = {"variant": variant, "seed": seed, "epochs": epochs, "checkpoint": str(ckpt),
           "val_errors": val_errors(calc, read(str(data_dir / "replicate.traj"), "::50"))}
    steps = int(round(md_ps * 1000 / spec["timestep_fs"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    traj = out_dir / "md.traj"
    done = traj.with_suffix(".json")
    start = start_frame(system, data_dir, seed, ref_frames)
    t = time.perf_counter()
    old = json.loads(done.read_text()) if done.exists() else {}
    if (not rerun_md and old.get("steps_requested") == steps and old.get("checkpoint") == str(ckpt)
            and old.get("start_reference_frame") == start.info["reference_frame"]):
        md = old
        print(f"  using existing {traj}")
    else:  # a run of this model, length and start only
        md = run_md(start, calc, traj, ensemble="nose-hoover", timestep_fs=spec["timestep_fs"],
                    temperature_K=spec["temperature_K"], steps=steps, save_every=spec["save_every"], seed=seed,
                    tdamp_fs=spec["tdamp_fs"], progress=progress)
        md.update(checkpoint=str(ckpt), start_reference_frame=start.info["reference_frame"])
        done.write_text(json.dumps(md, indent=2))
    res["md"] = md
    res["metrics"] = evaluate_run(system, str(traj), ref_frames, out_dir, variant, ref_d)
    if not spec["periodic"]:
        res["metrics"].update(_hr_by_length(M.load_frames(str(traj)), h_ref, res["metrics"]["stable_ps"]))
    m = res["metrics"]
    print(f"  [{system} {variant} seed {seed}] {md['simulated_ps']:.1f} ps in {time.perf_counter() - t:.0f} s, "
          f"stable {m['stable_ps']:.1f} ps, {_CURVE_KEY[spec['periodic']]} {m[_CURVE_KEY[spec['periodic']]]}")
    return res


def _hr_by_length(frames: Sequence, h_ref: np.ndarray, stable_ps: float) -> dict:
    """h(r) MAE of the first ``SHORT_PS`` of a run beside the whole: how much of a short
    run's h(r) error is sampling noise rather than the model. ``h_ref``: the reference's h(r)."""
    t = M.frame_times_ps(frames)
    short = [a for a, ti in zip(frames, t) if ti <= min(SHORT_PS, stable_ps) + 1e-9]
    return {f"hr_mae_first_{SHORT_PS:g}ps": M.curve_mae(M.distance_histogram(short)[1], h_ref) if len(short) > 1 else None}


def _mean_std(values: Sequence) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None,
            "std": float(v.std(ddof=1)) if len(v) > 1 else (0.0 if len(v) else None), "n": int(len(v))}


def aggregate(system: str, runs: Sequence[dict], replicate: dict) -> dict:
    """Mean and sample std (ddof 1, as Table 1) over seeds of each variant's MDSim metrics."""
    periodic = SYSTEMS[system]["periodic"]
    keys = ["stable_ps", _CURVE_KEY[periodic]] + (["D_abs_error_1e-5_cm2_per_s"] if periodic
                                                 else [f"hr_mae_first_{SHORT_PS:g}ps"])
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row = {k: _mean_std([r["metrics"].get(k) for r in rs]) for k in keys}
        row["forces_mae_meV_per_A"] = _mean_std([r["val_errors"]["forces_mae_meV_per_A"] for r in rs])
        row["md_ps"] = max(r["md"]["steps_requested"] for r in rs) * SYSTEMS[system]["timestep_fs"] / 1000
        row["seeds"] = [r["seed"] for r in rs]
        row["epochs"] = sorted({r["epochs"] for r in rs})
        out[variant] = row
    out["replicate"] = {k: {"mean": replicate.get(k), "std": None, "n": 1} for k in keys}
    out["replicate"]["md_ps"] = replicate["length_ps"]
    return out


def protocol_markdown(summary: dict) -> str:
    """One table: every system and variant, mean ± std over seeds, the replicate as noise floor."""
    lines = ["| system | model | seeds | epochs | MD ps | val F MAE (meV/Å) | stable (ps) | h(r) / RDF MAE | "
             f"h(r) MAE, first {SHORT_PS:g} ps | D error (1e-5 cm²/s) |", "|---" * 10 + "|"]

    def cell(d, key, fmt):
        v = d.get(key)
        if not v or v["mean"] is None:
            return "–"
        return format(v["mean"], fmt) + (f" ± {format(v['std'], fmt)}" if v["n"] > 1 else "")

    for system, entry in summary.items():
        if system not in SYSTEMS or "table" not in entry:
            continue
        periodic = SYSTEMS[system]["periodic"]
        for name, row in entry["table"].items():
            label = "reference replicate" if name == "replicate" else f"LEIGNN, {name}"
            seeds = "–" if name == "replicate" else str(len(row["seeds"]))
            epochs = "–" if name == "replicate" else ",".join(map(str, row["epochs"]))
            lines.append(" | ".join([
                f"| {system}", label, seeds, epochs, f"{row['md_ps']:g}", cell(row, "forces_mae_meV_per_A", ".1f"),
                cell(row, "stable_ps", ".1f"), cell(row, _CURVE_KEY[periodic], ".3f"),
                cell(row, f"hr_mae_first_{SHORT_PS:g}ps", ".3f"),
                cell(row, "D_abs_error_1e-5_cm2_per_s", ".3f")]) + " |")
    return "\n".join(lines) + "\n"


def protocol_png(summary: dict, path: Path) -> None:
    """Bars with ± std: stable time and curve MAE per system and variant (the replicate hatched)."""
    plt = M._plt()
    systems = [s for s in summary if s in SYSTEMS and "table" in summary[s]]
    if not systems:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(n for s in systems for n in summary[s]["table"]))
    w = 0.8 / len(names)
    for ax, key, ylabel in ((axes[0], "stable_ps", "stable time (ps)"), (axes[1], None, "h(r) / RDF MAE")):
        for j, name in enumerate(names):
            ys, es = [], []
            for s in systems:
                row = summary[s]["table"].get(name, {})
                v = row.get(key or _CURVE_KEY[SYSTEMS[s]["periodic"]]) or {}
                ys.append(np.nan if v.get("mean") is None else v["mean"])
                es.append(v.get("std") or 0.0)
            x = np.arange(len(systems)) + (j - (len(names) - 1) / 2) * w
            ax.bar(x, ys, w, yerr=es, capsize=3, label=name, hatch="//" if name == "replicate" else None)
        ax.set_xticks(np.arange(len(systems)), systems)
        ax.set_ylabel(ylabel + ", mean ± std over seeds")
    axes[0].legend()
    fig.suptitle("MDSim protocol: LEIGNN MD vs the reference calculator")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_system(system: str, data_dir: str | Path, runs_dir: str | Path, out_dir: str | Path,
               config_dir: str | Path = "configs/md", epochs: int | None = None, md_ps: float = MD_PS,
               seeds: Sequence[int] = (0,), variants: Sequence[str] = ("direct",), retrain: bool = False,
               rerun_md: bool = False, progress: bool = True) -> dict:
    """Every (variant, seed) of one system, its replicate noise floor, the table entry and an
    h(r) / RDF overlay; ``<data_dir>``, ``<runs_dir>``, ``<out_dir>`` are the system's folders."""
    spec = SYSTEMS[system]
    data_dir, runs_dir, out_dir = Path(data_dir), Path(runs_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{system}]")
    ensure_reference(system, data_dir, 0)
    ref_frames = M.load_frames(str(data_dir / "reference.traj"))
    replicate = M.load_frames(str(data_dir / "replicate.traj"))
    ref_d = (M.diffusivity(ref_frames, M.frame_times_ps(ref_frames), SPECIES.get(system))
             if spec["periodic"] else None)
    curve = M.rdf if spec["periodic"] else M.distance_histogram
    r, g_ref = curve(ref_frames)  # [bins]: once, for the overlay and the short-run h(r) MAEs
    h_ref = None if spec["periodic"] else g_ref
    rep = evaluate_run(system, replicate, ref_frames, out_dir, "replicate", ref_d)
    if not spec["periodic"]:
        rep.update(_hr_by_length(replicate, h_ref, rep["stable_ps"]))
    runs = [run_seed(system, v, s, data_dir, runs_dir, out_dir / v / f"seed{s}", config_dir,
                     epochs or EPOCHS[system], md_ps, ref_frames, ref_d, h_ref, retrain, rerun_md, progress)
            for v in variants for s in seeds]
    curves = {"reference": g_ref, "reference replicate": curve(replicate)[1]}
    for run in runs:
        if run["seed"] == seeds[0]:
            frames = M.load_frames(run["md"]["trajectory"])
            if len(frames) > 1:
                curves[f"LEIGNN {run['variant']}, seed {run['seed']}"] = curve(frames)[1]
    M.plot_curves(r, curves, out_dir / "overlay.png", "g(r)" if spec["periodic"] else "h(r) (1/Å)",
                  f"{system}: {'RDF' if spec['periodic'] else 'h(r)'}")
    return {"protocol": {k: spec[k] for k in ("calculator", "temperature_K", "timestep_fs", "ref_ps")},
            "runs": runs, "replicate": rep, "table": aggregate(system, runs, rep),
            "pngs": sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png"))}


def nve_comparison(system: str, ckpt_direct: str | Path, data_dir: str | Path, runs_dir: str | Path,
                   out_dir: str | Path, config_dir: str | Path = "configs/md", epochs: int | None = None,
                   nve_ps: float = 1.0, seed: int = 0, retrain: bool = False, progress: bool = True,
                   ckpt_conservative: str | Path | None = None) -> dict:
    """NVE energy drift: direct-force LEIGNN vs conservative LEIGNN (``ckpt_conservative``, else
    trained here, in ``runs_dir``) vs the reference calculator, from the reference start with
    its velocities."""
    from ase.io import read

    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.run import run_md

    spec = SYSTEMS[system]
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ckpt_cons = ckpt_conservative or train(
        Path(config_dir) / f"{system}_leignn_conservative.yml", runs_dir, "leignn_conservative",
        epochs or EPOCHS[system], data_dir=data_dir, seed=seed, retrain=retrain)
    start = read(str(data_dir / "start.traj"))
    steps = int(round(nve_ps * 1000 / spec["timestep_fs"]))
    val_frames = read(str(data_dir / "replicate.traj"), "::50")
    res, lines = {}, {}
    for name, calc in (("leignn_direct", LEIGNNCalculator(ckpt_direct, seed=seed)),
                       ("leignn_conservative", LEIGNNCalculator(ckpt_cons, seed=seed)),
                       ("reference_" + spec["calculator"].split()[0], make_calculator(system))):
        traj = out_dir / f"nve_{name}.traj"
        md = run_md(start, calc, traj, ensemble="nve", timestep_fs=spec["timestep_fs"],
                    temperature_K=spec["temperature_K"], steps=steps, save_every=5, seed=seed,
                    keep_velocities=True, stop_on_blowup=False, progress=progress)
        frames = M.load_frames(str(traj))
        d = M.nve_energy_drift(frames, M.frame_times_ps(frames))
        t, e = np.array(d.pop("time_ps")), np.array(d.pop("total_energy_eV"))
        lines[name] = (t, 1000 * (e - e[0]) / len(start))  # [T] meV/atom
        d["blew_up"] = md["blew_up"]
        if name.startswith("leignn"):
            d["val_errors"] = val_errors(calc, val_frames)
        res[name] = d
        print(f"  NVE {name}: drift {d['drift_meV_per_ps_per_atom']:.3f} meV/ps/atom, "
              f"max |dE| {d['max_abs_dev_meV_per_atom']:.3f} meV/atom")
    M.plot_lines(lines, out_dir / "nve_drift.png", "time (ps)", "E_tot(t) - E_tot(0) (meV/atom)",
                 f"{system}: NVE, dt {spec['timestep_fs']:g} fs")
    res["png"] = str(out_dir / "nve_drift.png")
    (out_dir / "nve_drift.json").write_text(json.dumps(res, indent=2))
    return res


def run_benchmark(systems: Sequence[str] = tuple(SYSTEMS), data: str | Path = "data/md",
                  runs: str | Path = "runs/md", out: str | Path = "results/md", configs: str | Path = "configs/md",
                  epochs: int | None = None, md_ps: float = MD_PS, seeds: Sequence[int] = (0, 1, 2),
                  variants: Sequence[str] = tuple(VARIANTS), nve_ps: float = 1.0, skip_nve: bool = False,
                  retrain: bool = False, rerun_md: bool = False, progress: bool = True) -> dict:
    """Every step for every system; updates and returns ``<out>/summary.json`` and writes
    ``<out>/protocol.md`` and ``<out>/protocol.png``."""
    data, runs, out = Path(data), Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = {}
    for system in systems:
        res = run_system(system, data / system, runs / system, out / system, configs, epochs=epochs, md_ps=md_ps,
                         seeds=seeds, variants=variants, retrain=retrain, rerun_md=rerun_md, progress=progress)
        summary[system] = res
        if system == "ethanol" and not skip_nve:
            first = {r["variant"]: r["checkpoint"] for r in reversed(res["runs"])}  # the first seed's
            ckpt = first.get("direct") or train(Path(configs) / f"{system}_leignn.yml", runs / system,
                                                f"leignn_e{epochs or EPOCHS[system]}_s{seeds[0]}",
                                                epochs or EPOCHS[system], data / system, seeds[0], retrain)
            summary["nve_drift"] = nve_comparison(
                system, ckpt, data / system, runs / system, out / system, configs, epochs=epochs,
                nve_ps=nve_ps, seed=seeds[0], retrain=retrain, progress=progress,
                ckpt_conservative=first.get("conservative"))
        # merged into what is there just now: benchmarks of other systems may share <out>
        summary = {**(json.loads(path.read_text()) if path.exists() else {}), **summary}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(path)
        (out / "protocol.md").write_text(protocol_markdown(summary))
        protocol_png(summary, out / "protocol.png")
    print(f"summary -> {path}, {out / 'protocol.md'}, {out / 'protocol.png'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leignn-md-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--data", type=Path, default=Path("data/md"), help="reference data, one folder per system")
    p.add_argument("--runs", type=Path, default=Path("runs/md"), help="fairchem run directories")
    p.add_argument("--out", type=Path, default=Path("results/md"))
    p.add_argument("--configs", type=Path, default=Path("configs/md"),
                   help="folder with <system>_leignn.yml and <system>_leignn_conservative.yml")
    p.add_argument("--epochs", type=int, help=f"training epochs (default: {EPOCHS})")
    p.add_argument("--md-ps", type=float, default=MD_PS, help="length of every LEIGNN MD run (default: %(default)s ps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one training and one MD run per seed and variant; the MD starts from the seed's "
                        "random test frame (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="direct forces and/or conservative (-dE/dx) LEIGNN (default: both)")
    p.add_argument("--nve-ps", type=float, default=1.0, help="NVE length for the drift comparison")
    p.add_argument("--skip-nve", action="store_true")
    p.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    p.add_argument("--rerun-md", action="store_true", help="run LEIGNN MD even if its trajectory exists")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    """``leignn-md-benchmark``."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.md_ps <= 0 or (a.epochs is not None and a.epochs < 1):
        raise SystemExit(f"leignn-md-benchmark: error: --md-ps must be > 0 and --epochs >= 1, "
                         f"not {a.md_ps} / {a.epochs}")
    run_benchmark(a.systems, a.data, a.runs, a.out, a.configs, epochs=a.epochs, md_ps=a.md_ps, seeds=a.seeds,
                  variants=a.variants, nve_ps=a.nve_ps, skip_nve=a.skip_nve, retrain=a.retrain,
                  rerun_md=a.rerun_md, progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
