"""Bring your own data: check and score ASE databases and extxyz files with the Table-1 metrics.

Training needs no code of ours: every ``configs/s2ef/default/`` leaf trains on fairchem 1.10's ASE
datasets from the command line (``docs/notes/byo_data.md``)::

    fairchem --mode train --config-yml configs/s2ef/default/leignn.yml --cpu \\
        --dataset.train.format=ase_db --dataset.train.src=my_train.db \\
        --dataset.train.a2g_args.r_energy=True --dataset.train.a2g_args.r_forces=True \\
        --dataset.val.src=my_val.db

Scoring does: :func:`score` evaluates a checkpoint (trained on any data) on ASE splits with the
same fairchem forward and Evaluator as ``leignn-evaluate`` on LMDB folders
(:func:`~leignn_ocp.evaluation.metrics.evaluate_split`); :func:`check` says what a file holds and
stops, naming the file and the structure, where a structure has no energy or no forces.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("ase_db", "ase_read", "ase_read_multi")
# files that hold many structures: fairchem reads them with ase_read_multi (a folder + a glob)
MULTI_FRAME_SUFFIXES = (".xyz", ".extxyz", ".traj")
LABELS = ("energy", "forces")


def dataset_config(src: str | Path, fmt: str | None = None, pattern: str | None = None) -> dict:
    """The fairchem dataset config of one ASE split, its energy and forces read as labels.

    src: an ASE database (``.db``, ``.json``, ``.aselmdb``, a folder of them), or an extxyz / traj
    file or folder. fmt: a fairchem format (:data:`FORMATS`); default ``ase_read_multi`` for an
    ``.xyz`` / ``.extxyz`` / ``.traj`` file, a folder of only such files, or when ``pattern`` is given,
    else ``ase_db``.
    fairchem's ase_read(_multi) readers take a folder and a glob, so a single file becomes its folder
    with the file name as the pattern.
    """
    p = Path(src)
    if fmt is None:
        frames = [p] if p.is_file() else sorted(p.iterdir()) if p.is_dir() else []
        multi = bool(frames) and all(f.suffix in MULTI_FRAME_SUFFIXES for f in frames if f.is_file())
        fmt = "ase_read_multi" if multi or pattern else "ase_db"
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not an ASE format of fairchem ({', '.join(FORMATS)}); "
                         f"LMDB folders are scored by `leignn-evaluate quick/table`")
    if not p.exists() and not any(c in str(src) for c in "*?["):
        raise FileNotFoundError(f"{src}: no such file or folder (expected an ASE database or extxyz file)")
    cfg = {"format": fmt, "src": str(p), "a2g_args": {"r_energy": True, "r_forces": True}}
    if fmt != "ase_db":
        if p.is_file():
            cfg["src"], cfg["pattern"] = str(p.parent), p.name
        elif pattern:
            cfg["pattern"] = pattern
        if fmt == "ase_read_multi":
            cfg["use_tqdm"] = False
    return cfg


def open_dataset(cfg: dict):
    """fairchem's ASE dataset class for ``cfg`` (a :func:`dataset_config`), the one the trainer reads."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    return registry.get_dataset_class(cfg["format"])(dict(cfg))


def check(cfg: dict) -> dict:
    """Every structure of an ASE split has an energy and forces; a summary of what it holds.

    Raises ValueError naming the source, the first structure without a label and the properties
    it has. Returns {"structures", "atoms", "fixed_atoms", "elements", "tags"}.
    """
    import numpy as np
    from ase.constraints import FixAtoms

    ds = open_dataset(cfg)
    n_atoms = n_fixed = 0
    elements: set[str] = set()
    tags: set[int] = set()
    for i, ident in enumerate(ds.ids):
        atoms = ds.get_atoms(ident)
        have = sorted(getattr(atoms.calc, "results", {}) or {})
        missing = [k for k in LABELS if k not in have]
        if missing:
            raise ValueError(
                f"{cfg['src']}: structure {i} ({ident}) has no {' and no '.join(missing)} "
                f"(it has {', '.join(have) if have else 'no calculator results'}); training and scoring need "
                f"an energy and forces on every structure (ASE db: write atoms with a calculator or a "
                f"SinglePointCalculator attached; extxyz: energy= in the comment line and a forces column)")
        forces = np.asarray(atoms.calc.results["forces"])
        if forces.shape != (len(atoms), 3):
            raise ValueError(f"{cfg['src']}: structure {i} ({ident}) has forces of shape {forces.shape} "
                             f"for {len(atoms)} atoms")
        n_atoms += len(atoms)
        n_fixed += sum(len(c.index) for c in atoms.constraints if isinstance(c, FixAtoms))
        elements.update(atoms.get_chemical_symbols())
        tags.update(int(t) for t in atoms.get_tags())
    return {"structures": len(ds), "atoms": n_atoms, "fixed_atoms": n_fixed, "elements": sorted(elements),
            "tags": sorted(tags)}


