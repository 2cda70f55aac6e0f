"""The measurement harness: each line-up model as its recipe trains it, and the probes that time it.

A :class:`Runner` holds one model built from its config (``configs/s2ef/<size>/<key>.yml`` read
by fairchem's loader, the model from fairchem's registry), the loss functions and optimizer
fairchem's trainer would build from the same config, and the batch it is timed on. The
probes (:func:`timed`, :func:`peak_memory_bytes`, :class:`MatmulProbe`, FLOP counting) know
nothing about models; :func:`run_benchmark` is the round-robin loop that ties them together,
and :func:`phase_breakdown` the per-phase timing and profiler tables of the small-structure
workloads (labels from :mod:`leignn_ocp.benchmark.profile`).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from leignn_ocp import lineup, ops
from leignn_ocp.benchmark import profile as bench_profile
from leignn_ocp.benchmark.profile import phase
from leignn_ocp.benchmark.structures import make_batch, workload_structures
from leignn_ocp.checks import check_input

DEFAULT_CONFIG_DIR = "configs/s2ef/200k"
# Column order of the table and figure: LEIGNN and its ablations first (ratios are to LEIGNN),
# then the baselines in the line-up's order.
DEFAULT_MODELS: tuple[str, ...] = (
    *(e.key for e in reversed(lineup.ENTRIES) if e.is_leignn and e.benchmarked),
    *(e.key for e in lineup.ENTRIES if not e.is_leignn and e.benchmarked),
)

# --------------------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """One line-up entry as a config describes it: the merged config and constructor overrides."""

    entry: lineup.Entry
    config: dict
    overrides: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def label(self) -> str:
        return self.entry.label

    @property
    def conservative(self) -> bool:
        return self.entry.conservative


def load_recipe(name: str, config_dir: str | Path = DEFAULT_CONFIG_DIR, tiny: bool = False,
                overrides: dict | None = None) -> Recipe:
    """``<config_dir>/<key>.yml`` through fairchem's loader (``includes:`` merged).

    ``config_dir`` is relative to the working directory, as ``fairchem --config-yml`` is.
    ``tiny`` applies the entry's small-model overrides; ``overrides`` go on top (e.g.
    ``{"chunked_messages": False}`` for LEIGNN's plain message path).
    """
    entry = lineup.get(name)
    path = Path(config_dir) / f"{entry.key}.yml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config {path}: --config-dir must be a folder with one <model>.yml per line-up entry "
            f"(default {DEFAULT_CONFIG_DIR}, relative to the working directory: run from the "
            f"repository root or pass the folder explicitly)")
    over = dict(entry.tiny) if tiny else {}
    over.update(overrides or {})
    return Recipe(entry, lineup.load_config(path), over)


def scale_factor_modules(model: torch.nn.Module) -> list:
    from fairchem.core.modules.scaling import ScaleFactor

    return [m for m in model.modules() if isinstance(m, ScaleFactor)]


@torch.no_grad()
def fit_scale_factors(model: torch.nn.Module, batch) -> int:
    """Give GemNet/PaiNN ScaleFactors values, fitted on the benchmark batch.

    fairchem ships no scale file in the package; unfitted factors are skipped in forward, which
    would make those models do slightly *less* work than when trained. Fitting all factors in
    one forward pass with fairchem's own ``fit_context_`` / ``fit_`` (a one-pass approximation of
    fairchem's sequential fit) restores the multiply; the values do not affect timing.
    """
    factors = scale_factor_modules(model)
    if not factors:
        return 0
    was_training = model.training
    model.eval()
    with ExitStack() as stack:
        for f in factors:
            stack.enter_context(f.fit_context_())
        with torch.enable_grad():
            model(batch.clone())
        for f in factors:
            try:
                f.fit_()
            except AssertionError:  # a factor that saw no data / zero variance
                f.set_(1.0)
    model.train(was_training)
    return len(factors)


def num_edges(model: torch.nn.Module, batch) -> int:
    """Edges of the model's own graph (cutoff, max neighbours, periodic images)."""
    with torch.no_grad():
        g = model.generate_graph(batch.clone(), cutoff=getattr(model, "cutoff", None),
                                 max_neighbors=getattr(model, "max_neighbors", None))
    return int(g.edge_index.shape[1])


