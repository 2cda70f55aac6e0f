"""Evaluation: the paper's Table 1 through fairchem's trainer and Evaluator, OC20 submission files,
the equal-budget line-up, and ScaleFactor fitting. Command line: ``leignn-evaluate`` (:mod:`.cli`).

checkpoints  checkpoint -> fairchem trainer (weights, EMA, normalizers); split loaders
metrics      Table-1 metrics from arrays, from a trainer on one split, from a checkpoint on four
tables       Markdown / CSV / JSON / PNG writers
submission   predict mode on the test splits, the S2EF submission file, the local scorer
runs         the line-up: train every config with the fairchem CLI, then score
scales       PaiNN / GemNet ScaleFactor fitting into a scale_file
cli          `leignn-evaluate`: quick (default), table, lineup, predict, score, fit-scales
"""

from leignn_ocp.evaluation.checkpoints import (
    close_lmdb,
    find_checkpoint,
    load_trainer,
    split_loader,
)
from leignn_ocp.evaluation.metrics import (
    COLUMNS,
    EVAL_METRICS,
    evaluate_checkpoint,
    evaluate_splits,
    evaluate_split,
    metrics_from_arrays,
)
from leignn_ocp.evaluation.runs import run_lineup, subset_data, train_args
from leignn_ocp.evaluation.scales import fit_scales, has_scale_factors
from leignn_ocp.evaluation.submission import make_submission, predict_splits, read_labels, score_submission
from leignn_ocp.evaluation.tables import bar_chart, markdown_table, read_csv, write_csv, write_outputs

__all__ = [
    "COLUMNS", "EVAL_METRICS", "bar_chart", "close_lmdb", "evaluate_checkpoint",
    "evaluate_split", "evaluate_splits", "find_checkpoint", "fit_scales", "has_scale_factors", "load_trainer",
    "make_submission", "markdown_table", "metrics_from_arrays", "predict_splits", "read_csv",
    "read_labels", "run_lineup", "score_submission", "split_loader", "subset_data", "train_args",
    "write_csv", "write_outputs",
]
