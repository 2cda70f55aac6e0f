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
* **Checkpoint checks** before fairchem loads anything (:func:`check_checkpoint`, also used by
  ``leignn_ocp.evaluation.load_trainer`` and ``LEIGNNCalculator``): a file that is empty, truncated or
  not a fairchem checkpoint, one of another model class (a PaiNN checkpoint for a LEIGNN config), or
  one whose tensors, EMA or optimizer groups do not fit this run's model (other ``hidden_channels`` /
  ``num_layers``) raises :class:`CheckpointError` naming the file, the first mismatching tensors and
  the model settings that differ. fairchem 1.10 gives a torch size-mismatch RuntimeError per tensor,
  or, for another number of tensors, "loaded state dict contains a parameter group that doesn't match
  the size of optimizer's group", after the logger has opened a new events file; the check fails at
  the same point (``TrainTask.setup``), so the run folder's checkpoints and logs stay byte-identical
  (the one file such a failed start adds is that events file: a header, no scalars).
* **Epoch-counted LR schedules**: ``optim.scheduler_params`` (with ``scheduler: LambdaLR``) selects
  fairchem's cosine / multistep LambdaLR, the one its EquiformerV2 trainer builds, with
  ``warmup_epochs`` / ``decay_epochs`` in epochs converted to steps with this run's loader. The
  schedule then ends where training ends for any ``--optim.max_epochs``, data size or world size.
  Bad settings raise :class:`ScheduleError` naming the key (fairchem: a bare ValueError or a
  ZeroDivisionError). Without ``scheduler_params`` the schedule is fairchem's own.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import math
import os
import shlex
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
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
REQUIRED_KEYS = ("state_dict", "normalizers")  # what fairchem 1.10's load_checkpoint reads unconditionally
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (torch >= 1.6)
SHOW = 4  # names shown per list in an error



def instantiable_optimizable_batch() -> None:
    """Make fairchem 1.10's ``OptimizableBatch`` instantiable under ASE >= 3.24, whose Optimizable ABC
    declares methods (get_x, set_x, ...) fairchem 1.10 never implements and its own LBFGS never calls
    (otherwise ``ml_relax`` fails: TypeError, "Can't instantiate abstract class")."""
    from fairchem.core.common.relaxation.optimizable import OptimizableBatch

    for cls in (OptimizableBatch, *OptimizableBatch.__subclasses__()):
        cls.__abstractmethods__ = frozenset()

class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: unreadable, not a fairchem checkpoint, or of another model."""


class UnfittedScaleFactorsError(ValueError):
    """A model with ScaleFactors that were never fitted was about to be trained."""


class ScheduleError(ValueError):
    """``optim.scheduler_params`` that fairchem's epoch-counted LambdaLR cannot run."""


# fairchem's EquiformerV2 LambdaLR: what each lambda_type reads from scheduler_params (epochs: max_epochs)
SCHEDULE_KEYS = {"cosine": ("warmup_epochs", "warmup_factor", "lr_min_factor"),
                 "multistep": ("warmup_epochs", "warmup_factor", "decay_epochs", "decay_rate")}


def check_schedule(optim: dict) -> None:
    """Refuse ``scheduler_params`` that fairchem would fail on late or run wrongly: another scheduler,
    an unknown ``lambda_type``, a missing key, a negative warm-up, a factor outside (0, 1]."""
    sp = optim["scheduler_params"]
    where = "optim.scheduler_params"
    if optim.get("scheduler") != "LambdaLR":
        raise ScheduleError(f"{where} is read by scheduler: LambdaLR only, not {optim.get('scheduler')!r}; "
                            "set optim.scheduler: LambdaLR or remove scheduler_params")
    kind = sp.get("lambda_type")
    if kind not in SCHEDULE_KEYS:
        raise ScheduleError(f"{where}.lambda_type must be one of {sorted(SCHEDULE_KEYS)}, not {kind!r}")
    missing = [k for k in SCHEDULE_KEYS[kind] if k not in sp]
    if missing:
        raise ScheduleError(f"{where} ({kind}) lacks {', '.join(missing)}")
    for key in ("warmup_epochs", "warmup_factor", "lr_min_factor", "decay_rate"):
        if key not in sp:
            continue
        try:
            value = float(sp[key])
        except (TypeError, ValueError):
            raise ScheduleError(f"{where}.{key} must be a number, not {sp[key]!r}") from None
        if key == "warmup_epochs" and not value >= 0:
            raise ScheduleError(f"{where}.warmup_epochs={sp[key]} must be >= 0")
        if key != "warmup_epochs" and not 0.0 < value <= 1.0:
            raise ScheduleError(f"{where}.{key}={sp[key]} must lie in (0, 1]")


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


