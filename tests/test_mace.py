"""MACE's wrapper (leignn_ocp/baselines/mace.py): the dict it hands mace-torch is the one mace-torch's
own data path (``AtomicData.from_config``, matscipy's neighbour list) builds, edge by edge, so the
same weights give the same energy, forces and equivariant features; and bad arguments and inputs
stop with errors that name the problem. The generic checks (symmetries, batching, gradients,
smoothness, CLI) run in tests/test_lineup_models.py and tests/test_configs.py."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111, molecule

from leignn_ocp import lineup
from leignn_ocp.baselines.mace import MACE
from leignn_ocp.testing import cu_bulk, default_dtype, ethanol, oc20_slab, perturb_parameters, to_batch

mace_data = pytest.importorskip("mace.data")
from mace.modules.utils import get_edge_vectors_and_lengths  # noqa: E402
from mace.tools import AtomicNumberTable  # noqa: E402
from mace.tools.torch_geometric import Batch  # noqa: E402

TINY = lineup.get("mace").tiny


def _model(**overrides) -> MACE:
    """The line-up's tiny MACE in float64 with trained-looking weights (every parameter perturbed),
    and a neighbour cap no structure here reaches: MACE's own list has no cap."""
    torch.manual_seed(0)
    kw = {**TINY, "max_neighbors": 1000, "avg_num_neighbors": 8.0, **overrides}
    return perturb_parameters(MACE(**kw).double().eval(), scale=1.0)


def _tilted_bulk():
    """Primitive fcc Pt (a non-orthogonal cell smaller than the cutoff: many images per pair), rattled."""
    atoms = bulk("Pt", "fcc", a=3.92).repeat((2, 1, 1))
    atoms.rattle(0.1, seed=4)
    return atoms


def _mace_own(model: MACE, structures, zs) -> dict:
    """mace-torch's input for ``structures``, from its own data path (float64)."""
    table = AtomicNumberTable(list(zs))
    data = [mace_data.AtomicData.from_config(mace_data.config_from_atoms(a), z_table=table, cutoff=model.cutoff)
            for a in structures]
    return Batch.from_data_list(data).to_dict()


def _run(model: MACE, inputs: dict) -> dict:
    inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
    inputs["positions"] = inputs["positions"].detach().requires_grad_(True)
    out = model.mace(inputs, training=False, compute_force=True)
    return {k: out[k].detach() for k in ("energy", "forces", "node_feats")}


def _edges(inputs: dict) -> dict:
    """(sender, receiver, unit shift) -> edge vector, as MACE computes it from the dict."""
    vec, _ = get_edge_vectors_and_lengths(inputs["positions"], inputs["edge_index"], inputs["shifts"])
    keys = zip(inputs["edge_index"][0].tolist(), inputs["edge_index"][1].tolist(),
               map(tuple, inputs["unit_shifts"].round().long().tolist()))
    return dict(zip(keys, vec.detach()))


STRUCTURES = {"cu_bulk": lambda: [cu_bulk()], "pt_primitive": lambda: [_tilted_bulk()],
              "slab": lambda: [oc20_slab()], "batch": lambda: [oc20_slab(), _tilted_bulk(), cu_bulk()]}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_same_input_and_outputs_as_maces_own_data_path(name):
    structures = STRUCTURES[name]()
    model = _model()
    with default_dtype(torch.float64):
        ours = model.mace_input(to_batch(structures, torch.float64))
        own = _mace_own(model, structures, range(1, 101))
    # the same directed edges, each with the same vector (sign included)
    e_ours, e_own = _edges(ours), _edges(own)
    assert len(e_ours) == ours["edge_index"].shape[1], "an edge appears twice"
    assert set(e_ours) == set(e_own), f"{len(set(e_ours) ^ set(e_own))} edges differ from MACE's own list"
    err = max((e_ours[k] - e_own[k]).abs().max().item() for k in e_own)
    assert err < 1e-12, f"edge vectors differ from MACE's by {err:.3g}"
    for key in ("node_attrs", "batch", "ptr"):
        assert torch.equal(ours[key].to(own[key].dtype), own[key]), key
    a, b = _run(model, ours), _run(model, own)
    assert a["energy"].abs().max() > 1e-2 and a["forces"].abs().max() > 1e-3, "trivial outputs"
    for key in ("energy", "forces", "node_feats"):
        assert torch.allclose(a[key], b[key], rtol=1e-10, atol=1e-10), (
            f"{key} differs from MACE's own path by {(a[key] - b[key]).abs().max().item():.3g}")
    # and the wrapper's forward returns exactly these
    with default_dtype(torch.float64):
        out = model(to_batch(structures, torch.float64))
    assert torch.allclose(out["energy"].detach(), b["energy"], rtol=1e-10, atol=1e-10)
    assert torch.allclose(out["forces"].detach(), b["forces"], rtol=1e-10, atol=1e-10)


