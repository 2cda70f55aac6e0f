"""Generate the embedded offline OC20-style S2EF dataset (train + OC20's four val splits).

    leignn-generate-data --out data/default --seed 0          # the default
    leignn-generate-data --out data/big --train-systems 600 --val-systems 60
    leignn-generate-data --out data/chgnet --calculator chgnet  # slower, PBE-like labels

(``python scripts/generate_data.py ...`` is the same command.)
Writes <out>/s2ef/{train,val_id,val_ood_ads,val_ood_cat,val_ood_both}/{data.lmdb,metadata.npz} and
<out>/s2ef/summary.json. If <out> already holds data made with the same arguments it says so and
exits at once (cheap to call before every training run); --force regenerates. The whole s2ef/
folder is replaced atomically, so an interrupted run leaves the previous data (or none) intact.

The labelling runs in a child process whose numeric kernels are pinned before numpy loads
(:func:`pinned_env`): the same arguments give the same bytes, and so the same split sizes, on
every machine of one architecture with the same glibc, numpy (and its OpenBLAS), scipy and ASE.
``--native-kernels`` runs in this process with whatever the machine selects instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .generate import (IS2RS, PINNED_MARK, RIGID_MODES, SPLITS, THREAD_ENV, GenConfig, existing_matches, generate,
                       numpy_dispatch_features)

# glibc's libm picks exp/log/pow/sin variants by CPU (FMA/AVX2 ones differ in the last bit)
GLIBC_HWCAPS_MASK = "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-FMA4,-AVX"
# OpenBLAS picks its kernels by CPU (Zen, Haswell, SkylakeX ... differ in the last bit); these
# run on every CPU of their architecture
OPENBLAS_BASE_CORE = {"x86_64": "Prescott", "amd64": "Prescott", "aarch64": "ARMV8", "arm64": "ARMV8"}


def pinned_env(base: dict | None = None) -> dict:
    """The child's environment: every kernel choice that differs between CPUs of one architecture
    fixed to the one every such CPU has, and one thread (reductions split over threads round
    differently).

    Measured (docs/notes/data.md): OpenBLAS's Prescott and Zen kernels, and 1 vs 2 BLAS threads,
    give other bytes from dot and eigh, and the default data's split sizes changed with the kernel;
    glibc's exp/log/pow/sin change when FMA/AVX2 are masked. Numpy's own SIMD loops are switched
    to its baseline too (its AVX-512 float64 exp/log are not glibc's)."""
    env = dict(os.environ if base is None else base)
    env.update({var: "1" for var in THREAD_ENV})
    env[PINNED_MARK] = "1"
    env["ATEN_CPU_CAPABILITY"] = "default"  # torch's vectorised kernels (AtomsToGraphs' casts)
    core = OPENBLAS_BASE_CORE.get(platform.machine().lower())
    if core is not None:
        env["OPENBLAS_CORETYPE"] = core
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(numpy_dispatch_features())
    if platform.machine().lower() in ("x86_64", "amd64"):
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), GLIBC_HWCAPS_MASK) if t)
    return env


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
    p.add_argument("--minimum-rattle-stds", type=float, nargs="*", default=list(d.minimum_rattle_stds),
                   metavar="STD", help="A: one rattled copy of each relaxation's last frame per value (none: no copies)")
    p.add_argument("--pressed-per-system", type=int, default=d.pressed_per_system,
                   help="frames per relaxation with the adsorbate pushed into the slab (then rattled)")
    p.add_argument("--pressed-min-contact", type=float, default=d.pressed_min_contact,
                   help="pushed until the closest adsorbate-slab distance is a random fraction in [this, 1) of the frame's")
    p.add_argument("--fmax", type=float, default=d.fmax, help="BFGS force criterion, eV/A")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="BFGS steps per relaxation")
    p.add_argument("--millers", type=_millers, default=d.millers, help="facets, e.g. 111,100,110,211")
    p.add_argument("--ood-ads-frac", type=float, default=d.ood_ads_frac)
    p.add_argument("--ood-cat-frac", type=float, default=d.ood_cat_frac)
    p.add_argument("--rigid-adsorbate", choices=RIGID_MODES, default=d.rigid_adsorbate,
                   help="hold the adsorbate rigid while sampling: on, off, or as_needed (free, rigid only where "
                        "the free relaxation breaks it); auto: as_needed for emt, whose C/H/N/O breaks most "
                        "adsorbates, else off")
    p.add_argument("--broken-frames-per-system", type=int, default=d.broken_frames_per_system,
                   help="as_needed: frames kept, flagged `anomaly`, from a free relaxation that broke")
    p.add_argument("--is2rs-systems", type=int, default=d.is2rs_systems,
                   help="reference relaxations in <out>/is2rs (free, converged, unbroken; 0: none)")
    p.add_argument("--is2rs-max-steps", type=int, default=d.is2rs_max_steps,
                   help="BFGS steps of an IS2RS reference relaxation")
    p.add_argument("--is2rs-max-adsorbate-atoms", type=int, default=d.is2rs_max_adsorbate_atoms,
                   help="IS2RS adsorbates have at most this many atoms (EMT breaks larger ones)")
    p.add_argument("--small-adsorbate-share", type=float, default=d.small_adsorbate_share,
                   help="share of each S2EF split's candidates drawn from the adsorbates of at most "
                        "--is2rs-max-adsorbate-atoms atoms (EMT relaxes those whole: free relaxations, minima)")
    p.add_argument("--keep-anomalies", action="store_true",
                   help="keep dissociated/desorbed/... relaxations (field `anomaly`) instead of dropping")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes (does not change the output)")
    p.add_argument("--force", action="store_true", help="regenerate even if matching data exists")
    p.add_argument("--native-kernels", action="store_true",
                   help="label in this process with the kernels this CPU selects (faster BLAS, but the "
                        "bytes and split sizes then depend on the machine)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def generate_main(argv=None) -> int:
    """``leignn-generate-data``: returns the exit code (0 done or already there, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    try:
        cfg = GenConfig(
            seed=a.seed, calculator=a.calculator, train_systems=a.train_systems, val_systems=a.val_systems,
            frames_per_system=a.frames_per_system, rattled_per_system=a.rattled_per_system,
            rattle_std=a.rattle_std, minimum_rattle_stds=tuple(a.minimum_rattle_stds),
            pressed_per_system=a.pressed_per_system, pressed_min_contact=a.pressed_min_contact, fmax=a.fmax, max_steps=a.max_steps, millers=a.millers,
            ood_ads_frac=a.ood_ads_frac, ood_cat_frac=a.ood_cat_frac, rigid_adsorbate=a.rigid_adsorbate,
            keep_anomalies=a.keep_anomalies, broken_frames_per_system=a.broken_frames_per_system,
            is2rs_systems=a.is2rs_systems, is2rs_max_steps=a.is2rs_max_steps,
            is2rs_max_adsorbate_atoms=a.is2rs_max_adsorbate_atoms, small_adsorbate_share=a.small_adsorbate_share,
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
    if not a.native_kernels and os.environ.get(PINNED_MARK) != "1":
        # numpy and torch are loaded by now (the package imports torch) and have read their
        # environment: only a new process gets the pinned kernels
        sys.stdout.flush()
        return subprocess.run([sys.executable, "-m", "leignn_ocp.data.cli", *argv, "--force"],
                              env=pinned_env()).returncode
    # one worker labels in this process, under generate()'s one-thread limits; forked workers
    # inherit them, and these variables reach any library loaded later
    for var in THREAD_ENV:
        os.environ.setdefault(var, "1")
    t0 = time.perf_counter()
    summary = generate(cfg, out, workers=max(1, a.workers), progress=not a.no_progress)
    wall = time.perf_counter() - t0
    print(f"[generate_data] wrote {out / 's2ef'} in {wall:.1f} s ({a.workers} workers, calculator {cfg.calculator})")
    for s in SPLITS:
        sp, fl = summary["splits"][s], summary["filtered"][s]
        reasons = ", ".join(f"{k} {fl[k]}" for k in ("dissociated", "desorbed", "surface_changed", "intercalated")
                            if fl[k]) or "none"
        print(f"  {s:13s} {sp['frames']:6d} frames  {sp['systems']:4d} relaxations "
              f"({sp['systems_sampled_free']} free, {sp['systems_sampled_rigid']} rigid, {sp['broken_frames']} "
              f"flagged broken frames)  near-minimum {100 * sp['near_minimum_share']:.1f} %  "
              f"natoms {sp['natoms_min']}-{sp['natoms_max']}  filtered {fl['anomalous']}/{fl['candidates_tried']} "
              f"({reasons})")
    if IS2RS in summary:
        r = summary[IS2RS]
        print(f"  {IS2RS:13s} {r['systems']:6d} reference relaxations of {r['candidates_tried']} tried "
              f"(dropped: {', '.join(f'{k} {v}' for k, v in r['dropped'].items()) or 'none'})  {r['path']}")
    print(json.dumps({"summary": str(out / "s2ef" / "summary.json")}))
    return 0


main = generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
