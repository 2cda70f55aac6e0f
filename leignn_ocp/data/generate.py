"""Offline OC20-style S2EF data: adsorbate+slab relaxations labelled by an ASE calculator.

Why: OC20 cannot be downloaded everywhere (CI, laptops, this machine). This writes the same LMDB
format and the same four evaluation splits from real calculator labels, small enough for CPU.

Pipeline per system (one adsorbate on one slab site):
  OC20 adsorbate (fairchem.data.oc DB, binding atom down, heuristic site)  on an OC20-protocol slab
  -> BFGS relaxation (frames sampled along it, OC20 S2EF style) + rattled copies of sampled frames
     + pressed copies (adsorbate pushed into the slab: the wall a relaxing model must not walk through)
  -> OC20 anomaly checks on the relaxed structure (DetectTrajAnomaly: dissociated, desorbed,
     surface changed, intercalated); anomalous systems are filtered (default) or kept and flagged.

Energy target (``energy``, eV): OC20's adsorption-energy referencing, with every term from the same
calculator:  E = E_total(frame) - E_relaxed_clean_slab - sum_X n_X mu_X  over adsorbate atoms X,
mu_H = E(H2)/2, mu_O = E(H2O) - E(H2), mu_C = E(CO) - mu_O, mu_N = E(N2)/2 (relaxed gas molecules).
Forces (``forces``, eV/A): raw calculator forces on all atoms (fixed atoms included, as in OC20).

Splits (OC20's sense, disjoint by construction and asserted): adsorbates and catalyst compositions
are each partitioned (seeded) into seen/unseen; train + val_id use seen x seen, val_ood_ads unseen
adsorbates on seen catalysts, val_ood_cat seen adsorbates on unseen catalysts, val_ood_both unseen x
unseen. No (catalyst, facet, adsorbate) system appears in two splits, so val_id has new systems.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import pickle
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lmdb_io import atomic_dir, dumps_deterministic, write_raw_lmdb_dir
from .catalysts import (
    EMT_ADSORBATE_ELEMENTS,
    Catalyst,
    adsorbate_db,
    adsorbate_ids,
    adsorbate_smiles,
    default_catalysts,
    fit_bulk,
    make_slabs,
)

SPLITS = ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")
# split -> (adsorbate pool, catalyst pool)
SPLIT_POOLS = {
    "train": ("seen", "seen"),
    "val_id": ("seen", "seen"),
    "val_ood_ads": ("unseen", "seen"),
    "val_ood_cat": ("seen", "unseen"),
    "val_ood_both": ("unseen", "unseen"),
    "is2rs": ("seen", "seen"),
}

ANOMALIES = ("dissociated", "desorbed", "surface_changed", "intercalated")
RIGID_MODES = ("auto", "on", "off", "as_needed")
IS2RS = "is2rs"  # the relaxation set's stream of candidates (after the S2EF splits; val_id's pools)
STREAMS = (*SPLITS, IS2RS)  # the index is the candidate stream and the sid block
NEAR_MIN = 0.05  # eV/A: a frame whose largest free-atom force is below this is near a minimum
FORCE_BINS = np.logspace(-3, 2, 26)  # eV/A, 5 per decade: the free-atom |F| histogram (ends clipped in)
BROKEN_FID = 10_000  # fid of a flagged frame from a free relaxation that broke: 10_000 + step
SID_STRIDE = 1_000_000  # sid = split_index * SID_STRIDE + candidate index: unique across splits
# 2: records made by fairchem's AtomsToGraphs (positions wrapped into the cell); 3: as_needed
# sampling (fields `anomaly`, `rigid`), the last relaxation frame always kept, the IS2RS set;
# 4: rattled copies of the last frame (minimum_rattle_stds), small_adsorbate_share; 5: pressed frames
# (pressed_per_system 4) and random rattles of 0.1 A instead of 0.05
FORMAT_VERSION = 5
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PINNED_MARK = "LEIGNN_GENERATE_PINNED"  # set by leignn-generate-data in the child that labels


@dataclass(frozen=True)
class GenConfig:
    """Everything that determines the bytes of the dataset (``workers`` does not)."""

    seed: int = 0
    calculator: str = "emt"
    train_systems: int = 100  # kept relaxations in train
    val_systems: int = 10  # kept relaxations in each of the four val splits
    frames_per_system: int = 24  # relaxation frames sampled per system (all if fewer)
    rattled_per_system: int = 6  # rattled copies of sampled relaxation frames per system
    rattle_std: float = 0.1  # A, Gaussian displacement of free atoms
    # one copy of the relaxation's last frame per std (A, free atoms): where the forces approach zero,
    # which a relaxing model must find and random frames rarely show (issue 15, docs/notes/data.md)
    minimum_rattle_stds: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04)
    # copies of random relaxation frames with the adsorbate pushed along the surface normal into the slab
    # until its closest slab contact is a random fraction in [pressed_min_contact, 1) of the frame's own,
    # then rattled at rattle_std: the repulsive wall that relaxations ran through (issue 15, data.md)
    pressed_per_system: int = 4
    pressed_min_contact: float = 0.7
    fmax: float = 0.05  # eV/A, BFGS convergence
    max_steps: int = 100  # BFGS steps per relaxation
    millers: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 0, 0), (1, 1, 0))
    ood_ads_frac: float = 0.25  # adsorbates held out for val_ood_ads / val_ood_both
    ood_cat_frac: float = 0.3  # compositions held out (per group: elemental, alloy)
    # adsorbate held rigid while sampling: on / off / as_needed (free, and rigid only where the free
    # relaxation breaks it) / auto (as_needed for emt, whose C/H/N/O breaks most adsorbates; else off)
    rigid_adsorbate: str = "auto"
    keep_anomalies: bool = False  # keep anomalous relaxations (flag field ``anomaly``) instead of dropping
    broken_frames_per_system: int = 4  # as_needed: frames kept (flagged) from a free relaxation that broke
    is2rs_systems: int = 20  # IS2RS set: freely relaxed, converged, unbroken systems (val_id's pools)
    # ... of adsorbates with at most this many atoms: EMT leaves 1-2 atom adsorbates whole about
    # half the time and larger ones rarely (docs/notes/data.md)
    is2rs_max_adsorbate_atoms: int = 2
    is2rs_max_steps: int = 300  # BFGS steps of an IS2RS reference relaxation
    # share of each S2EF split's candidates drawn from those small adsorbates only: the ones EMT relaxes
    # whole, so a split holds free relaxations and their minima (issue 15, docs/notes/data.md)
    small_adsorbate_share: float = 0.3
    max_candidates_factor: int = 12  # give up when a split needs more candidates than factor x target

    def __post_init__(self):
        if self.train_systems < 1 or self.val_systems < 1:
            raise ValueError("train_systems and val_systems must be >= 1")
        if self.frames_per_system < 1 or self.rattled_per_system < 0:
            raise ValueError("frames_per_system must be >= 1 and rattled_per_system >= 0")
        if not 0 < self.ood_ads_frac < 1 or not 0 < self.ood_cat_frac < 1:
            raise ValueError("ood_ads_frac and ood_cat_frac must be in (0, 1)")
        if not 0 <= self.small_adsorbate_share <= 1:
            raise ValueError(f"small_adsorbate_share must be in [0, 1], got {self.small_adsorbate_share}")
        if self.max_steps < 1 or self.fmax <= 0 or self.rattle_std < 0 or any(x <= 0 for x in self.minimum_rattle_stds):
            raise ValueError("max_steps >= 1, fmax > 0, rattle_std >= 0 and minimum_rattle_stds > 0 required")
        if self.pressed_per_system < 0 or not 0 < self.pressed_min_contact < 1:
            raise ValueError(f"pressed_per_system must be >= 0 and pressed_min_contact in (0, 1), got "
                             f"{self.pressed_per_system} and {self.pressed_min_contact}")
        if self.rigid_adsorbate not in RIGID_MODES:
            raise ValueError(f"rigid_adsorbate must be one of {', '.join(map(repr, RIGID_MODES))}, "
                             f"got {self.rigid_adsorbate!r}")
        if (self.broken_frames_per_system < 0 or self.is2rs_systems < 0 or self.is2rs_max_steps < 1
                or self.is2rs_max_adsorbate_atoms < 1):
            raise ValueError("broken_frames_per_system >= 0, is2rs_systems >= 0, is2rs_max_steps >= 1 and "
                             "is2rs_max_adsorbate_atoms >= 1 required")
        for m in self.millers:
            if len(m) != 3 or not any(m):
                raise ValueError(f"bad Miller index {m!r}")

    @property
    def rigid(self) -> str:
        """on | off | as_needed, with auto resolved by the calculator."""
        if self.rigid_adsorbate == "auto":
            name = self.calculator.strip().lower()
            return "as_needed" if name == "emt" or name.endswith(".emt:emt") else "off"
        return self.rigid_adsorbate

    @property
    def flagged(self) -> bool:
        """Records carry ``anomaly`` (and, as_needed, ``rigid``): some kept frames are anomalous."""
        return self.keep_anomalies or self.rigid == "as_needed"

    def targets(self) -> dict[str, int]:
        """Kept relaxations per stream: the S2EF splits, then the IS2RS set (if any)."""
        out = {s: (self.train_systems if s == "train" else self.val_systems) for s in SPLITS}
        if self.is2rs_systems:
            out[IS2RS] = self.is2rs_systems
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["millers"] = [list(m) for m in self.millers]
        d["minimum_rattle_stds"] = list(self.minimum_rattle_stds)
        d["format_version"] = FORMAT_VERSION
        return d


# ----------------------------------------------------------------------------- calculators


def make_calculator(spec: str):
    """``emt`` (ASE), ``chgnet`` (pretrained weights ship in its PyPI package) or ``module:Class``."""
    name = spec.strip()
    if name.lower() == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name.lower() == "chgnet":
        try:
            from chgnet.model.dynamics import CHGNetCalculator
        except ImportError as exc:
            raise RuntimeError("--calculator chgnet needs `pip install chgnet`") from exc
        return CHGNetCalculator(use_device="cpu")
    if ":" in name:
        mod, cls = name.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), cls)()
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"cannot build calculator {name!r}: {exc}") from exc
    raise ValueError(f"unknown calculator {spec!r}: use 'emt', 'chgnet' or 'package.module:ClassName'")


def _relax(atoms, fmax: float, steps: int, record: bool = False, check=None, check_every: int = 20):
    """BFGS; returns (frames, converged, aborted_reason). Frames are (pos, E, F) at every force call
    the optimizer made, i.e. OC20's trajectory frames; ``check(atoms)`` may abort early."""
    from ase.optimize import BFGS

    frames = []
    opt = BFGS(atoms, logfile=None)
    converged, reason = False, None
    for i, converged in enumerate(opt.irun(fmax=fmax, steps=steps)):
        if record:
            frames.append((atoms.get_positions().copy(), float(atoms.get_potential_energy(apply_constraint=False)),
                           atoms.get_forces(apply_constraint=False).copy()))
        if check is not None and i > 0 and i % check_every == 0 and not converged:
            reason = check(atoms)
            if reason is not None:
                break
    return frames, bool(converged), reason


