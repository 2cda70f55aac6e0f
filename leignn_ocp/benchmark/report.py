"""A benchmark result as files: benchmark.csv, benchmark.json, benchmark.md, benchmark.png; with a
phase breakdown also breakdown.csv / .md / .png and one torch.profiler table per model and mode
(profile_<model>_<train|infer>.txt)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from leignn_ocp import lineup

COLUMNS = [
    "model", "label", "params", "edges", "gflop_fwd", "gflop_train",
    "train_ms", "infer_ms", "train_atoms_per_s", "infer_atoms_per_s",
    "peak_mem_train_mb", "peak_mem_infer_mb", "train_x_leignn", "infer_x_leignn",
    "train_cpu_ms", "infer_cpu_ms", "train_cpu_x_leignn", "infer_cpu_x_leignn",
]
FILES = ("benchmark.csv", "benchmark.md", "benchmark.png", "benchmark.json")
BREAKDOWN_FILES = ("breakdown.csv", "breakdown.md", "breakdown.png")
PHASES = ("graph", "input_checks", "model", "loss", "backward", "optimizer", "other")
PHASE_LABELS = {"graph": "graph construction", "input_checks": "input checks", "model": "model compute",
                "loss": "loss", "backward": "backward", "optimizer": "optimizer step",
                "other": "other"}
PHASE_COLORS = {"graph": "#4c72b0", "input_checks": "#dd8452", "model": "#55a868", "loss": "#8172b3",
                "backward": "#c44e52", "optimizer": "#937860", "other": "#bbbbbb"}
BREAKDOWN_COLUMNS = ["workload", "config", "model", "label", "mode", "steps", "steps_averaged", "step_ms",
                     *(f"{p}_ms" for p in PHASES), "phases_sum_ms", "round_robin_ms", "profiled_step_ms"]
WORKLOAD_TEXT = {
    "oc20": "OC20-like slab+adsorbate structures",
    "molecules": "small molecules (ASE's G2 set, rattled; non-periodic path of every model, use_pbc=False)",
    "cells": "small periodic bulk cells (ase.build.bulk, rattled)",
}


def fmt(x, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{nd}f}"


def write_rows(out: Path, stem: str, rows: list[dict], columns, meta: dict) -> None:
    """``<out>/<stem>.csv`` (the columns) and ``<stem>.json`` (meta and every row), ``out`` created."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def write_outputs(out: str | Path, rows: list[dict], meta: dict, raw: dict,
                  breakdown: list[dict] | None = None, profiles: dict[str, str] | None = None) -> Path:
    """All four files into ``out`` (created), and the breakdown's and profiler tables when given;
    returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if breakdown:
        for b in breakdown:
            b.setdefault("workload", meta.get("workload", "oc20"))
            b.setdefault("config", meta.get("config_dir"))
        write_breakdown(out, breakdown, f"{_batch_text(meta)}; {meta['device_name']}")
    for name, table in (profiles or {}).items():
        (out / f"profile_{name}.txt").write_text(
            f"# torch.profiler key_averages, the phases and the top rows by self CPU time: {name} ({_batch_text(meta)}, "
            f"config {meta.get('config_dir')})\n{table}\n")
    with open(out / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    with open(out / "benchmark.json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": raw}, f, indent=1, default=str)
    (out / "benchmark.md").write_text(markdown(rows, meta))
    plot(rows, meta, out / "benchmark.png")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    cpu = meta["device"].startswith("cpu")
    lines = [
        f"# LEIGNN efficiency benchmark ({meta['device_name']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Batch: {_batch_text(meta)} (otf graphs). torch {meta['torch']}, {meta['threads']} thread(s)"
        + (", glibc malloc tuned (no mmap, no trim)" if meta.get("malloc_tuned") else "")
        + f". Medians of {meta['repeats']} round-robin repeats after {meta['warmup']} warm-up; wall-clock time.",
        "",
        "| model | params | edges | GFLOP fwd | GFLOP train | train ms | infer ms | train atoms/s | "
        "infer atoms/s | peak MB train | peak MB infer | train × LEIGNN | infer × LEIGNN |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {fmt(r['params'])} | {fmt(r['edges'])} | {fmt(r['gflop_fwd'], 2)} | "
            f"{fmt(r['gflop_train'], 2)} | {fmt(r['train_ms'])} | {fmt(r['infer_ms'])} | "
            f"{fmt(r['train_atoms_per_s'], 0)} | {fmt(r['infer_atoms_per_s'], 0)} | "
            f"{fmt(r['peak_mem_train_mb'])} | {fmt(r['peak_mem_infer_mb'])} | "
            f"{fmt(r['train_x_leignn'], 2)} | {fmt(r['infer_x_leignn'], 2)} |")
    if cpu:
        lines += [
            "",
            "Same run, medians of process CPU time (robust to other processes on a shared machine):",
            "",
            "| model | train ms (CPU) | infer ms (CPU) | train × LEIGNN | infer × LEIGNN |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r['label']} | {fmt(r['train_cpu_ms'])} | {fmt(r['infer_cpu_ms'])} | "
                         f"{fmt(r['train_cpu_x_leignn'], 2)} | {fmt(r['infer_cpu_x_leignn'], 2)} |")
    lines += [
        "",
        "× LEIGNN = model time / LEIGNN time (above 1: LEIGNN is that many times faster).",
        "Train step = forward + each recipe's loss_functions built by fairchem (energy + free-atom forces,",
        "normalised targets as the trainer uses them; autograd forces with create_graph for energy-gradient",
        f"models) + backward + gradient clipping + {meta.get('optimizer', 'AdamW')} step built from the",
        "recipe's optim block as fairchem's trainer builds it (fused: the same update in one pass).",
        "Inference under torch.no_grad except for energy-gradient models, which need autograd for forces.",
        "Graph construction (fairchem's radius_graph_pbc) is part of every forward.",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode (matmul/bmm/conv only: elementwise ops,",
        "gathers and scatters are not counted); 'fwd' includes the force gradient where forces are",
        "-dE/dx, 'train' is forward + backward of one training step. They are the FLOPs each",
        "implementation executes: LEIGNN's chunked CPU path multiplies each chunk of edges only with the",
        "radial-basis columns that are not negligible for it; baselines run fairchem's code as is.",
        f"Peak memory: {meta['memory_method']}",
        "",
        f"Dense float32 matmul ({meta['matmul_n']}×{meta['matmul_n']}), median over the same round-robin: "
        f"**{meta['matmul_gflops']:.1f} GFLOP/s**.",
        f"LEIGNN training step: {meta['leignn_train_gflop']:.2f} GFLOP in {meta['leignn_train_ms']:.1f} ms = "
        f"**{meta['leignn_train_gflops']:.1f} GFLOP/s = {100 * meta['leignn_matmul_fraction']:.1f} % of the matmul rate**.",
    ]
    if cpu:
        lines.append(
            f"By process CPU time: {meta['leignn_train_gflops_cpu_time']:.1f} GFLOP/s vs. "
            f"{meta['matmul_gflops_cpu_time']:.1f} GFLOP/s = {100 * meta['leignn_matmul_fraction_cpu_time']:.1f} %.")
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: str | Path) -> None:
    """Fig. 4 style: time per batch per model (left), training cost vs. published force MAE (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    main = [r for r in rows if r["model"] in lineup.MODELS]  # not the compile / autocast extras
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    x = range(len(main))
    w = 0.4
    tr = [r["train_ms"] for r in main]
    inf = [r["infer_ms"] for r in main]
    ax1.bar([i - w / 2 for i in x], tr, w, label="training step", color="#3b6ea5")
    ax1.bar([i + w / 2 for i in x], inf, w, label="inference", color="#e39b3b")
    for i, r in enumerate(main):
        if r["model"] != "leignn":
            ax1.text(i - w / 2, tr[i] * 1.05, f"{r['train_x_leignn']:.1f}×", ha="center", va="bottom", fontsize=7)
            ax1.text(i + w / 2, inf[i] * 1.05, f"{r['infer_x_leignn']:.1f}×", ha="center", va="bottom", fontsize=7)
    ax1.set_yscale("log")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels([r["label"] for r in main], rotation=30, ha="right")
    ax1.set_ylabel("median time per batch (ms, log)")
    ax1.set_title(f"{meta['batch_structures']} structures / {meta['batch_atoms']} atoms on {meta['device_short']}")
    ax1.legend()

    for r in main:
        published = lineup.get(r["model"]).published.get("ID")
        if published is None:
            continue
        mae = published[1]  # force MAE, meV/Å
        ax2.scatter(r["train_ms"], mae, s=40 + 3 * r["params"] / 1e5,
                    color="#c0392b" if r["model"] == "leignn" else "#555555", alpha=0.8)
        # Vanilla and Vanilla + NMU share one MAE and about one cost: labels above / below
        dx, dy, ha = {"vanilla": (-6, -12, "right"), "vanilla_nmu": (6, 6, "left"),
                      "leignn": (10, -4, "left")}.get(r["model"], (5, 4, "left"))
        ax2.annotate(r["label"], (r["train_ms"], mae), textcoords="offset points", xytext=(dx, dy),
                     ha=ha, fontsize=8)
    ax2.set_xscale("log")
    ax2.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xlabel("training step (ms, log; this run)")
    ax2.set_ylabel("OC20-200K ID force MAE (meV/Å, published)")
    ax2.set_title("cost vs. accuracy (marker size ~ parameters)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _batch_text(meta: dict) -> str:
    text = (f"{meta['batch_structures']} {WORKLOAD_TEXT[meta.get('workload', 'oc20')]}, "
            f"{meta['batch_atoms']} atoms")
    n_inf = meta.get("infer_batch_structures", meta["batch_structures"])
    if n_inf != meta["batch_structures"]:
        text += f"; inference on {n_inf} structure(s), {meta['infer_batch_atoms']} atoms"
    return text


def write_breakdown(out: str | Path, rows: list[dict], title: str = "") -> Path:
    """breakdown.csv / .md / .png into ``out``: ms per phase of each (workload, config, model, mode)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "breakdown.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BREAKDOWN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in BREAKDOWN_COLUMNS})
    (out / "breakdown.md").write_text(breakdown_markdown(rows, title))
    plot_breakdown(rows, out / "breakdown.png", title)
    return out


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("workload"), r.get("config"), r["mode"]), []).append(r)
    return groups


def breakdown_markdown(rows: list[dict], title: str = "") -> str:
    lines = ["# Where a step's time goes" + (f" ({title})" if title else ""), ""]
    for (workload, config, mode), group in _groups(rows).items():
        phases = [p for p in PHASES if any(f"{p}_ms" in r for r in group)]
        lines += [f"## {workload}, {config}: {'training step' if mode == 'train' else 'inference'}", "",
                  "| model | step ms | " + " | ".join(f"{PHASE_LABELS[p]} ms (%)" for p in phases)
                  + " | round-robin ms | profiled ms |",
                  "|---|---:|" + "---:|" * len(phases) + "---:|---:|"]
        for r in group:
            cells = [f"{fmt(r.get(f'{p}_ms'), 2)} ({fmt(100 * r[f'{p}_ms'] / r['step_ms'], 0)})"
                     if r.get(f"{p}_ms") is not None and r["step_ms"] else "–" for p in phases]
            lines.append(f"| {r['label']} | {fmt(r['step_ms'], 2)} | " + " | ".join(cells)
                         + f" | {fmt(r.get('round_robin_ms'), 2)} | {fmt(r.get('profiled_step_ms'), 2)} |")
        lines.append("")
    lines += [
        "Means over the middle half (by step time) of instrumented, unprofiled steps (wall clock), so the",
        "phases add up to the step. Graph construction = fairchem's",
        "GraphModelMixin.generate_graph (and PyG's RadiusInteractionGraph, SchNet's non-periodic graph);",
        "input checks = leignn_ocp.checks (LEIGNN's; fairchem's SchNet and PaiNN run none); model compute =",
        "the forward's own time (incl. autograd forces of energy-gradient models and the position wrap /",
        "neighbour mask LEIGNN does around the graph); loss = the recipe's fairchem losses; backward =",
        "loss.backward(); optimizer step = zero_grad + gradient clipping + the optimizer's step.",
        "Other = freeing the step's autograd graph and outputs + time outside every label.",
        "Round-robin ms = the benchmark table's median of the same step; profiled ms = the same step",
        "under torch.profiler (its per-op overhead included); the op tables are profile_<model>_<mode>.txt.",
    ]
    return "\n".join(lines) + "\n"


def plot_breakdown(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Stacked bars of ms per phase: one panel per (workload, config, mode), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    cols = list(dict.fromkeys((w, c) for w, c, _ in groups))
    modes = [m for m in ("train", "infer") if any(k[2] == m for k in groups)]
    fig, axes = plt.subplots(len(modes), len(cols), figsize=(3.6 * len(cols) + 1.5, 3.4 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, (workload, config) in enumerate(cols):
            ax = axes[i][j]
            group = groups.get((workload, config, mode), [])
            bottom = [0.0] * len(group)
            for p in PHASES:
                vals = [max(r.get(f"{p}_ms") or 0.0, 0.0) for r in group]
                if not any(vals):
                    continue
                ax.bar(range(len(group)), vals, 0.6, bottom=bottom, color=PHASE_COLORS[p],
                       label=PHASE_LABELS[p] if (i, j) == (0, 0) else None)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xticks(range(len(group)))
            ax.set_xticklabels([r["label"] for r in group], rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{workload}, {Path(str(config)).name}: {mode}", fontsize=9)
            if j == 0:
                ax.set_ylabel("ms per step")
    fig.legend(loc="center right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (3.6 * len(cols) + 1.5), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
