"""The relaxation benchmark's ceiling: the reference calculator's own forces, with errors of a chosen
size, relaxed by fairchem's batched LBFGS with the settings ``fairchem --mode run-relaxations`` uses.

Why: the benchmark (:mod:`leignn_ocp.evaluation.relaxations`) scores a model's relaxations with the
reference calculator (lowered below the start, E_ref - E_ref(minimum), ADwT). With exact forces the
pipeline itself must lower every system and land on the reference minima; with an error of a given
size it shows how accurate a model's forces must be before a bar such as "95 % lowered" can be met,
and which kind of error does the harm:

* ``fixed``: one random force per atom, drawn once per system (a model that is wrong in the same way
  along the whole path: the relaxation settles where the error balances the restoring force);
* ``fresh``: a new random force at every call (a model whose error changes from step to step: LBFGS
  builds its curvature from force differences, so the noise enters every update).

The error's size ``sigma`` is given as a force MAE per component (eV/Å, what fairchem's evaluator
reports as ``forces_mae``): Gaussian components of standard deviation sigma * sqrt(pi / 2).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leignn_ocp.data.is2rs import read_is2rs, record_atoms, validate_is2rs
from leignn_ocp.evaluation.relaxations import reference_scores

NOISE_KINDS = ("fixed", "fresh")
CEILING_METRICS = ("lowered", "dE_median", "dE_mean", "within_0.1", "adwt", "converged")


class ReferenceTrainer:
    """What fairchem's ``OptimizableBatch`` asks of a trainer (``device``, ``predict``), answered by an
    ASE calculator at each structure of the batch, plus an error of MAE ``sigma`` (module docstring)."""

    def __init__(self, calc, sigma: float = 0.0, kind: str = "fixed", seed: int = 0):
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
        if not (sigma >= 0.0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a finite force MAE >= 0 (eV/Å), got {sigma!r}")
        self.calc, self.kind, self.device = calc, kind, torch.device("cpu")
        self.std = sigma * math.sqrt(math.pi / 2)  # per component: E|x| = std * sqrt(2 / pi)
        self.rng = np.random.default_rng(seed)
        self._fixed: np.ndarray | None = None  # [N, 3], drawn at the first call
        self.calls = 0

    def _error(self, n: int) -> np.ndarray:
        if self.kind == "fresh" or self._fixed is None:
            err = self.rng.normal(0.0, self.std, size=(n, 3))  # [N, 3] eV/Å
            if self.kind == "fixed":
                self._fixed = err
            return err
        return self._fixed

    def predict(self, batch, per_image: bool = False, disable_tqdm: bool = True) -> dict:
        self.calls += 1
        energies, forces = [], []
        for d in batch.to_data_list():
            atoms = record_atoms(d, d.pos)
            atoms.calc = self.calc
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
        f = np.concatenate(forces)  # [N, 3]
        f = f + self._error(len(f))
        return {"energy": torch.tensor(energies, dtype=torch.float32),  # [B]
                "forces": torch.tensor(f, dtype=torch.float32)}  # [N, 3]


def adwt(records: Sequence, positions: Sequence[np.ndarray]) -> float:
    """fairchem's IS2RS ADwT over free atoms (as its run_relaxations scores it), by its own evaluator."""
    from fairchem.core.modules.evaluator import average_distance_within_threshold

    free = [d.fixed.numpy() == 0 for d in records]
    pred = torch.tensor(np.concatenate([np.asarray(p)[m] for p, m in zip(positions, free)]))  # [N_free, 3]
    target = torch.cat([d.pos_relaxed[torch.as_tensor(m)] for d, m in zip(records, free)]).double()
    natoms = torch.tensor([int(m.sum()) for m in free])
    cell = torch.cat([d.cell.reshape(1, 3, 3) for d in records]).double()  # [B, 3, 3]
    out = average_distance_within_threshold({"positions": pred, "natoms": natoms},
                                            {"positions": target, "cell": cell, "natoms": natoms,
                                             "pbc": torch.tensor([True, True, True])})
    return float(out["metric"])


