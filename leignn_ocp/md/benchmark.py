"""The LEIGNN MD benchmark end to end (MDSim protocol, offline reference systems).

For each system (``ethanol``: GFN2-xTB molecule, MD17-like; ``cu_liquid``: EMT liquid
copper, LiPS-like; see :mod:`leignn_ocp.md.reference`):

1. reference data (:func:`ensure_reference`) unless ``<data>/<system>`` has it;
2. LEIGNN trained on reference frames by the ``fairchem`` CLI (:func:`train`,
   ``<configs>/<system>_leignn.yml``);
3. MD with ``LEIGNNCalculator`` under the reference protocol, from the equilibrated start
   of the reference run;
4. metrics against the reference trajectory - stability, RDF / h(r) MAE, diffusivity - for
   the LEIGNN run and for an independent reference replicate (the noise floor);
5. (``ethanol``) NVE energy drift of the direct-force model beside a conservative
   (``direct_forces: false``) model and the reference calculator (:func:`nve_comparison`).

Writes ``<out>/summary.json``, ``<out>/<system>/*_metrics.json`` and PNGs. Paths are
relative to the current directory, as for ``fairchem`` itself: run it from the repository
root (where ``configs/md`` is) or pass ``--configs``::

    leignn-md-benchmark                                  # both systems, the full protocol
    leignn-md-benchmark --systems ethanol --epochs 10 --md-ps 2

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
from leignn_ocp.md.reference import SYSTEMS, make_calculator, make_lmdbs, make_trajectories

MD_PS = {"ethanol": 5.0, "cu_liquid": 5.0}
EPOCHS = {"ethanol": 30, "cu_liquid": 6}
SPECIES = {"cu_liquid": ["Cu"]}  # the diffusing species (None: all atoms)



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


def run_system(system: str, data_dir: str | Path, runs_dir: str | Path, out_dir: str | Path,
               config_dir: str | Path = "configs/md", epochs: int | None = None, md_ps: float | None = None,
               seed: int = 0, retrain: bool = False, rerun_md: bool = False, progress: bool = True) -> dict:
    """Steps 1-4 for one system (``<data_dir>``, ``<runs_dir>``, ``<out_dir>`` are that system's
    folders); returns its summary entry. The checkpoint is ``result["checkpoint"]``."""
    from ase.io import read

    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.run import run_md

    spec = SYSTEMS[system]
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{system}]")
    ensure_reference(system, data_dir, seed)
    ckpt = train(Path(config_dir) / f"{system}_leignn.yml", runs_dir, "leignn", epochs or EPOCHS[system],
                 data_dir=data_dir, seed=seed, retrain=retrain)
    calc = LEIGNNCalculator(ckpt, seed=seed)
    res = {"checkpoint": str(ckpt)}
    res["val_errors"] = val_errors(calc, read(str(data_dir / "replicate.traj"), "::50"))

    steps = int(round((md_ps or MD_PS[system]) * 1000 / spec["timestep_fs"]))
    traj = out_dir / "leignn_md.traj"
    done = traj.with_suffix(".json")
    t = time.perf_counter()
    if done.exists() and not retrain and not rerun_md and json.loads(done.read_text())["steps_requested"] == steps:
        md = json.loads(done.read_text())
        print(f"  using existing {traj}")
    else:
        md = run_md(read(str(data_dir / "start.traj")), calc, traj, ensemble="nose-hoover",
                    timestep_fs=spec["timestep_fs"], temperature_K=spec["temperature_K"], steps=steps,
                    save_every=spec["save_every"], seed=seed, tdamp_fs=spec["tdamp_fs"], progress=progress)
    print(f"  LEIGNN MD: {md['simulated_ps']:.2f} ps in {time.perf_counter() - t:.0f} s "
          f"({md['ms_per_step']} ms/step), blew_up={md['blew_up']}")
    res["md"] = md

    ref_frames = M.load_frames(str(data_dir / "reference.traj"))
    replicate = M.load_frames(str(data_dir / "replicate.traj"))
    ref_d = (M.diffusivity(ref_frames, M.frame_times_ps(ref_frames), SPECIES.get(system))
             if spec["periodic"] else None)
    res["leignn"] = evaluate_run(system, str(traj), ref_frames, out_dir, "leignn", ref_d)
    res["replicate"] = evaluate_run(system, replicate, ref_frames, out_dir, "replicate", ref_d)
    # one overlay of reference, replicate and LEIGNN
    curve = M.rdf if spec["periodic"] else M.distance_histogram
    r, g_ref = curve(ref_frames)
    curves = {"reference": g_ref, "reference replicate": curve(replicate)[1]}
    model_frames = M.load_frames(str(traj))
    if len(model_frames) > 1:
        curves["LEIGNN"] = curve(model_frames)[1]
    M.plot_curves(r, curves, out_dir / "overlay.png", "g(r)" if spec["periodic"] else "h(r) (1/Å)",
                  f"{system}: {'RDF' if spec['periodic'] else 'h(r)'}")
    res["pngs"] = sorted(str(p) for p in out_dir.glob("*.png"))
    return res


def nve_comparison(system: str, ckpt_direct: str | Path, data_dir: str | Path, runs_dir: str | Path,
                   out_dir: str | Path, config_dir: str | Path = "configs/md", epochs: int | None = None,
                   nve_ps: float = 1.0, seed: int = 0, retrain: bool = False, progress: bool = True) -> dict:
    """NVE energy drift: direct-force LEIGNN vs conservative LEIGNN (trained here, in
    ``runs_dir``) vs the reference calculator, from the reference start with its velocities."""
    from ase.io import read

    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.run import run_md

    spec = SYSTEMS[system]
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ckpt_cons = train(Path(config_dir) / f"{system}_leignn_conservative.yml", runs_dir, "leignn_conservative",
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


def run_benchmark(systems: Sequence[str] = ("ethanol", "cu_liquid"), data: str | Path = "data/md",
                  runs: str | Path = "runs/md", out: str | Path = "results/md", configs: str | Path = "configs/md",
                  epochs: int | None = None, md_ps: float | None = None, nve_ps: float = 1.0,
                  skip_nve: bool = False, retrain: bool = False, rerun_md: bool = False, seed: int = 0,
                  progress: bool = True) -> dict:
    """Every step for every system; updates and returns ``<out>/summary.json``."""
    data, runs, out = Path(data), Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    for system in systems:
        res = run_system(system, data / system, runs / system, out / system, configs, epochs=epochs, md_ps=md_ps,
                         seed=seed, retrain=retrain, rerun_md=rerun_md, progress=progress)
        summary[system] = res
        if system == "ethanol" and not skip_nve:
            summary["nve_drift"] = nve_comparison(
                system, res["checkpoint"], data / system, runs / f"{system}_conservative", out / system, configs,
                epochs=epochs, nve_ps=nve_ps, seed=seed, retrain=retrain, progress=progress)
        path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary -> {path}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leignn-md-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=list(MD_PS), choices=list(SYSTEMS))
    p.add_argument("--data", type=Path, default=Path("data/md"), help="reference data, one folder per system")
    p.add_argument("--runs", type=Path, default=Path("runs/md"), help="fairchem run directories")
    p.add_argument("--out", type=Path, default=Path("results/md"))
    p.add_argument("--configs", type=Path, default=Path("configs/md"),
                   help="folder with <system>_leignn.yml (and ethanol_leignn_conservative.yml)")
    p.add_argument("--epochs", type=int, help="training epochs (default: ethanol 30, cu_liquid 6)")
    p.add_argument("--md-ps", type=float, help="LEIGNN MD length (default: 5 ps)")
    p.add_argument("--nve-ps", type=float, default=1.0, help="NVE length for the drift comparison")
    p.add_argument("--skip-nve", action="store_true")
    p.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    p.add_argument("--rerun-md", action="store_true", help="run LEIGNN MD even if its trajectory exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    """``leignn-md-benchmark``."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_benchmark(a.systems, a.data, a.runs, a.out, a.configs, epochs=a.epochs, md_ps=a.md_ps, nve_ps=a.nve_ps,
                  skip_nve=a.skip_nve, retrain=a.retrain, rerun_md=a.rerun_md, seed=a.seed,
                  progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
