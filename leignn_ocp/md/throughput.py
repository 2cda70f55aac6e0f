"""MD throughput: steps per second of ASE MD driven by a model's calculator, per system and mode.

What is timed is what a user's MD loop pays per step: ASE's integrator, the calculator's
conversion of the Atoms, the graph and the model. Modes: ``fairchem`` (fairchem's own
``OCPCalculator.calculate`` on every step), ``reuse`` (the kept batch of
:class:`~leignn_ocp.md.calculator.ReusingOCPCalculator`, the default) and ``reuse+compile``
(the same under ``torch.compile``). Every mode runs the same checkpoint from the same start, the modes
take turns in blocks of steps (median block), and the forces of the first step are compared with
the first mode's (fairchem's path by default).

Without ``--checkpoint KEY=PATH`` the models have fresh weights from their configs (timing does not
depend on the weights) and a force scale of ``--force-scale`` eV/Å, so that the thermostatted
structure stays near its start for the steps timed; say so when quoting the numbers.

    leignn-md-throughput --models leignn painn_direct --systems ethanol cu108 --out docs/results/md_throughput
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.build import bulk, molecule

SYSTEMS = {
    # an MD17 molecule, no cell (the molecule path of the graph)
    "ethanol": lambda: _molecule("CH3CH2OH"),
    # a 108-atom fcc Cu cell (3 x 3 x 3 conventional cells), periodic
    "cu108": lambda: _crystal((3, 3, 3)),
    # 1,000 atoms: 5 x 5 x 10 conventional cells
    "cu1000": lambda: _crystal((5, 5, 10)),
}
MODES = ("fairchem", "reuse", "reuse+compile")
COLUMNS = ("system", "atoms", "model", "label", "mode", "steps", "ms_per_step", "steps_per_s", "ns_per_day",
           "first_call_s", "max_force_diff_vs_first_mode", "threads", "device")


def _crystal(repeat) -> Atoms:
    """fcc Cu, rattled by 0.05 Å: in a perfect lattice every atom is alike, and the ScaleFactors
    fitted on it (PaiNN's variance of per-atom features) divide by zero."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=0)
    return atoms


def _molecule(name: str) -> Atoms:
    atoms = molecule(name)
    atoms.pbc = False
    return atoms


def fresh_checkpoint(key: str, config_dir: str | Path, path: Path, atoms: Atoms, *, seed: int = 0,
                     force_scale: float = 0.05, overrides: dict | None = None) -> Path:
    """A checkpoint in fairchem's layout for line-up entry ``key`` with fresh weights (its
    ``<config_dir>/<key>.yml``; ``use_pbc`` set from ``atoms``), ScaleFactors fitted as the benchmark fits them,
    normalisers mean 0 and rmsd ``force_scale`` for energy and forces (one scale, as -dE/dx needs)."""
    from leignn_ocp import lineup
    from leignn_ocp.benchmark.harness import fit_scale_factors, load_recipe
    from leignn_ocp.benchmark.structures import make_batch, oc20_like_structures

    recipe = load_recipe(key, config_dir)
    over = {**recipe.overrides, **(overrides or {}), "use_pbc": bool(atoms.pbc.any())}
    model = lineup.build_model(recipe.config["model"], over, seed=seed)
    # ScaleFactors (PaiNN, GemNet) fitted on the benchmark's varied OC20-like batch: fitted on a
    # crystal whose atoms are all alike, they divide by a near-zero variance
    fit_scale_factors(model, make_batch(oc20_like_structures(2)))
    config = dict(recipe.config)
    config["model"] = {**{k: v for k, v in config["model"].items() if k != "scale_file"}, **over}
    config["cmd"] = {**config.get("cmd", {}), "seed": seed, "identifier": "throughput", "print_every": 100}
    config["dataset"] = dict(config["dataset"].get("train", config["dataset"]))  # as a training checkpoint stores it
    config.setdefault("slurm", {})
    config["logger"] = "tensorboard"
    scale = torch.tensor(float(force_scale))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "normalizers": {t: {"mean": torch.tensor(0.0), "rmsd": scale} for t in ("energy", "forces")},
                "config": config, "amp": None}, path)
    return path