def score(checkpoint: str | Path, splits: dict[str, dict], cpu: bool = True, batch_size: int | None = None,
          which: str = "final") -> dict[str, dict[str, float]]:
    """{split name: Table-1 metrics} of a checkpoint on ASE splits ({name: :func:`dataset_config`}).

    Metrics are fairchem's Evaluator on free atoms (atoms without an ASE ``FixAtoms`` constraint),
    as OC20 scores S2EF; the checkpoint's EMA weights and normalizers are used.
    """
    from leignn_ocp.evaluation.checkpoints import find_checkpoint, load_trainer
    from leignn_ocp.evaluation.metrics import evaluate_split

    for cfg in splits.values():
        check(cfg)  # before the model is loaded: a clear error for a split without labels
    ckpt = find_checkpoint(checkpoint, which)
    trainer = load_trainer(ckpt, cpu=cpu)
    out = {}
    for name, cfg in splits.items():
        # evaluate_split builds its loader from the trainer's dataset settings with src replaced
        trainer.config["dataset"] = {k: v for k, v in cfg.items() if k != "src"}
        out[name] = evaluate_split(trainer, cfg["src"], batch_size)
        log.info(f"{ckpt} on {name} ({cfg['src']}): {out[name]}")
    return out


def markdown(results: dict[str, dict[str, float]], sources: dict[str, str]) -> str:
    """One row per split: structures, energy MAE meV, force MAE meV/Å, force cosine, EFwT %."""
    lines = ["| split | data | structures | E MAE meV | F MAE meV/Å | F cos | EFwT % |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {sources[name]} | {r['n_structures']} | {r['energy_mae_meV']:.1f} | "
                     f"{r['forces_mae_meV_per_A']:.1f} | {r['forces_cos']:.3f} | {r['efwt_percent']:.2f} |")
    return "\n".join(lines) + "\n"


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="checkpoint file or fairchem run / checkpoint directory")
    ap.add_argument("--split", action="append", default=[], metavar="NAME=PATH",
                    help="an ASE split to score (repeatable): an ASE db, or an extxyz / traj file or folder")
    ap.add_argument("--check", nargs="+", default=None, metavar="PATH",
                    help="only check that every structure of these files has energy and forces (no checkpoint)")
    ap.add_argument("--format", choices=FORMATS, default=None,
                    help="fairchem dataset format (default: ase_read_multi for .xyz/.extxyz/.traj, else ase_db)")
    ap.add_argument("--pattern", default=None, help="glob of the files in a folder (ase_read / ase_read_multi)")
    ap.add_argument("--which", choices=["final", "best"], default="final")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    ap.add_argument("--out", default=None, help="also write byo_scores.{md,json} here")
    return ap


def main(argv: Sequence[str] | None = None, prog: str = "leignn-evaluate byo") -> int:
    """Command line: ``CHECKPOINT --split NAME=PATH ...`` scores; ``--check PATH ...`` checks."""
    from leignn_ocp.evaluation.checkpoints import resolve_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    a = _parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if a.check is not None:
            for src in a.check:
                print(f"{src}: {json.dumps(check(dataset_config(src, a.format, a.pattern)))}")
            return 0
        if not a.checkpoint or not a.split:
            raise ValueError("give a checkpoint and at least one --split NAME=PATH (or --check PATH)")
        splits, sources = {}, {}
        for spec in a.split:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--split expects NAME=PATH, got {spec!r}")
            splits[name], sources[name] = dataset_config(path, a.format, a.pattern), path
        results = score(a.checkpoint, splits, cpu=resolve_device(cpu=a.cpu) == "cpu", batch_size=a.batch_size,
                        which=a.which)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"{prog}: error: {exc}") from exc
    md = markdown(results, sources)
    print(md, end="")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "byo_scores.md").write_text(f"# {a.checkpoint}\n\n" + md)
        (out / "byo_scores.json").write_text(json.dumps({"checkpoint": str(a.checkpoint), "sources": sources,
                                                          "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m leignn_ocp.evaluation.byo"))
