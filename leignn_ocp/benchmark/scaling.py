"""How cost grows with the size of one periodic structure (``leignn-benchmark --regime scaling``).

Cu(111) slabs with an O adlayer, from ~100 to ~20,000 atoms, one structure per step: training-step
and inference time and peak memory (process RSS above the level before the call) per model, with
the same Runner, timers and memory probe as the rest of the benchmark. A model whose memory,
extrapolated from its last two sizes along their own log-log slope, would pass ``--memory-limit-gb``
is not run at the larger sizes (the row says so): the quadratic graph search of fairchem's models
would otherwise take the machine down with it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111

SIZES = (100, 500, 1000, 2000, 5000, 10000, 20000)
MODELS = ("leignn", "painn_direct", "schnet")
COLUMNS = ("model", "label", "atoms", "edges", "infer_ms", "train_ms", "infer_us_per_atom", "train_us_per_atom",
           "peak_mem_infer_mb", "peak_mem_train_mb", "note")


def slab(n_target: int, seed: int = 0) -> Atoms:
    """A 4-layer Cu(111) slab with O on a quarter of the fcc sites, ~``n_target`` atoms, rattled."""
    side = max(2, round(math.sqrt(n_target / 4.25)))
    atoms = fcc111("Cu", (side, side, 4), vacuum=8.0, a=3.61)
    top = atoms.positions[:, 2].max()
    rng = np.random.default_rng(seed)
    layer = [p for p in atoms.positions if abs(p[2] - top) < 0.1]
    for p in layer[::4]:
        add_adsorbate(atoms, "O", 1.2, position=(p[0] + 1.27, p[1] + 0.74))
    atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
    atoms.pbc = True
    return atoms


def run(models=MODELS, sizes=SIZES, config_dir="configs/s2ef/default", repeats: int = 2,
        memory_limit_gb: float = 16.0, out: Path | None = None, log=print) -> list[dict]:
    from leignn_ocp import lineup
    from leignn_ocp.benchmark.harness import Runner, load_recipe, median, num_edges, peak_memory_bytes, timed
    from leignn_ocp.benchmark.structures import make_batch

    device = torch.device("cpu")
    rows, mem = [], {m: [] for m in models}  # mem: (atoms, peak MB) measured so far
    for n in sizes:
        atoms = slab(n)
        batch = make_batch([atoms])
        for key in models:
            base = {"model": key, "label": lineup.label(key), "atoms": len(atoms)}
            seen = mem[key]
            if len(seen) >= 2:
                (n0, m0), (n1, m1) = seen[-2:]
                slope = math.log(max(m1, 1.0) / max(m0, 1.0)) / math.log(n1 / n0)
                guess = m1 * (len(atoms) / n1) ** max(slope, 1.0)
                if guess > memory_limit_gb * 1024:
                    log(f"{base['label']} at {len(atoms)} atoms: skipped, memory would reach ~{guess / 1024:.0f} GB")
                    rows.append({**base, "note": f"not run: ~{guess / 1024:.0f} GB extrapolated "
                                                 f"(limit {memory_limit_gb:g} GB)"})
                    continue
            runner = Runner.build(load_recipe(key, config_dir), batch, device)
            edges = _edges(runner, num_edges)
            runner.infer(), runner.train_step()  # warm-up
            infer = median([timed(runner.infer, device)[0] for _ in range(repeats)]) * 1e3
            train = median([timed(runner.train_step, device)[0] for _ in range(repeats)]) * 1e3
            mi = peak_memory_bytes(runner.infer, device) / 2**20
            mt = peak_memory_bytes(runner.train_step, device) / 2**20
            seen.append((len(atoms), max(mi, mt)))
            row = {**base, "edges": edges, "infer_ms": round(infer, 1), "train_ms": round(train, 1),
                   "infer_us_per_atom": round(1e3 * infer / len(atoms), 1),
                   "train_us_per_atom": round(1e3 * train / len(atoms), 1),
                   "peak_mem_infer_mb": round(mi), "peak_mem_train_mb": round(mt), "note": ""}
            rows.append(row)
            log(f"{base['label']} at {len(atoms)} atoms ({edges} edges): infer {infer:.0f} ms, train {train:.0f} ms, "
                f"peak memory {mi:.0f} / {mt:.0f} MB")
            del runner
    if out is not None:
        write(rows, Path(out), {"config_dir": str(config_dir), "repeats": repeats, "threads": torch.get_num_threads(),
                                "memory_limit_gb": memory_limit_gb})
    return rows


def _edges(runner, num_edges) -> int:
    """Edges of the model's graph: LEIGNN's own search (fairchem's generate_graph would take the
    quadratic path at every size), fairchem's for its models."""
    from leignn_ocp.checks import periodic_axes
    from leignn_ocp.model import LEIGNN

    batch = runner.fresh_infer_batch()
    if isinstance(runner.model, LEIGNN):
        with torch.no_grad():
            axes = periodic_axes(batch)
            return int(runner.model._graph(runner.model._wrapped(batch, axes), axes)[0].numel())
    return num_edges(runner.model, batch)


def write(rows: list[dict], out: Path, meta: dict) -> None:
    from leignn_ocp.benchmark.report import write_rows

    write_rows(out, "scaling", rows, COLUMNS, meta)
    lines = [f"# Cost against structure size (CPU, {meta['threads']} thread(s), {meta['config_dir']}, "
             f"one Cu(111)+O slab per step, median of {meta['repeats']})", "",
             "| model | atoms | edges | inference ms (µs/atom) | training step ms (µs/atom) | peak MB infer / train | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "infer_ms" not in r:
            lines.append(f"| {r['label']} | {r['atoms']} | | | | | {r['note']} |")
            continue
        lines.append(f"| {r['label']} | {r['atoms']} | {r['edges']} | {r['infer_ms']} ({r['infer_us_per_atom']}) | "
                     f"{r['train_ms']} ({r['train_us_per_atom']}) | {r['peak_mem_infer_mb']} / {r['peak_mem_train_mb']} | |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "scaling.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label and "infer_ms" in r]
        if not rs:
            continue
        n = [r["atoms"] for r in rs]
        axes[0].loglog(n, [r["infer_ms"] for r in rs], "o-", label=label)
        axes[1].loglog(n, [r["train_ms"] for r in rs], "o-", label=label)
        axes[2].loglog(n, [max(r["peak_mem_train_mb"], 1) for r in rs], "o-", label=label)
    for ax, title in zip(axes, ("inference ms", "training step ms", "peak memory of a training step, MB")):
        lo, hi = ax.get_xlim()
        y0 = ax.get_lines()[0].get_ydata()[0] if ax.get_lines() else 1
        x0 = ax.get_lines()[0].get_xdata()[0] if ax.get_lines() else 1
        xs = np.array([x0, hi])
        ax.loglog(xs, y0 * xs / x0, "k:", lw=1, label="linear")
        ax.set_xlabel("atoms in the structure")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
