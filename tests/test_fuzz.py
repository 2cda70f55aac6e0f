"""Bad input never becomes a number: the three cases of the issue pinned, the checks' switches,
and the seeded fuzz suite (``leignn_ocp.fuzz``; ``LEIGNN_FUZZ_CASES=20000`` runs more)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from leignn_ocp import fuzz
from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.checks import close_pairs, wrap_positions
from leignn_ocp.model import LEIGNN
from leignn_ocp.testing import cu_bulk, ethanol, oc20_slab, predict

CASES = int(os.environ.get("LEIGNN_FUZZ_CASES", "1000"))


def model(use_pbc: bool, direct: bool = True, **kw) -> LEIGNN:
    torch.manual_seed(0)
    m = LEIGNN(hidden_channels=16, num_layers=2, num_rbf=8, max_neighbors=50, use_pbc=use_pbc,
               direct_forces=direct, zero_init_energy=False, **kw)
    return m.to(torch.float32 if use_pbc else torch.float64).eval()


# --------------------------------------------------------------------------- the table

@pytest.mark.parametrize("direct", [True, False])
def test_coincident_atoms_in_a_molecule(direct):
    """Was NaN energy and forces, with direct and with -dE/dx forces."""
    atoms = ethanol()
    atoms.positions[7] = atoms.positions[2]
    with pytest.raises(ValueError, match=r"LEIGNN: atoms 2 and 7 of structure 0 are 0 Å apart, under "
                                         r"min_distance=0\.1 Å: a duplicated atom\?"):
        model(False, direct)(atoms_to_batch(atoms, torch.float64))


def test_coincident_atoms_periodic():
    """Was a finite energy: fairchem's radius_graph_pbc drops pairs under 0.01 Å without a word."""
    atoms = cu_bulk()
    atoms.positions[3] = atoms.positions[30] + atoms.cell[1] - 2 * atoms.cell[2]  # an image of atom 30
    with pytest.raises(ValueError, match=r"atoms 3 and 30 of structure 0 are [.e\d-]+ Å apart \(through a "
                                         r"periodic image\), under min_distance=0\.1 Å"):
        model(True)(atoms_to_batch(atoms))


def test_lattice_vector_of_a_thousandth_of_an_angstrom():
    """Was a finite energy (the volume passed the old 1e-6 check)."""
    atoms = cu_bulk()
    cell = atoms.cell.array.copy()
    cell[2] = [0.0, 0.0, 0.001]
    atoms.set_cell(cell, scale_atoms=False)
    assert atoms.get_volume() > 1e-6
    with pytest.raises(ValueError, match=r"structure 0 has a degenerate cell: 0\.001 Å between the faces along "
                                         r"lattice vector 2 \(under min_distance=0\.1 Å"):
        model(True)(atoms_to_batch(atoms))


def test_second_structure_of_a_batch_is_named():
    bad = ethanol()
    bad.positions[4] = bad.positions[1] + [0.05, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"atoms 1 and 4 of structure 2 are 0\.05 Å apart"):
        model(False)(atoms_to_batch([ethanol(), ethanol(0.05), bad], torch.float64))


def test_too_many_images():
    atoms = cu_bulk((1, 1, 1))
    atoms.set_cell(np.diag([3.6, 0.4, 0.4]), scale_atoms=True)  # 5 x 31 x 31 images; atoms 0.28 Å apart
    with pytest.raises(ValueError, match=r"structure 0 would need 4805 periodic images for the 6\.0 Å cutoff "
                                         r"\(cell heights \[3\.6, 0\.4, 0\.4\] Å; max_images=2197\)"):
        model(True)(atoms_to_batch(atoms))


@pytest.mark.parametrize("edit, message", [
    (lambda b: setattr(b, "pos", b.pos[:, :2]), r"positions must be \[N, 3\], got \[\d+, 2\]"),
    (lambda b: setattr(b, "atomic_numbers", b.atomic_numbers[1:]), r"atomic_numbers must be \[N\] = \[\d+\]"),
    (lambda b: setattr(b, "natoms", b.natoms + 1), r"inconsistent batch: natoms"),
    (lambda b: setattr(b, "batch", b.batch.flip(0)), r"inconsistent batch: .* batch must be sorted"),
    (lambda b: setattr(b, "cell", b.cell[:1]), r"cell must be \[B, 3, 3\] = \[2, 3, 3\]"),
    (lambda b: setattr(b, "natoms", int(b.natoms.sum())), r"natoms must be a \[B\] tensor"),
])
def test_hand_built_batch_with_mismatched_shapes(edit, message):
    batch = atoms_to_batch([oc20_slab((2, 2, 3)), cu_bulk((1, 1, 2))])
    edit(batch)
    with pytest.raises(ValueError, match=message):
        model(True)(batch)