CHECK_DATA = ("auto", "full", "sample", "off")
CHECK_FULL_UP_TO = 100_000  # structures: "auto" reads every record up to this size (~1-2 s per 3k here)


def check_data(kwargs: dict, optim: dict) -> dict[str, int] | None:
    """Validate every source of the run's ``dataset`` block (leignn_ocp.data.validate): a truncated or
    corrupt LMDB, a wrong ``length``, missing or non-finite labels, mixed dtypes stop the run here,
    naming the file and record, instead of a SIGBUS, a silently short epoch or a NaN loss later.

    ``optim.check_data``: auto (every record up to CHECK_FULL_UP_TO structures, else 256 per file
    spread evenly; headers, lengths and keys always in full), full, sample, or off.
    """
    from leignn_ocp.data.validate import validate_dataset_config

    mode = optim.get("check_data", "auto")
    if mode not in CHECK_DATA:
        raise ValueError(f"optim.check_data must be one of {CHECK_DATA}, got {mode!r}")
    dataset = kwargs.get("dataset")
    if mode == "off" or not dataset:
        return None
    outputs = kwargs.get("outputs") or {}
    required = tuple(k for k in ("energy", "forces") if k in outputs) if outputs else ("energy", "forces")
    if mode == "auto":
        counts = validate_dataset_config(dataset, max_check=0, required=required)  # headers only
        mode = "full" if sum(counts.values()) <= CHECK_FULL_UP_TO else "sample"
    counts = validate_dataset_config(dataset, max_check=None if mode == "full" else 256, required=required)
    logging.info(f"data checked ({mode}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


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
        if "scheduler_params" in (optim or {}):
            check_schedule(optim)  # likewise (fairchem builds the scheduler after fitting normalizers)
        self._es_state: EarlyStoppingState | None = None
        self._es_restored: dict | None = None
        self._stop_at: tuple[int, float] | None = None  # (step, epoch) patience ran out at
        if not kwargs.get("inference_only", False):
            check_data(kwargs, optim or {})  # before fairchem opens an LMDB (one handle per file and process)
        super().__init__(*args, **kwargs)

    def load_extras(self) -> None:
        """fairchem's epoch-counted LambdaLR when ``optim.scheduler_params`` is set (module docstring)."""
        optim = self.config["optim"]
        if "scheduler_params" not in optim:
            return super().load_extras()
        as_written = copy.deepcopy(optim)  # fairchem scales decay_epochs lists in place
        # typed as fairchem's lambdas check them (float); YAML reads 1e-2 as a str, 1 as an int
        sp = optim["scheduler_params"] = copy.deepcopy(as_written["scheduler_params"])
        for key in ("warmup_factor", "lr_min_factor", "decay_rate"):
            if key in sp:
                sp[key] = float(sp[key])
        n = len(self.train_loader) if self.train_loader is not None else 0  # 0: fairchem builds no scheduler
        if n and int(float(sp["warmup_epochs"]) * n) < 1:  # fairchem's lambda divides by it at step 0
            self._log(f"LR warm-up: {sp['warmup_epochs']} epochs is under one step of this run's {n} per "
                      "epoch; warming up for one step")
            sp["warmup_epochs"] = (1 + 1e-9) / n
        # imported here: the module loads (and warns about) EquiformerV2's Wigner tables
        from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer

        try:
            EquiformerV2ForcesTrainer.load_extras(self)  # converts *epochs keys to steps in self.config
        finally:
            self.config["optim"] = as_written  # checkpoints keep epochs: a resume converts them once
        return None

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
    def run_relaxations(self):
        """fairchem's IS2RS relaxations, its OptimizableBatch made instantiable first."""
        instantiable_optimizable_batch()
        return super().run_relaxations()

    def unfitted_scale_factors(self) -> list[str]:
        """Names (module paths where unnamed) of the model's ScaleFactors still at 0, i.e. skipped."""
        from fairchem.core.modules.scaling import ScaleFactor

        return [m.name or path for path, m in self._unwrapped_model.named_modules()
                if isinstance(m, ScaleFactor) and not m.fitted]

    def load_references_and_normalizers(self) -> None:
        """fairchem's normalizers, then ``optim.tie_force_normalizer: true``: the force normaliser's
        rmsd set to the energy's (fairchem's own OC20 recipes write both as one number).

        Why: a -dE/dx model's force output is the gradient of its normalised energy, (F / rmsd_E);
        trained against F / rmsd_F with rmsd_F != rmsd_E, the energy and the force losses ask for
        slopes that differ by rmsd_E / rmsd_F, and the predicted energies come out scaled by it.
        Direct-force models have a force head of their own and need no tie.
        """
        super().load_references_and_normalizers()
        if not self.config["optim"].get("tie_force_normalizer", False):
            return
        norms = self.normalizers
        if "energy" not in norms or "forces" not in norms:
            raise ValueError("optim.tie_force_normalizer: needs energy and forces normalizers "
                             f"(dataset.train.transforms.normalizer), found {sorted(norms)}")
        if float(norms["forces"].mean) != 0.0:
            raise ValueError(f"optim.tie_force_normalizer: the force normaliser's mean must be 0 (a force offset "
                             f"is not the gradient of an energy), got {float(norms['forces'].mean)}")
        old = float(norms["forces"].rmsd)
        norms["forces"].rmsd = norms["energy"].rmsd.clone()  # the same number, the same dtype
        logging.info(f"force normaliser rmsd {old:.4g} -> {float(norms['forces'].rmsd):.4g} (the energy's: "
                     "optim.tie_force_normalizer)")

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
        """fairchem's load, after :func:`check_checkpoint` has made sure the file is a readable
        checkpoint of this model (one error naming the file and the problem, before anything is
        loaded, so a failed resume leaves the run as it was)."""
        if checkpoint is None:  # a missing file: FileNotFoundError, as fairchem raises it
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            checkpoint = read_checkpoint(checkpoint_path, torch.device("cpu") if self.cpu else self.device)
        check_checkpoint(self, checkpoint, checkpoint_path, inference_only=inference_only)
        sched = getattr(getattr(self, "scheduler", None), "scheduler", None)  # None: inference, no train set, Null
        saved = checkpoint.get("scheduler")
        # another scheduler's state (a ReduceLROnPlateau run relaxed or resumed with a cosine config):
        # torch's load_state_dict would fail (KeyError) or half-apply it; not restored, said so below
        foreign = (not inference_only and sched is not None and saved is not None
                   and set(saved) != set(sched.state_dict()))
        if foreign:
            checkpoint = {**checkpoint, "scheduler": None}
        super().load_checkpoint(checkpoint_path, checkpoint=checkpoint, inference_only=inference_only)
        if not inference_only:
            self._es_restored = checkpoint.get(CKPT_KEY)
        plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)  # steps at validations only
        per_step = not inference_only and sched is not None and not plateau
        continues = per_step and isinstance(sched, torch.optim.lr_scheduler.LambdaLR)  # a function of the step
        if per_step:
            step = int(checkpoint.get("step", 0))
            if foreign and continues:
                sched.last_epoch = step - 1  # continue it at the checkpoint's step (caught up below)
            if sched.last_epoch == step - 1:
                # saved inside step N, before its scheduler step (fairchem's loop saves checkpoint_every and the
                # best checkpoint there): take that step now, or a resume trains one step behind the schedule
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "step() before optimizer.step()": no step is taken here
                    sched.step()
        if foreign:
            self._log(f"{checkpoint_path}: its LR scheduler state is another scheduler's than this run's "
                      f"{type(sched).__name__}: not restored; "
                      + (f"the schedule continues at step {step} (lr {sched.get_last_lr()[0]:.3g})" if continues
                         else "it starts afresh"))

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


