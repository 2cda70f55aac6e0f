"""The (optimised) LEIGNN equals a plain evaluation of the spec's equations, in float64.

The reference below is written from shared/design/LEIGNN.md alone: an explicit loop over
the edges of the graph the model itself builds (its ``_graph``: which neighbours, which
periodic images), the weights read by name from the model's ``state_dict``, no
fused projections, no concatenated gathers, no scatter kernels. Positions enter the
reference through the edge vectors, so the energy-gradient force mode is checked too
(autograd through the reference).
"""

from __future__ import annotations

import math

import pytest
import torch
from ase import Atoms
from ase.build import molecule

from leignn_ocp import LEIGNN, ops
from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.checks import periodic_axes
from leignn_ocp.lineup import VARIANTS
from leignn_ocp.testing import oc20_slab

# chunked_min_edges 0: the fused kernel wherever chunked_messages asks for it, on these small graphs too
HP = {"hidden_channels": 8, "num_layers": 2, "num_rbf": 6, "cutoff": 5.0, "max_neighbors": 10, "chunked_min_edges": 0}


def sigma(x):  # ScaledSiLU
    return torch.nn.functional.silu(x) / 0.6


class Weights:
    def __init__(self, model: LEIGNN) -> None:
        self.sd = {k: v.detach() for k, v in model.state_dict().items()}

    def lin(self, x, name, bias=True):
        y = x @ self.sd[f"{name}.weight"].T
        return y + self.sd[f"{name}.bias"] if bias else y

    def mlp(self, x, name, act_out=False):  # Linear, sigma, Linear[, sigma]
        y = self.lin(sigma(self.lin(x, f"{name}.0")), f"{name}.2")
        return sigma(y) if act_out else y


def radial_basis(r, cutoff, mu):
    """Gaussians on d = r/r_c at centres mu (evenly spaced over [0, 1], width = spacing) times
    the p=5 polynomial envelope. The centres are the model's buffer: fairchem builds them in
    float32, so 0.2 is 0.2000000030 even in a float64 model."""
    d = r / cutoff
    gauss = torch.exp(-0.5 * (d - mu) ** 2 / (mu[1] - mu[0]) ** 2)
    p = 5.0
    env = 1 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d ** (p + 1) - p * (p + 1) / 2 * d ** (p + 2)
    return gauss * (env if d < 1 else 0.0)