# --------------------------------------------------------------------------- switches and helpers

def test_min_distance_is_a_constructor_switch():
    atoms = ethanol()
    atoms.positions[8] = atoms.positions[0] + [0.0, 0.3, 0.0]
    batch = atoms_to_batch(atoms, torch.float64)
    with pytest.raises(ValueError, match=r"0\.3 Å apart, under min_distance=0\.5 Å"):
        model(False, min_distance=0.5)(batch)
    e, f = predict(model(False), batch)  # 0.3 Å passes the default 0.1
    assert torch.isfinite(e).all() and torch.isfinite(f).all()


@pytest.mark.parametrize("path", ["dense", "ghost atoms"])
@pytest.mark.parametrize("axes", [(True, True, True), (True, True, False)])
def test_close_pairs_finds_every_pair_a_brute_force_finds(monkeypatch, path, axes):
    """Against all pairs over the neighbouring images (along the periodic axes), on a skewed cell
    with atoms near faces and corners, two structures in one batch; both of close_pairs' paths."""
    import leignn_ocp.checks as checks

    monkeypatch.setattr(checks, "DENSE_PAIRS_MAX_ATOMS", 1000 if path == "dense" else 0)
    rng = np.random.default_rng(3)
    cell = torch.tensor([[4.0, 0.0, 0.0], [2.5, 3.5, 0.0], [1.0, -1.2, 3.0]], dtype=torch.float64)
    frac = torch.tensor(rng.uniform(-0.02, 0.02, (60, 3)) + rng.integers(0, 2, (60, 3)), dtype=torch.float64)
    pos = frac @ cell  # clustered at the corners of the cell: most pairs go through an image
    batch = torch.tensor([0] * 25 + [1] * 35)
    r = 0.03
    i, j, d = close_pairs(pos, batch, torch.stack([cell, cell]), axes, r)
    steps = torch.tensor(np.stack(np.meshgrid(*[[-1, 0, 1] if a else [0] for a in axes], indexing="ij"), -1)
                         .reshape(-1, 3), dtype=torch.float64)
    diff = pos[:, None, None] - pos[None, :, None] - steps @ cell  # [60, 60, S, 3]
    dmin = diff.norm(dim=-1).min(-1).values
    dmin.fill_diagonal_(float("inf"))
    dmin[batch[:, None] != batch[None, :]] = float("inf")
    expected = {(a, b) for a, b in (dmin < r).nonzero().tolist()}
    assert len(expected) > 20
    assert {(a, b) for a, b in zip(i.tolist(), j.tolist())} == expected
    assert torch.allclose(d, dmin[i, j])


def test_wrapping_leaves_the_callers_batch_alone():
    atoms = cu_bulk()
    atoms.positions += 3 * atoms.cell[0]  # every atom three cells away
    batch = atoms_to_batch(atoms)
    before = batch.pos.clone()
    e_far, f_far = predict(model(True), batch)
    assert torch.equal(batch.pos, before)
    atoms.wrap()
    e, f = predict(model(True), atoms, torch.float32)
    assert torch.allclose(e_far, e, atol=1e-4) and torch.allclose(f_far, f, atol=1e-4)
    wrapped = wrap_positions(before, batch.cell, batch.batch, [True] * 3)
    assert torch.allclose(wrapped, torch.tensor(atoms.positions, dtype=torch.float32), atol=1e-4)


# --------------------------------------------------------------------------- the fuzz suite

def test_fuzz_suite(request):
    report = fuzz.run(CASES, seed=0)
    # printed at the end of the session by conftest's terminal summary
    request.config.leignn_fuzz_report = ["LEIGNN input fuzz (leignn_ocp.fuzz)", *report.lines()]
    assert set(report.cases) == set(fuzz.VALID) | set(fuzz.INVALID)
    assert not report.failures, "\n".join(report.lines())


def test_pbc_as_atoms_to_graphs_stores_it():
    """fairchem's AtomsToGraphs(r_pbc=True) stores pbc as [3] per structure: a batch has [3B]."""
    from ase.calculators.emt import EMT
    from fairchem.core.datasets import data_list_collater

    from leignn_ocp.batching import labelled_data

    frames = [cu_bulk((1, 1, 2), seed=k) for k in range(3)]
    for f in frames:
        f.calc = EMT()
    batch = data_list_collater([labelled_data(f, pbc=True) for f in frames], otf_graph=True)
    assert batch.pbc.shape == (9,)
    e, f = predict(model(True), batch)
    assert torch.isfinite(e).all() and e.shape == (3,)
    batch.pbc = batch.pbc[:4]
    with pytest.raises(ValueError, match=r"pbc must be \[B, 3\] = \[3, 3\] \(or \[3\] per structure\), got \[4\]"):
        model(True)(batch)
