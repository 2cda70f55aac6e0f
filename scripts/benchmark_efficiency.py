#!/usr/bin/env python
"""LEIGNN's cost next to fairchem's baselines, the way the paper's Fig. 4 compares them.

Every model in its OC20-200K configuration (read from configs/s2ef/200k/*.yml), all on the
same batch of OC20-like slab+adsorbate structures, all timed in one process, round-robin
(one repeat of every model before the next repeat of any), after warm-up. Reported per
model: parameters, graph edges, FLOPs of one forward (torch's FlopCounterMode), median
training-step time (forward + loss incl. autograd forces where the model uses them +
backward + gradient clipping + AdamW step), median inference time (torch.no_grad for
direct-force models; energy-gradient models need autograd), peak memory, throughput in
atoms/s, and time ratios to LEIGNN. Also the achieved FLOP rate of LEIGNN's training step
as a fraction of a dense float32 matmul timed in the same round-robin.

CPU defaults: 1 thread (on a shared machine a second OpenMP thread that loses its core makes
every parallel region wait; single-threaded timings are stable; --threads 0 = torch's default),
glibc malloc tuned so that no model page-faults its tensors anew at every step (see
leignn_ocp.bench.tune_malloc; --no-malloc-tuning to compare), fused AdamW for every model.
Medians of wall-clock time, and of process CPU time as a second table (robust to other load).

    python scripts/benchmark_efficiency.py                      # CPU, defaults (~5 min)
    python scripts/benchmark_efficiency.py --device cuda --batch-size 32 --repeats 20
    python scripts/benchmark_efficiency.py --tiny --out /tmp/x  # seconds; what the tests run

Outputs in --out (default results/efficiency/<device>): benchmark.csv, benchmark.md,
benchmark.png (Fig. 4 style), benchmark.json (raw timings).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from leignn_ocp import bench  # noqa: E402

COLUMNS = [
    "model", "label", "params", "edges", "gflop_fwd", "gflop_train",
    "train_ms", "infer_ms", "train_atoms_per_s", "infer_atoms_per_s",
    "peak_mem_train_mb", "peak_mem_infer_mb", "train_x_leignn", "infer_x_leignn",
    "train_cpu_ms", "infer_cpu_ms", "train_cpu_x_leignn", "infer_cpu_x_leignn",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--models", default=",".join(bench.MODELS), help="comma-separated subset of: " + ",".join(bench.MODELS))
    p.add_argument("--batch-size", type=int, default=None, help="structures per batch (default: 2 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed round-robin repeats (default: 7 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed round-robin repeats first (default: 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 on CPU, see the docstring; 0 = torch's default)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default allocator settings (see leignn_ocp.bench.tune_malloc)")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the reference matmul (default 2048; 8192 on CUDA)")
    p.add_argument("--compile", action="store_true", help="also time LEIGNN inference under torch.compile")
    p.add_argument("--amp", action="store_true",
                   help="also run LEIGNN under autocast (train + infer) and report its error vs float32")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="autocast dtype for --amp (float16 trains with a GradScaler)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny models and structures (for tests; numbers meaningless)")
    p.add_argument("--out", default=None, help="output folder (default results/efficiency/<device>)")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.batch_size = a.batch_size or (1 if a.tiny else (32 if cuda else 2))
    a.repeats = a.repeats or (1 if a.tiny else (20 if cuda else 7))
    if a.threads is None:
        a.threads = 0 if cuda else 1
    a.warmup = a.warmup if a.warmup is not None else (0 if a.tiny else (5 if cuda else 1))
    a.matmul_n = a.matmul_n or (128 if a.tiny else (8192 if cuda else 2048))
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in a.models if m not in bench.MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(bench.MODELS)}")
    if "leignn" not in a.models:
        a.models.insert(0, "leignn")  # ratios are to LEIGNN
    a.out = Path(a.out or REPO / "results" / "efficiency" / a.device.replace(":", ""))
    return a


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(x, nd=1):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{nd}f}"


def write_outputs(args, rows, meta, raw) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    with open(args.out / "benchmark.json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": raw}, f, indent=1, default=str)

    lines = [
        f"# LEIGNN efficiency benchmark ({meta['device_name']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Batch: {meta['batch_structures']} OC20-like slab+adsorbate structures, {meta['batch_atoms']} atoms "
        f"(periodic, otf graphs). torch {meta['torch']}, {meta['threads']} thread(s)"
        + (", glibc malloc tuned (no mmap, no trim)" if meta.get("malloc_tuned") else "")
        + f". Medians of {args.repeats} round-robin repeats after {args.warmup} warm-up; wall-clock time.",
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
    if meta["device"].startswith("cpu"):
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
        "Train step = forward + loss (energy + free-atom forces, each model's own loss functions and",
        "coefficients; autograd forces with create_graph for energy-gradient models) + backward +",
        f"gradient clipping + {meta.get('optimizer', 'AdamW')} step (the recipes' amsgrad, lr, clip; the fused",
        "kernel is the same update as the default loop, in one pass). Inference under torch.no_grad except for energy-gradient",
        "models (SchNet, DimeNet++, PaiNN), which need autograd for forces. Graph construction",
        "(fairchem's radius_graph_pbc) is part of every forward.",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode (matmul/bmm/conv only: elementwise ops,",
        "gathers and scatters are not counted); 'fwd' includes the force gradient where forces are",
        "-dE/dx, 'train' is forward + backward of one training step. They are the FLOPs each",
        "implementation executes: LEIGNN's CPU path multiplies each chunk of edges only with the",
        "radial-basis columns that are not negligible for it (model.py, RadialFilter), so its",
        "W(rbf) products are about a fifth of the dense ones; baselines run fairchem's code as is.",
        f"Peak memory: {meta['memory_method']}",
        "",
        f"Dense float32 matmul ({args.matmul_n}×{args.matmul_n}), median over the same round-robin: "
        f"**{meta['matmul_gflops']:.1f} GFLOP/s**.",
        f"LEIGNN training step: {meta['leignn_train_gflop']:.2f} GFLOP in {meta['leignn_train_ms']:.1f} ms = "
        f"**{meta['leignn_train_gflops']:.1f} GFLOP/s = {100 * meta['leignn_matmul_fraction']:.1f} % of the matmul rate**.",
    ]
    if meta["device"].startswith("cpu"):
        lines.append(
            f"By process CPU time: {meta['leignn_train_gflops_cpu_time']:.1f} GFLOP/s vs. "
            f"{meta['matmul_gflops_cpu_time']:.1f} GFLOP/s = {100 * meta['leignn_matmul_fraction_cpu_time']:.1f} %.")
    for note in meta.get("notes", []):
        lines += ["", note]
    (args.out / "benchmark.md").write_text("\n".join(lines) + "\n")
    plot(args, rows, meta)


def plot(args, rows, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    main = [r for r in rows if r["model"] in bench.MODELS]
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
        mae = bench.PUBLISHED_ID_FORCE_MAE.get(r["model"])
        if mae is None:
            continue
        ax2.scatter(r["train_ms"], mae, s=40 + 3 * r["params"] / 1e5,
                    color="#c0392b" if r["model"] == "leignn" else "#555555", alpha=0.8)
        # Vanilla and Vanilla+NMU share one MAE and about one cost: labels above / below
        dx, dy, ha = {"vanilla": (-6, -12, "right"), "vanilla_nmu": (6, 6, "left"),
                      "leignn": (10, -4, "left")}.get(r["model"], (5, 4, "left"))
        ax2.annotate(r["label"], (r["train_ms"], mae), textcoords="offset points", xytext=(dx, dy),
                     ha=ha, fontsize=8)
    ax2.set_xscale("log")
    ax2.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xlabel("training step (ms, log; this run)")
    ax2.set_ylabel("OC20-200K ID force MAE (meV/Å, published)")
    ax2.set_title("cost vs. accuracy (marker size ~ parameters)")
    fig.tight_layout()
    fig.savefig(args.out / "benchmark.png", dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc_tuned = device.type == "cpu" and not args.no_malloc_tuning and bench.tune_malloc()
    torch.manual_seed(args.seed)

    atoms = bench.oc20_like_structures(args.batch_size, seed=args.seed, tiny=args.tiny)
    batch = bench.make_batch(atoms, device)
    n_atoms = int(batch.pos.shape[0])
    log(f"{len(atoms)} structures, {n_atoms} atoms on {device}; models: {', '.join(args.models)}")

    runners: dict[str, bench.Runner] = {}
    rows: dict[str, dict] = {}
    for name in args.models:
        spec = bench.model_spec(name, tiny=args.tiny)
        model = bench.build_model(spec, device, seed=args.seed)
        nsf = bench.fit_scale_factors(model, batch)
        runners[name] = bench.Runner(spec, model, batch, device)
        rows[name] = {"model": name, "label": spec.label, "params": bench.count_params(model),
                      "edges": bench.num_edges(model, batch)}
        log(f"built {spec.label}: {rows[name]['params']:,} params, {rows[name]['edges']:,} edges"
            + (f", {nsf} scale factors fitted" if nsf else ""))

    extra: dict[str, bench.Runner] = {}
    notes = []
    if args.amp:
        spec = bench.model_spec("leignn", tiny=args.tiny)
        amp_dtype = getattr(torch, args.amp_dtype)
        r = bench.Runner(spec, runners["leignn"].model, batch, device, amp=True, amp_dtype=amp_dtype)
        ref = runners["leignn"].infer()
        out = r.infer()
        de = (out["energy"].float() - ref["energy"]).abs()
        df = (out["forces"].float() - ref["forces"]).abs()
        short = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
        notes.append(
            f"{short} autocast vs float32, same (untrained) weights: |ΔE| max {de.max().item():.3g} "
            f"(|E| max {ref['energy'].abs().max().item():.3g}); |ΔF| mean {df.mean().item():.3g}, max "
            f"{df.max().item():.3g} (|F| mean {ref['forces'].abs().mean().item():.3g}, max "
            f"{ref['forces'].abs().max().item():.3g}). Readout heads and all sums run in float32.")
        extra[f"leignn_{short}"] = r
        rows[f"leignn_{short}"] = {**rows["leignn"], "model": f"leignn_{short}", "label": f"LEIGNN ({short} autocast)"}
    if args.compile:
        spec = bench.model_spec("leignn", tiny=args.tiny)
        r = bench.Runner(spec, runners["leignn"].model, batch, device)
        r.compiled = torch.compile(runners["leignn"].model, dynamic=True)
        t0 = time.perf_counter()
        ref = runners["leignn"].infer()
        out = r.infer()
        t_compile = time.perf_counter() - t0
        err = (out["forces"] - ref["forces"]).abs().max().item()
        notes.append(f"torch.compile (inductor) LEIGNN inference: first call incl. compilation "
                     f"{t_compile:.1f} s; max |ΔF| vs eager {err:.2g}.")
        extra["leignn_compiled"] = r
        rows["leignn_compiled"] = {**rows["leignn"], "model": "leignn_compiled", "label": "LEIGNN (torch.compile, infer)"}

    # ---- FLOPs
    for name, r in runners.items():
        rows[name]["gflop_fwd"] = r.flops_forward() / 1e9
        rows[name]["gflop_train"] = r.flops_train() / 1e9
    for name in extra:
        rows[name]["gflop_fwd"] = rows["leignn"]["gflop_fwd"]
        rows[name]["gflop_train"] = None if name == "leignn_compiled" else rows["leignn"]["gflop_train"]
    log("FLOPs counted")

    # ---- timing: round-robin, the order rotated every repeat; wall-clock and process CPU time
    probe = bench.MatmulProbe(args.matmul_n, device)
    all_names = list(runners) + list(extra)
    get = {**runners, **extra}
    t_train = {k: [] for k in all_names}  # [(wall s, cpu s)]
    t_infer = {k: [] for k in all_names}
    t_mm = []
    for rep in range(args.warmup + args.repeats):
        record = rep >= args.warmup
        k = rep % len(all_names)
        order = all_names[k:] + all_names[:k]
        for name in order:
            if name == "leignn_compiled":
                continue
            b = get[name]._fresh()
            dt = bench.timed(lambda: get[name].train_step(b), device)
            if record:
                t_train[name].append(dt)
        for name in order:
            b = get[name]._fresh()
            dt = bench.timed(lambda: get[name].infer(b), device)
            if record:
                t_infer[name].append(dt)
        dt = bench.timed(probe, device)
        if record:
            t_mm.append(dt)
            log(f"repeat {rep + 1 - args.warmup}/{args.repeats} (train/infer ms): " + ", ".join(
                f"{n} {1e3 * t_train[n][-1][0] if t_train[n] else float('nan'):.0f}/{1e3 * t_infer[n][-1][0]:.0f}"
                for n in all_names))
        else:
            log(f"warm-up {rep + 1}/{args.warmup} done")

    # ---- memory (separate pass, after timing)
    if device.type == "cuda":
        mem_method = ("torch.cuda.max_memory_allocated during one call minus the allocated memory "
                      "before it (tensors only; the caching allocator's reserve is not counted).")
    else:
        mem_method = ("process RSS (psutil) sampled every 0.5 ms by a thread during one call, minus the "
                      "RSS before it (after gc.collect + malloc_trim). Approximate: allocator reuse can hide part "
                      "of the peak; tracemalloc does not see torch tensors.")
    for name in all_names:
        r = get[name]
        if args.no_memory:
            rows[name]["peak_mem_train_mb"] = rows[name]["peak_mem_infer_mb"] = None
            continue
        if name != "leignn_compiled":
            b = r._fresh()
            rows[name]["peak_mem_train_mb"] = bench.peak_memory_bytes(lambda: r.train_step(b), device) / 2**20
        else:
            rows[name]["peak_mem_train_mb"] = None
        b = r._fresh()
        rows[name]["peak_mem_infer_mb"] = bench.peak_memory_bytes(lambda: r.infer(b), device) / 2**20
    if not args.no_memory:
        log("memory probed")

    def med(ts, i):  # median of wall (i=0) or CPU (i=1) seconds
        return bench.median([t[i] for t in ts]) if ts else math.nan

    lt, li = med(t_train["leignn"], 0), med(t_infer["leignn"], 0)
    lt_cpu, li_cpu = med(t_train["leignn"], 1), med(t_infer["leignn"], 1)
    for name in all_names:
        tr, ti = med(t_train[name], 0), med(t_infer[name], 0)
        tr_cpu, ti_cpu = med(t_train[name], 1), med(t_infer[name], 1)
        rows[name].update({
            "train_ms": 1e3 * tr, "infer_ms": 1e3 * ti,
            "train_atoms_per_s": n_atoms / tr, "infer_atoms_per_s": n_atoms / ti,
            "train_x_leignn": tr / lt, "infer_x_leignn": ti / li,
            "train_cpu_ms": 1e3 * tr_cpu, "infer_cpu_ms": 1e3 * ti_cpu,
            "train_cpu_x_leignn": tr_cpu / lt_cpu, "infer_cpu_x_leignn": ti_cpu / li_cpu,
        })

    mm = probe.rate(med(t_mm, 0))
    leignn_rate = rows["leignn"]["gflop_train"] * 1e9 / lt
    mm_cpu = probe.rate(med(t_mm, 1))  # the same ratio from process CPU time (CPU device)
    leignn_rate_cpu = rows["leignn"]["gflop_train"] * 1e9 / lt_cpu
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                dev_name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        dev_name = f"CPU: {dev_name}, {torch.get_num_threads()} thread(s)"
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else list(argv))),
        "device": str(device), "device_name": dev_name,
        "device_short": "GPU" if device.type == "cuda" else f"CPU ({torch.get_num_threads()} thread(s))",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batch_structures": len(atoms), "batch_atoms": n_atoms,
        "repeats": args.repeats, "warmup": args.warmup, "tiny": args.tiny,
        "matmul_n": args.matmul_n, "matmul_gflops": mm / 1e9,
        "leignn_train_gflop": rows["leignn"]["gflop_train"], "leignn_train_ms": 1e3 * lt,
        "leignn_train_gflops": leignn_rate / 1e9, "leignn_matmul_fraction": leignn_rate / mm,
        "matmul_gflops_cpu_time": mm_cpu / 1e9, "leignn_train_gflops_cpu_time": leignn_rate_cpu / 1e9,
        "leignn_matmul_fraction_cpu_time": leignn_rate_cpu / mm_cpu,
        "memory_method": mem_method, "notes": notes, "malloc_tuned": malloc_tuned,
        "optimizer": runners["leignn"].optimizer_name,
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    raw = {"train_wall_cpu_s": t_train, "infer_wall_cpu_s": t_infer, "matmul_wall_cpu_s": t_mm}
    ordered = [rows[n] for n in all_names]
    write_outputs(args, ordered, meta, raw)
    print((args.out / "benchmark.md").read_text())
    log(f"wrote {args.out}/benchmark.{{csv,md,png,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
