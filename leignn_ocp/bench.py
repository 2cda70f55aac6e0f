"""Helpers for ``scripts/benchmark_efficiency.py`` (paper Fig. 4: cost of LEIGNN vs. baselines).

Everything a benchmark needs that is not the timing loop itself: OC20-like structures,
model configurations read from ``configs/s2ef/200k/*.yml`` (the project's own copies of
the OC20 200K recipes), model construction, the training-step / inference closures,
FLOP counting, peak-memory probes and the dense-matmul reference rate.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from ase import Atoms
from ase.build import add_adsorbate, bcc110, fcc100, fcc111, hcp0001, molecule
from ase.constraints import FixAtoms
from torch.utils.flop_counter import FlopCounterMode

from leignn_ocp.batching import atoms_to_batch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "s2ef" / "200k"

# name -> (config file, label in tables/plots). Order = column order of the figure.
MODELS: dict[str, tuple[str, str]] = {
    "leignn": ("leignn.yml", "LEIGNN"),
    "vanilla_nmu": ("vanilla_nmu.yml", "Vanilla+NMU"),
    "vanilla": ("vanilla.yml", "Vanilla"),
    "schnet": ("schnet.yml", "SchNet"),
    "dimenetpp": ("dimenet_plus_plus.yml", "DimeNet++"),
    "painn": ("painn.yml", "PaiNN"),
    "painn_direct": ("painn_direct.yml", "PaiNN-direct"),
    "gemnet_dt": ("gemnet_dt.yml", "GemNet-dT"),
}

# OC20-200K ID force MAE (meV/A) from the spec's Table 1 / Table 2 (shared/design/LEIGNN.md);
# used only to place models on the time-vs-accuracy panel of the figure.
PUBLISHED_ID_FORCE_MAE = {
    "leignn": 43.9, "vanilla_nmu": 44.7, "vanilla": 44.7, "schnet": 59.6, "dimenetpp": 48.7,
    "painn": 52.7, "painn_direct": 46.6, "gemnet_dt": 41.3,
}

# --tiny: every model shrunk so that the whole benchmark runs in seconds (tests only).
TINY_OVERRIDES: dict[str, dict] = {
    "leignn": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
    "vanilla_nmu": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
    "vanilla": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8},
    "schnet": {"hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 8},
    "dimenetpp": {"hidden_channels": 16, "out_emb_channels": 16, "int_emb_size": 8, "basis_emb_size": 4,
                  "num_blocks": 1, "num_radial": 4, "num_spherical": 3},
    "painn": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8, "cutoff": 6.0, "max_neighbors": 12},
    "painn_direct": {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8, "cutoff": 6.0, "max_neighbors": 12},
    "gemnet_dt": {"num_blocks": 1, "emb_size_atom": 16, "emb_size_edge": 16, "emb_size_trip": 8,
                  "emb_size_rbf": 4, "emb_size_cbf": 4, "emb_size_bil_trip": 8, "num_radial": 8,
                  "num_spherical": 3, "max_neighbors": 12},
}


# --------------------------------------------------------------------------- configs


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_config(path: Path) -> dict:
    """A fairchem YAML with its ``includes`` resolved (later files override earlier ones)."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    merged: dict = {}
    for inc in cfg.pop("includes", []) or []:
        merged = _deep_merge(merged, load_yaml_config(path.parent / inc))
    return _deep_merge(merged, cfg)


@dataclass
class ModelSpec:
    name: str
    label: str
    model_kwargs: dict
    energy_loss: tuple[str, float]  # (fn, coefficient)
    force_loss: tuple[str, float]
    optim: dict
    conservative: bool  # forces = -dE/dx (needs autograd at inference)


def model_spec(name: str, tiny: bool = False) -> ModelSpec:
    fname, label = MODELS[name]
    cfg = load_yaml_config(CONFIG_DIR / fname)
    kw = dict(cfg["model"])
    cls_name = kw.pop("name")
    kw["_class"] = cls_name
    if tiny:
        kw.update(TINY_OVERRIDES[name])
    losses = {next(iter(d)): next(iter(d.values())) for d in cfg.get("loss_functions", [])}
    e = losses.get("energy", {"fn": "mae", "coefficient": 1})
    f = losses.get("forces", {"fn": "mae", "coefficient": 1})
    if cls_name in ("schnet", "dimenetplusplus"):
        conservative = True  # fairchem's SchNet / DimeNet++ only have energy-gradient forces
    else:
        conservative = not kw.get("direct_forces", True)
    return ModelSpec(name, label, kw, (e["fn"], float(e["coefficient"])), (f["fn"], float(f["coefficient"])),
                     dict(cfg.get("optim", {})), conservative)


