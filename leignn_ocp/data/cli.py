"""Generate the embedded offline OC20-style S2EF dataset (train + OC20's four val splits).

    leignn-generate-data --out data/default --seed 0          # the default
    leignn-generate-data --out data/big --train-systems 600 --val-systems 60
    leignn-generate-data --out data/chgnet --calculator chgnet  # slower, PBE-like labels

(``python scripts/generate_data.py ...`` is the same command.)
Writes <out>/s2ef/{train,val_id,val_ood_ads,val_ood_cat,val_ood_both}/{data.lmdb,metadata.npz} and
<out>/s2ef/summary.json. If <out> already holds data made with the same arguments it says so and
exits at once (cheap to call before every training run); --force regenerates. The whole s2ef/
folder is replaced atomically, so an interrupted run leaves the previous data (or none) intact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .generate import SPLITS, GenConfig, existing_matches, generate

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _millers(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if len(tok) != 3 or not tok.isdigit():
            raise argparse.ArgumentTypeError(f"Miller index {tok!r}: write three digits, e.g. 111,100,110,211")
        out.append(tuple(int(c) for c in tok))
    return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
    d = GenConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/default", help="output root; data goes to <out>/s2ef/")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calculator", default=d.calculator, help="emt | chgnet | package.module:ClassName")
    p.add_argument("--train-systems", type=int, default=d.train_systems, help="relaxations kept in train")
    p.add_argument("--val-systems", type=int, default=d.val_systems, help="relaxations kept per val split")
    p.add_argument("--frames-per-system", type=int, default=d.frames_per_system,
                   help="relaxation frames sampled per relaxation")
    p.add_argument("--rattled-per-system", type=int, default=d.rattled_per_system,
                   help="rattled (perturbed) frames per relaxation")
    p.add_argument("--rattle-std", type=float, default=d.rattle_std, help="A, free atoms only")
    p.add_argument("--fmax", type=float, default=d.fmax, help="BFGS force criterion, eV/A")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="BFGS steps per relaxation")
    p.add_argument("--millers", type=_millers, default=d.millers, help="facets, e.g. 111,100,110,211")
    p.add_argument("--ood-ads-frac", type=float, default=d.ood_ads_frac)
    p.add_argument("--ood-cat-frac", type=float, default=d.ood_cat_frac)
    p.add_argument("--rigid-adsorbate", choices=("auto", "on", "off"), default=d.rigid_adsorbate,
                   help="sample with the adsorbate held rigid (auto: on for emt, whose C/H/N/O breaks it)")
    p.add_argument("--keep-anomalies", action="store_true",
                   help="keep dissociated/desorbed/... relaxations (field `anomaly`) instead of dropping")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes (does not change the output)")
    p.add_argument("--force", action="store_true", help="regenerate even if matching data exists")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def generate_main(argv=None) -> int:
    """``leignn-generate-data``: returns the exit code (0 done or already there, 2 bad arguments)."""
    a = parse_args(argv)
    # numpy and torch are loaded by now (the package imports torch), so these only reach libraries
    # loaded later and child processes; generate() itself holds BLAS/OpenMP at one thread
    for var in THREAD_ENV:
        os.environ.setdefault(var, "1")
    try:
        cfg = GenConfig(
            seed=a.seed, calculator=a.calculator, train_systems=a.train_systems, val_systems=a.val_systems,
            frames_per_system=a.frames_per_system, rattled_per_system=a.rattled_per_system,
            rattle_std=a.rattle_std, fmax=a.fmax, max_steps=a.max_steps, millers=a.millers,
            ood_ads_frac=a.ood_ads_frac, ood_cat_frac=a.ood_cat_frac, rigid_adsorbate=a.rigid_adsorbate,
            keep_anomalies=a.keep_anomalies,
        )
    except ValueError as exc:
        print(f"[generate_data] error: {exc}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if not a.force and existing_matches(out, cfg):
        print(f"[generate_data] {out / 's2ef'} already holds this dataset (same arguments); "
              "nothing to do (--force regenerates)")
        return 0
    if (out / "s2ef").exists() and not a.force:
        print(f"[generate_data] {out / 's2ef'} exists but was made with other arguments; regenerating")
    t0 = time.perf_counter()
    summary = generate(cfg, out, workers=max(1, a.workers), progress=not a.no_progress)
    wall = time.perf_counter() - t0
    print(f"[generate_data] wrote {out / 's2ef'} in {wall:.1f} s ({a.workers} workers, calculator {cfg.calculator})")
    for s in SPLITS:
        sp, fl = summary["splits"][s], summary["filtered"][s]
        reasons = ", ".join(f"{k} {fl[k]}" for k in ("dissociated", "desorbed", "surface_changed", "intercalated")
                            if fl[k]) or "none"
        print(f"  {s:13s} {sp['frames']:6d} frames  {sp['systems']:4d} relaxations  "
              f"natoms {sp['natoms_min']}-{sp['natoms_max']}  filtered {fl['anomalous']}/{fl['candidates_tried']} "
              f"({reasons})")
    print(json.dumps({"summary": str(out / "s2ef" / "summary.json")}))
    return 0


main = generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