def gas_references(calc) -> dict[str, float]:
    """Per-element references mu_X from relaxed H2, H2O, CO, N2 (OC20's gas-phase scheme)."""
    from ase.build import molecule

    e = {}
    for name in ("H2", "H2O", "CO", "N2"):
        mol = molecule(name)
        mol.set_cell([15.0, 15.0, 15.0])
        mol.center()
        mol.pbc = True
        mol.calc = calc
        _relax(mol, fmax=0.01, steps=200)
        e[name] = float(mol.get_potential_energy())
    mu_o = e["H2O"] - e["H2"]
    return {"H": 0.5 * e["H2"], "O": mu_o, "C": e["CO"] - mu_o, "N": 0.5 * e["N2"]}


# ----------------------------------------------------------------------------- split planning


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def partition(cfg: GenConfig, catalysts: list[Catalyst], ads: list[int]) -> dict:
    """Seeded seen/unseen partition of adsorbates and catalyst compositions (at least one of each)."""
    r = _rng(cfg.seed, 7)
    ads_perm = [int(a) for a in r.permutation(ads)]
    n_un = min(max(1, round(cfg.ood_ads_frac * len(ads))), len(ads) - 1)
    unseen_ads, seen_ads = sorted(ads_perm[:n_un]), sorted(ads_perm[n_un:])
    seen_cat, unseen_cat = [], []
    for group in ([c for c in catalysts if c.b is None], [c for c in catalysts if c.b is not None]):
        if not group:
            continue
        names = [c.name for c in group]
        perm = [names[i] for i in r.permutation(len(names))]
        k = min(max(1, round(cfg.ood_cat_frac * len(names))), len(names) - 1) if len(names) > 1 else 0
        unseen_cat += perm[:k]
        seen_cat += perm[k:]
    if not unseen_cat:
        raise ValueError("need at least two catalyst compositions to hold one out")
    part = {"ads": {"seen": seen_ads, "unseen": unseen_ads},
            "cat": {"seen": sorted(seen_cat), "unseen": sorted(unseen_cat)}}
    assert not set(seen_ads) & set(unseen_ads) and not set(seen_cat) & set(unseen_cat)
    return part