def reference(model: LEIGNN, data):
    """Energy [B] and forces [N, 3] by the spec, one edge at a time."""
    w = Weights(model)
    F, L = model.hidden_channels, model.num_layers
    nmu, glob = model.update == "nmu", model.global_messages
    with torch.no_grad():
        src, dst, _, vec = model._graph(data.clone(), periodic_axes(data) if model.use_pbc else None)
    pos = data.pos.detach().clone().requires_grad_(True)
    # the image offset of every edge, read off the model's graph (constant w.r.t. positions)
    shift = vec.detach() - (pos[src] - pos[dst]).detach()
    N, B, E = pos.shape[0], int(data.natoms.numel()), src.numel()
    batch = data.batch

    s = w.sd["atom_emb.embeddings.weight"][data.atomic_numbers.long() - 1]  # [N, F]
    v = torch.zeros(N, 3, F, dtype=pos.dtype)
    if glob:
        g = w.sd["global_emb"].expand(B, F)
        u = torch.zeros(B, 3, F, dtype=pos.dtype)

    mu = w.sd["radial_basis.rbf.offset"]
    assert mu.numel() == model.num_rbf and abs(float(mu[0])) < 1e-12 and abs(float(mu[-1]) - 1) < 1e-6
    edges = []
    for k in range(E):
        j, i = int(src[k]), int(dst[k])
        r_vec = pos[j] - pos[i] + shift[k]  # fairchem's p_j - p_i (+ image)
        r = torch.linalg.norm(r_vec)
        edges.append((i, j, -r_vec / r, radial_basis(r, model.cutoff, mu)))

    for l in range(L):
        pre = f"layers.{l}"
        if glob:  # step 1
            s = s + w.mlp(torch.cat([s, g[batch]], -1), f"{pre}.distribute.mlp", act_out=True)
            v = v + w.lin(v + u[batch], f"{pre}.distribute.lin_v", bias=False)
        # step 2: explicit sum over the edges into every receiver i
        phi = w.mlp(s, f"{pre}.message.phi")  # [N, 3F]
        ds = [torch.zeros(F, dtype=pos.dtype) for _ in range(N)]
        dv = [torch.zeros(3, F, dtype=pos.dtype) for _ in range(N)]
        for i, j, e, rbf in edges:
            x = phi[j] * w.lin(rbf, f"{pre}.message.rbf_proj", bias=model.filter_bias) / math.sqrt(3.0)
            a, b, c = x[:F], x[F : 2 * F], x[2 * F :]
            ds[i] = ds[i] + c
            dv[i] = dv[i] + (a[None, :] * v[j] + e[:, None] * b[None, :]) / math.sqrt(F)
        s = (s + torch.stack(ds)) / math.sqrt(2.0)
        v = v + torch.stack(dv)
        # step 3
        UV = w.lin(v, f"{pre}.update.lin_uv", bias=False)
        U, V = UV[..., :F], UV[..., F:]
        V_norm = torch.sqrt((V**2).sum(1) + 1e-8)
        h = w.mlp(torch.cat([s, V_norm], -1), f"{pre}.update.mlp")
        if nmu:
            p, q, t = h[:, :F], h[:, F : 2 * F], h[:, 2 * F :]
            s = s + q / math.sqrt(2.0) + s * torch.tanh(t)
            v = v + p[:, None, :] * U
        else:
            a_vv, a_sv, a_ss = h[:, :F], h[:, F : 2 * F], h[:, 2 * F :]
            s = s + (a_ss + a_sv * (U * V).sum(1) / math.sqrt(F)) / math.sqrt(2.0)
            v = v + a_vv[:, None, :] * U
        if glob and l < L - 1:  # step 4: plain per-graph means (nothing reads the last one)
            s_mean = torch.stack([s[batch == b_].mean(0) for b_ in range(B)])
            v_mean = torch.stack([v[batch == b_].mean(0) for b_ in range(B)])
            g = g + w.mlp(torch.cat([s_mean, g], -1), f"{pre}.aggregate.mlp", act_out=True)
            u = u + w.lin(v_mean + u, f"{pre}.aggregate.lin_v", bias=False)

    e_atom = w.mlp(s, "out_energy")[:, 0]
    energy = torch.stack([e_atom[batch == b_].sum() for b_ in range(B)])
    if model.direct_forces:
        forces = (v @ w.sd["out_forces.weight"].T)[..., 0]
    else:
        forces = -torch.autograd.grad(energy.sum(), pos)[0]
    return energy.detach(), forces.detach()


def slab(size, ads, seed):
    return oc20_slab(size, seed=seed, ads=ads, vacuum=6.0, height=1.9)


def molecules():
    m1 = molecule("CH3CH2OH")
    m2 = molecule("H2O")
    m2.positions += [0.3, -0.2, 0.1]
    m1.rattle(0.02, seed=3)
    return [m1, m2, Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]])]


def periodic_batch_float64(atoms, model):
    """fairchem's radius_graph_pbc runs in float32 only: build the periodic graph on a float32
    copy, attach it (edge_index, cell_offsets, neighbors) to the float64 batch and let the
    model read it (otf_graph=False); distances are then recomputed in float64 by fairchem."""
    from fairchem.core.common.utils import radius_graph_pbc

    data = atoms_to_batch(atoms, torch.float64)
    edge_index, cell_offsets, neighbors = radius_graph_pbc(
        atoms_to_batch(atoms, torch.float32), model.cutoff, model.max_neighbors, True)
    data.edge_index, data.cell_offsets, data.neighbors = edge_index, cell_offsets, neighbors
    model.otf_graph = False
    return data


# the fused, chunked message runs only with direct forces (no gradient on positions)
CASES = [(v, df, pbc, ch, True) for v in VARIANTS for df in (True, False) for pbc in (True, False)
         for ch in ((True, False) if df else (False,))]
