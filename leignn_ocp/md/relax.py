"""Relax a structure with a trained checkpoint (or any ASE calculator), and say how it went.

An S2EF model used for relaxations can fail quietly: forces that never fall under ``fmax``, or an
optimizer that follows the model's forces uphill in the model's own energy (direct forces are not
-dE/dx). :func:`relax` caps the steps, keeps FixAtoms, writes every step to a trajectory, stops on
non-finite output, and returns a :class:`Relaxation` whose ``problems`` name each of these; with a
``reference`` calculator (the one that labelled the data) it also reports whether the relaxed
structure is lower in the reference's energy.

    leignn-relax --checkpoint best_checkpoint.pt --structure slab.traj --out relaxed.traj --reference emt
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read
from ase.io.trajectory import Trajectory
from ase.optimize import BFGS, FIRE

OPTIMIZERS = {"bfgs": BFGS, "fire": FIRE}


class RelaxationError(RuntimeError):
    """The calculator returned a non-finite energy or force; the trajectory holds every step before."""


@dataclass
class Relaxation:
    converged: bool
    steps: int
    fmax: float  # the largest force on a free atom at the end (eV/Å)
    energies: list[float]  # the model's energy at every step (eV)
    max_rise: float  # the largest rise of the model's energy above its lowest value so far (eV)
    uphill: bool  # the final energy above the initial one by more than energy_tol
    reference_initial: float | None = None  # the reference calculator's energy before and after
    reference_final: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def reference_lowered(self) -> bool | None:
        if self.reference_initial is None:
            return None
        return self.reference_final < self.reference_initial


def _free_fmax(atoms: Atoms) -> float:
    """The largest force norm on the atoms the constraints leave free (ASE applies FixAtoms)."""
    f = atoms.get_forces(apply_constraint=True)
    return float(np.sqrt((f ** 2).sum(axis=1)).max()) if len(f) else 0.0


def relax(atoms: Atoms, calc, optimizer: str = "bfgs", fmax: float = 0.05, steps: int = 300,
          trajectory: str | Path | None = None, reference=None, energy_tol: float = 1e-3,
          maxstep: float = 0.2) -> Relaxation:
    """Relax ``atoms`` (in place) with ``calc`` by BFGS or FIRE, at most ``steps`` steps.

    reference: an ASE calculator evaluated on the start and the end structure only.
    energy_tol (eV): what counts as uphill. maxstep (Å): the optimizer's largest move per step.
    """
    name = optimizer.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if steps < 0 or fmax <= 0:
        raise ValueError(f"steps must be >= 0 and fmax > 0, got steps={steps}, fmax={fmax}")
    ref_initial = None
    if reference is not None:
        probe = atoms.copy()
        probe.calc = reference
        ref_initial = float(probe.get_potential_energy())
    atoms.calc = calc
    energies: list[float] = []

    def record() -> None:
        e = float(atoms.get_potential_energy())
        f = atoms.get_forces()
        if not (math.isfinite(e) and np.isfinite(f).all()):
            raise RelaxationError(f"non-finite {'energy' if not math.isfinite(e) else 'forces'} at step "
                                  f"{len(energies)}; the trajectory holds the steps before")
        energies.append(e)

    record()  # step 0, before the optimizer writes anything
    opt = OPTIMIZERS[name](atoms, logfile=None, maxstep=maxstep)
    opt.attach(record, interval=1)  # first: a non-finite step raises before it is written
    traj = None if trajectory is None else Trajectory(str(trajectory), "w", atoms)
    if traj is not None:
        opt.attach(traj.write, interval=1)
    try:
        converged = bool(opt.run(fmax=fmax, steps=steps))
    finally:
        if traj is not None:
            traj.close()
    energies = energies[1:] if len(energies) > 1 else energies  # the observer also runs at step 0
    e = np.array(energies)
    rise = float((e - np.minimum.accumulate(e)).max()) if len(e) else 0.0
    result = Relaxation(converged=converged, steps=int(opt.nsteps), fmax=_free_fmax(atoms),
                        energies=[float(x) for x in e], max_rise=rise,
                        uphill=bool(e[-1] > e[0] + energy_tol))
    if reference is not None:
        probe = atoms.copy()
        probe.calc = reference
        result.reference_initial, result.reference_final = ref_initial, float(probe.get_potential_energy())
    if not converged:
        result.problems.append(f"not converged: max free-atom force {result.fmax:.3g} eV/Å > fmax {fmax} "
                               f"after {result.steps} steps")
    if result.uphill:
        result.problems.append(f"uphill in the model's own energy: {e[-1] - e[0]:+.4g} eV from start to end "
                               "(forces that are not -dE/dx?)")
    elif rise > energy_tol:
        result.problems.append(f"the model's energy rose by up to {rise:.4g} eV on the way")
    if reference is not None and result.reference_final > result.reference_initial + energy_tol:
        result.problems.append(f"the reference energy went up: {result.reference_initial:.4f} -> "
                               f"{result.reference_final:.4f} eV")
    return result


def reference_calculator(name: str):
    """An ASE calculator by name for ``--reference``: emt (the embedded data's labels)."""
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    raise ValueError(f"unknown reference calculator {name!r} (known: emt)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="leignn-relax", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="fairchem checkpoint of a LEIGNN model")
    p.add_argument("--structure", required=True, type=Path, help="start structure (any ASE format; last frame)")
    p.add_argument("--out", required=True, type=Path, help="trajectory of every step (.traj)")
    p.add_argument("--optimizer", default="bfgs", choices=sorted(OPTIMIZERS))
    p.add_argument("--fmax", type=float, default=0.05, help="converged below this free-atom force (eV/Å)")
    p.add_argument("--steps", type=int, default=300, help="step cap")
    p.add_argument("--maxstep", type=float, default=0.2, help="largest move per step (Å)")
    p.add_argument("--reference", default=None, help="calculator scoring start and end: emt")
    p.add_argument("--cpu", action="store_true", default=True)
    a = p.parse_args(argv)
    from leignn_ocp.md.calculator import LEIGNNCalculator

    atoms = read(a.structure, -1)
    result = relax(atoms, LEIGNNCalculator(a.checkpoint, cpu=a.cpu), a.optimizer, a.fmax, a.steps, a.out,
                   reference_calculator(a.reference) if a.reference else None, maxstep=a.maxstep)
    summary = {**asdict(result), "reference_lowered": result.reference_lowered}
    a.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"{'converged' if result.converged else 'NOT converged'} in {result.steps} steps, fmax {result.fmax:.3g} "
          f"eV/Å, model energy {result.energies[0]:.4f} -> {result.energies[-1]:.4f} eV")
    for problem in result.problems:
        print(f"WARNING: {problem}")
    return 0 if not result.problems else 2


if __name__ == "__main__":
    raise SystemExit(main())
