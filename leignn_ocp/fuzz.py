"""Seeded fuzzing of LEIGNN's input: valid structures give finite, symmetric, batch-independent
energies and forces; invalid ones stop with one of the named errors of ``leignn_ocp.checks``.

Every case is drawn from ``numpy.random.default_rng((seed, class index, case))``, so a failure is
replayed by its (class, case) alone. ``tests/test_fuzz.py`` runs ~1000 cases;
``python -m leignn_ocp.fuzz --cases 20000`` runs more and prints the same report.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, bcc110, bulk, fcc100, fcc111, molecule

from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.testing import predict, random_orthogonal, roundoff_tol, transform_case, transformed

CUTOFF = 4.0  # Å: small, so that the cases stay cheap; the checks scale with it
ELEMENTS = ["H", "C", "N", "O", "F", "S", "Cl", "Cu", "Pt", "Fe", "Na", "Si"]
METALS = ["Cu", "Pt", "Pd", "Ag", "Au", "Ni", "Al"]
ADSORBATES = ["O", "H", "CO", "OH", "H2O", "CH3", "NH3"]
BULKS = [("Cu", "fcc", 3.6), ("Fe", "bcc", 2.87), ("Na", "bcc", 4.23), ("Si", "diamond", 5.43),
         ("Mg", "hcp", 3.21), ("NaCl", "rocksalt", 5.64), ("Al", "fcc", 4.05)]


# --------------------------------------------------------------------------- valid structures

def random_molecule(rng, n: int | None = None, min_dist: float = 0.8) -> Atoms:
    """1-20 random atoms grown from a seed atom, each 0.9-2 Å from one before and no two closer
    than ``min_dist``: a molecule-like cluster without a cell."""
    n = int(rng.integers(1, 21)) if n is None else n
    pos = [np.zeros(3)]
    while len(pos) < n:
        d = rng.normal(size=3)
        p = pos[int(rng.integers(len(pos)))] + d / np.linalg.norm(d) * rng.uniform(0.9, 2.0)
        if np.min(np.linalg.norm(np.array(pos) - p, axis=1)) >= min_dist:
            pos.append(p)
    atoms = Atoms(list(rng.choice(ELEMENTS, size=n)), positions=np.array(pos))
    return transformed(atoms, q=random_orthogonal(int(rng.integers(1 << 30)), reflect=False))


def random_slab(rng) -> Atoms:
    """A rattled fcc(111) / fcc(100) / bcc(110) slab with an adsorbate, periodic with vacuum."""
    builder = [fcc111, fcc100, bcc110][int(rng.integers(3))]
    metal = "Fe" if builder is bcc110 else str(rng.choice(METALS))
    size = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(2, 4)))
    slab = builder(metal, size=size, vacuum=float(rng.uniform(4, 10)))
    ads = str(rng.choice(ADSORBATES))
    add_adsorbate(slab, molecule(ads) if len(ads) > 1 else Atoms(ads), float(rng.uniform(1.5, 2.5)), "ontop")
    slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
    slab.pbc = True
    return slab


def random_bulk(rng, primitive: bool = False) -> Atoms:
    """A rattled, strained crystal: a primitive cell (1-2 atoms, cell heights of 1-3 Å, many
    images within the cutoff) or a small conventional supercell."""
    name, kind, a = BULKS[int(rng.integers(len(BULKS)))]
    atoms = bulk(name, kind, a=a * rng.uniform(0.95, 1.05), cubic=not primitive and kind != "hcp")
    if not primitive:
        atoms = atoms.repeat(tuple(int(k) for k in rng.integers(1, 3, size=3)))
    strain = np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
    return atoms


def in_box(atoms: Atoms, rng, side: tuple[float, float]) -> Atoms:
    """A molecule in a periodic cubic cell of a random side (huge cells: hundreds of Å)."""
    a = atoms.copy()
    a.set_cell(np.eye(3) * rng.uniform(*side))
    a.center()
    a.pbc = True
    return a


def periodic_structure(rng) -> Atoms:
    kind = int(rng.integers(3))
    return random_slab(rng) if kind == 0 else random_bulk(rng) if kind == 1 else in_box(
        random_molecule(rng), rng, (2 * CUTOFF + 25, 40))


# --------------------------------------------------------------------------- the cases

@dataclass
class Models:
    """The fuzzed models: the molecule path in float64 (direct and -dE/dx forces) and the
    periodic path in float32 (fairchem's periodic graph is float32 only)."""
    molecule: torch.nn.Module
    molecule_conservative: torch.nn.Module
    periodic: torch.nn.Module

    @classmethod
    def build(cls, seed: int = 0) -> Models:
        from leignn_ocp.model import LEIGNN

        def make(use_pbc: bool, direct: bool, dtype):
            torch.manual_seed(seed)
            m = LEIGNN(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=CUTOFF, max_neighbors=500,
                       use_pbc=use_pbc, direct_forces=direct, zero_init_energy=False)
            return m.to(dtype).eval()

        return cls(make(False, True, torch.float64), make(False, False, torch.float64),
                   make(True, True, torch.float32))


def _close(a: torch.Tensor, b: torch.Tensor, dtype, ulps: float) -> float:
    """|a - b| in units of the round-off bound (<= 1 passes)."""
    return (a - b).abs().max().item() / roundoff_tol(dtype, b.abs().max().item(), ulps)


def _finite(e, f) -> None:
    if not (torch.isfinite(e).all() and torch.isfinite(f).all()):
        raise AssertionError("non-finite energy or forces")


def _symmetric(model, atoms: Atoms, dtype, rng, kinds=("rotation", "reflection", "translation", "permutation")):
    """Finite outputs, and invariance under one random transform of a random kind."""
    e0, f0 = predict(model, atoms, dtype)
    _finite(e0, f0)
    kind = kinds[int(rng.integers(len(kinds)))]
    a, expected = transform_case(atoms, f0, kind, rng, shift=5.0)
    e, f = predict(model, a, dtype)
    _finite(e, f)
    err = max(_close(e, e0, dtype, 2000), _close(f, expected, dtype, 2000))
    if err > 1:
        raise AssertionError(f"{kind}: outputs change by {err:.2g} x the round-off bound")


def _batched(model, structures: list[Atoms], dtype) -> None:
    alone = [predict(model, a, dtype) for a in structures]
    e, f = predict(model, structures, dtype)
    _finite(e, f)
    err = max(_close(e, torch.cat([x for x, _ in alone]), dtype, 2000),
              _close(f, torch.cat([x for _, x in alone]), dtype, 2000))
    if err > 1:
        raise AssertionError(f"batching: a batch differs from its members alone by {err:.2g} x the round-off bound")


def _outside(model, rng) -> None:
    """Atoms moved by whole lattice vectors (up to 20 cells away) change nothing."""
    atoms = periodic_structure(rng)
    moved = atoms.copy()
    moved.positions += rng.integers(-20, 21, size=(len(atoms), 3)) @ atoms.cell.array
    e0, f0 = predict(model, atoms, torch.float32)
    e, f = predict(model, moved, torch.float32)
    _finite(e, f)
    err = max(_close(e, e0, torch.float32, 2000), _close(f, f0, torch.float32, 2000))
    if err > 1:
        raise AssertionError(f"atoms outside the cell: outputs change by {err:.2g} x the round-off bound")


def _molecule_model(m: Models, rng) -> torch.nn.Module:
    """Direct or -dE/dx forces, drawn per case."""
    return m.molecule if rng.random() < 0.5 else m.molecule_conservative


VALID: dict[str, Callable[[Models, np.random.Generator], None]] = {
    "molecule": lambda m, rng: _symmetric(_molecule_model(m, rng), random_molecule(rng), torch.float64, rng),
    "single atom (molecule)": lambda m, rng: _symmetric(m.molecule, random_molecule(rng, 1), torch.float64, rng),
    "single atom (periodic box)": lambda m, rng: _symmetric(
        m.periodic, in_box(random_molecule(rng, 1), rng, (3.0, 30.0)), torch.float32, rng),
    "slab + adsorbate": lambda m, rng: _symmetric(m.periodic, random_slab(rng), torch.float32, rng),
    "bulk supercell": lambda m, rng: _symmetric(m.periodic, random_bulk(rng), torch.float32, rng),
    "tiny cell (primitive)": lambda m, rng: _symmetric(m.periodic, random_bulk(rng, primitive=True),
                                                       torch.float32, rng),
    "huge cell (40-500 Å)": lambda m, rng: _symmetric(m.periodic, in_box(random_molecule(rng), rng, (40.0, 500.0)),
                                                       torch.float32, rng),
    "atoms far outside the cell": lambda m, rng: _outside(m.periodic, rng),
    "mixed periodic batch": lambda m, rng: _batched(
        m.periodic, [periodic_structure(rng) for _ in range(int(rng.integers(2, 6)))], torch.float32),
    "mixed molecule batch": lambda m, rng: _batched(
        _molecule_model(m, rng), [random_molecule(rng) for _ in range(int(rng.integers(2, 6)))], torch.float64),
}


# --------------------------------------------------------------------------- invalid input

def _with_close_pair(rng, periodic: bool, gap: tuple[float, float]) -> Atoms:
    """A valid structure plus one atom ``gap`` Å from an existing one (through an image when
    ``periodic``: the copy sits several cells away)."""
    atoms = periodic_structure(rng) if periodic else random_molecule(rng, int(rng.integers(2, 15)))
    i = int(rng.integers(len(atoms)))
    d = rng.normal(size=3)
    p = atoms.positions[i] + d / np.linalg.norm(d) * rng.uniform(*gap)
    if periodic:
        p = p + rng.integers(-3, 4, size=3) @ atoms.cell.array
    atoms.append(str(rng.choice(ELEMENTS)))
    atoms.positions[-1] = p
    return atoms


def _degenerate_cell(rng) -> Atoms:
    atoms = random_bulk(rng)
    cell = atoms.cell.array.copy()
    k = int(rng.integers(3))
    cell[k] *= rng.uniform(1e-5, 0.09) / np.linalg.norm(cell[k])
    atoms.set_cell(cell, scale_atoms=False)
    return atoms


def _zero_volume(rng) -> Atoms:
    atoms = random_bulk(rng)
    cell = atoms.cell.array.copy()
    i, j = rng.permutation(3)[:2]
    if rng.random() < 0.5:
        cell[i] = 0.0  # a missing lattice vector
    else:
        cell[i] = cell[j] * rng.uniform(0.5, 2)  # two parallel ones
    atoms.set_cell(cell, scale_atoms=False)
    return atoms


def _too_many_images(rng) -> Atoms:
    """One atom in a cell whose heights (0.15-0.8 Å on two or three axes) pass min_distance but
    need more than MAX_IMAGES images for the cutoff."""
    from leignn_ocp.checks import MAX_IMAGES

    while True:
        h = rng.uniform(0.15, 0.8, 3)
        if rng.random() < 0.5:
            h[int(rng.integers(3))] = rng.uniform(5, 20)
        if np.prod(2 * np.ceil(CUTOFF / h) + 1) > MAX_IMAGES:
            break
    return Atoms(str(rng.choice(ELEMENTS)), positions=[[0.0, 0.0, 0.0]], cell=np.diag(h), pbc=True)


def _nonfinite(rng, periodic: bool) -> Atoms:
    atoms = periodic_structure(rng) if periodic else random_molecule(rng)
    atoms.positions[int(rng.integers(len(atoms))), int(rng.integers(3))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
    return atoms


def _bad_element(rng, periodic: bool):
    batch = (atoms_to_batch(periodic_structure(rng)) if periodic
             else atoms_to_batch(random_molecule(rng), torch.float64))
    z = [0, -1, 119, 200, 1000][int(rng.integers(5))]
    batch.atomic_numbers[int(rng.integers(batch.atomic_numbers.numel()))] = z
    return batch


def _bad_shapes(rng):
    """Hand-built batches whose tensors disagree: each kind is a mistake made building one by hand."""
    structures = [periodic_structure(rng) for _ in range(int(rng.integers(1, 4)))]
    batch = atoms_to_batch(structures)
    n = batch.pos.shape[0]
    kind = int(rng.integers(6))
    if kind == 0:
        batch.pos = batch.pos[:, :2]
    elif kind == 1:
        batch.atomic_numbers = batch.atomic_numbers[:-1]
    elif kind == 2:
        batch.natoms = batch.natoms.clone()
        batch.natoms[-1] += int(rng.integers(1, 5))
    elif kind == 3:
        batch.batch = batch.batch.flip(0) if len(structures) > 1 else batch.batch + 1
    elif kind == 4:
        batch.cell = batch.cell[:, :2]
    else:
        batch.batch = batch.batch[: n - 1]
    return batch


_CLOSE = r"atoms \d+ and \d+ of structure \d+ are [-+.e\d]+ Å apart.* under min_distance=0\.1 Å: a duplicated atom\?"
INVALID: dict[str, tuple[Callable[[np.random.Generator], object], bool, str]] = {
    # class: (generator, periodic model?, the error it must raise)
    "coincident atoms (molecule)": (lambda rng: _with_close_pair(rng, False, (0.0, 0.0)), False, _CLOSE),
    "near-coincident atoms (molecule, < 0.1 Å)": (lambda rng: _with_close_pair(rng, False, (1e-4, 0.095)), False, _CLOSE),
    "coincident atoms (periodic, < 0.01 Å: fairchem drops the pair)": (
        lambda rng: _with_close_pair(rng, True, (0.0, 0.009)), True, _CLOSE),
    "near-coincident atoms (periodic image, < 0.1 Å)": (
        lambda rng: _with_close_pair(rng, True, (0.01, 0.095)), True, _CLOSE),
    "degenerate cell (a lattice vector < 0.1 Å)": (_degenerate_cell, True, r"has a degenerate cell: [-+.e\d]+ Å between the faces"),
    "zero-volume cell": (_zero_volume, True, r"(have a zero-volume cell|has a degenerate cell)"),
    "cell needing too many images": (_too_many_images, True, r"would need \d+ periodic images for the 4\.0 Å cutoff"),
    "no cell on the periodic path": (lambda rng: random_molecule(rng), True, r"have a zero-volume cell"),
    "non-finite positions (molecule)": (lambda rng: _nonfinite(rng, False), False, r"non-finite positions for atoms \[\d+\]"),
    "non-finite positions (periodic)": (lambda rng: _nonfinite(rng, True), True, r"non-finite positions for atoms \[\d+\]"),
    "atomic number outside 1..118": (lambda rng: _bad_element(rng, bool(rng.integers(2))), None,
                                     r"atomic numbers \[-?\d+\] outside the embedding \(1\.\.118\)"),
    "hand-built batch with mismatched shapes": (_bad_shapes, True,
                                                r"(must be \[|inconsistent batch)"),
}


# --------------------------------------------------------------------------- the run

@dataclass
class Report:
    cases: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        width = max(map(len, self.cases))
        out = [f"{'input class':<{width}}  cases  failed"]
        for name, n in self.cases.items():
            out.append(f"{name:<{width}}  {n:5d}  {sum(f[0] == name for f in self.failures):6d}")
        out.append(f"{sum(self.cases.values())} cases in {self.seconds:.0f} s, {len(self.failures)} failed "
                   "(valid: finite and invariant; invalid: the named ValueError, no output)")
        out += [f"FAILED {name} case {k}: {msg}" for name, k, msg in self.failures[:20]]
        return out


def run(cases: int = 1000, seed: int = 0, models: Models | None = None, progress: bool = False) -> Report:
    """About ``cases`` cases spread evenly over every class of :data:`VALID` and :data:`INVALID`."""
    models = models or Models.build(seed)
    classes = [(n, True, f) for n, f in VALID.items()] + [(n, False, f) for n, f in INVALID.items()]
    per_class = max(1, math.ceil(cases / len(classes)))
    report, t0 = Report(), time.time()
    for ci, (name, valid, spec) in enumerate(classes):
        report.cases[name] = per_class
        for k in range(per_class):
            rng = np.random.default_rng((seed, ci, k))
            try:
                if valid:
                    spec(models, rng)
                else:
                    _expect_error(models, rng, *spec)
            except Exception as err:  # noqa: BLE001 - every failure is reported, with its case
                report.failures.append((name, k, f"{type(err).__name__}: {err}"))
        if progress:
            print(f"[{time.time() - t0:5.0f} s] {name}: {per_class} cases", file=sys.stderr, flush=True)
    report.seconds = time.time() - t0
    return report


def _expect_error(models: Models, rng, make, periodic, pattern: str) -> None:
    data = make(rng)
    if periodic is None:  # the generator picked a path; its batch knows which
        periodic = bool(data.cell.abs().sum() > 0)
    model, dtype = (models.periodic, torch.float32) if periodic else (models.molecule, torch.float64)
    batch = data if hasattr(data, "natoms") else atoms_to_batch(data, dtype)
    try:
        with torch.no_grad():
            out = model(batch)
    except ValueError as err:
        if not re.search(pattern, str(err)):
            raise AssertionError(f"wrong error: {err}") from None
        return
    bad = "NaN" if any(not torch.isfinite(v).all() for v in out.values()) else "finite numbers"
    raise AssertionError(f"no error: the model returned {bad}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m leignn_ocp.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    report = run(a.cases, a.seed, progress=True)
    print("\n".join(report.lines()))
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