def candidates(cfg: GenConfig, part: dict, split: str, start: int, count: int, used: set) -> list[dict]:
    """Candidates ``start .. start+count-1`` of a split, drawn from a per-(seed, split, index) stream.

    A candidate whose (catalyst, facet, adsorbate) was drawn before (``used``, shared by all splits)
    is redrawn from the same stream, so no system is in two splits. The draw order is fixed by the
    config and the (deterministic) relaxation outcomes, so the whole plan is seed-deterministic.
    """
    si = STREAMS.index(split)
    ads_pool, cat_pool = (part["ads"][SPLIT_POOLS[split][0]], part["cat"][SPLIT_POOLS[split][1]])
    small_pool = [a for a in ads_pool if len(adsorbate_db()[a][0]) <= cfg.is2rs_max_adsorbate_atoms]
    if split == IS2RS and not small_pool:
        raise ValueError(f"no seen adsorbate has at most {cfg.is2rs_max_adsorbate_atoms} atoms for the IS2RS set")
    out = []
    for idx in range(start, start + count):
        r = _rng(cfg.seed, 11, si, idx)
        small = split == IS2RS
        if not small and cfg.small_adsorbate_share > 0 and small_pool:  # no draw at 0: older data unchanged
            small = bool(r.random() < cfg.small_adsorbate_share)
        pool = small_pool if small else ads_pool
        for _ in range(1000):
            cat = cat_pool[int(r.integers(len(cat_pool)))]
            miller = tuple(cfg.millers[int(r.integers(len(cfg.millers)))])
            ads = pool[int(r.integers(len(pool)))]
            if (cat, miller, ads) not in used:
                break
        else:
            raise RuntimeError(f"{split}: ran out of distinct (catalyst, facet, adsorbate) systems")
        used.add((cat, miller, ads))
        out.append({"split": split, "index": idx, "sid": si * SID_STRIDE + idx, "catalyst": cat,
                    "miller": miller, "adsorbate_id": ads, "slab_pick": int(r.integers(1 << 30)),
                    "seed": int(r.integers(1 << 30)), "small": small})
    return out


# ----------------------------------------------------------------------------- worker side

_W: dict = {}


@contextlib.contextmanager
def _one_thread_quiet():
    """One BLAS/OpenMP thread and library warnings off while labelling; the caller's torch thread
    count, BLAS limits and warning filters are restored on exit.

    Why one thread: parallelism comes from worker processes, and thread-count-dependent reductions
    would otherwise make labels differ between machines. Numpy's and torch's thread pools exist by
    the time this runs, so it sets them through their run-time APIs (environment variables would be
    read too late); forked workers inherit the limits."""
    import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS now, so the limit reaches it)
    import torch

    n_torch = torch.get_num_threads()
    with warnings.catch_warnings(), _blas_threads(1):
        warnings.simplefilter("ignore")  # pymatgen / fairchem.data.oc chatter
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n_torch)


def _blas_threads(n: int):
    """threadpoolctl's limit on every loaded BLAS/OpenMP library (numpy's and scipy's OpenBLAS,
    torch's OpenMP), restored on exit."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n)


def _pool_init(cfg_json: str, refs: dict, catalysts: list[Catalyst]):
    """Initializer of a worker process: its own thread/warning settings (it exits, so nothing to
    restore), then the shared per-process state."""
    for var in THREAD_ENV:
        os.environ.setdefault(var, "1")  # libraries the worker loads later
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    _worker_init(cfg_json, refs, catalysts)


def _worker_init(cfg_json: str, refs: dict, catalysts: list[Catalyst]):
    """Per-process generator state (config, gas references, catalysts, caches); touches no
    process-wide settings, so generate() can call it in the caller's process."""
    d = json.loads(cfg_json)
    d.pop("format_version")
    d["millers"] = tuple(tuple(m) for m in d["millers"])
    d["minimum_rattle_stds"] = tuple(d["minimum_rattle_stds"])
    for cached in (_slabs, _bulk, _relaxed_slab):
        cached.cache_clear()  # a previous generate() in this process may have used another calculator
    _W.clear()
    _W.update(cfg=GenConfig(**d), refs=refs, catalysts={c.name: c for c in catalysts}, calc=None)