def calculator(key: str, checkpoint: Path, mode: str):
    """The calculator of ``mode`` for a checkpoint of line-up entry ``key``."""
    from leignn_ocp import lineup
    from leignn_ocp.md.calculator import LEIGNNCalculator, ReusingOCPCalculator
    from leignn_ocp.trainer import TRAINER_PATH

    kw = dict(reuse=mode != "fairchem", compile=mode == "reuse+compile")
    if lineup.get(key).is_leignn:
        return LEIGNNCalculator(checkpoint, **kw)
    return ReusingOCPCalculator(checkpoint_path=str(checkpoint), cpu=True, trainer=TRAINER_PATH, **kw)


class _Run:
    """One MD run of one calculator from ``atoms`` (a copy): Langevin, seeded velocities."""

    def __init__(self, atoms: Atoms, calc, timestep_fs: float, temperature_K: float = 300.0, seed: int = 0):
        from ase.md.langevin import Langevin
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        self.atoms = atoms.copy()
        self.atoms.calc = calc
        MaxwellBoltzmannDistribution(self.atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
        t0 = time.perf_counter()
        self.forces = self.atoms.get_forces().copy()  # the first call: graph, compilation
        self.first_call_s = time.perf_counter() - t0
        self.dyn = Langevin(self.atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=0.01,
                            rng=np.random.default_rng(seed))
        self.dyn.run(5)  # warm-up (compiled code for the shapes of the first steps)
        self.block_ms: list[float] = []

    def block(self, steps: int) -> None:
        t0 = time.perf_counter()
        self.dyn.run(steps)
        self.block_ms.append(1e3 * (time.perf_counter() - t0) / steps)
        if not np.isfinite(self.atoms.get_forces()).all():
            raise RuntimeError("non-finite forces during the timed MD")


def run(models, systems, modes, steps: int, out: Path | None, config_dir: str | Path = "configs/s2ef/default",
        checkpoints: dict[str, Path] | None = None, force_scale: float = 0.05, timestep_fs: float = 0.5,
        rounds: int = 5, progress=print) -> list[dict]:
    """Every mode of one (system, model) runs side by side: ``rounds`` blocks of ``steps / rounds``
    steps each, the modes taking turns, so that load elsewhere on the machine hits all of them; the
    median block gives ms per step."""
    from leignn_ocp import lineup

    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="leignn_throughput_")  # fresh-weight checkpoints, not results
    work = Path(tmp.name)
    per_block = max(1, steps // rounds)
    rows = []
    for system in systems:
        atoms = SYSTEMS[system]()
        for key in models:
            ckpt = (checkpoints or {}).get(key) or fresh_checkpoint(
                key, config_dir, work / f"{key}_{system}.pt", atoms, force_scale=force_scale)
            runs = {}
            for mode in modes:
                try:
                    runs[mode] = _Run(atoms, calculator(key, ckpt, mode), timestep_fs)
                except Exception as err:  # e.g. a model torch.compile cannot trace: a row that says so
                    if mode != "reuse+compile":
                        raise
                    progress(f"{system} {key} {mode}: failed ({type(err).__name__}: {str(err)[:200]})")
            for _ in range(rounds):
                for r in runs.values():
                    r.block(per_block)
            ref = next(iter(runs.values())).forces if runs else None
            for mode in modes:
                base = {"system": system, "atoms": len(atoms), "model": key, "label": lineup.label(key), "mode": mode}
                if mode not in runs:
                    rows.append({**base, "steps": 0})
                    continue
                r = runs[mode]
                ms = float(np.median(r.block_ms))
                row = {**base, "steps": per_block * rounds, "ms_per_step": round(ms, 3),
                       "steps_per_s": round(1e3 / ms, 1), "ns_per_day": round(timestep_fs * 1e-6 * 86400e3 / ms, 3),
                       "first_call_s": round(r.first_call_s, 2),
                       "max_force_diff_vs_first_mode": float(np.abs(r.forces - ref).max()),
                       "threads": torch.get_num_threads(), "device": "cpu"}
                rows.append(row)
                progress(f"{system} ({len(atoms)} atoms) {lineup.label(key)} [{mode}]: {ms:.2f} ms/step, "
                         f"{row['steps_per_s']} steps/s (first call {row['first_call_s']} s, "
                         f"max |dF| vs the first mode {row['max_force_diff_vs_first_mode']:.2g} eV/Å)")
    tmp.cleanup()
    if out is not None:
        write(rows, Path(out), dict(steps=steps, rounds=rounds, timestep_fs=timestep_fs, force_scale=force_scale,
                                    config_dir=str(config_dir), fresh_weights=not checkpoints))
    return rows


def write(rows: list[dict], out: Path, meta: dict) -> None:
    from leignn_ocp.benchmark.report import write_rows

    write_rows(out, "throughput", rows, COLUMNS, meta)
    lines = [f"# MD throughput (CPU, {rows[0]['threads'] if rows else '?'} thread(s); Langevin, "
             f"{meta['timestep_fs']} fs; the modes take turns, {meta['rounds']} blocks of "
             f"{max(1, meta['steps'] // meta['rounds'])} steps each, median block)", "",
             "| system | atoms | model | mode | ms/step | steps/s | ns/day | first call s | max dF vs the first mode (eV/Å) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("steps"):
            lines.append(f"| {r['system']} | {r['atoms']} | {r['label']} | {r['mode']} | failed | | | | |")
            continue
        lines.append(f"| {r['system']} | {r['atoms']} | {r['label']} | {r['mode']} | {r['ms_per_step']} | "
                     f"{r['steps_per_s']} | {r['ns_per_day']} | {r['first_call_s']} | "
                     f"{r['max_force_diff_vs_first_mode']:.2g} |")
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "throughput.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("steps")]
    systems = list(dict.fromkeys(r["system"] for r in ok))
    fig, axes = plt.subplots(1, len(systems), figsize=(4.5 * len(systems), 3.6), squeeze=False)
    for ax, system in zip(axes[0], systems):
        sub = [r for r in ok if r["system"] == system]
        labels = [f"{r['label']}\n{r['mode']}" for r in sub]
        ax.barh(range(len(sub)), [r["steps_per_s"] for r in sub], color="tab:blue")
        ax.set_yticks(range(len(sub)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("MD steps / s (higher is better)")
        ax.set_title(f"{system} ({sub[0]['atoms']} atoms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from leignn_ocp import lineup

    p = argparse.ArgumentParser(prog="leignn-md-throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["leignn", "painn_direct"], choices=lineup.KEYS)
    p.add_argument("--systems", nargs="+", default=["ethanol", "cu108"], choices=sorted(SYSTEMS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=200, help="timed MD steps per (system, model, mode)")
    p.add_argument("--rounds", type=int, default=5, help="blocks per mode, the modes taking turns (median block)")
    p.add_argument("--config-dir", default="configs/s2ef/default")
    p.add_argument("--checkpoint", action="append", default=[], metavar="KEY=PATH",
                   help="a trained checkpoint for a model instead of fresh weights")
    p.add_argument("--force-scale", type=float, default=0.05, help="eV/Å scale of fresh weights' forces")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/md_throughput")
    a = p.parse_args(argv)
    if a.steps < 1 or a.rounds < 1:
        p.error("--steps and --rounds must be >= 1")
    checkpoints = {}
    for item in a.checkpoint:
        key, sep, path = item.partition("=")
        if not sep or key not in lineup.KEYS or not Path(path).is_file():
            p.error(f"--checkpoint {item!r}: expected KEY=PATH with KEY in {', '.join(lineup.KEYS)} and an existing file")
        checkpoints[key] = Path(path)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.models, a.systems, a.modes, a.steps, Path(a.out), a.config_dir, checkpoints, a.force_scale, rounds=a.rounds)
    print(f"wrote {a.out}/throughput.{{csv,json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
