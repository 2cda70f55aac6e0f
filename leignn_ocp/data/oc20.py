"""The real OC20 S2EF data: download + preprocess with fairchem's own scripts, and the paper's splits.

  download  fairchem's download_data.py (wget, uncompress, preprocess_ef with reference energies
            subtracted, i.e. OC20's adsorption-energy targets) into OC20's layout under --data-path:
              data/s2ef/{200k,2M,all}/train     data/s2ef/all/val_{id,ood_ads,ood_cat,ood_both}
              data/s2ef/all/test_{id,ood_ads,ood_cat,ood_both}   (--split test: the unlabelled
                                                leaderboard LMDBs, as `leignn-evaluate predict` reads them)
            then metadata.npz with fairchem's make_lmdb_sizes (load balancing, max_atoms).
              leignn-oc20-data download --split 200k --split val --split test --num-workers 8
  paper     the LEIGNN paper's splits of S2EF-200K (deterministic for --seed):
              data/s2ef/200k_split/{train,val}   8:2 train / internal validation (160K / 40K)
              data/s2ef/50k/{train,val}          the 25 % subset (50K) split 8:2 (40K / 10K)
              leignn-oc20-data paper --src data/s2ef/200k/train --data-path data
  split     the same on any fairchem S2EF LMDB folder (e.g. the generated data/default/s2ef/train)
              leignn-oc20-data split --src DIR --out OUT [--val-frac 0.2] [--subset-frac 0.25]
  check     validate datasets before training: LMDB folders / files, ASE databases, or every source
            of a config; a clear error naming file and record (truncated/corrupt file, length key
            off, missing labels, NaN/inf, mixed dtypes, ...)
              leignn-oc20-data check data/s2ef/all/val_id my_train.db --full
              leignn-oc20-data check --config-yml configs/s2ef/default/leignn.yml --full

(``python scripts/oc20_data.py ...`` is the same command.)
Needs internet for `download` only (dl.fbaipublicfiles.com); S2EF-200K is ~1.7 GB compressed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from leignn_ocp.lineup import SPLITS

from .lmdb_io import DatasetValidationError
from .splits import split_lmdb

VAL_SPLITS = tuple(f"val_{s}" for _, s, _ in SPLITS)
TEST_SPLITS = tuple(f"test_{s}" for _, s, _ in SPLITS)  # one fairchem download: --split test
TRAIN_SPLITS = ("200k", "2M", "20M", "all")


def _fairchem_script(name: str) -> Path:
    import fairchem.core.scripts as scripts

    path = Path(scripts.__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"fairchem script {path} not found (is fairchem-core 1.x installed?)")
    return path


def output_dir(data_path: Path, split: str) -> Path:
    """Where fairchem's download_data.py puts a split (OC20 layout used by configs/s2ef/*)."""
    if split in TRAIN_SPLITS:
        return data_path / "s2ef" / split / "train"
    return data_path / "s2ef" / "all" / split


def output_dirs(data_path: Path, split: str) -> list[Path]:
    """The folders one download writes: ``test`` is one archive holding the four test splits."""
    return [output_dir(data_path, s) for s in (TEST_SPLITS if split == "test" else (split,))]


def _download_test(cmd: list[str], data_path: Path, dry_run: bool) -> list[Path]:
    """fairchem's ``--split test``: wget + untar s2ef_test_lmdbs.tar.gz into --data-path, then
    ``mv <data-path>/s2ef_test_lmdbs/test_data/s2ef/all/test_* <data-path>/s2ef/all`` (no preprocessing:
    the archive holds LMDBs). It neither creates s2ef/all (mv then fails and the cleanup deletes the
    download) nor checks any exit code (os.system), so both happen here."""
    from fairchem.core.scripts.download_data import DOWNLOAD_LINKS_s2ef

    dest = data_path / "s2ef" / "all"
    targets = output_dirs(data_path, "test")
    present = [t for t in targets if t.exists()]
    print(f"[oc20_data] test: {DOWNLOAD_LINKS_s2ef['s2ef']['test']} -> {', '.join(map(str, targets))}", flush=True)
    if len(present) == len(targets):
        print(f"[oc20_data] test splits already in {dest}; not downloading again", flush=True)
        return targets
    if present:  # mv would nest or fail on them
        raise FileExistsError(f"{', '.join(map(str, present))} exist but not all four test splits do; "
                              "remove them and download again")
    print(f"[oc20_data] mkdir -p {dest}", flush=True)
    print("[oc20_data]", " ".join(cmd), flush=True)
    if dry_run:
        return targets
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True)
    missing = [t for t in targets if not t.is_dir()]
    if missing:
        raise FileNotFoundError(f"after fairchem's download_data.py --split test, {', '.join(map(str, missing))} "
                                f"missing (in {dest}: {sorted(p.name for p in dest.iterdir())}); "
                                "see its output above (wget / tar / mv)")
    return targets


def cmd_download(a) -> int:
    splits: list[str] = []
    for s in a.split:
        splits += list(VAL_SPLITS) if s == "val" else [s]
    data_path = Path(a.data_path).resolve()
    for split in splits:
        cmd = [sys.executable, str(_fairchem_script("download_data.py")), "--task", "s2ef", "--split", split,
               "--num-workers", str(a.num_workers), "--data-path", str(data_path)]
        if split != "test":  # preprocessing flags; the test archive is LMDBs already
            if not a.no_ref_energy:
                cmd.append("--ref-energy")
            if a.get_edges:
                cmd.append("--get-edges")
        if a.keep:
            cmd.append("--keep")
        # download_data.py imports its sibling scripts (uncompress, preprocess_ef) as top-level
        # modules, so it must run as a file; it wgets into --data-path and verifies the count
        if split == "test":
            _download_test(cmd, data_path, a.dry_run)
        else:
            print("[oc20_data]", " ".join(cmd), flush=True)
            if not a.dry_run:
                subprocess.run(cmd, check=True)
        cmd_sizes(argparse.Namespace(paths=[str(p) for p in output_dirs(data_path, split)],
                                     num_workers=a.num_workers, dry_run=a.dry_run))
    return 0