def relax_with_reference(records: Sequence, calc, relax_opt: dict, steps: int, fmax: float, sigma: float = 0.0,
                         kind: str = "fixed", seed: int = 0) -> dict:
    """One batched LBFGS relaxation of every record with the reference forces (+ error); the benchmark's
    reference metrics, ADwT and the share that met ``fmax`` (by the forces the optimizer saw)."""
    from fairchem.core.common.relaxation.ml_relaxation import ml_relax
    from fairchem.core.datasets import data_list_collater

    from leignn_ocp.trainer import instantiable_optimizable_batch

    instantiable_optimizable_batch()
    trainer = ReferenceTrainer(calc, sigma, kind, seed)
    batch = data_list_collater([d.clone() for d in records], otf_graph=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # fairchem's LBFGS logs every step's fmax at INFO
    try:
        relaxed = ml_relax(batch, trainer, steps=steps, fmax=fmax, relax_opt=dict(relax_opt, traj_dir=None),
                           save_full_traj=False)
    finally:
        root.setLevel(level)
    positions = torch.split(relaxed.pos.detach().double(), relaxed.natoms.tolist())  # B x [N_b, 3]
    positions = [p.numpy() for p in positions]
    f = torch.as_tensor(relaxed.forces).reshape(-1, 3).norm(dim=1)  # [N] the optimizer's last forces
    f[relaxed.fixed == 1] = 0.0
    fmax_b = torch.stack([x.max() for x in torch.split(f, relaxed.natoms.tolist())])  # [B]
    row = reference_scores(records, positions, calc)
    row.update(adwt=adwt(records, positions), converged=float((fmax_b < fmax).float().mean()),
               sigma=sigma, kind=kind, seed=seed, calls=trainer.calls, n=len(records))
    return row


def run_ceiling(is2rs: Path, out: Path, sigmas: Sequence[float], kinds: Sequence[str] = NOISE_KINDS,
                seeds: Sequence[int] = (0,), config: Path = Path("configs/is2rs/default/base.yml"),
                reference: str = "emt") -> list[dict]:
    """Every (kind, sigma, seed); rows in ``<out>/ceiling.json``, the table ``ceiling.md``, ``ceiling.png``."""
    from leignn_ocp.lineup import load_config
    from leignn_ocp.md.relax import reference_calculator

    validate_is2rs(is2rs)
    task = load_config(config)["task"]
    records = [d for _, d in read_is2rs(is2rs)]
    calc = reference_calculator(reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    settings = [(kinds[0], 0.0)] * (0.0 in sigmas) + [(k, s) for k in kinds for s in sigmas if s > 0]
    for kind, sigma in settings:
        for seed in (seeds if sigma > 0 else seeds[:1]):  # no error: one deterministic run
            row = relax_with_reference(records, calc, task["relax_opt"], int(task["relaxation_steps"]),
                                       float(task["relaxation_fmax"]), sigma, kind, seed)
            rows.append(row)
            print(f"  {'none' if sigma == 0 else kind:5s} sigma {sigma:.3f} eV/A seed {seed}: lowered "
                  f"{row['lowered']:.2f}, dE median {row['dE_median']:+.3f} eV, ADwT {row['adwt']:.3f}, "
                  f"converged {row['converged']:.2f}", flush=True)
    tmp = out / "ceiling.json.tmp"
    tmp.write_text(json.dumps({"is2rs": str(is2rs), "reference": reference, "task": task, "rows": rows}, indent=1))
    tmp.replace(out / "ceiling.json")
    (out / "ceiling.md").write_text(ceiling_markdown(rows))
    ceiling_png(rows, out / "ceiling.png")
    return rows


def _by_setting(rows: Sequence[dict]) -> dict:
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["sigma"]), []).append(r)
    return by


def ceiling_markdown(rows: Sequence[dict]) -> str:
    """Mean ± std (ddof 1) over seeds of each (kind, sigma)."""
    lines = ["| error | force MAE added (eV/Å) | seeds | " + " | ".join(CEILING_METRICS) + " |",
             "|---" * (len(CEILING_METRICS) + 3) + "|"]
    for (kind, sigma), rs in _by_setting(rows).items():
        cells = []
        for m in CEILING_METRICS:
            v = np.array([r[m] for r in rs], dtype=float)
            cells.append(f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {'none' if sigma == 0 else kind} | {sigma:g} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ceiling_png(rows: Sequence[dict], path: Path) -> None:
    """Share lowered and median E_ref - E_ref(minimum) against the added force MAE, per kind of error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_setting(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in NOISE_KINDS:
        pts = sorted((s, rs) for (k, s), rs in by.items() if k == kind or s == 0)
        if not any(s > 0 for s, _ in pts):
            continue
        xs = [s for s, _ in pts]
        for ax, m in zip(axes, ("lowered", "dE_median")):
            v = [np.array([r[m] for r in rs]) for _, rs in pts]
            ax.errorbar(xs, [x.mean() for x in v], yerr=[x.std(ddof=1) if len(x) > 1 else 0 for x in v],
                        marker="o", capsize=3, label=f"{kind} error")
    axes[0].axhline(0.95, color="grey", ls="--", lw=1, label="95 %")
    axes[0].set_ylabel("share with E_ref(end) < E_ref(start)")
    axes[1].set_ylabel("median E_ref(end) - E_ref(minimum) (eV)")
    for ax in axes:
        ax.set_xlabel("force MAE added to the reference forces (eV/Å)")
        ax.legend()
    fig.suptitle("fairchem LBFGS on the IS2RS set with reference forces + error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
