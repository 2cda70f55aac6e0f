"""fairchem 1.10's ``OCPTrainer`` with early stopping and a refusal to train unfitted ScaleFactors.

Configs select it with ``trainer: leignn_ocp.trainer.Trainer`` (configs/s2ef/common.yml does, for
every size). fairchem 1.10's ``registry.get_trainer_class`` imports a dotted name it has not seen, so
the plain ``fairchem`` CLI, ``leignn-launch``, a Slurm job and every DDP rank find it with nothing
imported first. The class is also registered as ``leignn_ocp`` (``trainer: leignn_ocp``), a name
that resolves only once this module has been imported in the process.

What it adds to ``OCPTrainer``, which it otherwise leaves alone:

* **Early stopping** on the validation primary metric (``evaluation_metrics.primary_metric``).
  ``optim.early_stopping_patience: N`` counts evaluations (``optim.eval_every``): after N in a row
  without improvement, training stops at that step with checkpoint.pt saved. An improvement is a
  value below the best so far by more than ``optim.early_stopping_min_delta`` (default 0), above it
  for a metric without "mae" in its name (fairchem's own rule for the best checkpoint). Absent or 0:
  off, and the run is fairchem's, step for step. The count is logged at every evaluation, saved in
  every training checkpoint (key ``early_stopping``) and restored on resume.
* **Unfitted ScaleFactors** (GemNet, PaiNN: ``fairchem.core.modules.scaling``) stop ``train()`` with
  an error naming them and the command that fits them, where fairchem only warns and trains with
  each factor skipped. ``optim.allow_unfitted_scale_factors: true`` restores fairchem's warning.
  Fitting (``leignn-evaluate fit-scales``), validation and prediction never call ``train()``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.trainers import base_trainer
from fairchem.core.trainers.ocp_trainer import OCPTrainer

REGISTERED_NAME = "leignn_ocp"  # registry name; configs use the dotted path (TRAINER_PATH)
TRAINER_PATH = "leignn_ocp.trainer.Trainer"
CKPT_KEY = "early_stopping"  # where a training checkpoint keeps the count
PATIENCE_KEY = "early_stopping_patience"
MIN_DELTA_KEY = "early_stopping_min_delta"
ALLOW_UNFITTED_KEY = "allow_unfitted_scale_factors"
FIT_DOC = "configs/s2ef/scales/README.md and docs/notes/training.md"


class UnfittedScaleFactorsError(ValueError):
    """A model with ScaleFactors that were never fitted was about to be trained."""


class _StopTraining(Exception):
    """Raised at the first step boundary after patience ran out; caught in :meth:`Trainer.train`."""


@dataclass(frozen=True)
class EarlyStopping:
    """The early-stopping settings of an ``optim`` block (patience 0: off)."""

    patience: int = 0
    min_delta: float = 0.0

    @classmethod
    def from_optim(cls, optim: dict) -> EarlyStopping:
        """Read and check ``optim.early_stopping_patience`` / ``optim.early_stopping_min_delta``."""
        patience = optim.get(PATIENCE_KEY)
        patience = 0 if patience is None else patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"optim.{PATIENCE_KEY} must be a whole number of evaluations >= 0 "
                             f"(0 or absent: no early stopping), not {patience!r}")
        min_delta = optim.get(MIN_DELTA_KEY)
        min_delta = 0.0 if min_delta is None else min_delta
        if (isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta)
                or min_delta < 0):
            raise ValueError(f"optim.{MIN_DELTA_KEY} must be a finite number >= 0 (in the primary metric's "
                             f"units), not {min_delta!r}")
        return cls(patience, float(min_delta))

    @property
    def on(self) -> bool:
        return self.patience > 0


@dataclass
class EarlyStoppingState:
    """The count, as saved in a checkpoint under ``early_stopping``."""

    metric: str
    best: float | None = None  # best value that counted as an improvement
    best_step: int | None = None
    wait: int = 0  # evaluations since then without improvement
    stopped_step: int | None = None  # step training stopped at (patience reached)


def improved(value: float, best: float | None, min_delta: float, lower_is_better: bool) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (any value beats no best)."""
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if lower_is_better else value > best + min_delta


def _fmt(value: float | None) -> str:
    return "none (no finite value yet)" if value is None else f"{value:.6g}"


def lower_is_better(metric: str) -> bool:
    """fairchem 1.10's rule (BaseTrainer.update_best): a metric named ``*mae*`` is minimised."""
    return "mae" in metric