# filter_bias=False: W(rbf) without its bias, on both message paths
CASES += [("leignn", True, True, ch, False) for ch in (True, False)] + [("leignn", False, False, False, False)]


@pytest.fixture
def chunked_calls(monkeypatch):
    """Counts the calls of the fused CPU kernel, so that a test knows which path it checked."""
    calls = []
    kernel = ops._chunked_message
    monkeypatch.setattr(ops, "_chunked_message", lambda *a: calls.append(1) or kernel(*a))
    return calls


@pytest.mark.parametrize("variant,direct_forces,pbc,chunked,filter_bias", CASES)
def test_model_equals_reference(variant, direct_forces, pbc, chunked, filter_bias, chunked_calls):
    torch.manual_seed(7)
    model = LEIGNN(**VARIANTS[variant], direct_forces=direct_forces, use_pbc=pbc, chunked_messages=chunked,
                   filter_bias=filter_bias, **HP)
    # non-trivial biases, so that a dropped bias or a mis-ordered block would show
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = model.double().eval()
    if pbc:
        data = periodic_batch_float64([slab((2, 2, 3), "OH", 1), slab((2, 3, 2), "CO", 2)], model)
    else:
        data = atoms_to_batch(molecules(), torch.float64)
    out = model(data.clone())
    assert len(chunked_calls) == (model.num_layers if chunked else 0)  # the path named is the path run
    e_ref, f_ref = reference(model, data)
    assert out["forces"].shape == f_ref.shape
    torch.testing.assert_close(out["energy"].detach(), e_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["forces"].detach(), f_ref, rtol=1e-9, atol=1e-10)
    assert f_ref.abs().max() > 1e-6  # the comparison is not between two zeros


