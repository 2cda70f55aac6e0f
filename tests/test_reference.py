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
from ase.build import add_adsorbate, fcc111, molecule

from leignn_ocp import LEIGNN
from leignn_ocp.batching import atoms_to_batch

VARIANTS = {"leignn": ("nmu", True), "vanilla_nmu": ("nmu", False), "vanilla": ("painn", False)}
HP = {"hidden_channels": 8, "num_layers": 2, "num_rbf": 6, "cutoff": 5.0, "max_neighbors": 10}


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
        src, dst, _, vec = model._graph(data.clone())
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
            x = phi[j] * w.lin(rbf, f"{pre}.message.rbf_proj") / math.sqrt(3.0)
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
    a = fcc111("Cu", size=size, vacuum=6.0)
    add_adsorbate(a, molecule(ads), 1.9, "fcc")
    a.rattle(0.05, seed=seed)
    a.pbc = True
    return a


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


CASES = [(v, df, pbc) for v in VARIANTS for df in (True, False) for pbc in (True, False)]


@pytest.mark.parametrize("variant,direct_forces,pbc", CASES)
def test_model_equals_reference(variant, direct_forces, pbc):
    torch.manual_seed(7)
    update, glob = VARIANTS[variant]
    model = LEIGNN(update=update, global_messages=glob, direct_forces=direct_forces, use_pbc=pbc, **HP)
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
    e_ref, f_ref = reference(model, data)
    assert out["forces"].shape == f_ref.shape
    torch.testing.assert_close(out["energy"].detach(), e_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["forces"].detach(), f_ref, rtol=1e-9, atol=1e-10)
    assert f_ref.abs().max() > 1e-6  # the comparison is not between two zeros


def test_no_grad_inference_matches():
    """Direct-force inference under torch.no_grad gives the same numbers as with autograd on."""
    torch.manual_seed(0)
    model = LEIGNN(use_pbc=True, **HP).double().eval()
    data = periodic_batch_float64([slab((2, 2, 3), "OH", 1)], model)
    ref = model(data.clone())
    with torch.no_grad():
        out = model(data.clone())
    torch.testing.assert_close(out["energy"], ref["energy"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(out["forces"], ref["forces"].detach(), rtol=0, atol=0)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_banded_radial_filters_equal_reference():
    """OC20's 128 Gaussians: the CPU path multiplies each chunk of edges only with the basis
    columns that are not negligible for it; the result is still the spec's, to float64 round-off."""
    from leignn_ocp.model import RadialFilter

    torch.manual_seed(11)
    hp = {**HP, "num_rbf": 128}
    model = _perturbed(LEIGNN(use_pbc=True, **hp)).double().eval()
    data = periodic_batch_float64([slab((2, 2, 3), "OH", 1), slab((2, 3, 2), "CO", 2)], model)
    with torch.no_grad():
        _, _, dist, _ = model._graph(data.clone())
        rbf = RadialFilter(model.radial_basis(dist.sort().values), chunked=True)
    assert len(rbf.chunks) >= 2 and rbf.fraction < 0.5  # the banded path is really taken
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
    update, glob = VARIANTS[variant]
    hp = {**HP, "num_layers": 3, "num_rbf": 128}
    model = _perturbed(LEIGNN(update=update, global_messages=glob, use_pbc=True, **hp)).double().train()
    data = periodic_batch_float64([slab((2, 2, 3), "OH", 1), slab((2, 3, 2), "CO", 2)], model)
    g = torch.Generator().manual_seed(0)
    w_e = torch.randn(2, generator=g, dtype=torch.float64)
    w_f = torch.randn(data.pos.shape, generator=g, dtype=torch.float64)
    outs, grads = {}, {}
    for chunked in (True, False):
        model.chunked_messages = chunked
        model.zero_grad(set_to_none=True)
        out = model(data.clone())
        ((out["energy"] * w_e).sum() + (out["forces"] * w_f).sum()).backward()
        outs[chunked] = {k: v.detach() for k, v in out.items()}
        grads[chunked] = {n: p.grad for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    assert all(grads[True][n] is not None for n in names), [n for n in names if grads[True][n] is None]
    for k in outs[False]:
        torch.testing.assert_close(outs[True][k], outs[False][k], rtol=1e-10, atol=1e-10)
    for n in names:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-9, atol=1e-11, msg=n)
        assert grads[False][n] is not None