def test_mace_vectors_are_minus_fairchems_distance_vec():
    """Edge by edge: sender = fairchem's source, receiver = its target, MACE's vector = -distance_vec."""
    atoms = [oc20_slab()]
    model = _model(max_neighbors=50)
    with default_dtype(torch.float32):
        batch = to_batch(atoms, torch.float32)
        ours = model.float().mace_input(batch)
        graph = model.generate_graph(batch)
    assert torch.equal(ours["edge_index"], graph.edge_index)
    vec, _ = get_edge_vectors_and_lengths(ours["positions"], ours["edge_index"], ours["shifts"])
    assert torch.allclose(vec, -graph.edge_distance_vec, atol=1e-5)


def test_the_comparison_sees_a_wrong_shift_sign():
    """The other sign of the image shifts (fairchem's offsets as they are) gives periodic edges wrong
    lengths: the edge sets and the energies above would then differ."""
    atoms = [cu_bulk()]
    model = _model()
    with default_dtype(torch.float64):
        ours = model.mace_input(to_batch(atoms, torch.float64))
        own = _mace_own(model, atoms, range(1, 101))
    wrong = dict(ours, shifts=-ours["shifts"], unit_shifts=-ours["unit_shifts"])
    assert set(_edges(wrong)) != set(_edges(own))
    assert (_run(model, wrong)["energy"] - _run(model, own)["energy"]).abs().max() > 1e-3


def test_molecule_matches_maces_own_data_path():
    model = _model(use_pbc=False)
    atoms = ethanol(rattle=0.05, seed=1)
    with default_dtype(torch.float64):
        ours = _run(model, model.mace_input(to_batch(atoms, torch.float64)))
        own = _run(model, _mace_own(model, [atoms], range(1, 101)))
    for key in ("energy", "forces", "node_feats"):
        assert torch.allclose(ours[key], own[key], rtol=1e-10, atol=1e-10), key


def test_explicit_element_table_matches_maces_z_table():
    zs = [1, 6, 8, 29]
    model = _model(atomic_numbers=[29, 8, 1, 6])
    assert model.num_elements == 4 and model.atomic_numbers == zs
    atoms = [oc20_slab()]
    with default_dtype(torch.float64):
        ours = _run(model, model.mace_input(to_batch(atoms, torch.float64)))
        own = _run(model, _mace_own(model, atoms, zs))
    assert torch.allclose(ours["energy"], own["energy"], rtol=1e-10, atol=1e-10)
    assert torch.allclose(ours["forces"], own["forces"], rtol=1e-10, atol=1e-10)


def test_neighbour_cap_keeps_the_nearest_per_receiver():
    """max_neighbors caps each receiving atom's edges (fairchem's mask), keeping the nearest."""
    atoms = oc20_slab()
    full, capped = _model(), _model(max_neighbors=12)
    with default_dtype(torch.float64):
        a = full.mace_input(to_batch(atoms, torch.float64))
        b = capped.mace_input(to_batch(atoms, torch.float64))
    la = get_edge_vectors_and_lengths(a["positions"], a["edge_index"], a["shifts"])[1].squeeze(-1)
    lb = get_edge_vectors_and_lengths(b["positions"], b["edge_index"], b["shifts"])[1].squeeze(-1)
    n = len(atoms)
    count = torch.bincount(b["edge_index"][1], minlength=n)
    assert int(count.max()) == 12 and int(torch.bincount(a["edge_index"][1], minlength=n).min()) > 12
    for i in range(n):
        kept = lb[b["edge_index"][1] == i].sort().values
        nearest = la[a["edge_index"][1] == i].sort().values[:12]
        assert torch.allclose(kept, nearest, atol=1e-5), f"atom {i} did not keep its 12 nearest"


def test_training_mode_forces_carry_gradients_to_the_weights():
    """While training MACE differentiates with create_graph, so a force loss reaches the weights."""
    model = _model(max_neighbors=50).float().train()
    batch = to_batch([oc20_slab()], torch.float32)
    out = model(batch)
    out["forces"].square().sum().backward()
    grad = model.mace.interactions[0].conv_tp_weights.layer0.weight.grad
    assert grad is not None and grad.abs().max() > 0
    assert out["forces"].shape == (len(oc20_slab()), 3) and out["energy"].shape == (1,)


def test_energy_only():
    model = _model(regress_forces=False)
    with default_dtype(torch.float64):
        out = model(to_batch([cu_bulk()], torch.float64))
    assert set(out) == {"energy"}