def test_no_grad_inference_matches(chunked_calls):
    """Direct-force inference under torch.no_grad (the fused CPU kernel) gives the same numbers
    as with autograd on (bit for bit) and as the plain tensor path (to round-off)."""
    torch.manual_seed(0)
    model = LEIGNN(use_pbc=True, **HP).double().eval()
    plain = LEIGNN(use_pbc=True, chunked_messages=False, **HP).double().eval()
    plain.load_state_dict(model.state_dict())
    data = periodic_batch_float64([slab((2, 2, 3), "OH", 1)], model)
    plain.otf_graph = False
    ref = plain(data.clone())
    assert not chunked_calls
    grad_on = model(data.clone())
    with torch.no_grad():
        out = model(data.clone())
    assert len(chunked_calls) == 2 * model.num_layers
    torch.testing.assert_close(out["energy"], grad_on["energy"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(out["forces"], grad_on["forces"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(out["energy"], ref["energy"].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], ref["forces"].detach(), rtol=1e-11, atol=1e-12)
    assert ref["forces"].abs().max() > 1e-6


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_banded_radial_filters_equal_reference():
    """OC20's 128 Gaussians: the CPU path multiplies each chunk of edges only with the basis
    columns that are not negligible for it; the result is still the spec's, to float64 round-off."""
    torch.manual_seed(11)
    hp = {**HP, "num_rbf": 128}
    model = _perturbed(LEIGNN(use_pbc=True, **hp)).double().eval()
    data = periodic_batch_float64([slab((2, 2, 3), "OH", 1), slab((2, 3, 2), "CO", 2)], model)
    with torch.no_grad():
        _, _, dist, _ = model._graph(data.clone(), periodic_axes(data))
        plan = ops.plan_chunks(model.radial_basis(dist.sort().values))
    assert len(plan.chunks) >= 2 and plan.fraction < 0.5  # the banded path is really taken
    out = model(data.clone())
    e_ref, f_ref = reference(model, data)
    torch.testing.assert_close(out["energy"].detach(), e_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["forces"].detach(), f_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_message_gradients_equal_plain_autograd(variant):
    """Training on CPU with direct forces runs the fused, chunked message (hand-written backward,
    banded filters); its outputs and every parameter gradient equal the plain per-edge autograd
    path's, and every parameter gets a gradient (DDP needs that)."""
    torch.manual_seed(5)
    hp = {**HP, "num_layers": 3, "num_rbf": 128}
    model = _perturbed(LEIGNN(**VARIANTS[variant], use_pbc=True, **hp)).double().train()
    data = periodic_batch_float64([slab((2, 2, 3), "OH", 1), slab((2, 3, 2), "CO", 2)], model)
    models = {True: model, False: LEIGNN(**VARIANTS[variant], use_pbc=True, chunked_messages=False, **hp)}
    models[False].double().train().load_state_dict(model.state_dict())
    models[False].otf_graph = False
    g = torch.Generator().manual_seed(0)
    w_e = torch.randn(2, generator=g, dtype=torch.float64)
    w_f = torch.randn(data.pos.shape, generator=g, dtype=torch.float64)
    outs, grads = {}, {}
    for chunked, m in models.items():
        out = m(data.clone())
        ((out["energy"] * w_e).sum() + (out["forces"] * w_f).sum()).backward()
        outs[chunked] = {k: v.detach() for k, v in out.items()}
        grads[chunked] = {n: p.grad for n, p in m.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    assert all(grads[True][n] is not None for n in names), [n for n in names if grads[True][n] is None]
    for k in outs[False]:
        torch.testing.assert_close(outs[True][k], outs[False][k], rtol=1e-10, atol=1e-10)
    for n in names:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-9, atol=1e-11, msg=n)
        assert grads[False][n] is not None


@pytest.mark.parametrize("with_v,with_bias", [(True, True), (False, True), (True, False)])
def test_message_kernel_equals_plain_path(with_v, with_bias):
    """ops.message on its own: the fused kernel (banded filters, hand-written backward) and the
    plain tensor path give the same sums and the same gradients for phi, v, W and its bias;
    v=None (v = 0) equals an explicit zero v."""
    g = torch.Generator().manual_seed(3)
    N, F, K, E = 7, 4, 128, 300
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    src, dst = torch.randint(0, N, (E,), generator=g), torch.randint(0, N, (E,), generator=g)
    dist = 0.5 + 5.0 * torch.rand(E, generator=g, dtype=torch.float64)
    mu = torch.linspace(0, 6.0, K, dtype=torch.float64)
    rbf = torch.exp(-0.5 * ((dist[:, None] - mu) / (mu[1] - mu[0])) ** 2)  # localised Gaussians
    e = torch.nn.functional.normalize(rnd(E, 3), dim=-1)
    leaves = [rnd(N, 3 * F), rnd(N, 3, F), rnd(3 * F, K), rnd(3 * F)]  # phi, v, W, bias
    g_ds, g_dv = rnd(N, F), rnd(N, 3, F)
    results = {}
    for chunked in (True, False):
        phi, v, w, b = (x.clone().requires_grad_(True) for x in leaves)
        edges = ops.edges(src, dst, e, rbf, dist, chunked=chunked)
        assert (edges.plan is not None) == chunked
        ds, dv = ops.message(phi, v if with_v else None, edges, w, b if with_bias else None)
        ((ds * g_ds).sum() + (dv * g_dv).sum()).backward()
        results[chunked] = [ds.detach(), dv.detach(), phi.grad, w.grad] + ([b.grad] if with_bias else []) \
            + ([v.grad] if with_v else [])
    plan = ops.edges(src, dst, e, rbf, dist, chunked=True).plan
    assert len(plan.chunks) == 3 and plan.fraction < 0.7  # banded: some columns really skipped
    for x, y in zip(results[True], results[False]):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)
    if not with_v:  # v = None is v = 0
        ds0, dv0 = ops.message(leaves[0], torch.zeros(N, 3, F, dtype=torch.float64),
                               ops.edges(src, dst, e, rbf, dist), leaves[2], leaves[3])
        torch.testing.assert_close(results[False][0], ds0, rtol=0, atol=0)
        torch.testing.assert_close(results[False][1], dv0, rtol=0, atol=0)


def test_mlp_on_cat_equals_mlp_of_cat():
    """The per-graph split of GlobalDistribute's first Linear changes only round-off."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.SiLU(), torch.nn.Linear(4, 4)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    torch.testing.assert_close(ops.mlp_on_cat(mlp, x, y, index), mlp(torch.cat([x, y[index]], -1)))