# --------------------------------------------------------------------------- fairchem's loss and optimizer


def fairchem_losses(config: dict) -> list[tuple[str, dict]]:
    """``[(target, {"fn": DDPLoss, "coefficient": c})]`` from ``loss_functions``, as
    fairchem's ``BaseTrainer.load_loss`` builds them (losses from ``registry.get_loss_class``)."""
    from fairchem.core.trainers.base_trainer import BaseTrainer

    shim = SimpleNamespace(config={"loss_functions": config["loss_functions"]})
    BaseTrainer.load_loss(shim)
    return shim.loss_functions


def fairchem_target_transforms(config: dict) -> tuple[dict, dict]:
    """(element references, normalizers) from ``dataset.train.transforms``, by fairchem's own
    loaders, as ``BaseTrainer.load_references_and_normalizers`` builds them: the trainer's
    losses are on referenced, normalised targets, so the benchmark's are too. Entries that ask
    for a ``fit`` on the training data are dropped (the benchmark has none; its targets are
    random)."""
    from fairchem.core.modules.normalization.element_references import load_references_from_config
    from fairchem.core.modules.normalization.normalizer import load_normalizers_from_config

    dataset = config.get("dataset") or {}
    transforms = (dataset.get("train", dataset) or {}).get("transforms") or {}

    def given(key: str) -> dict | None:
        spec = copy.deepcopy(transforms.get(key))
        if spec:
            spec.pop("fit", None)
        return spec or None

    refs_cfg, norms_cfg = given("element_references"), given("normalizer")
    refs = load_references_from_config(refs_cfg, dataset=None) if refs_cfg else {}
    norms = (load_normalizers_from_config(norms_cfg, dataset=None, element_references=refs)
             if norms_cfg else {})
    return refs, norms


def fairchem_optimizer(model: torch.nn.Module, optim: dict, fused: bool = True):
    """The optimizer ``BaseTrainer.load_optimizer`` builds from an ``optim:`` block, by that code.

    fairchem 1.10 reads ``optim.weight_decay`` only when it is > 0: with ``weight_decay: 0``
    (every recipe here) AdamW keeps its own default 0.01 unless
    ``optim.optimizer_params.weight_decay`` is set. That is what training does, so the
    benchmark does the same. ``fused`` adds ``fused=True`` to ``optimizer_params`` (torch's
    one-pass kernel, the same update; CPU and CUDA since torch 2.4) when the optimizer
    accepts it. Returns (optimizer, description).
    """
    from fairchem.core.trainers.base_trainer import BaseTrainer

    name = optim.get("optimizer", "AdamW")
    tries = [True, False] if fused else [False]
    for use_fused in tries:
        cfg = copy.deepcopy(optim)
        if use_fused:
            cfg["optimizer_params"] = {**(cfg.get("optimizer_params") or {}), "fused": True}
        shim = SimpleNamespace(config={"optim": cfg}, model=model, _unwrapped_model=model)
        try:
            BaseTrainer.load_optimizer(shim)
        except (RuntimeError, TypeError, ValueError):
            if not use_fused:
                raise
            continue
        return shim.optimizer, f"{name}(fused=True)" if use_fused else name
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- runner