def cmd_sizes(a) -> int:
    for p in a.paths:
        cmd = [sys.executable, str(_fairchem_script("make_lmdb_sizes.py")), "--data-path", p,
               "--num-workers", str(a.num_workers)]
        print("[oc20_data]", " ".join(cmd), flush=True)
        if not a.dry_run:
            subprocess.run(cmd, check=True)
    return 0


def cmd_split(a) -> int:
    fr = (1.0 - a.val_frac, a.val_frac)
    counts = split_lmdb(a.src, a.out, ("train", "val"), fr, seed=a.seed, subset_frac=a.subset_frac,
                        overwrite=a.force)
    print(f"[oc20_data] {a.src} -> {a.out}: {counts}")
    return 0


def cmd_paper(a) -> int:
    root = Path(a.data_path) / "s2ef"
    for out, subset in ((root / "200k_split", None), (root / "50k", 0.25)):
        counts = split_lmdb(a.src, out, ("train", "val"), (0.8, 0.2), seed=a.seed, subset_frac=subset,
                            overwrite=a.force)
        print(f"[oc20_data] {a.src} -> {out}: {counts}")
    return 0


def cmd_check(a) -> int:
    from .validate import validate_dataset_config, validate_source

    if not a.paths and not a.config_yml:
        raise ValueError("check: give LMDB / ASE database paths or --config-yml")
    max_check = None if a.full else a.sample
    bad = 0
    for p in a.paths:
        try:
            n = validate_source(p, None if a.format == "auto" else a.format, required=tuple(a.required),
                                max_check=max_check)
            print(f"[oc20_data] ok  {p}: {n} structures")
        except DatasetValidationError as exc:
            print(f"[oc20_data] BAD {exc}", file=sys.stderr)
            bad += 1
    for path in a.config_yml or ():
        from fairchem.core.common.utils import load_config

        try:
            counts = validate_dataset_config(load_config(path)[0].get("dataset") or {}, max_check=max_check,
                                             required=tuple(a.required))
            print(f"[oc20_data] ok  {path}: " + ", ".join(f"{k} {v} structures" for k, v in counts.items()))
        except DatasetValidationError as exc:
            print(f"[oc20_data] BAD {path}: {exc}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def main(argv=None) -> int:
    """``leignn-oc20-data``: returns the exit code (0 ok, 1 a folder failed `check`, 2 error)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("download", help="fairchem download_data.py + make_lmdb_sizes")
    d.add_argument("--split", action="append", required=True, choices=[*TRAIN_SPLITS, *VAL_SPLITS, "val", "test"],
                   help="repeatable; 'val' = the four val splits, 'test' = the four (unlabelled) test splits "
                        "-> <data-path>/s2ef/all/test_{id,ood_ads,ood_cat,ood_both}")
    d.add_argument("--data-path", default="data")
    d.add_argument("--num-workers", type=int, default=1)
    d.add_argument("--no-ref-energy", action="store_true", help="keep total energies (OC20 S2EF uses referenced)")
    d.add_argument("--get-edges", action="store_true")
    d.add_argument("--keep", action="store_true", help="keep the downloaded archives")
    d.add_argument("--dry-run", action="store_true", help="print the commands only")
    d.set_defaults(func=cmd_download)

    z = sub.add_parser("sizes", help="metadata.npz with fairchem's make_lmdb_sizes")
    z.add_argument("paths", nargs="+")
    z.add_argument("--num-workers", type=int, default=1)
    z.add_argument("--dry-run", action="store_true")
    z.set_defaults(func=cmd_sizes)

    s = sub.add_parser("split", help="seeded train/val split (optionally of a subset) of an LMDB folder")
    s.add_argument("--src", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--val-frac", type=float, default=0.2)
    s.add_argument("--subset-frac", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=cmd_split)

    q = sub.add_parser("paper", help="200k_split/{train,val} (8:2) and 50k/{train,val} (25 %% subset, 8:2)")
    q.add_argument("--src", default="data/s2ef/200k/train")
    q.add_argument("--data-path", default="data")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=cmd_paper)

    c = sub.add_parser("check", help="validate LMDB folders / files and ASE databases (or a config's dataset)")
    c.add_argument("paths", nargs="*", help="LMDB folders or files, ASE databases (.db, .json, .aselmdb, folders)")
    c.add_argument("--format", choices=("auto", "lmdb", "ase_db", "ase_read", "ase_read_multi"), default="auto",
                   help="fairchem dataset format of the paths (auto: lmdb for *.lmdb files or folders, else ase_db)")
    c.add_argument("--config-yml", action="append", metavar="YML",
                   help="repeatable: check every source of this fairchem config's dataset block (train/val/test)")
    c.add_argument("--required", nargs="*", default=["energy", "forces"])
    c.add_argument("--sample", type=int, default=256,
                   help="records checked per file, spread evenly (default 256; headers and keys always in full)")
    c.add_argument("--full", action="store_true", help="check every record")
    c.set_defaults(func=cmd_check)

    a = p.parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"[oc20_data] error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
