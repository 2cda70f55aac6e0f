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

(also ``python -m leignn_ocp.benchmark`` and ``python scripts/benchmark_efficiency.py``).
Outputs in --out (default results/efficiency/<device>): benchmark.csv, benchmark.md,
benchmark.png (Fig. 4 style), benchmark.json (raw timings).
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
from leignn_ocp.benchmark.report import write_outputs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leignn-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated subset of: " + ",".join(DEFAULT_MODELS) + " (LEIGNN is always run)")
    p.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR,
                   help="folder with one <model>.yml per line-up entry, relative to the working directory "
                        "(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="structures per batch (default: 2 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed round-robin repeats (default: 7 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed round-robin repeats first (default: 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: 1 on CPU, see above; 0 = torch's default)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default allocator settings (see harness.tune_malloc)")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the reference matmul (default 2048; 8192 on CUDA)")
    p.add_argument("--compile", action="store_true", help="also time LEIGNN inference under torch.compile")
    p.add_argument("--fragment", action="store_true",
                   help="also time LEIGNN with global_scope: fragment (globals per connected component)")
    p.add_argument("--amp", action="store_true",
                   help="also run LEIGNN under autocast (train + infer) and report its error vs float32")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="autocast dtype for --amp (float16 trains with a GradScaler)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny models and structures (for tests; numbers meaningless)")
    p.add_argument("--out", default=None, help="output folder (default results/efficiency/<device>)")
    return p


def settings_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> Settings:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if not _known(m)]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(DEFAULT_MODELS)}")
    if not Path(args.config_dir).is_dir():
        p.error(f"--config-dir {args.config_dir}: no such folder (relative to {Path.cwd()}); run from "
                f"the repository root or pass the configs folder, e.g. --config-dir <repo>/{DEFAULT_CONFIG_DIR}")
    return Settings(device=args.device, models=tuple(models), config_dir=args.config_dir,
                    batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                    matmul_n=args.matmul_n, compile=args.compile, fragment=args.fragment, amp=args.amp, amp_dtype=args.amp_dtype,
                    memory=not args.no_memory, seed=args.seed, tiny=args.tiny)


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
    settings = settings_from_args(args, p)
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

    try:
        result = run_benchmark(settings, log=log, command=" ".join(["leignn-benchmark", *argv]),
                               malloc_tuned=malloc_tuned)
    except FileNotFoundError as err:  # a config missing from --config-dir
        p.error(str(err))
    out = Path(args.out or Path("results") / "efficiency" / args.device.replace(":", ""))
    write_outputs(out, result.rows, result.meta, result.raw)
    print((out / "benchmark.md").read_text())
    log(f"wrote {out}/benchmark.{{csv,md,png,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
