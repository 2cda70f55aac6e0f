"""``leignn-benchmark``: LEIGNN's cost next to fairchem's baselines, the way the paper's Fig. 4
compares them.

Every model in its OC20-200K configuration (``--config-dir``, default configs/s2ef/200k, read
by fairchem's loader), all on the same batch of OC20-like slab+adsorbate structures, all timed
in one process, round-robin (one repeat of every model before the next repeat of any), after
warm-up. Reported per model: parameters, graph edges, FLOPs of one forward (torch's
FlopCounterMode), median training-step time (forward + the recipe's fairchem losses incl.
autograd forces where the model uses them + backward + gradient clipping + the recipe's
optimizer step), median inference time (torch.no_grad for direct-force models; energy-gradient
models need autograd), peak memory, throughput in atoms/s, and time ratios to LEIGNN. Also the
achieved FLOP rate of LEIGNN's training step as a fraction of a dense float32 matmul timed in
the same round-robin.

CPU defaults: 1 thread (on a shared machine a second OpenMP thread that loses its core makes
every parallel region wait; single-threaded timings are stable; --threads 0 = torch's default),
glibc malloc tuned so that no model page-faults its tensors anew at every step
(leignn_ocp.benchmark.harness.tune_malloc; --no-malloc-tuning to compare), fused AdamW for
every model. Medians of wall-clock time, and of process CPU time as a second table.

    leignn-benchmark                                  # CPU, defaults (~5 min)
    leignn-benchmark --device cuda --batch-size 32 --repeats 20
    leignn-benchmark --tiny --out /tmp/x              # seconds; what the tests run
    leignn-benchmark --regime small                   # molecules + small cells, default + 200k sizes (~3 min)
    leignn-benchmark --regime scaling                 # one slab of 100 ... 20,000 atoms per step

The small end (``--workload molecules|cells``, or ``--regime small`` for both at the
configs/s2ef/default and configs/s2ef/200k sizes): LEIGNN, PaiNN (direct forces) and SchNet
train on 8 small structures and infer on one (the MD case, ``--infer-batch-size``), and every
step is split into graph construction, input checks, the model's own compute, loss, backward
and optimizer step (leignn_ocp.benchmark.profile), with a torch.profiler op table per model and
mode.

(also ``python -m leignn_ocp.benchmark`` and ``python scripts/benchmark_efficiency.py``).
Outputs in --out (default results/efficiency/<device>; small workloads
results/efficiency/<device>/<workload>_<config folder>, --regime small
results/efficiency/<device>/small with one such folder per run): benchmark.csv, benchmark.md,
benchmark.png (Fig. 4 style), benchmark.json (raw timings); with the breakdown also
breakdown.csv, breakdown.md, breakdown.png and profile_<model>_<train|infer>.txt (a regime writes
one breakdown of all its runs at its top).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from leignn_ocp import lineup
from leignn_ocp.benchmark.harness import DEFAULT_CONFIG_DIR, DEFAULT_MODELS, Settings, run_benchmark, tune_malloc
from leignn_ocp.benchmark.report import write_breakdown, write_outputs
from leignn_ocp.benchmark.structures import WORKLOADS

SMALL_MODELS = ("leignn", "painn_direct", "schnet")
SMALL_CONFIG_DIRS = ("configs/s2ef/default", "configs/s2ef/200k")
REGIMES = {"small": ("molecules", "cells"), "scaling": ()}  # scaling: leignn_ocp.benchmark.scaling


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leignn-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--models", default=None,
                   help="comma-separated subset of: " + ",".join(DEFAULT_MODELS) + " (LEIGNN is always run; "
                        "default all, small workloads " + ",".join(SMALL_MODELS) + ")")
    p.add_argument("--config-dir", default=None,
                   help="folder with one <model>.yml per line-up entry, relative to the working directory "
                        f"(default {DEFAULT_CONFIG_DIR}; --regime small: {','.join(SMALL_CONFIG_DIRS)}); "
                        "comma-separated folders are run one after the other")
    p.add_argument("--workload", default="oc20", choices=WORKLOADS,
                   help="oc20: OC20-like slabs (default); molecules: 9-22 atom molecules; cells: 2-24 atom bulk cells")
    p.add_argument("--regime", default=None, choices=sorted(REGIMES),
                   help="small: the molecules and cells workloads (overrides --workload); scaling: one slab per step, 100 to 20,000 atoms (--sizes)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures per training batch (default: 2 on CPU, 32 on CUDA; small workloads 8 / 64)")
    p.add_argument("--infer-batch-size", type=int, default=None,
                   help="structures per inference batch (default: the training batch; small workloads 1, the MD case)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                   help="time per phase + torch.profiler tables (default: on for small workloads)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="steps per model and mode under torch.profiler (default 5, tiny 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed round-robin repeats (default: 7 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed round-robin repeats first (default: 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 on CPU, see above; 0 = torch's default)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default allocator settings (see harness.tune_malloc)")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="size of the reference matmul (default 2048; 8192 on CUDA)")
    p.add_argument("--compile", action="store_true", help="also time LEIGNN inference under torch.compile")
    p.add_argument("--fragment", action="store_true",
                   help="also time LEIGNN with global_scope: fragment (globals per connected component)")
    p.add_argument("--amp", action="store_true",
                   help="also run LEIGNN under autocast (train + infer) and report its error vs float32")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="autocast dtype for --amp (float16 trains with a GradScaler)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--sizes", default=None,
                   help="--regime scaling: atoms per structure, comma-separated (default 100,...,20000)")
    p.add_argument("--memory-limit-gb", type=float, default=16.0,
                   help="--regime scaling: skip a model's sizes whose extrapolated memory passes this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny models and structures (for tests; numbers meaningless)")
    p.add_argument("--out", default=None, help="output folder (default results/efficiency/<device>)")
    return p


def runs_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[Settings]:
    """One Settings per (workload, config folder) the arguments ask for, in run order."""
    for flag in ("batch_size", "infer_batch_size", "profile_steps", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    workloads = REGIMES[args.regime] if args.regime else (args.workload,)
    if args.config_dir:
        dirs = [d.strip() for d in args.config_dir.split(",") if d.strip()]
    else:
        dirs = list(SMALL_CONFIG_DIRS) if args.regime else [DEFAULT_CONFIG_DIR]
    for d in dirs:
        if not Path(d).is_dir():
            p.error(f"--config-dir {d}: no such folder (relative to {Path.cwd()}); run from "
                    f"the repository root or pass the configs folder, e.g. --config-dir <repo>/{DEFAULT_CONFIG_DIR}")
    small = all(w != "oc20" for w in workloads)
    names = args.models or ",".join(SMALL_MODELS if small else DEFAULT_MODELS)
    models = [m.strip() for m in names.split(",") if m.strip()]
    unknown = [m for m in models if not _known(m)]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(DEFAULT_MODELS)}")
    return [Settings(device=args.device, models=tuple(models), config_dir=d,
                     batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                     matmul_n=args.matmul_n, compile=args.compile, fragment=args.fragment, amp=args.amp,
                     amp_dtype=args.amp_dtype, memory=not args.no_memory, seed=args.seed, tiny=args.tiny,
                     workload=w, infer_batch_size=args.infer_batch_size, breakdown=args.breakdown,
                     profile_steps=args.profile_steps)
            for w in workloads for d in dirs]


def run_folder(s: Settings, several: bool) -> str:
    """Subfolder of one run: "" for a single OC20 run, else <workload>_<config folder name>."""
    return f"{s.workload}_{Path(s.config_dir).name}" if several or s.workload != "oc20" else ""


def _scaling(args: argparse.Namespace) -> int:
    """--regime scaling: one structure of growing size per step (leignn_ocp.benchmark.scaling), in
    the process main has set up (threads, allocator, quiet logs)."""
    from leignn_ocp.benchmark import scaling

    models = [m.strip() for m in (args.models or ",".join(scaling.MODELS)).split(",") if m.strip()]
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else list(scaling.SIZES)
    out = Path(args.out or Path("results") / "efficiency" / "cpu" / "scaling")
    scaling.run(models, sizes, args.config_dir or "configs/s2ef/default", repeats=args.repeats or 2,
                memory_limit_gb=args.memory_limit_gb, out=out, log=log)
    log(f"wrote {out}/scaling.{{csv,json,md,png}}")
    return 0


def _known(name: str) -> bool:
    try:
        lineup.get(name)
    except KeyError:
        return False
    return True


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    runs = None if args.regime == "scaling" else runs_from_args(args, p)
    argv = sys.argv[1:] if argv is None else list(argv)

    import torch

    # The process is the benchmark's: quiet fairchem's warnings, fix threads and the allocator.
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    cuda = args.device.startswith("cuda")
    threads = args.threads if args.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    malloc_tuned = not cuda and not args.no_malloc_tuning and tune_malloc()
    if runs is None:
        return _scaling(args)

    out = Path(args.out or Path("results") / "efficiency" / args.device.replace(":", "")
               / ("small" if args.regime == "small" else ""))
    several = len(runs) > 1
    breakdown = []
    for s in runs:
        if several:
            log(f"run: {s.workload} at {s.config_dir}")
        try:
            result = run_benchmark(s, log=log, command=" ".join(["leignn-benchmark", *argv]),
                                   malloc_tuned=malloc_tuned)
        except FileNotFoundError as err:  # a config missing from --config-dir
            p.error(str(err))
        folder = out / run_folder(s, several)
        write_outputs(folder, result.rows, result.meta, result.raw, result.breakdown, result.profiles)
        breakdown += result.breakdown
        print((folder / "benchmark.md").read_text())
        if result.breakdown:
            print((folder / "breakdown.md").read_text())
        log(f"wrote {folder}/benchmark.{{csv,md,png,json}}"
            + (", breakdown.{csv,md,png}, profile_*.txt" if result.breakdown else ""))
    if several and breakdown:
        write_breakdown(out, breakdown, f"{result.meta['device_name']}")
        log(f"wrote {out}/breakdown.{{csv,md,png}} (all runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