def test_registered_and_built_from_the_config():
    from fairchem.core.common.registry import registry

    assert registry.get_model_class("leignn_ocp.baselines.mace.MACE") is MACE
    assert registry.get_model_class("mace") is MACE
    model_cfg = lineup.load_config(lineup.config_path("mace", "200k"))["model"]
    model = lineup.build_model(model_cfg, TINY)
    assert isinstance(model, MACE) and model.cutoff == 6.0 and model.max_neighbors == 50
    assert str(model.mace.interactions[0].__class__.__name__) == "RealAgnosticInteractionBlock"
    assert str(model.mace.interactions[1].__class__.__name__) == "RealAgnosticResidualInteractionBlock"


def test_no_weight_decay_is_maces_own_grouping():
    """The parameters fairchem decays are exactly those mace-torch's get_params_options decays."""
    from mace.tools.scripts_utils import get_params_options

    model = _model()
    args = argparse.Namespace(weight_decay=5e-7, lr=0.01, lr_params_factors="{}", freeze=None,
                              amsgrad=True, beta=0.9)
    ids = {id(p): n for n, p in model.mace.named_parameters()}
    decayed = {f"mace.{ids[id(p)]}" for g in get_params_options(args, model.mace)["params"]
               if g["weight_decay"] > 0 for p in g["params"]}
    exempt = set(model.no_weight_decay())
    assert decayed and exempt
    assert decayed | exempt == {n for n, _ in model.named_parameters()} and not decayed & exempt


@pytest.mark.parametrize("kwargs,match", [
    ({"r_max": 5.0}, r"r_max \(use cutoff\)"),
    ({"num_channels": 64}, "num_channels"),
    ({"hidden_irreps": "8x0e + 16x1o"}, "one multiplicity"),
    ({"hidden_irreps": "8x1o"}, "no scalars"),
    ({"hidden_irreps": "eight scalars"}, "not an e3nn irreps string"),
    ({"hidden_irreps": "8x0e + 8x1o + 8x2e", "max_ell": 1}, "l > max_ell"),
    ({"MLP_irreps": "4x1o"}, "scalars only"),
    ({"correlation": [2, 2, 2]}, "one per interaction"),
    ({"correlation": 0}, "correlation must be an integer >= 1"),
    ({"num_interactions": 0}, "num_interactions"),
    ({"interaction": "ResidualBlock"}, "not a mace-torch interaction block"),
    ({"gate": "relu"}, "gate 'relu'"),
    ({"num_elements": 119}, "num_elements must be <= 118"),
    ({"atomic_numbers": [1, 1, 8]}, "distinct"),
    ({"atomic_numbers": [1, 8], "num_elements": 3}, "disagrees"),
    ({"avg_num_neighbors": 0}, "avg_num_neighbors"),
    ({"cutoff": -1.0}, "cutoff must be > 0"),
    ({"direct_forces": True}, "no force head"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MACE(**{**TINY, **kwargs})


def test_bad_inputs_name_the_problem():
    model = MACE(**TINY, atomic_numbers=[1, 6, 8, 29]).eval()
    pt = fcc111("Pt", size=(2, 2, 3), vacuum=5.0)
    pt.pbc = True
    with pytest.raises(ValueError, match=r"atomic numbers \[78\] are not in the element table"):
        model(to_batch([pt], torch.float32))
    cu = cu_bulk()
    batch = to_batch([cu], torch.float32)
    batch.pos[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model(batch)
    with pytest.raises(ValueError, match="zero-volume cell"):
        model(to_batch([molecule("H2O")], torch.float32))


def test_cell_smaller_than_cutoff_sums_every_image():
    """The primitive fcc cell (2.77 A) is far below r_c = 6 A: its energy per atom equals a 2x2x2
    supercell's (every image counted once), as extensivity demands."""
    model = _model()
    a = bulk("Cu", "fcc", a=3.6)
    with default_dtype(torch.float64):
        e1 = model(to_batch([a], torch.float64))["energy"].item()
        e8 = model(to_batch([a.repeat((2, 2, 2))], torch.float64))["energy"].item()
    assert abs(e1) > 1e-3
    assert np.isclose(e8, 8 * e1, rtol=1e-9, atol=1e-9), (e1, e8)


def test_deep_copy_is_independent_and_equal():
    """copy.deepcopy works (the test kit and EMA-style code copy models) and copies the weights."""
    import copy

    model = _model()
    twin = copy.deepcopy(model)
    with default_dtype(torch.float64):
        batch = to_batch([cu_bulk()], torch.float64)
        assert torch.equal(model(batch.clone())["energy"], twin(batch.clone())["energy"])
        with torch.no_grad():
            next(twin.parameters()).add_(1.0)
        assert not torch.equal(model(batch.clone())["energy"], twin(batch.clone())["energy"])
