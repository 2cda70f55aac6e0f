"""Table 1 as files: Markdown (energy/force MAE, then cosine/EFwT), CSV, JSON and a bar chart.

``results[model][split title] -> metrics`` (as :func:`~leignn_ocp.evaluation.metrics.evaluate_checkpoint`
returns per model); ``extra[model] -> {column: value}`` adds a table of e.g. parameters and times.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from leignn_ocp.evaluation.metrics import COLUMNS
from leignn_ocp.lineup import SPLIT_TITLES


def _split_table(results: dict, heads: tuple[str, str], cells) -> list[str]:
    """One Markdown table with two columns per split; ``cells(metrics)`` -> the two cell texts."""
    lines = ["| model | " + " | ".join(f"{t} {heads[0]} | {t} {heads[1]}" for t in SPLIT_TITLES) + " |",
             "|---|" + "---|---|" * len(SPLIT_TITLES)]
    for model, res in results.items():
        row = [c for t in SPLIT_TITLES for c in (cells(res[t]) if res.get(t) else ("-", "-"))]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return lines


def markdown_table(results: dict[str, dict[str, dict[str, float]]], extra: dict[str, dict] | None = None) -> str:
    """Table 1 (E meV / F meV/Å) + cosine / EFwT table (+ the ``extra`` table)."""
    lines = _split_table(results, ("E", "F"),
                         lambda r: (f"{r['energy_mae_meV']:.1f}", f"{r['forces_mae_meV_per_A']:.1f}"))
    lines += [""] + _split_table(results, ("cos", "EFwT %"),
                                 lambda r: (f"{r['forces_cos']:.3f}", f"{r['efwt_percent']:.2f}"))
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
    """One row per (model, split)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "split", *COLUMNS, "n_structures"])
        for model, res in results.items():
            for t in SPLIT_TITLES:
                if t in res:
                    r = res[t]
                    w.writerow([model, t, *(f"{r[c]:.6g}" for c in COLUMNS), r.get("n_structures", "")])


def read_csv(path: Path) -> dict:
    """:func:`write_csv`'s file back into ``results``."""
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

    models = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(SPLIT_TITLES))
    for ax, key, ylabel in ((axes[0], "energy_mae_meV", "energy MAE (meV)"),
                            (axes[1], "forces_mae_meV_per_A", "force MAE (meV/Å)")):
        allv = []
        for i, m in enumerate(models):
            vals = [results[m].get(t, {}).get(key, np.nan) for t in SPLIT_TITLES]
            allv += [v for v in vals if np.isfinite(v) and v > 0]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=m, color=f"C{i % 10}")
        if allv and max(allv) / min(allv) > 30:
            ax.set_yscale("log")
            ylabel += ", log scale"
        ax.set_xticks(x, SPLIT_TITLES)
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
    """<out>/table1.{md,csv,png,json}; returns the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = (f"# {title}\n\n" if title else "") + (note + "\n\n" if note else "") + markdown_table(results, extra)
    (out / "table1.md").write_text(md)
    write_csv(results, out / "table1.csv")
    bar_chart(results, out / "table1.png", title)
    (out / "table1.json").write_text(json.dumps({"results": results, "extra": extra or {}}, indent=1))
    return md
