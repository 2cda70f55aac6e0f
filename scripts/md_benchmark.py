#!/usr/bin/env python
"""The LEIGNN MD benchmark end to end (MDSim protocol, offline reference systems).

For each system (``ethanol``: GFN2-xTB molecule, MD17-like; ``cu_liquid``: EMT liquid
copper, LiPS-like):

1. reference data (``scripts/make_md_reference.py``) unless ``data/md/<system>`` has it;
2. train LEIGNN on reference frames with the fairchem CLI (``configs/md/<system>_leignn.yml``);
3. MD with LEIGNN (``LEIGNNCalculator``) under the reference protocol, from the
   equilibrated start of the reference run;
4. metrics against the reference trajectory - stability, RDF / h(r) MAE, diffusivity - for
   the LEIGNN run and for an independent reference replicate (the noise floor);
5. (``ethanol``) NVE energy drift of the direct-force model beside a conservative
   (``direct_forces: false``) model and the reference calculator.

Writes ``<out>/summary.json``, ``<out>/<system>/*_metrics.json`` and PNGs.

    python scripts/md_benchmark.py                       # ~10-15 min on 2 CPU cores
    python scripts/md_benchmark.py --systems ethanol --epochs 10 --md-ps 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # tblite must load its OpenMP runtime before torch does (torch's libgomp lacks GOMP_5.0)
    import tblite.ase  # noqa: F401
except ImportError:
    pass

MD_PS = {"ethanol": 5.0, "cu_liquid": 5.0}
EPOCHS = {"ethanol": 30, "cu_liquid": 6}
SPECIES = {"cu_liquid": ["Cu"]}


def sh(cmd: list[str], log_path: Path) -> None:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(log_path, "w") as fh:
        r = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"command failed ({r.returncode}), see {log_path}: {' '.join(cmd)}")


def train(config: Path, run_dir: Path, identifier: str, epochs: int, retrain: bool) -> Path:
    """Train with the fairchem CLI unless a finished run exists; return best_checkpoint.pt."""
    found = sorted(run_dir.glob(f"checkpoints/*-{identifier}/best_checkpoint.pt"), key=os.path.getmtime)
    if found and not retrain:
        print(f"  using existing {found[-1]}")
        return found[-1]
    fairchem = str(Path(sys.executable).parent / "fairchem")
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sh([fairchem, "--mode", "train", "--config-yml", str(config), "--cpu", "--run-dir", str(run_dir),
        "--identifier", identifier, f"--optim.max_epochs={epochs}"], run_dir / f"train_{identifier}.log")
    found = sorted(run_dir.glob(f"checkpoints/*-{identifier}/best_checkpoint.pt"), key=os.path.getmtime)
    print(f"  trained {config.name} ({epochs} epochs) in {time.perf_counter() - t:.0f} s -> {found[-1]}")
    return found[-1]


def val_errors(calc, frames) -> dict:
    import numpy as np

    de, df = [], []
    for a in frames:
        b = a.copy()
        b.calc = calc
        de.append(abs(b.get_potential_energy() - a.get_potential_energy()) / len(a))
        df.append(np.abs(b.get_forces() - a.get_forces()).mean())
    return {"energy_mae_meV_per_atom": 1000 * float(np.mean(de)), "forces_mae_meV_per_A": 1000 * float(np.mean(df))}


def run_system(system: str, a, summary: dict) -> None:
    from ase.io import read

    from leignn_ocp.md import metrics as M
    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.reference import SYSTEMS, make_lmdbs, make_trajectories
    from leignn_ocp.md.run import run_md

    spec = SYSTEMS[system]
    data = a.data / system
    out = a.out / system
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{system}]")
    if not (data / "reference.traj").exists() or not (data / "train").exists():
        meta = dict(system=system, protocol=spec, frame_interval_fs=spec["timestep_fs"] * spec["save_every"],
                    timings=make_trajectories(system, data, spec, a.seed))
        meta["lmdb"] = make_lmdbs(system, data, spec, a.seed)
        (data / "reference.json").write_text(json.dumps(meta, indent=2))
    ckpt = train(ROOT / f"configs/md/{system}_leignn.yml", a.runs / system, "leignn",
                 a.epochs or EPOCHS[system], a.retrain)
    calc = LEIGNNCalculator(ckpt, seed=a.seed)
    res = {"checkpoint": str(ckpt)}
    res["val_errors"] = val_errors(calc, read(str(data / "replicate.traj"), "::50"))

    md_ps = a.md_ps or MD_PS[system]
    steps = int(round(md_ps * 1000 / spec["timestep_fs"]))
    start = read(str(data / "start.traj"))
    traj = out / "leignn_md.traj"
    t = time.perf_counter()
    done = traj.with_suffix(".json")
    if done.exists() and not a.retrain and not a.rerun_md and json.loads(done.read_text())["steps_requested"] == steps:
        md = json.loads(done.read_text())
        print(f"  using existing {traj}")
    else:
        md = run_md(start, calc, traj, ensemble="nose-hoover", timestep_fs=spec["timestep_fs"],
                    temperature_K=spec["temperature_K"], steps=steps, save_every=spec["save_every"],
                    seed=a.seed, tdamp_fs=spec["tdamp_fs"], progress=not a.no_progress)
    print(f"  LEIGNN MD: {md['simulated_ps']:.2f} ps in {time.perf_counter() - t:.0f} s "
          f"({md['ms_per_step']} ms/step), blew_up={md['blew_up']}")
    res["md"] = md
    ref = str(data / "reference.traj")
    if spec["periodic"]:
        ref_frames = M.load_frames(ref)
        ref_d = M.diffusivity(ref_frames, M.frame_times_ps(ref_frames), SPECIES.get(system))
        ev = lambda tr, name: M.evaluate_condensed(tr, ref_frames, out, name=name, species=SPECIES.get(system),  # noqa: E731
                                                   reference_diffusivity=ref_d)
    else:
        ref_frames = M.load_frames(ref)
        ev = lambda tr, name: M.evaluate_molecule(tr, ref_frames, out, name=name)  # noqa: E731
    res["leignn"] = ev(str(traj), "leignn")
    res["replicate"] = ev(str(data / "replicate.traj"), "replicate")
    # one overlay of reference, replicate and LEIGNN
    curve = M.rdf if spec["periodic"] else M.distance_histogram
    r, g_ref = curve(ref_frames)
    curves = {"reference": g_ref, "reference replicate": curve(M.load_frames(str(data / "replicate.traj")))[1]}
    model_frames = M.load_frames(str(traj))
    if len(model_frames) > 1:
        curves["LEIGNN"] = curve(model_frames)[1]
    M.plot_curves(r, curves, out / "overlay.png", "g(r)" if spec["periodic"] else "h(r) (1/Å)",
                  f"{system}: {'RDF' if spec['periodic'] else 'h(r)'}")
    res["pngs"] = sorted(str(p) for p in out.glob("*.png"))
    summary[system] = res
    if system == "ethanol" and not a.skip_nve:
        summary["nve_drift"] = nve_comparison(system, a, spec, ckpt, data, out)


def nve_comparison(system: str, a, spec: dict, ckpt_direct: Path, data: Path, out: Path) -> dict:
    """NVE energy drift: direct-force LEIGNN vs conservative LEIGNN vs the reference calculator."""
    import numpy as np
    from ase.io import read

    from leignn_ocp.md import metrics as M
    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.reference import make_calculator
    from leignn_ocp.md.run import run_md

    ckpt_cons = train(ROOT / f"configs/md/{system}_leignn_conservative.yml", a.runs / f"{system}_conservative",
                      "leignn_conservative", a.epochs or EPOCHS[system], a.retrain)
    start = read(str(data / "start.traj"))
    steps = int(round(a.nve_ps * 1000 / spec["timestep_fs"]))
    res, series = {}, {}
    for name, calc in (("leignn_direct", LEIGNNCalculator(ckpt_direct, seed=a.seed)),
                       ("leignn_conservative", LEIGNNCalculator(ckpt_cons, seed=a.seed)),
                       ("reference_" + spec["calculator"].split()[0], make_calculator(system))):
        traj = out / f"nve_{name}.traj"
        md = run_md(start, calc, traj, ensemble="nve", timestep_fs=spec["timestep_fs"],
                    temperature_K=spec["temperature_K"], steps=steps, save_every=5, seed=a.seed,
                    keep_velocities=True, stop_on_blowup=False, progress=not a.no_progress)
        frames = M.load_frames(str(traj))
        d = M.nve_energy_drift(frames, M.frame_times_ps(frames))
        series[name] = (np.array(d.pop("time_ps")), np.array(d.pop("total_energy_eV")))
        d["blew_up"] = md["blew_up"]
        if name.startswith("leignn"):
            d["val_errors"] = val_errors(calc, read(str(data / "replicate.traj"), "::50"))
        res[name] = d
        print(f"  NVE {name}: drift {d['drift_meV_per_ps_per_atom']:.3f} meV/ps/atom, "
              f"max |dE| {d['max_abs_dev_meV_per_atom']:.3f} meV/atom")
    plt = M._plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (t, e) in series.items():
        ax.plot(t, 1000 * (e - e[0]) / len(start), label=name)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("E_tot(t) - E_tot(0) (meV/atom)")
    ax.set_title(f"{system}: NVE, dt {spec['timestep_fs']:g} fs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "nve_drift.png", dpi=120)
    plt.close(fig)
    res["png"] = str(out / "nve_drift.png")
    (out / "nve_drift.json").write_text(json.dumps(res, indent=2))
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=["ethanol", "cu_liquid"], choices=["ethanol", "cu_liquid"])
    p.add_argument("--data", type=Path, default=ROOT / "data/md")
    p.add_argument("--runs", type=Path, default=ROOT / "runs/md")
    p.add_argument("--out", type=Path, default=ROOT / "results/md")
    p.add_argument("--epochs", type=int, help="training epochs (default: ethanol 30, cu_liquid 6)")
    p.add_argument("--md-ps", type=float, help="LEIGNN MD length (default: 5 ps)")
    p.add_argument("--nve-ps", type=float, default=1.0, help="NVE length for the drift comparison")
    p.add_argument("--skip-nve", action="store_true")
    p.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    p.add_argument("--rerun-md", action="store_true", help="run LEIGNN MD even if its trajectory exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    for system in a.systems:
        run_system(system, a, summary)
        path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary -> {path}")


if __name__ == "__main__":
    main()