# --------------------------------------------------------------------------- models


def _model_class(cls_name: str):
    if cls_name in ("leignn", "leignn_ocp.LEIGNN"):
        from leignn_ocp import LEIGNN
        return LEIGNN
    if cls_name == "schnet":
        from fairchem.core.models.schnet import SchNetWrap
        return SchNetWrap
    if cls_name == "dimenetplusplus":
        from fairchem.core.models.dimenet_plus_plus import DimeNetPlusPlusWrap
        return DimeNetPlusPlusWrap
    if cls_name == "painn":
        from fairchem.core.models.painn.painn import PaiNN
        return PaiNN
    if cls_name == "gemnet_t":
        from fairchem.core.models.gemnet.gemnet import GemNetT
        return GemNetT
    raise KeyError(cls_name)


def scale_factor_modules(model: torch.nn.Module) -> list:
    from fairchem.core.modules.scaling import ScaleFactor
    return [m for m in model.modules() if isinstance(m, ScaleFactor)]


@torch.no_grad()
def fit_scale_factors(model: torch.nn.Module, batch) -> int:
    """Give GemNet/PaiNN ScaleFactors values, fitted on the benchmark batch.

    fairchem ships no scale file in the package (its JSONs live with the repo's configs);
    unfitted factors are skipped in forward, which would make those models do slightly
    *less* work than when trained. Fitting all factors in one forward pass with fairchem's
    own ``fit_context_`` / ``fit_`` (a one-pass approximation of fairchem's sequential fit)
    restores the multiply; the values themselves do not affect timing.
    """
    factors = scale_factor_modules(model)
    if not factors:
        return 0
    was_training = model.training
    model.eval()
    from contextlib import ExitStack
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