# ---------------------------------------------------------------------- checkpoint checks
def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load`` of a fairchem checkpoint with an error that names the file and the problem (empty,
    truncated, not a checkpoint, keys missing) instead of torch's zip-reader or KeyError message."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(errno.ENOENT, "Checkpoint file not found", str(p))  # fairchem's error
    size = p.stat().st_size
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)  # as fairchem loads it (torch 2.4 default)
    except Exception as err:  # the zip reader's RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"checkpoint {p} cannot be read: {_why_unreadable(p, size)} "
                              f"(torch.load: {_first_line(err)})") from err
    check_layout(ckpt, p)
    return ckpt


def _why_unreadable(p: Path, size: int) -> str:
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(p, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC and not zipfile.is_zipfile(p):
        return (f"it starts as a torch archive but its end (the zip directory) is missing, so the file "
                f"({size} bytes) is truncated: an interrupted save or copy. Use another checkpoint "
                f"(best_checkpoint.pt, an earlier copy) or copy it again")
    return f"it is not a file torch.save wrote ({size} bytes) or it is corrupted"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_layout(ckpt, path) -> None:
    """A fairchem checkpoint is a dict with a non-empty ``state_dict`` and ``normalizers``."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a fairchem checkpoint "
                              f"(a dict with {', '.join(REQUIRED_KEYS)} and config)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        hint = (" (normalizers.pt holds only the normalizers: give checkpoint.pt or best_checkpoint.pt)"
                if Path(path).name == "normalizers.pt" else "")
        raise CheckpointError(f"checkpoint {path} is not a fairchem checkpoint: it has no "
                              f"{' or '.join(map(repr, missing))} (its keys: {_names(list(ckpt), 8)}){hint}")
    sd = ckpt["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"checkpoint {path} has an empty or unusable state_dict ({type(sd).__name__})")


def model_config(config: dict) -> tuple[str | None, dict]:
    """(model name, model settings) of a fairchem config: ``model: {name: ..., ...}``, or the
    older ``model: <name>`` + ``model_attributes``."""
    model = config.get("model")
    if isinstance(model, str):
        return model, dict(config.get("model_attributes") or {})
    if isinstance(model, Mapping):
        attrs = dict(model)
        return attrs.pop("name", None), attrs
    return None, {}


def model_class(name: str | None):
    """The class fairchem's registry builds for a model name (None if it cannot resolve it)."""
    if not name:
        return None
    from fairchem.core.common.utils import setup_imports

    setup_imports()  # fairchem's own names (painn, gemnet_t, ...) register on import; once per process
    try:
        return registry.get_model_class(name)
    except Exception:  # noqa: BLE001  (an unknown name or a plugin that does not import here)
        return None


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _names(keys: list[str], n: int = SHOW) -> str:
    keys = [k.removeprefix("module.").removeprefix("module.") for k in keys]
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _settings_diff(saved: dict, here: dict) -> list[str]:
    """``key: <checkpoint> in the checkpoint, <here> here`` for every model setting that differs."""
    keys = sorted(set(saved) | set(here), key=str)
    missing = "(unset)"
    return [f"{k} = {saved.get(k, missing)!r} in the checkpoint, {here.get(k, missing)!r} here"
            for k in keys if saved.get(k, missing) != here.get(k, missing)]


def check_checkpoint(trainer, ckpt: dict, path, inference_only: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` loads into ``trainer``'s model as it is.

    fairchem 1.10 loads the optimizer state first (a model with another number of tensors: "loaded state
    dict contains a parameter group that doesn't match the size of optimizer's group"), the EMA without
    looking at shapes, then the weights (other shapes: a RuntimeError with one line per tensor, raised even
    with ``task.strict_load: false``). Checked here before any of it: the model class the checkpoint was
    trained as (its ``config``), every tensor's name and shape, the EMA and the optimizer's groups. With
    ``task.strict_load: false`` missing or extra tensors are only a warning (fairchem then loads the rest).
    """
    check_layout(ckpt, path)
    model = trainer._unwrapped_model
    here_name, here_attrs = model_config(trainer.config)
    saved_cfg = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    saved_name, saved_attrs = model_config(saved_cfg)
    resume = "" if inference_only else _resume_hint(trainer, path)
    if saved_name is not None:
        cls = model_class(saved_name)
        if (type(model) is not cls) if cls is not None else saved_name != here_name:
            trained_as = f"{saved_name} ({_qualname(cls)})" if cls is not None else f"{saved_name!r} (not a model here)"
            raise CheckpointError(
                f"checkpoint {path} holds a {trained_as} model, but this run's model is {here_name} "
                f"({_qualname(type(model))}): a checkpoint loads only into the model class it was trained as. "
                f"Use the config it was trained with (a copy is in the checkpoint, under 'config').{resume}")

    mine = trainer.model.state_dict()
    from fairchem.core.common.utils import match_state_dict

    theirs = match_state_dict(mine, ckpt["state_dict"])  # the "module." prefixes of a (D)DP wrapper
    shapes = [k for k, v in mine.items()
              if k in theirs and tuple(getattr(theirs[k], "shape", ())) != tuple(v.shape)]
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    strict = (trainer.config.get("task") or {}).get("strict_load", True)
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of its {len(theirs)} tensors have another shape in this model "
                        f"({k.removeprefix('module.').removeprefix('module.')}: {list(theirs[k].shape)} in the "
                        f"checkpoint, {list(mine[k].shape)} here; also {_names(shapes[1:])})"
                        if len(shapes) > 1 else
                        f"1 of its {len(theirs)} tensors has another shape in this model ({_names(shapes)}: "
                        f"{list(theirs[k].shape)} in the checkpoint, {list(mine[k].shape)} here)")
    if missing and (strict or shapes):
        problems.append(f"{len(missing)} of this model's tensors are not in it ({_names(missing)})")
    if unexpected and (strict or shapes):
        problems.append(f"{len(unexpected)} of its tensors are not in this model ({_names(unexpected)})")
    if not problems and not inference_only and isinstance(ckpt.get("optimizer"), Mapping) \
            and getattr(trainer, "optimizer", None) is not None:
        saved_groups = [len(g.get("params", ())) for g in ckpt["optimizer"].get("param_groups", ())]
        groups = [len(g["params"]) for g in trainer.optimizer.param_groups]
        if saved_groups != groups:
            problems.append(f"its optimizer state is for parameter groups of {saved_groups} tensors, this "
                            f"run's optimizer has groups of {groups} (resume needs the same parameters)")
    ema = ckpt.get("ema")
    if not problems and isinstance(ema, Mapping) and getattr(trainer, "ema", None) is not None:
        saved_shadow = [tuple(t.shape) for t in ema.get("shadow_params", [])]
        params = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
        if saved_shadow != params:
            problems.append(f"its EMA weights ({len(saved_shadow)} tensors) do not match this model's "
                            f"{len(params)} trainable parameters")
    if problems:
        diff = _settings_diff(saved_attrs, here_attrs) if saved_name is not None else []
        if saved_name is None:
            advice = " The checkpoint has no config to say which model settings it was trained with."
        elif not diff:  # the config saved with the weights builds this model: they contradict each other
            advice = (" The config saved in the checkpoint builds this same model, so its weights do not "
                      "match its own config: the file was edited or assembled by hand.")
        elif inference_only:
            advice = (f" The model settings differ: {'; '.join(diff[:6])}. Load it with the config it was "
                      f"trained with (a copy is in the checkpoint, under 'config').")
        else:
            advice = (f" The model settings differ: {'; '.join(diff[:6])}. Resume with the model settings it "
                      f"was trained with (its config, under 'config' in the file), or train this model in a new "
                      f"run (another --run-dir or --timestamp-id).{resume}")
        raise CheckpointError(f"checkpoint {path} does not fit this run's model {here_name}: "
                              f"{'; '.join(problems)}.{advice}")
    if missing or unexpected:
        parts = ([f"{len(missing)} of the model's tensors are not in it and keep their values ({_names(missing)})"]
                 if missing else []) + ([f"{len(unexpected)} of its tensors are left out ({_names(unexpected)})"]
                                        if unexpected else [])
        logging.warning(f"task.strict_load: false: loading checkpoint {path} partially: {'; '.join(parts)}")


def _resume_hint(trainer, path) -> str:
    """fairchem's TrainTask resumes from ``<checkpoint_dir>/checkpoint.pt`` by itself when it exists."""
    own = (trainer.config.get("cmd") or {}).get("checkpoint_dir")
    if own and os.path.abspath(path) == os.path.abspath(os.path.join(own, "checkpoint.pt")):
        return (" fairchem resumes a run folder's own checkpoint.pt by itself, and this run's --timestamp-id "
                "names that folder: give another --timestamp-id or --run-dir to start a new run.")
    return ""


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
