"""The paper's Table 1 with fairchem's trainer and evaluator, and OC20 leaderboard files.

Sub-commands (``leignn-evaluate <cmd> -h`` for the options; ``python -m leignn_ocp.evaluation`` and
``python scripts/evaluate.py`` are the same command):

  quick    one checkpoint (or run directory) -> its 4-split table printed (and --out files);
           the default when the first argument is not a sub-command
             leignn-evaluate quick runs/default/checkpoints/leignn
             leignn-evaluate --checkpoint CKPT --data data/default/s2ef --out results/default
  table    several checkpoints / run directories -> Table 1 as Markdown, CSV and a grouped bar PNG
             leignn-evaluate table --run LEIGNN=<ckpt|dir> --run PaiNN=<ckpt|dir> ... --out results/table1
  lineup   train every config of a folder with the fairchem CLI for one shared budget, then `table`
             leignn-evaluate lineup --config-dir configs/s2ef/default --epochs 5 \\
                 --train-size 1000 --eval-size 100 --out results/default_lineup   # embedded data
             leignn-evaluate lineup --config-dir configs/s2ef/200k --which best \\
                 --data-root data/s2ef/all --out results/oc20_200k                 # the paper's Table 1
  predict  fairchem's predict mode (trainer.predict, what `fairchem --mode predict` runs) on the four
           test splits + the S2EF submission file in the format of fairchem's make_submission_file
           (energy and forces float16 by default, fairchem's own default; --dtype float32 for full size)
             leignn-evaluate predict <ckpt> --data-root data/s2ef/all --split-prefix test_ --out sub/
  fit-scales  fit PaiNN / GemNet ScaleFactors on a config's training data -> --model.scale_file=<json>
             leignn-evaluate fit-scales --out gemnet_dt.json --mode train \\
                 --config-yml configs/s2ef/200k/gemnet_dt.yml
  score    the local scorer: a submission .npz against labelled LMDBs, with fairchem's Evaluator
             leignn-evaluate score sub/submission.npz --data-root data/default/s2ef
  relaxations  IS2RS / IS2RE: relax an IS2RS set with `fairchem --mode run-relaxations` per (model,
           seed), training what has no checkpoint like `lineup`, scored with the reference calculator
             leignn-evaluate relaxations --models leignn schnet --checkpoint leignn:0=<ckpt> \
                 --is2rs data/default/is2rs --out results/relax_default
  relax-ceiling  the same relaxations (fairchem's LBFGS, configs/is2rs/default/base.yml) with the reference
           calculator's forces plus an error of a given force MAE: what the benchmark gives with exact
           forces, and how accurate a model's forces must be for it
             leignn-evaluate relax-ceiling --is2rs data/default/is2rs --sigma 0 0.05 0.1 0.2 --seeds 0 1 2

Device: the GPU when torch sees one (quick, table, lineup, predict; `--gpu` is accepted and makes a
missing GPU an error), else the CPU; `--cpu` forces the CPU. The choice is logged.

Splits: ID, OOD-Ads, OOD-Cat, OOD-Both are the LMDB folders <data-root>/<prefix>{id,ood_ads,ood_cat,ood_both}
(prefix ``val_`` for the labelled S2EF validation sets, ``test_`` for the leaderboard test sets).
Metrics (fairchem's ``Evaluator``, free atoms only, as OC20 scores S2EF): energy MAE (meV),
force MAE (meV/Å, over the x/y/z components), force cosine similarity, and EFwT (% of structures
with |dE| < 0.02 eV and every free-atom |dF component| < 0.03 eV/Å).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from leignn_ocp import lineup
from leignn_ocp.evaluation.checkpoints import find_checkpoint, require_splits, resolve_device
from leignn_ocp.evaluation.metrics import evaluate_checkpoint
from leignn_ocp.evaluation.runs import run_lineup
from leignn_ocp.evaluation.scales import fit_scales
from leignn_ocp.evaluation.submission import DEFAULT_DTYPE, DTYPES, make_submission, predict_splits, score_submission
from leignn_ocp.evaluation.tables import markdown_table, write_outputs, write_seeded_outputs

PROG = "leignn-evaluate"
COMMANDS = ("quick", "table", "lineup", "predict", "score", "fit-scales", "relaxations", "relax-ceiling")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def device(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
        g.add_argument("--gpu", action="store_true",
                       help="the default when a GPU is visible; given, a missing GPU is an error")

    def common(p, default_prefix="val_", with_device=True):
        p.add_argument("--data-root", "--data", default="data/default/s2ef",
                       help="folder holding <prefix>{id,ood_ads,ood_cat,ood_both} (OC20: data/s2ef/all)")
        p.add_argument("--split-prefix", default=default_prefix)
        if with_device:
            device(p)
        p.add_argument("--batch-size", type=int, default=None)

    p = sub.add_parser("quick", help="one checkpoint -> 4-split table on stdout (the default command)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint file or fairchem run/checkpoint directory")
    p.add_argument("--checkpoint", dest="checkpoint_opt", default=None, help="same as the positional")
    p.add_argument("--which", choices=["final", "best"], default="final")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None, help="also write table1.{md,csv,png,json} here")
    common(p)

    p = sub.add_parser("table", help="checkpoints / run dirs -> Table 1 (md, csv, png)")
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--which", choices=["final", "best"], default="final")
    p.add_argument("--out", default="results/table1")
    p.add_argument("--title", default="")
    common(p)

    p = sub.add_parser("lineup", help="train every config of a folder for an equal budget, then Table 1")
    p.add_argument("--config-dir", default="configs/s2ef/default")
    p.add_argument("--epochs", type=int, default=None,
                   help="the shared budget: epochs of the train split for every model (default: each "
                        "config's own optim.max_epochs, i.e. each model's published recipe)")
    p.add_argument("--which", choices=["final", "best"], default="final",
                   help="checkpoint scored: final (default data, whose val is val_id) or best on the internal "
                        "validation split (the paper's OC20-200K/50K protocol)")
    p.add_argument("--models", nargs="*", default=None,
                   help=f"subset of {', '.join(lineup.KEYS)} (keys or aliases; default: every one with a config)")
    p.add_argument("--out", default="results/default_lineup")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                   help="fairchem --seed of each run (weights, shuffling); mean ± std over them")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the --train-size / --eval-size subsets")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table from the row files already in --out/rows")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain (model, seed) pairs that already have a row file in --out/rows")
    p.add_argument("--no-fit-scales", action="store_true", help="leave PaiNN/GemNet ScaleFactors unfitted")
    p.add_argument("--scale-batches", type=int, default=None,
                   help="batches per ScaleFactor fit (fairchem's default 16; lineup default 4 on CPU, 16 on GPU)")
    p.add_argument("--data-root", default="data/default/s2ef")
    p.add_argument("--train-size", type=int, default=None,
                   help="train every model on the same seeded random subset of this many structures of "
                        "<data-root>/train (meant for the embedded data; with OC20 configs leave it out)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="validate / test on seeded random subsets of this many structures per val split")
    p.add_argument("--costs", default=None, metavar="BENCHMARK_CSV",
                   help="benchmark.csv of leignn-benchmark on the same configs: adds the val force MAE "
                        "each model reaches in LEIGNN's wall time (from the learning curves)")
    device(p)
    p.add_argument("fairchem_args", nargs="*", help="extra fairchem CLI overrides, after --")

    p = sub.add_parser("predict", help="predict mode on the 4 test splits + S2EF submission file")
    p.add_argument("checkpoint")
    p.add_argument("--which", choices=["final", "best"], default="best")
    p.add_argument("--out", default="results/submission",
                   help="writes <out>/{id,ood_ads,ood_cat,ood_both}_predictions.npz, <out>/submission.npz "
                        "and fairchem's run files under <out>/fairchem")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help="dtype of the predicted energy and forces (default %(default)s, fairchem's and the "
                        "OC20 leaderboard files'; float32 doubles the file)")
    common(p, default_prefix="test_")

    p = sub.add_parser("score", help="local scorer: submission .npz vs labelled splits")
    p.add_argument("submission")
    p.add_argument("--out", default=None)
    common(p, with_device=False)

    p = sub.add_parser("relaxations", help="IS2RS/IS2RE: train (line-up) or take checkpoints, relax with "
                                           "fairchem --mode run-relaxations, score vs the reference calculator")
    p.add_argument("--config-dir", default="configs/s2ef/default")
    p.add_argument("--is2rs-config-dir", default="configs/is2rs/default")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0])
    p.add_argument("--data-root", default="data/default/s2ef")
    p.add_argument("--is2rs", default="data/default/is2rs", help="IS2RS folder (leignn_ocp.data.is2rs)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="results/relax_default")
    p.add_argument("--checkpoint", action="append", default=[], metavar="KEY:SEED=PATH")
    p.add_argument("--reference", default="emt")
    p.add_argument("--relax-arg", action="append", default=[],
                   help="override for the run-relaxations call, e.g. --relax-arg=--task.relaxation_steps=100")
    device(p)
    p.add_argument("fairchem_args", nargs="*", help="extra fairchem train overrides, after --")

    p = sub.add_parser("relax-ceiling", help="IS2RS relaxations with the reference calculator's forces + an error "
                                             "of a given MAE (fairchem's LBFGS): the benchmark's ceiling")
    p.add_argument("--is2rs", default="data/default/is2rs", help="IS2RS folder (leignn_ocp.data.is2rs)")
    p.add_argument("--config", default="configs/is2rs/default/base.yml",
                   help="its task: block gives the LBFGS settings, step cap and fmax")
    p.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2],
                   help="force MAE of the added error, eV/Å per component (default: %(default)s)")
    p.add_argument("--kinds", nargs="+", default=["fixed", "fresh"], choices=["fixed", "fresh"],
                   help="fixed: one error per atom for the whole relaxation; fresh: a new one every step")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reference", default="emt")
    p.add_argument("--out", default="results/relax_ceiling")

    # listed for --help only: main() hands its arguments to fairchem's own parser
    sub.add_parser("fit-scales", add_help=False,
                   help="fit ScaleFactors: --out FILE.json [--num-batches N] <fairchem --mode train arguments>")
    return ap


def _fit_scales_main(argv: Sequence[str]) -> int:
    """fit-scales --out FILE.json [--num-batches N] <the arguments of `fairchem --mode train`>."""
    fp = argparse.ArgumentParser(prog=f"{PROG} fit-scales", description=fit_scales.__doc__)
    fp.add_argument("--out", required=True, help="scale file to write (.json)")
    fp.add_argument("--num-batches", type=int, default=16)
    fa, rest = fp.parse_known_args(list(argv))
    fit_scales(rest, Path(fa.out), fa.num_batches)
    return 0


def _equal_time(rows: list[dict], costs: Path) -> str:
    """The equal-wall-time block of the line-up's table, from a benchmark CSV's train_ms column."""
    import csv

    from leignn_ocp.evaluation.tables import aggregate, equal_time_markdown

    with open(costs) as f:
        step_ms = {r["label"]: float(r["train_ms"]) for r in csv.DictReader(f)}
    for e in lineup.ENTRIES:  # rows the benchmark leaves out have LEIGNN's cost exactly (zero-init)
        if not e.benchmarked and lineup.label("leignn") in step_ms:
            step_ms.setdefault(e.label, step_ms[lineup.label("leignn")])
    agg = aggregate(rows)
    if lineup.label("leignn") not in agg:  # a partial line-up (--models without leignn, so far)
        return ("\n## At equal wall time\n\nNot yet: it reads every model at LEIGNN's wall time, and "
                "LEIGNN has no row here yet.\n")
    return ("\n## At equal wall time\n\nThe same runs read at the wall time LEIGNN took for its steps, "
            f"with each model's training-step time from `{costs}` (leignn-benchmark, every model alone on "
            "one machine, not the line-up's shared CPU):\n\n" + equal_time_markdown(agg, step_ms))


def _lineup_note(a, r: dict, argv: Sequence[str]) -> str:
    """The table's header: budget, data, seeds and the command that made it."""
    cpu = a.device == "cpu"
    sizes = ""
    if r["data"] != Path(a.data_root):
        spec = json.loads((Path(r["data"]) / "subset.json").read_text())
        sizes = (f" Data: seeded random subsets of {a.data_root} (data seed {a.data_seed}): "
                 + ", ".join(f"{k[2:]} {v}" for k, v in spec.items() if k.startswith("n_")) + " structures.")
    budget = f"for {a.epochs} epoch(s)" if a.epochs is not None else "for its config's own optim.max_epochs"
    seeds = sorted({s for row in r["rows"] for s in [row["seed"]]})
    note = (f"Budget: every model trained with `{Path(a.config_dir)}/<model>.yml` {budget} "
            f"on the same training set, once per seed {seeds} ({'GPU' if not cpu else 'CPU'}"
            f"{', extra args ' + ' '.join(a.fairchem_args) if a.fairchem_args else ''}); the {a.which} checkpoint "
            f"(EMA weights) evaluated on {r['data']}/val_{{id,ood_ads,ood_cat,ood_both}}.{sizes} "
            f"Cells: mean ± sample std over seeds. Energy MAE meV, force MAE meV/Å "
            f"(free atoms), force cosine, EFwT %; params = trainable parameters; train wall s: the `fairchem` "
            f"process, start and normalizer fit and the validations of the learning curve (learning_curves.png) "
            f"included; PaiNN / GemNet-dT ScaleFactors fitted once per model beforehand (not included).")
    return note + f"\n\nCommand: `{PROG} " + " ".join(x for x in argv if x != "--report-only") + "`"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if argv and argv[0] == "fit-scales":
        return _fit_scales_main(argv[1:])
    ap = _parser()
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["quick", *argv]  # `leignn-evaluate --checkpoint CKPT ...` = quick
    a = ap.parse_args(argv)
    if a.cmd == "quick" and not (a.checkpoint or a.checkpoint_opt):
        raise SystemExit("quick: give a checkpoint file or run directory")
    try:  # before any model is loaded: every missing split folder, or a --gpu without a GPU, in one line
        if a.cmd in ("quick", "table", "predict", "score"):
            require_splits(a.data_root, a.split_prefix)
        if a.cmd == "relax-ceiling" and (bad := [s for s in a.sigma if not s >= 0]):
            raise ValueError(f"--sigma must be force MAEs >= 0 (eV/Å), got {bad}")
        a.device = "cpu" if a.cmd in ("score", "relax-ceiling") else resolve_device(cpu=a.cpu, gpu=a.gpu)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"{PROG} {a.cmd}: error: {exc}") from exc
    cpu = a.device == "cpu"

    if a.cmd == "quick":
        ckpt = find_checkpoint(a.checkpoint or a.checkpoint_opt, a.which)
        name = a.name or ckpt.parent.name
        res = {name: evaluate_checkpoint(ckpt, a.data_root, a.split_prefix, cpu, a.batch_size)}
        print(markdown_table(res), end="")
        if a.out:
            write_outputs(res, Path(a.out), title=f"{name}: {ckpt}")
    elif a.cmd == "table":
        results = {}
        for spec in a.run:
            if "=" not in spec:
                raise SystemExit(f"--run expects NAME=PATH, got {spec!r}")
            name, path = spec.split("=", 1)
            results[name] = evaluate_checkpoint(find_checkpoint(path, a.which), a.data_root, a.split_prefix, cpu,
                                                a.batch_size)
        print(write_outputs(results, Path(a.out), a.title), end="")
        print(f"wrote {a.out}/table1.{{md,csv,png,json}}")
    elif a.cmd == "lineup":
        out = Path(a.out)
        r = run_lineup(Path(a.config_dir), out, epochs=a.epochs, data_root=Path(a.data_root), models=a.models,
                       cpu=cpu, seeds=a.seeds, data_seed=a.data_seed, fit_scales=not a.no_fit_scales,
                       extra_args=a.fairchem_args, train_size=a.train_size, eval_size=a.eval_size,
                       scale_batches=a.scale_batches or (4 if cpu else 16), which=a.which, overwrite=a.overwrite,
                       train=not a.report_only)
        md = write_seeded_outputs(r["rows"], out, "Table 1 on the embedded data", _lineup_note(a, r, argv))
        if a.costs:
            md += _equal_time(r["rows"], Path(a.costs))
            (out / "table1.md").write_text(md)
        print(md, end="")
        print(f"wrote {out}/table1.{{md,csv,png,json}} and {out}/learning_curves.png")
    elif a.cmd == "relaxations":
        from leignn_ocp.data.lmdb_io import LmdbValidationError
        from leignn_ocp.evaluation.relaxations import run_relaxation_benchmark

        ckpts = {}
        for spec in a.checkpoint:
            if "=" not in spec or ":" not in spec.split("=", 1)[0]:
                raise SystemExit(f"--checkpoint expects KEY:SEED=PATH, got {spec!r}")
            name, path = spec.split("=", 1)
            key, seed = name.rsplit(":", 1)
            ckpts[f"{lineup.get(key).key if key in lineup.KEYS else key}:{int(seed)}"] = path
        data = Path(a.data_root)
        try:  # the IS2RS set is validated first thing, before anything long
            run_relaxation_benchmark(Path(a.config_dir), Path(a.is2rs), Path(a.out), models=a.models,
                                     seeds=a.seeds, checkpoints=ckpts, reference=a.reference,
                                     is2rs_config_dir=Path(a.is2rs_config_dir),
                                     relax_args=[f"--dataset.train.src={data / 'train'}",
                                                 f"--dataset.val.src={data / 'val_id'}", *a.relax_arg],
                                     cpu=cpu, epochs=a.epochs, data_root=data, extra_args=a.fairchem_args)
        except LmdbValidationError as exc:
            raise SystemExit(f"{PROG} relaxations: error: {exc}") from exc
    elif a.cmd == "relax-ceiling":
        from leignn_ocp.data.lmdb_io import LmdbValidationError
        from leignn_ocp.evaluation.relax_ceiling import run_ceiling

        try:
            run_ceiling(Path(a.is2rs), Path(a.out), a.sigma, a.kinds, a.seeds, Path(a.config), a.reference)
        except LmdbValidationError as exc:
            raise SystemExit(f"{PROG} relax-ceiling: error: {exc}") from exc
        print((Path(a.out) / "ceiling.md").read_text(), end="")
        print(f"wrote {a.out}/ceiling.{{md,json,png}}")
    elif a.cmd == "predict":
        ckpt = find_checkpoint(a.checkpoint, a.which)
        files = predict_splits(ckpt, a.data_root, Path(a.out), a.split_prefix, cpu, a.batch_size, a.dtype)
        path = make_submission(files, Path(a.out) / "submission.npz")
        print(f"submission file ({a.dtype} energy/forces): {path}")
    elif a.cmd == "score":
        res = {Path(a.submission).stem: score_submission(a.submission, a.data_root, a.split_prefix)}
        print(markdown_table(res), end="")
        if a.out:
            write_outputs(res, Path(a.out), title=f"score of {a.submission}")
    return 0