def build_model(spec: ModelSpec, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {k: v for k, v in spec.model_kwargs.items() if not k.startswith("_")}
    model = _model_class(spec.model_kwargs["_class"])(**kw)
    return model.to(device)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- data

_SURFACES = [  # (builder, metal, size) chosen so that slab + adsorbate has 60-80 atoms
    (fcc111, "Cu", (4, 4, 4)), (fcc111, "Pt", (3, 3, 7)), (fcc100, "Pd", (4, 4, 4)),
    (bcc110, "Fe", (4, 4, 4)), (hcp0001, "Ru", (4, 4, 4)), (fcc111, "Ag", (3, 4, 6)),
    (fcc100, "Ni", (3, 4, 6)), (bcc110, "Mo", (3, 4, 6)), (fcc111, "Au", (4, 4, 4)),
    (hcp0001, "Co", (3, 4, 6)),
]
_ADSORBATES = ["CO", "OH", "CH3", "H2O", "NH3", "CH3OH", "O", "N2", "CH2OH", "HCOOH"]


def oc20_like_structures(n: int, seed: int = 0, tiny: bool = False) -> list[Atoms]:
    """``n`` periodic slab+adsorbate structures like OC20's (60-80 atoms, bottom layers fixed,
    tags 0/1/2 = subsurface/surface/adsorbate, 3D-periodic cell with ~15 A vacuum)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        builder, metal, size = _SURFACES[k % len(_SURFACES)]
        if tiny:
            size = (2, 2, 3)
        slab = builder(metal, size=size, vacuum=7.5)
        z = slab.positions[:, 2]
        layers = np.unique(np.round(z, 2))
        slab.set_tags(np.where(np.round(z, 2) >= layers[-1], 1, 0))
        ads_name = _ADSORBATES[k % len(_ADSORBATES)]
        ads = Atoms("O") if ads_name == "O" else molecule(ads_name)
        add_adsorbate(slab, ads, 1.9, position=tuple(slab.cell.array[:2, :2].sum(0) * rng.uniform(0.2, 0.8, 2)))
        tags = slab.get_tags()
        tags[-len(ads):] = 2
        slab.set_tags(tags)
        fixed = [i for i in range(len(slab)) if tags[i] == 0 and slab.positions[i, 2] < layers[min(1, len(layers) - 1)] + 0.1]
        slab.set_constraint(FixAtoms(indices=fixed))
        slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
        slab.pbc = True
        out.append(slab)
    return out


def make_batch(atoms_list: list[Atoms], device: torch.device):
    return atoms_to_batch(atoms_list, torch.float32).to(device)


# --------------------------------------------------------------------------- steps


def _loss_fn(name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "mae":
        return (pred - target).abs().mean()
    if name == "l2mae":  # fairchem: mean over atoms of the per-atom L2 norm
        return torch.linalg.vector_norm(pred - target, dim=-1).mean()
    if name == "mse":
        return ((pred - target) ** 2).mean()
    raise KeyError(name)


@dataclass
class Runner:
    """One model with its optimizer, targets and the closures the benchmark times."""

    spec: ModelSpec
    model: torch.nn.Module
    batch: object
    device: torch.device
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    compiled: Callable | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    energy_t: torch.Tensor = field(init=False)
    forces_t: torch.Tensor = field(init=False)
    free: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        o = self.spec.optim
        kw = dict(lr=float(o.get("lr_initial", 1e-4)), weight_decay=float(o.get("weight_decay", 0.0)),
                  amsgrad=bool((o.get("optimizer_params") or {}).get("amsgrad", False)))
        try:  # torch's fused AdamW kernel (CPU and CUDA since torch 2.4): same update, one pass
            self.optimizer = torch.optim.AdamW(self.model.parameters(), fused=True, **kw)
            self.optimizer_name = "AdamW(fused=True)"
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.AdamW(self.model.parameters(), **kw)
            self.optimizer_name = "AdamW"
        self.clip = o.get("clip_grad_norm")
        # float16 needs loss scaling against gradient underflow; bfloat16 does not
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if self.amp and self.amp_dtype == torch.float16 else None)
        g = torch.Generator().manual_seed(1)
        nb, na = int(self.batch.natoms.numel()), int(self.batch.pos.shape[0])
        self.energy_t = torch.randn(nb, generator=g).to(self.device)
        self.forces_t = (0.1 * torch.randn(na, 3, generator=g)).to(self.device)
        self.free = (self.batch.fixed == 0).to(self.device)

    def _fresh(self):
        # models set pos.requires_grad_ in place: every call gets its own batch object
        return self.batch.clone()

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        from contextlib import nullcontext
        return nullcontext()

    def loss(self, out) -> torch.Tensor:
        (efn, ec), (ffn, fc) = self.spec.energy_loss, self.spec.force_loss
        e = out["energy"].reshape(-1).float()
        f = out["forces"].float()
        return ec * _loss_fn(efn, e, self.energy_t) + fc * _loss_fn(ffn, f[self.free], self.forces_t[self.free])

    def train_step(self, batch=None) -> float:
        self.model.train()
        batch = self._fresh() if batch is None else batch
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(batch)
        loss = self.loss(out)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach())

    def infer(self, batch=None):
        self.model.eval()
        batch = self._fresh() if batch is None else batch
        fn = self.compiled or self.model
        if self.spec.conservative:  # -dE/dx needs autograd even at inference
            with torch.enable_grad(), self._autocast():
                out = fn(batch)
        else:
            with torch.no_grad(), self._autocast():
                out = fn(batch)
        return {k: v.detach() for k, v in out.items()}

    # ---- FLOPs (torch's FlopCounterMode: matmul/bmm/conv family only; elementwise,
    # gathers and scatters are not counted)
    def flops_forward(self) -> int:
        batch = self._fresh()
        with FlopCounterMode(display=False) as fc:
            self.infer(batch)
        return int(fc.get_total_flops())

    def flops_train(self) -> int:
        """FLOPs of forward + backward of one training step (optimizer update excluded)."""
        self.model.train()
        batch = self._fresh()
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as fc:
            with self._autocast():
                out = self.model(batch)
            self.loss(out).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(fc.get_total_flops())


def num_edges(model: torch.nn.Module, batch) -> int:
    """Edges of the model's own graph (cutoff, max neighbours, periodic images)."""
    with torch.no_grad():
        g = model.generate_graph(batch.clone(), cutoff=getattr(model, "cutoff", None),
                                 max_neighbors=getattr(model, "max_neighbors", None))
    return int(g.edge_index.shape[1])


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
    reuse the memory of the previous one instead of page-faulting fresh zeroed pages each
    time. Same effect as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
    On a VM that can be half of a CPU step of a model with large per-edge tensors; it applies
    to every model of the process alike. Returns whether both settings were accepted."""
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
    except OSError:
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
