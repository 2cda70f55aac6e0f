"""Symmetries, batching, extensivity, autograd forces and input errors of LEIGNN."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.constraints import FixAtoms
from fairchem.core.common.registry import registry
from scipy.stats import special_ortho_group

import leignn_ocp
from leignn_ocp import LEIGNN
from leignn_ocp.batching import atoms_to_batch

VARIANTS = {  # paper Table 2: (update, global_messages)
    "leignn": ("nmu", True),
    "vanilla_nmu": ("nmu", False),
    "vanilla": ("painn", False),
}
CASES = [(v, df) for v in VARIANTS for df in (True, False)]


def make_model(variant="leignn", direct_forces=True, use_pbc=False, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    update, global_messages = VARIANTS[variant]
    # random energy readout (zero_init_energy=False): a zero one would make every energy test trivial
    kw = {"hidden_channels": 32, "num_layers": 3, "num_rbf": 16, "cutoff": 6.0, "max_neighbors": 20,
          "zero_init_energy": False, **kw}
    model = LEIGNN(update=update, global_messages=global_messages, direct_forces=direct_forces,
                   use_pbc=use_pbc, **kw)
    return model.to(dtype).eval()


def run(model, atoms, dtype=torch.float64):
    out = model(atoms_to_batch(atoms, dtype))
    return out["energy"].detach(), out["forces"].detach()


def ethanol():
    return molecule("CH3CH2OH")


def oc20_slab(size=(3, 3, 3), seed=1):
    """A rattled Cu(111) slab with *OH, bottom layer fixed, periodic in 3D as OC20 stores it."""
    slab = fcc111("Cu", size=size, vacuum=8.0)
    add_adsorbate(slab, molecule("OH"), 2.0, "fcc")
    slab.set_tags([1 if a.symbol == "Cu" else 2 for a in slab])
    slab.rattle(0.05, seed=seed)  # before the constraint, which would keep fixed atoms on a perfect lattice
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.position[2] < slab.positions[:, 2].min() + 0.5]))
    slab.pbc = True
    return slab


def random_orthogonal(seed, reflect):
    q = special_ortho_group.rvs(3, random_state=seed)
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return q


def transformed(atoms, q=None, shift=None, perm=None):
    a = atoms.copy()
    if q is not None:
        a.set_cell(a.cell.array @ q.T, scale_atoms=False)
        a.positions = a.positions @ q.T
    if shift is not None:
        a.positions = a.positions + shift
        if a.pbc.any():
            a.wrap()
    if perm is not None:
        a = a[perm]
    return a


def symmetry_errors(model, atoms, dtype):
    """Max |dE| and max |dF| over rotations, reflections, translations and permutations."""
    e0, f0 = run(model, atoms, dtype)
    rng = np.random.default_rng(0)
    n = len(atoms)
    de, df = 0.0, 0.0
    for k, reflect in itertools.product(range(2), (False, True)):
        q = random_orthogonal(k, reflect)
        shift = rng.normal(size=3) * 3.0
        perm = rng.permutation(n)
        e, f = run(model, transformed(atoms, q, shift, perm), dtype)
        expected_f = (f0 @ torch.as_tensor(q.T, dtype=f0.dtype))[perm]
        de = max(de, (e - e0).abs().max().item())
        df = max(df, (f - expected_f).abs().max().item())
    return de, df, e0, f0


@pytest.mark.parametrize("variant,direct_forces", CASES)
def test_molecule_symmetries_float64(variant, direct_forces):
    model = make_model(variant, direct_forces)
    de, df, e0, f0 = symmetry_errors(model, ethanol(), torch.float64)
    print(f"\n[equivariance] molecule float64 {variant} direct={direct_forces}: dE={de:.2e} dF={df:.2e}")
    assert f0.abs().max() > 1e-3 and e0.abs().max() > 1e-3  # a non-trivial output
    assert de <= 1e-10 and df <= 1e-10


@pytest.mark.parametrize("variant,direct_forces", CASES)
def test_periodic_slab_symmetries_float32(variant, direct_forces):
    model = make_model(variant, direct_forces, use_pbc=True, dtype=torch.float32)
    de, df, e0, f0 = symmetry_errors(model, oc20_slab(), torch.float32)
    print(f"\n[equivariance] slab float32 {variant} direct={direct_forces}: dE={de:.2e} dF={df:.2e}")
    eps = torch.finfo(torch.float32).eps
    # round-off bound: a few hundred ulps of the output scale (sums over ~40 atoms x 20 edges)
    assert de <= 500 * eps * max(1.0, e0.abs().max().item())
    assert df <= 500 * eps * max(1.0, f0.abs().max().item())


def test_variants_differ_only_by_their_switches():
    n = {v: sum(p.numel() for p in make_model(v).parameters()) for v in VARIANTS}
    assert n["vanilla"] == n["vanilla_nmu"] < n["leignn"]
    e = {v: run(make_model(v), ethanol())[0].item() for v in VARIANTS}
    assert len({round(x, 8) for x in e.values()}) == 3  # same seed, three different functions


def test_batch_equals_members_alone():
    """Global entities are per graph: batching A with B changes nothing of A or B."""
    for use_pbc, dtype, (a, b) in [
        (False, torch.float64, (ethanol(), molecule("C6H6"))),
        (True, torch.float32, (oc20_slab(), oc20_slab((4, 3, 3), seed=2))),
    ]:
        model = make_model(use_pbc=use_pbc, dtype=dtype)
        ea, fa = run(model, a, dtype)
        eb, fb = run(model, b, dtype)
        eab, fab = run(model, [a, b], dtype)
        # the same round-off bound as the symmetry tests: summing ~30 per-atom energies of
        # order 10 eV in another order already moves a float32 total by ~5e-5 eV
        eps = torch.finfo(dtype).eps
        e_tol = 500 * eps * max(1.0, torch.cat([ea, eb]).abs().max().item())
        f_tol = 500 * eps * max(1.0, torch.cat([fa, fb]).abs().max().item())
        torch.testing.assert_close(eab, torch.cat([ea, eb]), rtol=0.0, atol=e_tol)
        torch.testing.assert_close(fab, torch.cat([fa, fb]), rtol=0.0, atol=f_tol)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_periodic_supercell_is_extensive(variant):
    slab = oc20_slab()
    model = make_model(variant, use_pbc=True, dtype=torch.float32)
    e1, f1 = run(model, slab, torch.float32)
    e2, f2 = run(model, slab.repeat((2, 1, 1)), torch.float32)
    torch.testing.assert_close(e2, 2 * e1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f2, torch.cat([f1, f1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_autograd_forces_match_finite_differences(variant):
    model = make_model(variant, direct_forces=False)
    atoms = ethanol()
    atoms.rattle(0.05, seed=3)
    _, f = run(model, atoms)
    h = 1e-5
    fd = torch.zeros_like(f)
    for i in range(len(atoms)):
        for d in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, d] += h
            minus.positions[i, d] -= h
            fd[i, d] = -(run(model, plus)[0] - run(model, minus)[0]).item() / (2 * h)
    torch.testing.assert_close(f, fd, rtol=1e-6, atol=1e-7)


def test_registered_in_fairchem_registry():
    assert registry.get_model_class("leignn") is LEIGNN
    assert registry.get_model_class("leignn_ocp.LEIGNN") is leignn_ocp.LEIGNN


def test_training_mode_backprop_through_autograd_forces():
    model = make_model(direct_forces=False).train()
    out = model(atoms_to_batch(ethanol(), torch.float64))
    loss = out["energy"].abs().sum() + out["forces"].abs().sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.out_energy[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("direct_forces", [True, False])
def test_isolated_atom_gives_finite_output_and_gradients(direct_forces):
    atoms = ethanol()
    atoms.append("O")
    atoms.positions[-1] = [50.0, 0.0, 0.0]  # no neighbour within 6 A
    model = make_model(direct_forces=direct_forces).train()
    out = model(atoms_to_batch(atoms, torch.float64))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if not direct_forces:  # no edge touches it, so nothing depends on its position
        assert out["forces"][-1].abs().max().item() == 0.0


def test_single_atom_structure():
    out = make_model()(atoms_to_batch(molecule("H"), torch.float64))
    assert torch.isfinite(out["energy"]).all() and out["forces"].shape == (1, 3)


@pytest.mark.parametrize("z", [0, 119])
def test_atomic_number_outside_embedding(z):
    batch = atoms_to_batch(ethanol(), torch.float64)
    batch.atomic_numbers[2] = z
    with pytest.raises(ValueError, match=rf"atomic numbers \[{z}\] outside the embedding \(1\.\.118\)"):
        make_model()(batch)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_positions(bad):
    batch = atoms_to_batch(ethanol(), torch.float64)
    batch.pos[4, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite positions for atoms \[4\]"):
        make_model()(batch)


def test_periodic_structure_without_cell():
    atoms = ethanol()  # no cell: a zero 3x3 matrix
    with pytest.raises(ValueError, match=r"structures \[0\] in the batch have a zero-volume cell"):
        make_model(use_pbc=True)(atoms_to_batch(atoms, torch.float64))
    batch = atoms_to_batch(oc20_slab(), torch.float32)
    del batch.cell
    with pytest.raises(ValueError, match="use_pbc=True but the structure has no cell"):
        make_model(use_pbc=True, dtype=torch.float32)(batch)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_init_energy_starts_at_zero_and_trains(variant):
    """The default readout starts every energy at exactly 0 (forces stay non-zero); one optimizer
    step on an energy loss moves it off zero."""
    atoms = [ethanol(), oc20_slab((2, 2, 3))]
    model = make_model(variant, use_pbc=False, zero_init_energy=True, dtype=torch.float32).train()
    data = atoms_to_batch(atoms, torch.float32)
    out = model(data.clone())
    assert torch.equal(out["energy"], torch.zeros(2))
    assert out["forces"].abs().max() > 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    (out["energy"] - torch.tensor([1.0, -1.0])).abs().sum().backward()
    opt.step()
    assert (model(data.clone())["energy"].detach().abs() > 1e-4).all()
    assert (make_model(variant, zero_init_energy=False)(atoms_to_batch(atoms, torch.float64))["energy"].abs() > 1e-4).all()


def test_bad_constructor_switch():
    with pytest.raises(ValueError, match=r"update must be one of \('nmu', 'painn'\), got 'gated'"):
        LEIGNN(update="gated")