def _calc():
    if _W["calc"] is None:
        _W["calc"] = make_calculator(_W["cfg"].calculator)
    return _W["calc"]


@functools.lru_cache(maxsize=64)
def _slabs(cat_name: str, miller: tuple) -> list:
    return make_slabs(_bulk(cat_name), miller)


@functools.lru_cache(maxsize=32)
def _bulk(cat_name: str):
    return fit_bulk(_W["catalysts"][cat_name], _calc())


@functools.lru_cache(maxsize=128)
def _relaxed_slab(cat_name: str, miller: tuple, k: int):
    """Relaxed clean slab (bottom fixed) and its energy: the adsorption-energy reference."""
    slab = _slabs(cat_name, miller)[k].atoms.copy()
    slab.pbc = True
    slab.calc = _calc()
    _relax(slab, fmax=_W["cfg"].fmax, steps=max(200, _W["cfg"].max_steps))
    e = float(slab.get_potential_energy())
    slab.calc = None
    return slab, e


def _anomaly(init_atoms, final_atoms, relaxed_slab) -> list[str]:
    from fairchem.data.oc.utils.flag_anomaly import DetectTrajAnomaly

    det = DetectTrajAnomaly(init_atoms, final_atoms, init_atoms.get_tags(), final_slab_atoms=relaxed_slab)
    checks = {"dissociated": det.is_adsorbate_dissociated, "desorbed": det.is_adsorbate_desorbed,
              "surface_changed": det.has_surface_changed, "intercalated": det.is_adsorbate_intercalated}
    return [name for name in ANOMALIES if checks[name]()]


def _fixed_mask(atoms) -> np.ndarray:
    """[N] bool, atoms held by FixAtoms (restraints are not 'fixed')."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.get_indices()] = True
    return mask


def _rigid_adsorbate(atoms, n_slab: int) -> None:
    """Hold the adsorbate's internal geometry (its OC20 DFT geometry) rigid while sampling; it still
    moves and turns as one body over the relaxing surface.
    Why: EMT's C/H/N/O parameters tear apart or fuse most OC20 adsorbates on metals when free
    (docs/notes/data.md). Only the sampling path is constrained: every label is the bare
    calculator's energy and forces."""
    from .rigid import RigidBody

    if len(atoms) - n_slab >= 1:
        atoms.set_constraint(list(atoms.constraints) + [RigidBody(range(n_slab, len(atoms)), atoms.positions)])


def _to_data(atoms, pos, energy, forces, sid, fid, extra: dict | None):
    """One S2EF record of ``atoms`` (numbers, cell, tags, FixAtoms) at ``pos`` with these labels."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    from leignn_ocp.batching import labelled_data

    frame = Atoms(numbers=atoms.numbers, positions=pos, cell=atoms.cell, pbc=atoms.pbc, tags=atoms.get_tags(),
                  constraint=FixAtoms(mask=_fixed_mask(atoms)))
    frame.calc = SinglePointCalculator(frame, energy=float(energy), forces=np.asarray(forces))
    d = labelled_data(frame, sid=int(sid))  # pos [N, 3] (wrapped into the cell), cell [1, 3, 3]
    # the dtypes these LMDBs have always had (AtomsToGraphs 1.10 gives uint8 / int32 / int32)
    d.atomic_numbers = d.atomic_numbers.float()  # [N]
    d.fixed = d.fixed.float()  # [N] 1 = fixed
    d.tags = d.tags.long()  # [N] 0 subsurface, 1 surface, 2 adsorbate
    d.energy = float(d.energy)  # eV, adsorption-referenced; forces [N, 3] eV/A
    d.fid = int(fid)
    for key, value in (extra or {}).items():
        setattr(d, key, int(value))
    return d


def _place(cand: dict):
    """The candidate's initial structure on its relaxed clean slab; returns (atoms, n_slab, slab, e_slab)."""
    from fairchem.data.oc.core import Adsorbate, AdsorbateSlabConfig, Slab

    slabs = _slabs(cand["catalyst"], cand["miller"])
    k = cand["slab_pick"] % len(slabs)
    slab_relaxed, e_slab = _relaxed_slab(cand["catalyst"], cand["miller"], k)
    # place on the relaxed clean slab (its tags and FixAtoms carry over)
    slab_obj = Slab(slab_atoms=slab_relaxed.copy(), millers=slabs[k].millers, shift=slabs[k].shift,
                    top=slabs[k].top)
    np.random.seed(cand["seed"])  # fairchem.data.oc's placement draws from numpy's global RNG
    ads = Adsorbate(adsorbate_id_from_db=cand["adsorbate_id"], adsorbate_db=adsorbate_db())
    config = AdsorbateSlabConfig(slab_obj, ads, num_sites=1, mode="random_site_heuristic_placement")
    atoms = config.atoms_list[0]
    n_slab = len(slab_relaxed)
    atoms.pbc = True
    tags = atoms.get_tags()
    assert (tags[n_slab:] == 2).all() and (tags[:n_slab] != 2).all()
    return atoms, n_slab, slab_relaxed, e_slab, k


def _sample(init, n_slab: int, rigid: bool, steps: int, early_abort: bool, slab_relaxed):
    """One BFGS relaxation from ``init`` (free or with the adsorbate rigid); returns
    (atoms at the end, frames, converged, anomaly reasons, aborted early)."""
    atoms = init.copy()
    if rigid:
        _rigid_adsorbate(atoms, n_slab)
    atoms.calc = _calc()

    def early(a):
        bad = _anomaly(init, a, slab_relaxed)
        return bad[0] if bad and bad[0] in ("dissociated", "desorbed") else None

    # a rigid adsorbate cannot break; a free one is stopped once it has
    frames, converged, aborted = _relax(atoms, _W["cfg"].fmax, steps, record=True,
                                        check=early if early_abort and not rigid else None)
    return atoms, frames, converged, _anomaly(init, atoms.copy(), slab_relaxed), aborted is not None


