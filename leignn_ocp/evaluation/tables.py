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


def bar_chart(results: dict, path: Path, title: str = "", std: dict | None = None,
              labels: dict | None = None) -> None:
    """Grouped bars: energy MAE and force MAE per split, one bar per model (log axis when the
    values span more than 30x, as an untrained or diverged model would otherwise flatten the rest).
    ``std`` (results-shaped) adds ± 1 std error bars; ``labels`` renames legend entries."""
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
            err = None if std is None else [std[m].get(t, {}).get(key, np.nan) for t in SPLIT_TITLES]
            allv += [v for v in vals if np.isfinite(v) and v > 0]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, yerr=err, capsize=2 if err else 0,
                   label=(labels or {}).get(m, m), color=f"C{i % 10}")
        if allv and max(allv) / min(allv) > 30:
            ax.set_yscale("log")
            ylabel += ", log scale"
        ax.set_xticks(x, SPLIT_TITLES)
        ax.set_ylabel(ylabel + (", mean ± std" if std is not None else ""))
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, legend = axes[0].get_legend_handles_labels()
    fig.legend(handles, legend, loc="lower center", ncol=min(len(models), 4), fontsize=8, frameon=False)
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


# --------------------------------------------------------------------------- seeded line-ups


def aggregate(rows: list[dict]) -> dict[str, dict]:
    """Line-up row files (one per model and seed, :func:`~leignn_ocp.evaluation.runs.run_lineup`)
    -> {label: {"mean", "std" (results-shaped), "seeds", "params", "train_s", "steps", "curves"}},
    in the registry's order. std is the sample standard deviation (ddof 1; 0 for one seed)."""
    from leignn_ocp import lineup

    order = {k: i for i, k in enumerate(lineup.KEYS)}
    by_model: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (order.get(r["key"], len(order)), r["key"], r["seed"])):
        by_model.setdefault(r["label"], []).append(r)
    out = {}
    for label, rs in by_model.items():
        mean, std = {}, {}
        for t in SPLIT_TITLES:
            vals = {c: np.array([r["results"][t][c] for r in rs]) for c in COLUMNS}
            mean[t] = {c: float(v.mean()) for c, v in vals.items()}
            std[t] = {c: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for c, v in vals.items()}
        train_s = np.array([r["train_s"] for r in rs])
        try:
            forces = "−∂E/∂x" if lineup.get(rs[0]["key"]).conservative else "direct"
        except KeyError:  # a config of the user's own
            forces = "-"
        out[label] = {"mean": mean, "std": std, "seeds": [r["seed"] for r in rs], "params": rs[0]["params"],
                      "forces": forces,
                      "steps": rs[0]["steps"], "train_s": float(train_s.mean()),
                      "train_s_std": float(train_s.std(ddof=1)) if len(rs) > 1 else 0.0,
                      "curves": [r["curve"] for r in rs]}
    return out


def seeded_markdown(agg: dict) -> str:
    """Table 1 with mean ± std over seeds, then force cosine / EFwT means, then cost per model."""
    lines = ["| model | seeds | " + " | ".join(f"{t} E | {t} F" for t in SPLIT_TITLES) + " |",
             "|---|---|" + "---|---|" * len(SPLIT_TITLES)]
    for label, a in agg.items():
        one = len(a["seeds"]) == 1  # no spread to show: the value alone, not "± 0.0"
        cells = [f"{a['mean'][t][c]:.1f}" + ("" if one else f" ± {a['std'][t][c]:.1f}")
                 for t in SPLIT_TITLES for c in ("energy_mae_meV", "forces_mae_meV_per_A")]
        lines.append(f"| {label} | {len(a['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "| model | " + " | ".join(f"{t} cos | {t} EFwT %" for t in SPLIT_TITLES) + " |",
              "|---|" + "---|---|" * len(SPLIT_TITLES)]
    for label, a in agg.items():
        cells = [f"{a['mean'][t]['forces_cos']:.3f}" if c == 0 else f"{a['mean'][t]['efwt_percent']:.2f}"
                 for t in SPLIT_TITLES for c in (0, 1)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| model | forces | params | steps | train wall s (mean ± std) | val F at end (meV/Å) |",
              "|---|---|---|---|---|---|"]
    for label, a in agg.items():
        ends = [c[-1][1] * 1000 for c in a["curves"] if c]
        end = f"{np.mean(ends):.1f}" if ends else "-"
        lines.append(f"| {label} | {a['forces']} | {a['params']} | {a['steps']} | "
                     f"{a['train_s']:.0f}" + ("" if len(a["seeds"]) == 1 else f" ± {a['train_s_std']:.0f}") + f" | {end} |")
    return "\n".join(lines) + "\n"


