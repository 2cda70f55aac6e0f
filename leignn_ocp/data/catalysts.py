"""Catalyst bulks (ASE) and OC20-protocol slabs (fairchem.data.oc), adsorbates from OC20's database.

Bulks: fcc elemental metals and fcc-based ordered binary alloys (L1_2 A3B, L1_0 AB) of the metals
ASE's EMT parameterises, lattice constant fitted with the labelling calculator (EOS on the cubic
cell) so that clean slabs start near equilibrium for EMT or any other calculator.
Slabs: fairchem.data.oc's ``Slab`` (pymatgen SlabGenerator, >= 7 A thick, >= 8 A in-plane, 20 A
vacuum, surface atoms tagged 1, subsurface 0 and fixed) -- OC20's own slab protocol.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, reference_states

EMT_METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
EMT_ADSORBATE_ELEMENTS = frozenset({"H", "C", "N", "O"})

# (name, prototype, A, B): A3B for L1_2, AB for L1_0 (c/a = 1 kept: a cubic fcc superlattice)
DEFAULT_ALLOYS: tuple[tuple[str, str, str, str], ...] = (
    ("Cu3Au", "L1_2", "Cu", "Au"),
    ("Cu3Pt", "L1_2", "Cu", "Pt"),
    ("Ni3Al", "L1_2", "Ni", "Al"),
    ("Pt3Ni", "L1_2", "Pt", "Ni"),
    ("CuAu", "L1_0", "Cu", "Au"),
    ("NiPt", "L1_0", "Ni", "Pt"),
    ("CuPd", "L1_0", "Cu", "Pd"),
)


@dataclass(frozen=True)
class Catalyst:
    """A bulk composition; ``name`` is its reduced formula (the OOD-cat unit)."""

    name: str
    prototype: str  # "fcc", "L1_2", "L1_0"
    a: str
    b: str | None = None

    @property
    def elements(self) -> tuple[str, ...]:
        return (self.a,) if self.b is None else (self.a, self.b)


def default_catalysts() -> list[Catalyst]:
    return [Catalyst(m, "fcc", m) for m in EMT_METALS] + [Catalyst(*t) for t in DEFAULT_ALLOYS]


def _vegard_a(cat: Catalyst) -> float:
    if cat.b is None:
        return float(reference_states[atomic_numbers[cat.a]]["a"])
    xa = 0.75 if cat.prototype == "L1_2" else 0.5
    aa = reference_states[atomic_numbers[cat.a]]["a"]
    ab = reference_states[atomic_numbers[cat.b]]["a"]
    return float(xa * aa + (1 - xa) * ab)


def cubic_bulk(cat: Catalyst, a: float) -> Atoms:
    """4-atom conventional fcc cell; L1_2 puts B on the corner, L1_0 on the corner + one face."""
    atoms = bulk(cat.a, "fcc", a=a, cubic=True)  # sites (0,0,0) (0,½,½) (½,0,½) (½,½,0)
    if cat.prototype == "L1_2":
        atoms[0].symbol = cat.b
    elif cat.prototype == "L1_0":
        atoms[0].symbol = cat.b
        atoms[3].symbol = cat.b  # B layers at z=0, A layers at z=½
    elif cat.prototype != "fcc":
        raise ValueError(f"unknown prototype {cat.prototype!r} for {cat.name}")
    return atoms


def fit_bulk(cat: Catalyst, calc) -> Atoms:
    """Bulk at the calculator's equilibrium lattice constant (EOS over +-4 % of Vegard's law)."""
    from ase.eos import EquationOfState

    a0 = _vegard_a(cat)
    scales = np.linspace(0.96, 1.04, 9)
    vols, energies = [], []
    for s in scales:
        atoms = cubic_bulk(cat, a0 * s)
        atoms.calc = calc
        vols.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    try:
        v0, _, _ = EquationOfState(vols, energies, eos="birchmurnaghan").fit()
        a = float(v0 ** (1 / 3))
    except Exception:  # no minimum in the window: take the best grid point
        a = float(a0 * scales[int(np.argmin(energies))])
    if not 0.9 * a0 < a < 1.1 * a0:
        a = float(a0 * scales[int(np.argmin(energies))])
    return cubic_bulk(cat, round(a, 6))


def make_slabs(bulk_atoms: Atoms, miller: tuple[int, int, int]) -> list:
    """fairchem.data.oc ``Slab`` objects (all terminations) for one Miller index."""
    from fairchem.data.oc.core import Bulk, Slab

    return Slab.from_bulk_get_specific_millers(tuple(int(m) for m in miller), bulk=Bulk(bulk_atoms=bulk_atoms))


@functools.lru_cache(maxsize=1)
def adsorbate_db() -> dict:
    """OC20's adsorbate database shipped in fairchem-data-oc: id -> (atoms, smiles, binding idx, rxn)."""
    from fairchem.data.oc.databases.pkls import ADSORBATE_PKL_PATH

    with open(ADSORBATE_PKL_PATH, "rb") as fh:
        return pickle.load(fh)


def adsorbate_ids(allowed_elements=EMT_ADSORBATE_ELEMENTS) -> list[int]:
    """Adsorbate ids whose elements the calculator handles, sorted."""
    db = adsorbate_db()
    return sorted(i for i, v in db.items() if set(v[0].get_chemical_symbols()) <= set(allowed_elements))


def adsorbate_smiles(ads_id: int) -> str:
    return adsorbate_db()[ads_id][1]