def run_system(cand: dict) -> dict:
    """Relax one candidate system and return its frames (as Data) or its anomaly reasons.

    as_needed: the free relaxation is kept when it leaves the adsorbate whole; when it breaks it,
    ``broken_frames_per_system`` of its frames are kept flagged (OC20 keeps such S2EF frames and
    flags them) and the frames come from a relaxation with the adsorbate rigid."""
    cfg: GenConfig = _W["cfg"]
    t0 = time.perf_counter()
    init, n_slab, slab_relaxed, e_slab, k = _place(cand)
    if cand["split"] == IS2RS:
        return _is2rs_system(cand, init, n_slab, slab_relaxed, e_slab, k, t0)
    mode = cfg.rigid
    broken = []  # (frames, reason) of a free relaxation that broke the adsorbate
    if mode == "as_needed":
        atoms, frames, converged, reasons, aborted = _sample(init, n_slab, False, cfg.max_steps, True, slab_relaxed)
        rigid = bool(reasons)
        if rigid:
            broken = [(frames, reasons[0])]
            atoms, frames, converged, reasons, aborted = _sample(init, n_slab, True, cfg.max_steps, False,
                                                                 slab_relaxed)
    else:
        rigid = mode == "on"
        atoms, frames, converged, reasons, aborted = _sample(init, n_slab, rigid, cfg.max_steps,
                                                             not cfg.keep_anomalies, slab_relaxed)
    out = {"candidate": cand, "slab_index": k, "converged": converged, "steps": len(frames),
           "anomalies": reasons, "aborted_early": aborted, "data": [], "natoms": len(atoms), "e_slab": e_slab,
           "rigid": rigid, "broken": broken[0][1] if broken else None}
    if reasons and not cfg.keep_anomalies:
        out["seconds"] = time.perf_counter() - t0
        return out

    e_ref = e_slab + sum(_W["refs"][s] for s in atoms.get_chemical_symbols()[n_slab:])
    # flagged records: `anomaly` 0 none, else 1 + index in ANOMALIES; `rigid` 1 = sampled rigid
    extra = None
    if cfg.flagged:
        extra = {"anomaly": 1 + ANOMALIES.index(reasons[0]) if reasons else 0}
        if mode == "as_needed":
            extra["rigid"] = int(rigid)
    r = _rng(cfg.seed, 13, cand["sid"])
    # the last frame always (a converged free relaxation's is near its minimum), the rest at random
    n_take = min(cfg.frames_per_system, len(frames))
    rest = r.choice(len(frames) - 1, size=n_take - 1, replace=False) if n_take > 1 else []
    picked = sorted({len(frames) - 1, *(int(i) for i in rest)})
    data = [_to_data(atoms, frames[i][0], frames[i][1] - e_ref, frames[i][2], cand["sid"], i, extra)
            for i in picked]
    free = np.flatnonzero(~_fixed_mask(atoms))
    # random frames at rattle_std, then the last frame at each minimum_rattle_std
    rattles = [(int(r.integers(len(frames))), cfg.rattle_std) for _ in range(cfg.rattled_per_system)]
    rattles += [(len(frames) - 1, std) for std in cfg.minimum_rattle_stds]

    def add_displaced(pos):  # pos [N, 3]; fid continues after the steps: fid >= steps marks a displaced frame
        atoms.set_positions(pos, apply_constraint=False)
        e = float(atoms.get_potential_energy(apply_constraint=False))
        f = atoms.get_forces(apply_constraint=False)
        data.append(_to_data(atoms, pos, e - e_ref, f, cand["sid"], len(frames) + len(data) - len(picked), extra))

    for src, std in rattles:
        pos = frames[src][0].copy()
        pos[free] += r.normal(0.0, std, size=(len(free), 3))
        add_displaced(pos)
    for _ in range(cfg.pressed_per_system):  # after the rattles
        src = int(r.integers(len(frames)))
        fraction = cfg.pressed_min_contact + (1 - cfg.pressed_min_contact) * r.random()
        pos = _pressed(atoms, frames[src][0], n_slab, fraction)  # [N, 3]
        pos[free] += r.normal(0.0, cfg.rattle_std, size=(len(free), 3))
        add_displaced(pos)
    n_broken = 0
    for frames_b, reason in broken:  # fid from 10_000 on: frames of the free relaxation that broke
        n_b = min(cfg.broken_frames_per_system, len(frames_b))
        flag = {"anomaly": 1 + ANOMALIES.index(reason), "rigid": 0}
        for i in sorted(int(i) for i in r.choice(len(frames_b), size=n_b, replace=False)):
            data.append(_to_data(atoms, frames_b[i][0], frames_b[i][1] - e_ref, frames_b[i][2], cand["sid"],
                                 BROKEN_FID + i, flag))
        n_broken += n_b
    # pickled here: torch tensors sent between processes would go through shared-memory file
    # descriptors (and run out of them); bytes are also exactly what the LMDB stores
    out["data"] = [dumps_deterministic(d) for d in data]
    out["energies"] = [float(d.energy) for d in data]
    norms = [_free_force_norms(d) for d in data]  # per record [n_free]
    out["max_free_force"] = [float(n.max()) if len(n) else 0.0 for n in norms]
    # the histogram's end bins take what lies beyond them
    out["force_hist"] = np.histogram(np.clip(np.concatenate(norms), FORCE_BINS[0], FORCE_BINS[-1]),
                                     FORCE_BINS)[0].tolist()
    out["n_rattled"] = len(rattles)
    out["n_minimum_rattled"] = len(cfg.minimum_rattle_stds)
    out["n_pressed"] = cfg.pressed_per_system
    out["n_broken"] = n_broken
    out["seconds"] = time.perf_counter() - t0
    return out