def fit_command(model_name: str, argv: list[str] | None = None) -> str:
    """The ``leignn-evaluate fit-scales`` command for this run: its --config-yml and overrides when
    the process was started with them (the fairchem / leignn-launch command line), else placeholders."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, overrides, cpu = None, [], False
    for i, arg in enumerate(argv):
        if arg == "--config-yml" and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config-yml="):
            config = arg.split("=", 1)[1]
        elif arg == "--cpu":
            cpu = True
        elif arg.startswith("--") and "." in arg.split("=", 1)[0] and "=" in arg:
            if arg.split("=", 1)[0] != "--model.scale_file":
                overrides.append(arg)  # --dataset.* / --model.* / --optim.*: the data, model and batch
    if config is None:
        overrides = []  # not a fairchem command line (a submitit job, an in-process caller)
    out = f"scales/{model_name}.json"
    head = shlex.join(["leignn-evaluate", "fit-scales", "--out", out, "--mode", "train", "--config-yml"])
    tail = shlex.join([*overrides, *(["--cpu"] if cpu else [])])
    cmd = " ".join(filter(None, [head, shlex.quote(config) if config else "<this run's config.yml>", tail]))
    return f"{cmd}\nthen train with --model.scale_file={out} (or `scale_file: {out}` in the model block)"


@registry.register_trainer(REGISTERED_NAME)
class Trainer(OCPTrainer):
    """``OCPTrainer`` + early stopping (``optim.early_stopping_patience``) + a hard error on
    unfitted ScaleFactors; see the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        optim = kwargs.get("optimizer") if "optimizer" in kwargs else (args[4] if len(args) > 4 else {})
        self.early_stopping = EarlyStopping.from_optim(optim or {})  # bad settings fail before data loading
        self._es_state: EarlyStoppingState | None = None
        self._es_restored: dict | None = None
        self._stop_at: tuple[int, float] | None = None  # (step, epoch) patience ran out at
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ training
    def train(self, disable_eval_tqdm: bool = False) -> None:
        self.check_scale_factors()
        es = self.early_stopping
        if not es.on:
            return super().train(disable_eval_tqdm=disable_eval_tqdm)
        if self.val_loader is None:
            raise ValueError(f"optim.{PATIENCE_KEY}={es.patience} needs a validation set (dataset.val): "
                             "early stopping counts evaluations of the validation primary metric")
        metric = self._primary_metric()
        self._es_state = self._initial_state(metric)
        st = self._es_state
        self._log(f"early stopping: on, after {es.patience} evaluations of val {metric} without an "
                  f"improvement of more than {es.min_delta:g} (eval every "
                  f"{self.config['optim'].get('eval_every', len(self.train_loader))} steps)")
        if st.wait >= es.patience:
            self._log(f"early stopping: the checkpoint (step {self.step}) already has {st.wait} evaluations "
                      f"without improvement (patience {es.patience}); nothing to train. Raise "
                      f"optim.{PATIENCE_KEY} to train on")
            return None
        st.stopped_step = None
        self._stop_at = None
        try:
            super().train(disable_eval_tqdm=disable_eval_tqdm)
        except _StopTraining:
            pass  # the loop's DataLoader iterator (and its workers) goes with the unwound frame
        if self._stop_at is not None:
            self.step, self.epoch = self._stop_at  # the next step was only begun (batch drawn, nothing run)
            st.stopped_step = self.step
            self._log(f"Early stopping at step {self.step} (epoch {self.epoch:.2f}): val {metric} has not "
                      f"improved on {_fmt(st.best)} (step {st.best_step}) for {st.wait} evaluations (patience "
                      f"{es.patience}, min_delta {es.min_delta:g}); saving checkpoint.pt and ending training")
            self.save(checkpoint_file="checkpoint.pt", training_state=True)
        return None

    def update_best(self, primary_metric, val_metrics, disable_eval_tqdm: bool = True) -> None:
        super().update_best(primary_metric, val_metrics, disable_eval_tqdm=disable_eval_tqdm)
        st, es = self._es_state, self.early_stopping
        if st is None or not es.on:
            return
        value = float(val_metrics[primary_metric]["metric"])  # all-reduced: every rank decides alike
        if improved(value, st.best, es.min_delta, lower_is_better(primary_metric)):
            st.best, st.best_step, st.wait = value, self.step, 0
        else:
            st.wait += 1
        self._log(f"early stopping: val {primary_metric} {value:.6g} at step {self.step}, best {_fmt(st.best)} "
                  f"at step {st.best_step}: {st.wait}/{es.patience} evaluations without improvement")
        if self.logger is not None:
            self.logger.log({"early_stopping_wait": st.wait}, step=self.step, split="val")
        if st.wait >= es.patience:
            self._stop_at = (self.step, self.epoch)  # finish this step (LR plateau step), stop before the next

    def _forward(self, batch):
        if self._stop_at is not None and self.model.training:
            raise _StopTraining  # first training forward after the step patience ran out at
        return super()._forward(batch)

    # ------------------------------------------------------------------ ScaleFactors
    def unfitted_scale_factors(self) -> list[str]:
        """Names (module paths where unnamed) of the model's ScaleFactors still at 0, i.e. skipped."""
        from fairchem.core.modules.scaling import ScaleFactor

        return [m.name or path for path, m in self._unwrapped_model.named_modules()
                if isinstance(m, ScaleFactor) and not m.fitted]

    def check_scale_factors(self) -> None:
        """Raise :class:`UnfittedScaleFactorsError` unless every ScaleFactor is fitted (from
        ``model.scale_file`` or a checkpoint), or ``optim.allow_unfitted_scale_factors`` is true."""
        names = self.unfitted_scale_factors()
        if not names:
            return
        allow = self.config["optim"].get(ALLOW_UNFITTED_KEY, False)
        if not isinstance(allow, bool):
            raise ValueError(f"optim.{ALLOW_UNFITTED_KEY} must be true or false, not {allow!r}")
        if allow:
            logging.warning(f"optim.{ALLOW_UNFITTED_KEY}: training with {len(names)} unfitted ScaleFactors "
                            f"({', '.join(names)}), each left out (scale 1)")
            return
        model_name = str(self.config["model"].get("name", type(self._unwrapped_model).__name__))
        short = model_name.rsplit(".", 1)[-1]
        raise UnfittedScaleFactorsError(
            f"refusing to train {model_name}: {len(names)} of its ScaleFactors are not fitted "
            f"({', '.join(names)}). fairchem would only warn and train with every one of them skipped, "
            f"so activations are not normalised and the results are not the model's. Fit them on this "
            f"run's training data:\n  {fit_command(short)}\nor resume from a checkpoint whose factors are "
            f"fitted (--optim.{ALLOW_UNFITTED_KEY}=True trains them unfitted, as fairchem would). See {FIT_DOC}.")

    # ------------------------------------------------------------------ checkpoints
    def save(self, metrics=None, checkpoint_file: str = "checkpoint.pt", training_state: bool = True):
        if not training_state or self._es_state is None:
            return super().save(metrics=metrics, checkpoint_file=checkpoint_file, training_state=training_state)
        with _extra_checkpoint_keys({CKPT_KEY: asdict(self._es_state)}):
            return super().save(metrics=metrics, checkpoint_file=checkpoint_file, training_state=training_state)

    def load_checkpoint(self, checkpoint_path: str, checkpoint: dict | None = None,
                        inference_only: bool = False) -> None:
        if checkpoint is None and os.path.isfile(checkpoint_path):  # else fairchem raises its FileNotFoundError
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            checkpoint = torch.load(checkpoint_path, map_location=torch.device("cpu") if self.cpu else self.device,
                                    weights_only=False)  # as fairchem loads it (torch 2.4 default)
        super().load_checkpoint(checkpoint_path, checkpoint=checkpoint, inference_only=inference_only)
        if not inference_only and checkpoint is not None:
            self._es_restored = checkpoint.get(CKPT_KEY)

    # ------------------------------------------------------------------ helpers
    def _primary_metric(self) -> str:
        return self.evaluation_metrics.get("primary_metric", self.evaluator.task_primary_metric[self.name])

    def _initial_state(self, metric: str) -> EarlyStoppingState:
        """A fresh count, or the one a loaded checkpoint saved (if it counted the same metric)."""
        saved, self._es_restored = self._es_restored, None
        if not saved:
            if self.step > 0:
                self._log(f"early stopping: the checkpoint (step {self.step}) has no count; counting from here")
            return EarlyStoppingState(metric)
        if saved.get("metric") != metric:
            self._log(f"early stopping: the checkpoint counted {saved.get('metric')}, this run {metric}; "
                      "counting from here")
            return EarlyStoppingState(metric)
        fields = EarlyStoppingState.__dataclass_fields__
        state = EarlyStoppingState(**{k: v for k, v in saved.items() if k in fields})
        self._log(f"early stopping: restored from the checkpoint (step {self.step}): best val {metric} "
                  f"{state.best} at step {state.best_step}, {state.wait} evaluations without improvement")
        return state

    @staticmethod
    def _log(msg: str) -> None:
        if distutils.is_master():
            logging.info(msg)


@contextlib.contextmanager
def _extra_checkpoint_keys(extra: dict) -> Iterator[None]:
    """Add ``extra`` to the state ``BaseTrainer.save`` writes: it calls the module-level
    ``save_checkpoint`` of fairchem's base_trainer (or the launcher's atomic one patched in there),
    looked up at call time, so wrap whichever is there for the duration of one save."""
    inner = base_trainer.save_checkpoint

    def save_with_extra(state, *args, **kwargs):
        return inner({**state, **extra}, *args, **kwargs)

    base_trainer.save_checkpoint = save_with_extra
    try:
        yield
    finally:
        base_trainer.save_checkpoint = inner