def mean_curve(a: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, seed-mean val force MAE in meV/Å) over the validations every seed has."""
    curves = [c for c in a["curves"] if c]
    if not curves:
        return np.array([]), np.array([])
    n = min(len(c) for c in curves)
    steps = np.array([s for s, _ in curves[0][:n]], dtype=float)
    return steps, np.array([[v * 1000 for _, v in c[:n]] for c in curves]).mean(0)


def equal_time_markdown(agg: dict, step_ms: dict[str, float], reference: str = "LEIGNN") -> str:
    """Val force MAE of every model after the wall time ``reference`` took for its steps.

    ``step_ms``: training-step time per model label (the efficiency benchmark, measured alone on
    one machine, not the line-up's contended wall times). A model x times slower than the
    reference gets steps / x steps, read off its learning curve (log-linear between validations);
    one faster than the reference would need more steps than were trained: its value at the end
    is an upper bound (<=), and before the first validation a lower bound (>=).
    """
    ref = agg[reference]
    t_ref = ref["steps"] * step_ms[reference]
    lines = [f"| model | step ms (benchmark) | steps in {reference}'s {ref['steps']} steps' time | "
             "val_id force MAE then (meV/Å) | at the end of its own steps |", "|---|---|---|---|---|"]
    for label, a in agg.items():
        steps, vals = mean_curve(a)
        if label not in step_ms or not len(steps):
            lines.append(f"| {label} | - | - | - | - |")
            continue
        k = t_ref / step_ms[label]
        if k >= steps[-1]:
            at = f"<= {vals[-1]:.0f}" if k > steps[-1] * 1.01 else f"{vals[-1]:.0f}"
        elif k < steps[0]:
            at = f">= {vals[0]:.0f}"
        else:
            at = f"{np.exp(np.interp(k, steps, np.log(vals))):.0f}"
        lines.append(f"| {label} | {step_ms[label]:.0f} | {k:.0f} | {at} | {vals[-1]:.0f} |")
    return "\n".join(lines) + "\n"


def learning_curves_png(agg: dict, path: Path, title: str = "") -> None:
    """Validation force MAE against training step, one line per model (seed mean, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (m, a) in enumerate(agg.items()):
        curves = [c for c in a["curves"] if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        vals = np.array([[v * 1000 for _, v in c[:n]] for c in curves])  # [seeds, evals], meV/Å
        ax.plot(steps, vals.mean(0), color=f"C{i % 10}", label=m, lw=1.5, ls="-" if i < 10 else "--")  # 10 colours
        ax.fill_between(steps, vals.min(0), vals.max(0), color=f"C{i % 10}", alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("val_id force MAE (meV/Å), seed mean, band min..max")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_seeded_outputs(rows: list[dict], out: Path, title: str = "", note: str = "") -> str:
    """<out>/table1.{md,csv,json,png} and <out>/learning_curves.png from line-up row files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    md = (f"# {title}\n\n" if title else "") + (note + "\n\n" if note else "") + seeded_markdown(agg)
    (out / "table1.md").write_text(md)
    with open(out / "table1.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "split", "n_seeds", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")),
                    "params", "steps", "train_s_mean", "train_s_std"])
        for m, a in agg.items():
            for t in SPLIT_TITLES:
                w.writerow([m, t, len(a["seeds"]),
                            *(f"{a[s][t][c]:.6g}" for c in COLUMNS for s in ("mean", "std")),
                            a["params"], a["steps"], f"{a['train_s']:.1f}", f"{a['train_s_std']:.1f}"])
    (out / "table1.json").write_text(json.dumps(agg, indent=1))
    bar_chart({m: a["mean"] for m, a in agg.items()}, out / "table1.png", title,
              std={m: a["std"] for m, a in agg.items()},
              labels={m: f"{m} ({len(a['seeds'])} seeds)" for m, a in agg.items()})
    learning_curves_png(agg, out / "learning_curves.png", title)
    return md