def _closest_contact(atoms, pos, n_slab: int) -> float:
    """Shortest adsorbate-slab distance (A, minimum image) with the atoms at ``pos`` [N, 3]."""
    from ase.geometry import get_distances

    return float(get_distances(pos[n_slab:], pos[:n_slab], cell=atoms.cell, pbc=atoms.pbc)[1].min())


def _pressed(atoms, pos, n_slab: int, fraction: float, step: float = 0.02, max_depth: float = 4.0) -> np.ndarray:
    """[N, 3] ``pos`` with the adsorbate moved rigidly along -n (n: the surface normal, a x b, pointing
    to the vacuum side) by the smallest multiple of ``step`` that brings its closest slab contact to
    ``fraction`` of the starting one (at most ``max_depth`` A: past a hollow the contact can grow)."""
    a, b, c = np.asarray(atoms.cell)
    n = np.cross(a, b)
    n /= np.linalg.norm(n) * np.sign(n @ c)  # OC20 slabs: adsorbate on the +c side
    target = fraction * _closest_contact(atoms, pos, n_slab)
    out = pos.copy()
    for depth in np.arange(step, max_depth + step / 2, step):
        out[n_slab:] = pos[n_slab:] - depth * n
        if _closest_contact(atoms, out, n_slab) <= target:
            break
    return out


def _free_force_norms(d) -> np.ndarray:
    """[n_free] force norms (eV/A) on the free atoms of a record."""
    return d.forces[d.fixed == 0].double().norm(dim=1).numpy()


def _is2rs_system(cand, init, n_slab, slab_relaxed, e_slab, k, t0) -> dict:
    """A reference relaxation for the IS2RS set: free, converged and unbroken, or not kept."""
    from .is2rs import is2rs_data

    cfg: GenConfig = _W["cfg"]
    atoms, frames, converged, reasons, aborted = _sample(init, n_slab, False, cfg.is2rs_max_steps, True,
                                                         slab_relaxed)
    if not reasons and not converged:
        reasons = ["not_converged"]
    out = {"candidate": cand, "slab_index": k, "converged": converged, "steps": len(frames),
           "anomalies": reasons, "aborted_early": aborted, "data": [], "natoms": len(atoms), "e_slab": e_slab,
           "rigid": False, "broken": None}
    if not reasons:
        e_ref = e_slab + sum(_W["refs"][s] for s in atoms.get_chemical_symbols()[n_slab:])
        # frames[0] is the initial structure (BFGS yields before its first step)
        y_init, y_relaxed = frames[0][1] - e_ref, frames[-1][1] - e_ref
        rec = is2rs_data(init, atoms.get_positions(), y_init, y_relaxed, e_ref, cand["sid"])
        out["data"] = [dumps_deterministic(rec)]
        out["energies"] = [y_relaxed]
        out["y_init"] = y_init
    out["seconds"] = time.perf_counter() - t0
    return out


def _run_group(group: list[dict]) -> list[dict]:
    return [run_system(c) for c in group]


# ----------------------------------------------------------------------------- driver


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sys", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return None


def generate(cfg: GenConfig, out_dir: Path | str, workers: int = 1, progress: bool = True,
             catalysts: list[Catalyst] | None = None) -> dict:
    """Generate all five splits under ``out_dir/s2ef/`` atomically; return the summary dict.

    The bytes depend on ``cfg`` (and the catalysts) only, not on ``workers``; with one worker it
    runs in this process, under :func:`_one_thread_quiet`, and leaves its settings as they were."""
    with _one_thread_quiet():
        return _generate(cfg, Path(out_dir), workers, progress, catalysts)


