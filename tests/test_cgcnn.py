"""CGCNN-specific behaviour (leignn_ocp/baselines/cgcnn.py): the convolution is the paper's
gated equation, batch norm in eval mode does not couple a batch, the smooth-cutoff switch does
what it says, bad arguments fail clearly. The generic checks (symmetries, batching, gradients,
cutoff) run for every line-up entry in tests/test_lineup_models.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ase import Atoms

from leignn_ocp import lineup
from leignn_ocp.baselines.cgcnn import CGCNN, CGConv, khot_table
from leignn_ocp.testing import check_cutoff_smoothness, ethanol, oc20_slab, perturb_parameters, predict

REPO = Path(__file__).resolve().parents[1]
TINY = lineup.get("cgcnn").tiny


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Batch norms with running statistics and affine parameters away from (0, 1): a fresh
    norm in eval mode is nearly the identity and would hide a misplaced one."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))


def _bn(x, m: torch.nn.BatchNorm1d):
    """Eval-mode batch norm of one row, written out."""
    return (x - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias


def _softplus(x):
    return torch.log1p(torch.exp(x))


def _conv_by_hand(conv: CGConv, v, u, src, dst):
    """v_i' = v_i + BN_v(sum_j sigmoid(z W_f + b_f) * softplus(z W_s + b_s)), z = v_i (+) v_j (+) u_ij,
    one edge and one atom at a time, with BN_e on z W + b."""
    F = v.shape[1]
    W, b = conv.lin.weight, conv.lin.bias
    out = []
    for i in range(v.shape[0]):
        total = torch.zeros(F, dtype=v.dtype)
        for e in range(len(src)):
            if dst[e] != i:
                continue
            z = torch.cat([v[i], v[src[e]], u[e]])  # [2F + G]
            a = _bn(W @ z + b, conv.bn_edge)  # [2F]: gate rows first, then core rows
            total = total + torch.sigmoid(a[:F]) * _softplus(a[F:])
        out.append(v[i] + _bn(total, conv.bn_node))
    return torch.stack(out)


def _conv(F=3, G=4, seed=0) -> CGConv:
    torch.manual_seed(seed)
    conv = CGConv(F, G).double().eval()
    perturb_parameters(conv, 0.3, seed)
    _randomise_norms(conv, seed)
    return conv


def test_conv_is_the_papers_equation_on_three_atoms():
    conv = _conv()
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 3, generator=g, dtype=torch.float64)
    src = [0, 1, 1, 2, 0]  # j
    dst = [1, 0, 2, 1, 2]  # i; atom 1 receives from 0 and 2, atom 0 from 1 only
    u = torch.rand(len(src), 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = conv(v, u, torch.tensor(src), torch.tensor(dst))
        want = _conv_by_hand(conv, v, u, src, dst)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # v_i and v_j enter z in that order: swapping sender and receiver changes the answer
    with torch.no_grad():
        swapped = conv(v, u, torch.tensor(dst), torch.tensor(src))
    assert (swapped - got).abs().max() > 1e-3


def test_the_gate_gates():
    """A closed gate (sigmoid -> 0) removes the message, an open one (-> 1) passes softplus(core)."""
    conv = _conv()
    F = 3
    g = torch.Generator().manual_seed(2)
    v = torch.randn(3, F, generator=g, dtype=torch.float64)
    src, dst = torch.tensor([0, 2]), torch.tensor([1, 1])
    u = torch.rand(2, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        open_ = conv(v, u, src, dst)
        conv.bn_edge.bias[:F] = -60.0  # gate pre-activations at about -60: sigmoid ~ 1e-26
        closed = conv(v, u, src, dst)
        conv.bn_edge.bias[:F] = 60.0
        wide_open = conv(v, u, src, dst)
        # open gate by hand: the message is softplus of the core rows alone
        W, b = conv.lin.weight, conv.lin.bias
        core = sum(_softplus(_bn(W @ torch.cat([v[1], v[j], u[k]]) + b, conv.bn_edge)[F:])
                   for k, j in enumerate(src.tolist()))
    zero_message = v + _bn(torch.zeros(F, dtype=v.dtype), conv.bn_node)
    torch.testing.assert_close(closed, zero_message, rtol=0, atol=1e-12)
    torch.testing.assert_close(wide_open[1], v[1] + _bn(core, conv.bn_node), rtol=1e-12, atol=1e-12)
    assert (open_[1] - closed[1]).abs().max() > 1e-3  # the gate was doing something before


def test_model_energy_by_hand_on_three_atoms():
    """The whole model on a 3-atom molecule: k-hot features -> Linear, Gaussians of every pair
    within the cutoff (both directions), the convolutions, the atom MLP, the sum."""
    torch.manual_seed(0)
    model = CGCNN(**TINY, fc_channels=8, num_fc_layers=2, use_pbc=False).double().eval()
    perturb_parameters(model, 0.3)
    _randomise_norms(model)
    atoms = Atoms("OCH", positions=[[0.0, 0.0, 0.0], [1.2, 0.1, 0.0], [2.0, 1.0, 0.3]])
    e, f = predict(model, atoms)
    with torch.no_grad():
        pos = torch.as_tensor(atoms.positions)
        z = torch.as_tensor(atoms.numbers)
        v = model.atom_embedding(khot_table().double()[z])
        src, dst = [j for i in range(3) for j in range(3) if i != j], [i for i in range(3) for j in range(3) if i != j]
        d = torch.stack([(pos[i] - pos[j]).norm() for i, j in zip(dst, src)])
        offsets = torch.linspace(0, model.cutoff, model.num_gaussians, dtype=torch.float64)
        width = offsets[1] - offsets[0]
        u = torch.exp(-0.5 * ((d[:, None] - offsets[None]) / width) ** 2)  # [E, G]
        for conv in model.convs:
            v = _conv_by_hand(conv, v, u, src, dst)
        want = model.energy_mlp(v).sum()
    # 1e-7: PyG's smearing builds its centres and width in float32 (the model's u differs from
    # this float64 one by ~1e-8); a wrong wiring is off by O(1)
    torch.testing.assert_close(e, want.reshape(1), rtol=1e-7, atol=1e-7)
    assert f.abs().max() > 1e-4


def _slab_model(**kw) -> CGCNN:
    torch.manual_seed(0)
    model = CGCNN(**TINY, **kw).eval()
    perturb_parameters(model, 0.1)
    _randomise_norms(model)
    return model


def test_eval_batch_norm_is_batch_independent_and_train_mode_is_not():
    a, b = oc20_slab(seed=1), oc20_slab((4, 3, 3), seed=2)
    model = _slab_model()
    e_alone, f_alone = predict(model, a, torch.float32)
    e_pair, f_pair = predict(model, [a, b], torch.float32)
    torch.testing.assert_close(e_pair[:1], e_alone, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f_pair[: len(a)], f_alone, rtol=1e-4, atol=1e-5)
    # in train mode the norms use the batch's statistics: the same structure changes with its company
    model.train()
    e_alone_t, _ = predict(model, a, torch.float32)
    e_pair_t, _ = predict(model, [a, b], torch.float32)
    assert (e_pair_t[0] - e_alone_t[0]).abs() > 1e-3


def test_smooth_cutoff_switch():
    """Off (the paper): a neighbour crossing r_c makes the energy jump; on: continuous."""
    def model(smooth):
        m = _slab_model(smooth_cutoff=smooth, use_pbc=False).double()
        return m

    check_cutoff_smoothness(model(True), ethanol())
    with pytest.raises(AssertionError, match="cutoff smoothness"):
        check_cutoff_smoothness(model(False), ethanol())


def test_parameter_count_of_the_200k_recipe():
    m = lineup.load_config(lineup.config_path("cgcnn", "200k", REPO / "configs/s2ef"))["model"]
    F, L, fc, n_fc, G = (m[k] for k in ("hidden_channels", "num_layers", "fc_channels", "num_fc_layers",
                                        "num_gaussians"))
    assert (F, L, fc, n_fc, G, m["cutoff"], m["max_neighbors"]) == (128, 2, 128, 3, 100, 6.0, 50)
    conv = (2 * F + G) * 2 * F + 2 * F + 2 * (2 * F) + 2 * F  # W, b, BN_e and BN_v scales and shifts
    mlp = (F * fc + fc) + (n_fc - 1) * (fc * fc + fc) + (fc + 1)
    want = (92 * F + F) + L * conv + mlp  # k-hot (92) -> F embedding
    assert lineup.count_params(lineup.build_model(m)) == want


def test_no_weight_decay_reaches_fairchems_optimizer():
    """What fairchem 1.10's trainer builds from the 200K recipe: decay 0.01 on the weights of the
    linear maps, none on biases, the atom embedding and the batch-norm scales."""
    from fairchem.core.trainers.base_trainer import BaseTrainer

    config = lineup.load_config(lineup.config_path("cgcnn", "200k", REPO / "configs/s2ef"))
    model = lineup.build_model(config["model"], TINY)
    shim = SimpleNamespace(config=config, model=model, _unwrapped_model=model)
    BaseTrainer.load_optimizer(shim)
    by_id = {id(p): g["weight_decay"] for g in shim.optimizer.param_groups for p in g["params"]}
    decay = {n: by_id[id(p)] for n, p in model.named_parameters()}
    assert decay["convs.0.lin.weight"] == 0.01 and decay["energy_mlp.0.weight"] == 0.01
    for name in ("convs.0.lin.bias", "convs.0.bn_edge.weight", "convs.1.bn_node.weight", "atom_embedding.weight"):
        assert decay[name] == 0, name


def test_registry_names_one_class():
    from fairchem.core.common.registry import registry

    assert registry.get_model_class("cgcnn") is CGCNN
    assert registry.get_model_class("leignn_ocp.baselines.cgcnn.CGCNN") is CGCNN


@pytest.mark.parametrize("kwargs,error,match", [
    ({"atom_embedding_size": 64}, TypeError, r"atom_embedding_size \(use hidden_channels\)"),
    ({"num_graph_conv_layers": 3}, TypeError, r"num_graph_conv_layers \(use num_layers\)"),
    ({"hiden_channels": 64}, TypeError, "unknown argument.*hiden_channels.*known: hidden_channels"),
    ({"direct_forces": True}, ValueError, "direct_forces"),
    ({"num_gaussians": 1}, ValueError, "num_gaussians must be an integer >= 2"),
    ({"num_layers": 0}, ValueError, "num_layers must be an integer >= 1"),
    ({"hidden_channels": 16.5}, ValueError, "hidden_channels must be an integer"),
    ({"cutoff": 0.0}, ValueError, "cutoff must be > 0"),
])
def test_bad_arguments_fail_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        CGCNN(**{**TINY, **kwargs})


def test_bad_structures_fail_clearly():
    model = CGCNN(**TINY).eval()
    with pytest.raises(ValueError, match="zero-volume cell"):
        predict(model, ethanol(), torch.float32)  # a molecule on the periodic path
    model.use_pbc = False
    heavy = Atoms("CuLr", positions=[[0, 0, 0], [2.0, 0, 0]])  # Z = 103 > the k-hot table's 100
    with pytest.raises(ValueError, match=r"atomic numbers \[103\] outside the k-hot element table"):
        predict(model, heavy, torch.float32)