@dataclass
class Runner:
    """One model with its optimizer, targets and the closures the benchmark times.

    ``train_step`` is what fairchem's OCPTrainer does per batch: forward, the recipe's losses
    (free atoms only where ``outputs.<target>.train_on_free_atoms``), backward, gradient
    clipping, optimizer step. Targets are random (fixed seed): timing does not depend on them.
    """

    recipe: Recipe
    model: torch.nn.Module
    batch: object
    device: torch.device
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    compiled: Callable | None = None
    fused_optimizer: bool = True
    infer_batch: object = None  # what infer() runs on; None: ``batch`` (the MD case: one structure)
    scale_factors: int = field(default=0, init=False)  # ScaleFactors fitted by build()

    def __post_init__(self) -> None:
        cfg = self.recipe.config
        optim = cfg.get("optim", {})
        self.optimizer, self.optimizer_name = fairchem_optimizer(self.model, optim, self.fused_optimizer)
        self.clip = optim.get("clip_grad_norm")
        self.loss_functions = fairchem_losses(cfg)
        self.elementrefs, self.normalizers = fairchem_target_transforms(cfg)
        self.outputs = cfg.get("outputs") or {  # fairchem's S2EF task when a config has none
            "energy": {"level": "system"}, "forces": {"level": "atom", "train_on_free_atoms": True}}
        # float16 needs loss scaling against gradient underflow; bfloat16 does not
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.amp and self.amp_dtype == torch.float16 else None)
        g = torch.Generator().manual_seed(1)
        nb, na = int(self.batch.natoms.numel()), int(self.batch.pos.shape[0])
        self.targets = {"energy": torch.randn(nb, generator=g).to(self.device),  # [B]
                        "forces": (0.1 * torch.randn(na, 3, generator=g)).to(self.device)}  # [N, 3]

    @classmethod
    def build(cls, recipe: Recipe, batch, device: torch.device, seed: int = 0, **kw) -> Runner:
        """Fresh weights from the registry (seeded), ScaleFactors fitted on ``batch``."""
        model = lineup.build_model(recipe.config["model"], recipe.overrides, seed=seed).to(device)
        runner = cls(recipe, model, batch, device, **kw)
        runner.scale_factors = fit_scale_factors(model, batch)
        return runner

    def sibling(self, **kw) -> Runner:
        """Another runner on the same model and batch (own optimizer), e.g. under autocast."""
        return Runner(self.recipe, self.model, self.batch, self.device, infer_batch=self.infer_batch, **kw)

    def fresh_batch(self):
        """A copy of the batch: models set ``pos.requires_grad_`` in place."""
        return self.batch.clone()

    def fresh_infer_batch(self):
        """A copy of the inference batch."""
        return (self.batch if self.infer_batch is None else self.infer_batch).clone()

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    def loss(self, out: dict, batch) -> torch.Tensor:
        """The weighted sum of the recipe's losses, as OCPTrainer (``_forward`` reshapes the
        predictions, ``_compute_loss`` masks, references, normalises and weights)."""
        nb, na = int(batch.natoms.numel()), int(batch.natoms.sum())
        free = batch.fixed == 0  # [N]
        terms = []
        for target_name, info in self.loss_functions:
            spec = self.outputs[target_name]
            atom = spec["level"] == "atom"
            pred = out[target_name].view(na if atom else nb, -1)  # [N, d] or [B, d]
            target = self.targets[target_name]
            if atom and spec.get("train_on_free_atoms", True):
                pred, target = pred[free], target[free]
            target = target.view(pred.shape[0], -1)
            if target_name in self.elementrefs:
                target = self.elementrefs[target_name].dereference(target, batch)
            if target_name in self.normalizers:
                target = self.normalizers[target_name].norm(target)
            terms.append(info["coefficient"] * info["fn"](pred, target, natoms=batch.natoms))
        return sum(terms)

    def train_step(self, batch=None) -> float:
        """One training step; its phases labelled for :mod:`leignn_ocp.benchmark.profile` (free
        outside its ``instrumented`` context). ``Module.train`` walks every submodule in Python
        (~0.1 ms): done only when the mode changes."""
        if not self.model.training:
            self.model.train()
        batch = self.fresh_batch() if batch is None else batch
        with phase("zero_grad"):
            self.optimizer.zero_grad(set_to_none=True)
        with phase("forward"), self._autocast():
            out = self.model(batch)
        with phase("loss"):
            loss = self.loss(out, batch)
        with phase("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
        with phase("optimizer"):
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            value = float(loss.detach())
        with phase("release"):  # the step's autograd graph and outputs freed here, not after return
            del out, loss
        return value

    def infer(self, batch=None) -> dict[str, torch.Tensor]:
        if self.model.training:  # as in train_step: a 1-structure MD step should not pay for it
            self.model.eval()
        batch = self.fresh_infer_batch() if batch is None else batch
        fn = self.compiled or self.model
        grad = torch.enable_grad() if self.recipe.conservative else torch.no_grad()  # -dE/dx needs autograd
        with grad, self._autocast(), phase("forward"):
            out = fn(batch)
        result = {k: v.detach() for k, v in out.items()}
        with phase("release"):  # an energy-gradient model's autograd graph is freed here
            del out
        return result

    # FLOPs: torch's FlopCounterMode counts the matmul/bmm/conv family only; elementwise ops,
    # gathers and scatters are not counted.
    def flops_forward(self) -> int:
        with FlopCounterMode(display=False) as fc:
            self.infer()
        return int(fc.get_total_flops())

    def flops_train(self) -> int:
        """FLOPs of forward + backward of one training step (optimizer update excluded)."""
        self.model.train()
        batch = self.fresh_batch()
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            with self._autocast():
                out = self.model(batch)
            self.loss(out, batch).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(fc.get_total_flops())


# --------------------------------------------------------------------------- timing / memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call. CPU time counts only the time
    this process ran (all its threads), so it is robust to other processes on a shared
    machine; on CUDA it is host time only and not a measure of the work."""
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    fn()
    sync(device)
    t1 = time.perf_counter()
    return t1 - t0, time.process_time() - c0


def tune_malloc() -> bool:
    """glibc only: serve every allocation from the heap and never give it back to the OS
    (``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD`` = 2 GiB), so that the tensors of one training step
    reuse the memory of the previous one instead of page-faulting fresh zeroed pages each time
    (docs/notes/benchmark.md). Same effect as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``; it
    applies to every model of the process alike. Returns whether both settings were accepted."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(fn: Callable, device: torch.device, interval_s: float = 0.0005) -> int:
    """Peak memory of one call above the level just before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensor memory of the caching allocator).
    CPU: process RSS (psutil) sampled every ``interval_s`` by a thread while ``fn`` runs,
    minus the RSS right before, after ``gc.collect`` + ``malloc_trim`` so that heap freed by
    earlier calls is handed back to the OS first. tracemalloc cannot see torch's allocations.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    import psutil

    proc = psutil.Process()
    _malloc_trim()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return int(peak[0] - base)


class MatmulProbe:
    """Dense float32 ``torch.matmul`` of two n x n matrices: the machine's reference FLOP rate."""

    def __init__(self, n: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device)
        self.b = torch.randn(n, n, generator=g).to(device)
        self.flops = 2 * n**3
        self.device = device

    def __call__(self) -> None:
        torch.matmul(self.a, self.b)

    def rate(self, seconds: float) -> float:
        return self.flops / seconds if seconds > 0 else math.nan


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {torch.get_num_threads()} thread(s)"


# --------------------------------------------------------------------------- the loop


@dataclass
class Settings:
    """What to measure. ``None`` sizes take the device's defaults (:meth:`resolved`)."""

    device: str = "cpu"
    models: tuple[str, ...] = DEFAULT_MODELS
    config_dir: str | Path = DEFAULT_CONFIG_DIR
    batch_size: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    matmul_n: int | None = None
    compile: bool = False
    fragment: bool = False
    amp: bool = False
    amp_dtype: str = "bfloat16"
    memory: bool = True
    seed: int = 0
    tiny: bool = False
    workload: str = "oc20"  # structures.WORKLOADS
    infer_batch_size: int | None = None
    breakdown: bool | None = None  # per-phase times + profiler tables (default: on for small workloads)
    profile_steps: int | None = None

    def resolved(self) -> Settings:
        """Defaults filled in: CPU 2 structures x 7 repeats after 1 warm-up, CUDA 32 x 20 after 5,
        ``tiny`` 1 x 1 without warm-up; models as line-up keys with LEIGNN first. Small workloads
        (molecules, cells) train on 8 structures (CUDA 64, tiny 2) and infer on 1 (the MD case);
        OC20-like ones infer on the training batch."""
        cuda = self.device.startswith("cuda")
        s = copy.copy(self)
        small = s.workload != "oc20"
        if small:
            s.batch_size = s.batch_size or (2 if s.tiny else (64 if cuda else 8))
            s.infer_batch_size = s.infer_batch_size or 1
        s.breakdown = small if s.breakdown is None else s.breakdown
        s.profile_steps = s.profile_steps or (1 if s.tiny else 5)
        s.batch_size = s.batch_size or (1 if s.tiny else (32 if cuda else 2))
        s.infer_batch_size = s.infer_batch_size or s.batch_size
        s.repeats = s.repeats or (1 if s.tiny else (20 if cuda else 7))
        s.warmup = s.warmup if s.warmup is not None else (0 if s.tiny else (5 if cuda else 1))
        s.matmul_n = s.matmul_n or (128 if s.tiny else (8192 if cuda else 2048))
        keys = [lineup.get(m).key for m in s.models]
        keys = list(dict.fromkeys(keys))
        if "leignn" in keys:
            keys.remove("leignn")
        s.models = ("leignn", *keys)  # ratios are to LEIGNN
        return s


@dataclass
class Result:
    rows: list[dict]  # one per model, report.COLUMNS and more
    meta: dict
    raw: dict  # every timing, (wall s, CPU s) per repeat
    breakdown: list[dict] = field(default_factory=list)  # one per (model, train|infer): ms per phase
    profiles: dict[str, str] = field(default_factory=dict)  # "<model>_<train|infer>" -> profiler table


def run_benchmark(settings: Settings, log: Callable[[str], None] = print, command: str = "",
                  malloc_tuned: bool = False) -> Result:
    """Every model on the same batch, timed round-robin (one repeat of each model before the
    next repeat of any, the order rotated every repeat) after warm-up, then a separate
    peak-memory pass. Process-wide settings (threads, malloc) are the caller's: they are
    only recorded here (``malloc_tuned``)."""
    s = settings.resolved()
    device = torch.device(s.device)
    torch.manual_seed(s.seed)

    atoms = workload_structures(s.workload, s.batch_size, seed=s.seed, tiny=s.tiny)
    batch = make_batch(atoms, device)
    n_atoms = int(batch.pos.shape[0])
    if s.infer_batch_size == s.batch_size:
        infer_atoms, infer_batch = atoms, None
    else:  # the first structures of the same workload
        infer_atoms = workload_structures(s.workload, s.infer_batch_size, seed=s.seed, tiny=s.tiny)
        infer_batch = make_batch(infer_atoms, device)
    n_infer_atoms = sum(len(a) for a in infer_atoms)
    log(f"{s.workload}: {len(atoms)} structures, {n_atoms} atoms on {device} (inference: {len(infer_atoms)} "
        f"structure(s), {n_infer_atoms} atoms); models: {', '.join(s.models)}")
    # molecules go through every model's non-periodic path, as in MD17 training
    overrides = {"use_pbc": False} if s.workload == "molecules" else {}

    runners: dict[str, Runner] = {}
    rows: dict[str, dict] = {}
    for key in s.models:
        recipe = load_recipe(key, s.config_dir, tiny=s.tiny, overrides=overrides)
        r = runners[key] = Runner.build(recipe, batch, device, seed=s.seed, infer_batch=infer_batch)
        rows[key] = {"model": key, "label": recipe.label, "params": lineup.count_params(r.model),
                     "edges": num_edges(r.model, batch)}
        log(f"built {recipe.label}: {rows[key]['params']:,} params, {rows[key]['edges']:,} edges"
            + (f", {r.scale_factors} scale factors fitted" if r.scale_factors else ""))

    leignn = runners["leignn"]
    extra: dict[str, Runner] = {}
    notes = []
    if s.amp:
        amp_dtype = getattr(torch, s.amp_dtype)
        r = leignn.sibling(amp=True, amp_dtype=amp_dtype)
        ref, out = leignn.infer(), r.infer()
        de = (out["energy"].float() - ref["energy"]).abs()
        df = (out["forces"].float() - ref["forces"]).abs()
        short = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
        notes.append(
            f"{short} autocast vs float32, same (untrained) weights: |ΔE| max {de.max().item():.3g} "
            f"(|E| max {ref['energy'].abs().max().item():.3g}); |ΔF| mean {df.mean().item():.3g}, max "
            f"{df.max().item():.3g} (|F| mean {ref['forces'].abs().mean().item():.3g}, max "
            f"{ref['forces'].abs().max().item():.3g}). Readout heads and all sums run in float32.")
        extra[f"leignn_{short}"] = r
        rows[f"leignn_{short}"] = {**rows["leignn"], "model": f"leignn_{short}",
                                   "label": f"{leignn.recipe.label} ({short} autocast)"}
    if s.compile:
        r = leignn.sibling(compiled=torch.compile(leignn.model, dynamic=True))
        t0 = time.perf_counter()
        ref, out = leignn.infer(), r.infer()
        t_compile = time.perf_counter() - t0
        err = (out["forces"] - ref["forces"]).abs().max().item()
        notes.append(f"torch.compile (inductor) LEIGNN inference: first call incl. compilation "
                     f"{t_compile:.1f} s; max |ΔF| vs eager {err:.2g}.")
        extra["leignn_compiled"] = r
        rows["leignn_compiled"] = {**rows["leignn"], "model": "leignn_compiled",
                                   "label": f"{leignn.recipe.label} (torch.compile, infer)"}

    if s.fragment:  # the same weights with the globals per connected component
        model = copy.deepcopy(leignn.model)
        model.global_scope = "fragment"
        r = Runner(leignn.recipe, model, batch, device, infer_batch=infer_batch)
        ref, out = leignn.infer(), r.infer()
        err = (out["forces"] - ref["forces"]).abs().max().item()
        src, dst = model.generate_graph(batch.clone()).edge_index
        n_frag = ops.connected_components(src, dst, n_atoms)[1]
        notes.append(f"global_scope: fragment: {n_frag} fragments in {len(atoms)} structures; max |ΔF| vs the "
                     f"structure scope {err:.2g}.")
        extra["leignn_fragment"] = r
        rows["leignn_fragment"] = {**rows["leignn"], "model": "leignn_fragment",
                                   "label": f"{leignn.recipe.label} (global_scope: fragment)"}

    for key, r in runners.items():
        try:
            rows[key]["gflop_fwd"] = r.flops_forward() / 1e9
            rows[key]["gflop_train"] = r.flops_train() / 1e9
        except RuntimeError as err:  # FlopCounterMode's module hooks vs autograd.grad of a leaf input
            if key == "leignn":
                raise
            rows[key]["gflop_fwd"] = rows[key]["gflop_train"] = None
            r.optimizer.zero_grad(set_to_none=True)
            notes.append(f"{r.recipe.label}: FLOPs not counted on this workload (torch's FlopCounterMode "
                         f"fails on its forward: {str(err).splitlines()[0]})")
    for key in extra:
        rows[key]["gflop_fwd"] = rows["leignn"]["gflop_fwd"]
        rows[key]["gflop_train"] = None if key == "leignn_compiled" else rows["leignn"]["gflop_train"]
    log("FLOPs counted")

    probe = MatmulProbe(s.matmul_n, device)
    every = {**runners, **extra}
    names = list(every)
    trains = [n for n in names if n != "leignn_compiled"]  # compile is inference only
    t_train: dict[str, list] = {k: [] for k in names}  # [(wall s, CPU s)]
    t_infer: dict[str, list] = {k: [] for k in names}
    t_mm: list = []
    for rep in range(s.warmup + s.repeats):
        record = rep >= s.warmup
        k = rep % len(names)
        order = names[k:] + names[:k]
        for mode, times, members in (("train", t_train, trains), ("infer", t_infer, names)):
            for name in order:
                if name not in members:
                    continue
                r = every[name]
                b = r.fresh_batch() if mode == "train" else r.fresh_infer_batch()
                step = r.train_step if mode == "train" else r.infer
                dt = timed(lambda: step(b), device)
                if record:
                    times[name].append(dt)
        dt = timed(probe, device)
        if record:
            t_mm.append(dt)
            log(f"repeat {rep + 1 - s.warmup}/{s.repeats} (train/infer ms): " + ", ".join(
                f"{n} {1e3 * t_train[n][-1][0] if t_train[n] else float('nan'):.0f}/{1e3 * t_infer[n][-1][0]:.0f}"
                for n in names))
        else:
            log(f"warm-up {rep + 1}/{s.warmup} done")

    # the input checks every LEIGNN forward runs (leignn_ocp.checks), alone: all of them, and
    # without the close-pair search (min_distance=0)
    m = leignn.model
    check_batch = batch if infer_batch is None else infer_batch  # the batch its inference runs on
    t_checks = {md: [timed(lambda: check_input(check_batch, model="LEIGNN", use_pbc=m.use_pbc, cutoff=m.cutoff,
                                                 num_elements=m.num_elements, min_distance=md,
                                                 max_images=m.max_images, pairs_in_graph=m._pairs_in_graph),
                                     device)[0]
                         for _ in range(max(s.repeats, 3))]
                for md in (m.min_distance, 0.0)}
    checks_ms, flags_ms = 1e3 * median(t_checks[m.min_distance]), 1e3 * median(t_checks[0.0])
    on = "this batch" if infer_batch is None else f"the inference batch ({len(infer_atoms)} structure(s))"
    search = (f"of which the close-pair search at min_distance={m.min_distance} Å {checks_ms - flags_ms:.2f} ms"
              if not m._pairs_in_graph else "non-periodic: close pairs are read off the model's own graph")
    notes.append(f"LEIGNN's input checks (leignn_ocp.checks) on {on}: {checks_ms:.2f} ms, {search}; "
                 f"{100 * checks_ms / (1e3 * median([t[0] for t in t_infer['leignn']])):.1f} % of its inference.")

    breakdown, profiles = (phase_breakdown(runners, s, device, log) if s.breakdown else ([], {}))

    if device.type == "cuda":
        mem_method = ("torch.cuda.max_memory_allocated during one call minus the allocated memory "
                      "before it (tensors only; the caching allocator's reserve is not counted).")
    else:
        mem_method = ("process RSS (psutil) sampled every 0.5 ms by a thread during one call, minus the "
                      "RSS before it (after gc.collect + malloc_trim). Approximate: allocator reuse can hide part "
                      "of the peak; tracemalloc does not see torch tensors.")
    for name in names:
        r = every[name]
        rows[name]["peak_mem_train_mb"] = rows[name]["peak_mem_infer_mb"] = None
        if not s.memory:
            continue
        if name in trains:
            b = r.fresh_batch()
            rows[name]["peak_mem_train_mb"] = peak_memory_bytes(lambda: r.train_step(b), device) / 2**20
        b = r.fresh_infer_batch()
        rows[name]["peak_mem_infer_mb"] = peak_memory_bytes(lambda: r.infer(b), device) / 2**20
    if s.memory:
        log("memory probed")

    def med(ts, i):  # median of wall (i=0) or CPU (i=1) seconds
        return median([t[i] for t in ts]) if ts else math.nan

    lt, li = med(t_train["leignn"], 0), med(t_infer["leignn"], 0)
    lt_cpu, li_cpu = med(t_train["leignn"], 1), med(t_infer["leignn"], 1)
    for name in names:
        tr, ti = med(t_train[name], 0), med(t_infer[name], 0)
        tr_cpu, ti_cpu = med(t_train[name], 1), med(t_infer[name], 1)
        rows[name].update({
            "train_ms": 1e3 * tr, "infer_ms": 1e3 * ti,
            "train_atoms_per_s": n_atoms / tr, "infer_atoms_per_s": n_infer_atoms / ti,
            "train_x_leignn": tr / lt, "infer_x_leignn": ti / li,
            "train_cpu_ms": 1e3 * tr_cpu, "infer_cpu_ms": 1e3 * ti_cpu,
            "train_cpu_x_leignn": tr_cpu / lt_cpu, "infer_cpu_x_leignn": ti_cpu / li_cpu,
        })

    mm = probe.rate(med(t_mm, 0))
    mm_cpu = probe.rate(med(t_mm, 1))  # the same ratio from process CPU time
    leignn_rate = rows["leignn"]["gflop_train"] * 1e9 / lt
    leignn_rate_cpu = rows["leignn"]["gflop_train"] * 1e9 / lt_cpu
    meta = {
        "command": command, "device": str(device), "device_name": device_name(device),
        "device_short": "GPU" if device.type == "cuda" else f"CPU ({torch.get_num_threads()} thread(s))",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config_dir": os.fspath(s.config_dir),
        "batch_structures": len(atoms), "batch_atoms": n_atoms, "workload": s.workload,
        "infer_batch_structures": len(infer_atoms), "infer_batch_atoms": n_infer_atoms,
        "pbc_override": overrides.get("use_pbc"),
        "repeats": s.repeats, "warmup": s.warmup, "tiny": s.tiny,
        "matmul_n": s.matmul_n, "matmul_gflops": mm / 1e9,
        "leignn_train_gflop": rows["leignn"]["gflop_train"], "leignn_train_ms": 1e3 * lt,
        "leignn_train_gflops": leignn_rate / 1e9, "leignn_matmul_fraction": leignn_rate / mm,
        "matmul_gflops_cpu_time": mm_cpu / 1e9, "leignn_train_gflops_cpu_time": leignn_rate_cpu / 1e9,
        "leignn_matmul_fraction_cpu_time": leignn_rate_cpu / mm_cpu,
        "memory_method": mem_method, "notes": notes, "malloc_tuned": malloc_tuned,
        "optimizer": leignn.optimizer_name, "input_checks_ms": checks_ms, "input_checks_without_close_pairs_ms": flags_ms,
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    raw = {"train_wall_cpu_s": t_train, "infer_wall_cpu_s": t_infer, "matmul_wall_cpu_s": t_mm}
    for b in breakdown:  # the round-robin's median next to the breakdown's own
        b["round_robin_ms"] = rows[b["model"]][f"{b['mode']}_ms"]
    return Result([rows[n] for n in names], meta, raw, breakdown, profiles)


def phase_breakdown(runners: dict[str, Runner], s: Settings, device: torch.device,
                    log: Callable[[str], None] = print) -> tuple[list[dict], dict[str, str]]:
    """Per-phase wall-clock ms of every model's training step and inference (``max(repeats, 3)``
    instrumented steps, round-robin over the models after one untimed step each; means over the
    middle half of them by step time), then ``profile_steps`` steps of each under torch.profiler
    for its op table (:mod:`leignn_ocp.benchmark.profile`). Returns (rows, {"<model>_<mode>": table})."""
    n = max(s.repeats, 3)
    samples: dict[tuple[str, str], list] = {(k, m): [] for k in runners for m in ("train", "infer")}
    profiles: dict[str, str] = {}
    profiled: dict[tuple[str, str], dict] = {}
    with bench_profile.instrumented(device):
        # all training steps first, then all inference (no train/eval switch inside a timed step)
        for mode, rep, key in ((m, i, k) for m in ("train", "infer") for i in range(n + 1) for k in runners):
            r = runners[key]
            b = r.fresh_batch() if mode == "train" else r.fresh_infer_batch()
            step = r.train_step if mode == "train" else r.infer
            dt, totals = bench_profile.timed_phases(lambda: step(b), device)
            if rep:  # the first round warms the wrappers' paths and switches the mode
                samples[key, mode].append((dt, bench_profile.split(totals, dt, mode == "train")))
        for key, mode in samples:
            r = runners[key]
            batches = iter([r.fresh_batch() if mode == "train" else r.fresh_infer_batch()
                            for _ in range(s.profile_steps + 1)])
            step = r.train_step if mode == "train" else r.infer
            profiles[f"{key}_{mode}"], profiled[key, mode] = bench_profile.profiler_table(
                lambda: step(next(batches)), device, s.profile_steps)
    log(f"phase breakdown: {n} instrumented steps per model and mode, {s.profile_steps} profiled")
    rows = []
    for (key, mode), out in samples.items():
        # the middle half of the steps by step time (ceil(n/2) around the median): steps another
        # process interrupted drop out, and the phases' means add up to the mean step exactly
        out = sorted(out, key=lambda x: x[0])
        m = max(1, (len(out) + 1) // 2)
        mid = out[(len(out) - m) // 2:][:m]
        phases = list(out[0][1])
        row = {"model": key, "label": runners[key].recipe.label, "mode": mode, "steps": len(out),
               "steps_averaged": len(mid), "step_ms": 1e3 * statistics.fmean(dt for dt, _ in mid)}
        row.update({f"{p}_ms": 1e3 * statistics.fmean(ph[p] for _, ph in mid) for p in phases})
        row["phases_sum_ms"] = sum(row[f"{p}_ms"] for p in phases if p != "other")
        row["profiled_step_ms"] = sum(v for k, v in profiled[key, mode].items()
                                      if k in ("zero_grad", "forward", "loss", "backward", "optimizer", "release"))
        rows.append(row)
    return rows, profiles