def _generate(cfg: GenConfig, out_dir: Path, workers: int, progress: bool,
              catalysts: list[Catalyst] | None) -> dict:
    t_start = time.perf_counter()
    catalysts = catalysts or default_catalysts()
    allowed = EMT_ADSORBATE_ELEMENTS  # all OC20 adsorbate elements; EMT handles exactly these
    ads_all = adsorbate_ids(allowed)
    part = partition(cfg, catalysts, ads_all)
    calc = make_calculator(cfg.calculator)
    refs = gas_references(calc)

    targets = cfg.targets()
    kept: dict[str, list[dict]] = {s: [] for s in targets}
    next_idx = {s: 0 for s in targets}
    used: set = set()
    stats = {s: Counter() for s in targets}
    rate = 1.0  # initial guess of the kept fraction; updated from what was seen
    bar = _progress(0, "relaxations") if progress else None
    cfg_json = json.dumps(cfg.to_json())
    ctx = mp.get_context("fork") if workers > 1 else None
    pool = ctx.Pool(workers, initializer=_pool_init, initargs=(cfg_json, refs, catalysts)) if ctx else None
    if pool is None:
        _worker_init(cfg_json, refs, catalysts)
    try:
        while True:
            need = {s: targets[s] - len(kept[s]) for s in targets if len(kept[s]) < targets[s]}
            if not need:
                break
            batch = []
            for s, n in need.items():
                if next_idx[s] >= cfg.max_candidates_factor * targets[s]:
                    raise RuntimeError(
                        f"{s}: only {len(kept[s])}/{targets[s]} relaxations kept after {next_idx[s]} "
                        f"candidates ({dict(stats[s])}); the calculator breaks too many adsorbates "
                        f"(try --keep-anomalies or another --calculator)")
                m = max(1, math.ceil(n / max(rate, 0.1) * (1.0 if rate > 0.98 else 1.1)))
                m = min(m, cfg.max_candidates_factor * targets[s] - next_idx[s])
                batch += candidates(cfg, part, s, next_idx[s], m, used)
                next_idx[s] += m
            # group by slab so each worker builds/relaxes a slab once; order restored afterwards
            groups: dict = {}
            for c in batch:
                groups.setdefault((c["catalyst"], c["miller"]), []).append(c)
            glist = sorted(groups.values(), key=lambda g: -len(g))
            it = pool.imap_unordered(_run_group, glist) if pool else map(_run_group, glist)
            done = []
            if bar is not None:
                bar.total += len(batch)
                bar.refresh()
            for res in it:
                done += res
                if bar is not None:
                    bar.update(len(res))
            done.sort(key=lambda o: (STREAMS.index(o["candidate"]["split"]), o["candidate"]["index"]))
            for o in done:
                s = o["candidate"]["split"]
                stats[s]["tried"] += 1
                for a in o["anomalies"]:
                    stats[s][a] += 1
                if o["anomalies"]:
                    stats[s]["anomalous"] += 1
                if o["anomalies"] and (s == IS2RS or not cfg.keep_anomalies):
                    continue
                if len(kept[s]) < targets[s]:
                    kept[s].append(o)
            tried = sum(st["tried"] for st in stats.values())
            good = sum(st["tried"] - (0 if cfg.keep_anomalies and s != IS2RS else st["anomalous"])
                       for s, st in stats.items())
            rate = good / max(tried, 1)
            if bar is not None:
                bar.set_postfix_str(f"kept {sum(len(k) for k in kept.values())}/{sum(targets.values())}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    t_label = time.perf_counter() - t_start

    check_splits(kept, part)
    summary = {
        "config": cfg.to_json(),
        "energy": "adsorption-referenced: E_total - E_relaxed_clean_slab - sum mu_X (mu_H=E(H2)/2, "
                  "mu_O=E(H2O)-E(H2), mu_C=E(CO)-mu_O, mu_N=E(N2)/2), all from the same calculator; eV",
        "forces": "calculator forces on all atoms, eV/A (fixed atoms included, as in OC20)",
        "frames": "sid = relaxation id (unique across splits); fid = BFGS step for relaxation frames, "
                  "fid >= number of steps for rattled frames (free atoms displaced: rattled_per_system random "
                  "frames at rattle_std, then the last frame at each of minimum_rattle_stds), then "
                  "pressed_per_system pressed frames (adsorbate pushed into the slab, then rattled)",
        "sampling": SAMPLING[cfg.rigid],
        "gas_references_eV": refs,
        "partition": {"adsorbates": {k: [adsorbate_smiles(a) for a in v] for k, v in part["ads"].items()},
                      "catalysts": part["cat"]},
        "splits": {},
        "filtered": {},
        "force_bins_eV_per_A": [float(b) for b in FORCE_BINS],
        "near_minimum": f"frames whose largest free-atom force is below {NEAR_MIN} eV/A",
    }
    s2ef = out_dir / "s2ef"
    with atomic_dir(s2ef) as tmp:
        for s in SPLITS:
            data = [d for o in kept[s] for d in o["data"]]
            energies = [e for o in kept[s] for e in o["energies"]]
            write_raw_lmdb_dir(tmp / s, data, [o["natoms"] for o in kept[s] for _ in o["data"]])
            n_rattled = sum(o.get("n_rattled", 0) for o in kept[s])
            n_min = sum(o.get("n_minimum_rattled", 0) for o in kept[s])
            n_pressed = sum(o.get("n_pressed", 0) for o in kept[s])
            n_broken = sum(o.get("n_broken", 0) for o in kept[s])
            natoms = [o["natoms"] for o in kept[s]]
            fmax = np.array([f for o in kept[s] for f in o["max_free_force"]])
            summary["splits"][s] = {
                "systems": len(kept[s]),
                "frames": len(data),
                "relaxation_frames": len(data) - n_rattled - n_pressed - n_broken,
                "pressed_frames": n_pressed,
                "rattled_frames": n_rattled,
                "minimum_rattled_frames": n_min,  # of rattled_frames: copies of the last relaxation frame
                "broken_frames": n_broken,
                "systems_small_adsorbate_draw": sum(o["candidate"]["small"] for o in kept[s]),
                "systems_sampled_free": sum(not o["rigid"] for o in kept[s]),
                "systems_sampled_rigid": sum(o["rigid"] for o in kept[s]),
                "converged_relaxations": sum(o["converged"] for o in kept[s]),
                "near_minimum_frames": int((fmax < NEAR_MIN).sum()),
                "near_minimum_share": float((fmax < NEAR_MIN).mean()),
                "max_free_force_quantiles": {f"q{q}": float(np.quantile(fmax, q / 100)) for q in (5, 25, 50, 75, 95)},
                "free_force_histogram": [int(c) for c in np.sum([o["force_hist"] for o in kept[s]], axis=0)],
                "natoms_min": int(min(natoms)), "natoms_max": int(max(natoms)),
                "natoms_mean": float(np.mean(natoms)),
                "energy_mean": float(np.mean(energies)),
                "energy_std": float(np.std(energies)),
                "catalysts": sorted({o["candidate"]["catalyst"] for o in kept[s]}),
                "facets": sorted({"".join(map(str, o["candidate"]["miller"])) for o in kept[s]}),
                "adsorbates": sorted({adsorbate_smiles(o["candidate"]["adsorbate_id"]) for o in kept[s]}),
                "elements": sorted({sym for o in kept[s] for sym in _formula_elements(o)}),
                "sid_range": [int(min(o["candidate"]["sid"] for o in kept[s])),
                              int(max(o["candidate"]["sid"] for o in kept[s]))],
            }
            st = stats[s]
            summary["filtered"][s] = {"candidates_tried": int(st["tried"]),
                                      "anomalous": int(st["anomalous"]),
                                      **{a: int(st[a]) for a in ANOMALIES},
                                      "action": "kept with field `anomaly`" if cfg.keep_anomalies else "dropped"}
        force_histogram_png(summary, tmp / "forces.png")
        if IS2RS in targets:
            from .is2rs import write_is2rs

            # written (atomically) before s2ef/summary.json, which marks a complete dataset
            outs = kept[IS2RS]
            write_is2rs(out_dir / IS2RS, [pickle.loads(d) for o in outs for d in o["data"]])
            st = stats[IS2RS]
            summary[IS2RS] = {
                "path": str(out_dir / IS2RS),
                "systems": len(outs),
                "pools": f"val_id's (seen adsorbates of at most {cfg.is2rs_max_adsorbate_atoms} atoms on seen "
                         "catalysts), systems in no S2EF split",
                "reference": f"free BFGS relaxation to fmax {cfg.fmax} eV/A within {cfg.is2rs_max_steps} steps, "
                             "adsorbate unbroken (OC20's anomaly checks)",
                "candidates_tried": int(st["tried"]),
                "dropped": {k: int(st[k]) for k in (*ANOMALIES, "not_converged") if st[k]},
                "steps_mean": float(np.mean([o["steps"] for o in outs])) if outs else 0.0,
                "y_init_minus_y_relaxed_mean_eV": float(np.mean([o["y_init"] - o["energies"][0] for o in outs]))
                                                  if outs else 0.0,
            }
        summary["timing_s"] = {"label_and_relax": round(t_label, 2),
                               "total": round(time.perf_counter() - t_start, 2), "workers": workers}
        summary["catalysts"] = {c.name: {"prototype": c.prototype, "elements": list(c.elements)} for c in catalysts}
        summary["fingerprint"] = fingerprint(cfg, catalysts)
        summary["kernels"] = kernels()
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


SAMPLING = {
    "on": "adsorbate held rigid during relaxation (labels unconstrained)",
    "off": "free relaxation",
    "as_needed": "free relaxation; where it breaks the adsorbate (OC20's anomaly checks), a few of its frames "
                 "flagged (`anomaly` > 0, fid >= 10000) and the rest from a relaxation with the adsorbate held "
                 "rigid (`rigid` 1; labels unconstrained)",
}


def force_histogram_png(summary: dict, path: Path) -> None:
    """The free-atom |F| distribution of each split, with the near-minimum force marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.array(summary["force_bins_eV_per_A"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for s, sp in summary["splits"].items():
        counts = np.array(sp["free_force_histogram"], dtype=float)
        ax.stairs(counts / max(counts.sum(), 1), bins,
                  label=f"{s}: {100 * sp['near_minimum_share']:.1f} % of frames near a minimum")
    ax.axvline(NEAR_MIN, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("|F| on a free atom (eV/Å)")
    ax.set_ylabel("share of free atoms")
    ax.set_title(f"force distribution per split (dashed: {NEAR_MIN} eV/Å)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def numpy_dispatch_features() -> list[str]:
    """Numpy's run-time-dispatched SIMD targets this CPU has and this process uses."""
    try:
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy >= 2 moved them
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]


