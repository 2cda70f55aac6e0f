"""LEIGNN through the shared model-test kit (leignn_ocp.testing), plus what only LEIGNN has:
its three variants, the chunked CPU message path, training mode and its input errors."""

from __future__ import annotations

import pytest
import torch
from ase.build import molecule
from fairchem.core.common.registry import registry

import leignn_ocp
from leignn_ocp import LEIGNN, lineup, ops
from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.testing import (
    ModelCase,
    ModelTests,
    check_cutoff_smoothness,
    ethanol,
    oc20_slab,
    predict,
    roundoff_tol,
)

VARIANTS = lineup.VARIANTS  # paper Table 2: key -> {update, global_messages}
# random energy readout (zero_init_energy=False): a zero one would make every energy test trivial
HP = {"hidden_channels": 32, "num_layers": 3, "num_rbf": 16, "cutoff": 6.0, "max_neighbors": 20,
      "zero_init_energy": False}


def make_model(variant="leignn", direct_forces=True, use_pbc=False, dtype=torch.float64, seed=0,
               chunked=True, **kw):
    torch.manual_seed(seed)
    model = LEIGNN(**VARIANTS[variant], direct_forces=direct_forces, use_pbc=use_pbc,
                   chunked_messages=chunked, **{"chunked_min_edges": 0, **HP, **kw})  # the kernel on any size
    return model.to(dtype).eval()


def smooth_cluster():
    """A 20-atom Cu(111) flake with *OH, no cell: enough edges (~300) for several chunks of the
    CPU message path, so that its planner drops basis columns (num_rbf=128, see below)."""
    atoms = oc20_slab((3, 3, 2), seed=4)
    atoms.pbc = False
    atoms.set_cell(None)
    return atoms


# The filter W(rbf) of step 2 has a bias by default (filter_bias=True, as PaiNN's), so an edge
# at r_c still carries phi(s_j) * b / sqrt(3): with trained (non-zero) biases the energy and
# forces jump when a neighbour leaves the sphere. Fresh models have b = 0 and are smooth;
# filter_bias=False is smooth with any weights (the cases below without the known failure).
FILTER_BIAS = ("the radial filter W(rbf) + b keeps phi(s_j) * b at r_c: not smooth once the "
               "bias is non-zero (model.py / the spec's W, see docs/notes/testing.md)")


def leignn_case(variant, direct_forces, chunked=True, filter_bias=True):
    mode = ("direct" + ("" if chunked else ", plain")) if direct_forces else "conservative"
    mode += "" if filter_bias else ", no filter bias"
    return ModelCase(
        name=f"{variant} ({mode})",
        build=lambda use_pbc, dtype, **kw: make_model(variant, direct_forces, use_pbc, dtype, chunked=chunked,
                                                      **{"filter_bias": filter_bias, **kw}),
        conservative=not direct_forces,
        smooth_structure=smooth_cluster,
        # 128 Gaussians as in the OC20 recipe (the planner's bands need a localised basis), and
        # no K-nearest truncation: the crossing edge must be the only thing that changes
        smooth_overrides={"num_rbf": 128, "max_neighbors": 64},
        known_failures={"smoothness_trained": FILTER_BIAS} if filter_bias else {},
    )


CASES = [leignn_case(v, True, True) for v in VARIANTS] + [leignn_case(v, True, False) for v in VARIANTS] \
    + [leignn_case(v, False) for v in VARIANTS] + [leignn_case(v, True, True, filter_bias=False) for v in VARIANTS]


class TestLEIGNN(ModelTests):
    """Symmetries (float64 molecule, float32 periodic slab), batching, extensivity, numeric
    gradient, cutoff smoothness: 3 variants x {direct chunked, direct plain, conservative}."""

    @pytest.fixture(params=CASES, ids=str)
    def case(self, request):
        return request.param


# --------------------------------------------------------------------------- the CPU message path


class _PlanSpy:
    """Records every ops.plan_chunks result (the chunked path's plan) while installed."""

    def __init__(self, monkeypatch):
        self.plans = []
        real = ops.plan_chunks

        def spy(*args, **kwargs):
            plan = real(*args, **kwargs)
            self.plans.append(plan)
            return plan

        monkeypatch.setattr(ops, "plan_chunks", spy)


def test_the_message_path_is_picked_by_graph_size(monkeypatch):
    """chunked_min_edges: the fused kernel on graphs of at least that many edges, plain ops below
    (the same numbers either way)."""
    spy = _PlanSpy(monkeypatch)
    atoms = smooth_cluster()  # ~300 edges
    torch.manual_seed(0)
    ref = predict(make_model(chunked=False), atoms)
    for min_edges, taken in ((0, True), (10_000, False)):
        spy.plans.clear()
        out = predict(make_model(chunked=True, chunked_min_edges=min_edges), atoms)
        assert any(p is not None for p in spy.plans) is taken, min_edges
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert LEIGNN().chunked_min_edges == 512


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cutoff_smoothness_runs_the_chunk_planner(variant, monkeypatch):
    """The cutoff check above really takes the fused path with banded filters (direct forces,
    CPU, no_grad), and the chunked and plain paths measure the same steps and jump."""
    spy = _PlanSpy(monkeypatch)
    measured = {}
    for chunked in (True, False):
        model = make_model(variant, chunked=chunked, num_rbf=128, max_neighbors=64)
        measured[chunked] = check_cutoff_smoothness(model, smooth_cluster())
        plans = [p for p in spy.plans if p is not None]
        if chunked:
            assert plans and all(len(p.chunks) >= 2 for p in plans), "the chunked path was not taken"
            assert max(p.fraction for p in plans) < 0.5, "the planner dropped no basis columns"
            spy.plans.clear()
        else:
            assert not plans, "chunked_messages=False still planned chunks"
    # the same measurement to round-off (the jumps themselves are round-off: ~1e-10 of |E| ~ 4e4 eV)
    e, f = predict(model, smooth_cluster())
    tol = {"e": roundoff_tol(torch.float64, e.abs().max().item()), "f": roundoff_tol(torch.float64, f.abs().max().item())}
    for k in ("jump_e", "step_e", "jump_f", "step_f"):
        assert abs(getattr(measured[True], k) - getattr(measured[False], k)) <= tol[k[-1]], k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_and_plain_paths_agree(variant):
    """Direct-force inference under no_grad: the fused chunked path equals the plain one."""
    data = atoms_to_batch(oc20_slab(), torch.float32)
    e1, f1 = predict(make_model(variant, use_pbc=True, dtype=torch.float32, chunked=True), data)
    e0, f0 = predict(make_model(variant, use_pbc=True, dtype=torch.float32, chunked=False), data)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- variants, registry, training


def test_variants_differ_only_by_their_switches():
    n = {v: sum(p.numel() for p in make_model(v).parameters()) for v in VARIANTS}
    assert n["vanilla"] == n["vanilla_nmu"] < n["leignn"]
    e = {v: predict(make_model(v), ethanol())[0].item() for v in VARIANTS}
    assert len({round(x, 8) for x in e.values()}) == 3  # same seed, three different functions


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