def kernels() -> dict:
    """What this process computes with: recorded in summary.json beside the data."""
    import platform

    from threadpoolctl import threadpool_info

    return {
        "pinned": os.environ.get(PINNED_MARK) == "1",
        "machine": platform.machine(),
        "glibc": "-".join(platform.libc_ver()),
        "numpy": np.__version__,
        "numpy_simd_dispatch": numpy_dispatch_features(),
        "blas": [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
                 for i in threadpool_info() if i.get("user_api") == "blas"],
        "env": {k: os.environ.get(k) for k in (*THREAD_ENV, "OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES",
                                               "GLIBC_TUNABLES", "ATEN_CPU_CAPABILITY")},
    }


def _formula_elements(o: dict) -> set[str]:
    ads = adsorbate_db()[o["candidate"]["adsorbate_id"]][0].get_chemical_symbols()
    cat = o["candidate"]["catalyst"]
    return set(ads) | {e for e in ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt") if e in cat}


def check_splits(kept: dict[str, list[dict]], part: dict) -> None:
    """Assert OC20's split semantics on what was actually kept (raises AssertionError)."""
    seen_a, unseen_a = set(part["ads"]["seen"]), set(part["ads"]["unseen"])
    seen_c, unseen_c = set(part["cat"]["seen"]), set(part["cat"]["unseen"])
    systems: dict = {}
    sids: set = set()
    for s, outs in kept.items():
        ap, cp = SPLIT_POOLS[s]
        for o in outs:
            c = o["candidate"]
            assert c["adsorbate_id"] in (seen_a if ap == "seen" else unseen_a), (s, c)
            assert c["catalyst"] in (seen_c if cp == "seen" else unseen_c), (s, c)
            key = (c["catalyst"], c["miller"], c["adsorbate_id"])
            assert key not in systems, f"system {key} in both {systems.get(key)} and {s}"
            systems[key] = s
            assert c["sid"] not in sids
            sids.add(c["sid"])


def fingerprint(cfg: GenConfig, catalysts: list[Catalyst] | None = None) -> str:
    """Hash of the generating arguments, catalyst list and library versions that change the labels."""
    import ase

    try:
        from importlib.metadata import version

        fc = version("fairchem-data-oc")
    except Exception:  # pragma: no cover
        fc = "?"
    cats = [dataclasses.astuple(c) for c in (catalysts or default_catalysts())]
    blob = json.dumps({"cfg": cfg.to_json(), "catalysts": cats, "ase": ase.__version__, "fairchem-data-oc": fc},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def existing_matches(out_dir: Path | str, cfg: GenConfig, catalysts: list[Catalyst] | None = None) -> bool:
    """True when ``out_dir/s2ef`` holds a complete dataset made with these arguments."""
    s2ef = Path(out_dir) / "s2ef"
    try:
        summary = json.loads((s2ef / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    if summary.get("fingerprint") != fingerprint(cfg, catalysts):
        return False
    folders = [s2ef / s for s in SPLITS] + ([Path(out_dir) / IS2RS] if cfg.is2rs_systems else [])
    return all((f / "data.lmdb").is_file() and (f / "metadata.npz").is_file() for f in folders)
