"""The kernels behind ``model.py``: sums over groups, the message step and a per-graph MLP.

``model.py`` states the equations; this module decides how they run. Every function here has
the same numbers as the plain tensor expression in its docstring, up to round-off (checked
against a float64 per-edge oracle, gradients included, in ``tests/test_reference.py``).
Why each optimisation exists and what it saves: ``docs/notes/model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 tensors (mixed precision), anything else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Reducer:
    """Sums rows into groups: per-edge messages into their receivers, atoms into their graph.

    ``index_add`` (a serial row-wise add on CPU, atomics on GPU, fused by inductor under
    ``torch.compile``); its backward is a plain row gather. Rows may come in any order.
    """

    def __init__(self, index: torch.Tensor, size: int, counts: torch.Tensor | None = None) -> None:
        self.index = index
        self.size = size
        self._counts = None if counts is None else counts.clamp(min=1)  # rows per group

    def sum(self, x: torch.Tensor) -> torch.Tensor:  # [M, ...] -> [size, ...]
        x = full_precision(x)  # accumulate half / bfloat16 terms (autocast) in float32
        return x.new_zeros((self.size, *x.shape[1:])).index_add_(0, self.index, x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.bincount(self.index, minlength=self.size).clamp(min=1)
        total = self.sum(x)
        return total / self._counts.to(total.dtype).view(-1, *([1] * (x.dim() - 1)))


def connected_components(src: torch.Tensor, dst: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """The fragment of each of ``n`` atoms in the graph of edges (src, dst), read as undirected:
    labels [N] in 0..C-1, numbered by each fragment's first atom, and C.

    Min-label propagation with pointer jumping (every label is an atom of the same fragment, so
    label[label] is one too): a few rounds for molecules, on the device, one host check a round.
    Edges never join two structures, so a fragment lies in one structure, whatever the batch.
    """
    label = torch.arange(n, device=src.device)
    while True:
        new = label.scatter_reduce(0, dst, label[src], reduce="amin")
        new = new.scatter_reduce(0, src, new[dst], reduce="amin")
        new = new[new]
        if torch.equal(new, label):
            break
        label = new
    first, frag = torch.unique(label, return_inverse=True)  # labels are first atoms: sorted
    return frag, first.numel()


def times_zero(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` times zero, as a scalar: what a product ``weight @ 0`` adds (0; NaN if the
    weight is not finite) and its gradient (zero), without computing the product. Keeps a
    parameter whose input is known to be zero in the autograd graph, as DDP needs."""
    return weight.sum() * 0.0


def mlp_on_cat(mlp: nn.Sequential, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mlp(cat([x, y[index]], -1))`` with the first Linear's half that reads ``y`` run once per row of y.

    ``y`` is per graph `[B, F]` and ``index`` maps atoms to graphs, so that half of the first
    matmul runs on B rows instead of N. ``mlp[0]`` must be an ``nn.Linear``.
    """
    first = mlp[0]
    w_x, w_y = first.weight.split(x.shape[-1], dim=1)  # [out, F] each (split: its backward is one cat)
    h = nn.functional.linear(x, w_x) + nn.functional.linear(y, w_y, first.bias).index_select(0, index)
    for layer in list(mlp)[1:]:
        h = layer(h)
    return h


# --------------------------------------------------------------------------- the message step


@dataclass(frozen=True)
class ChunkPlan:
    """How the fused message walks over the edges (sorted by distance) on CPU.

    chunks: ``(first edge, end edge, first basis column, end basis column)`` per chunk.
    fraction: share of the dense ``W(rbf)`` products actually computed.
    """

    chunks: list[tuple[int, int, int, int]]
    fraction: float


def plan_chunks(rbf: torch.Tensor, chunk: int = 128, rel_tol: float = 1e-20) -> ChunkPlan | None:
    """Cut the edges into chunks of ``chunk`` consecutive edges, each with its band of basis columns.

    Within a chunk only the contiguous range of basis columns in which some edge has a value
    above ``rel_tol`` times that edge's largest one enters ``W(rbf)``. The skipped products are
    far below float64 round-off, so the filters equal the dense ``Linear`` to round-off; a basis
    that is not localised simply keeps all its columns. None (use the plain path) when there
    are no edges or the basis itself needs a gradient.
    """
    if rbf.shape[0] == 0 or rbf.requires_grad:
        return None
    chunks, fraction = _plan_chunks(rbf, chunk, rel_tol)
    return ChunkPlan(chunks, fraction)


@torch.compiler.disable  # data-dependent Python values: runs eagerly under torch.compile
def _plan_chunks(rbf: torch.Tensor, chunk: int, rel_tol: float):
    E, K = rbf.shape
    with torch.no_grad():
        mag = rbf.abs()
        active = mag > rel_tol * mag.amax(dim=1, keepdim=True)  # [E, K]
        C = -(-E // chunk)
        pad = active.new_zeros(C * chunk, K)
        pad[:E] = active
        act = pad.view(C, chunk, K).any(dim=1).to(torch.int8)  # [C, K]: column used in chunk c
        used = act.any(dim=1)
        lo = torch.where(used, act.argmax(dim=1), 0).tolist()
        hi = torch.where(used, K - act.flip(1).argmax(dim=1), 0).tolist()
    chunks = [(c * chunk, min(E, (c + 1) * chunk), lo[c], hi[c]) for c in range(C)]
    return chunks, sum((c1 - c0) * (h - l) for c0, c1, l, h in chunks) / (E * K)


class Edges(NamedTuple):
    """The graph as the message step reads it: edge k carries a message from src[k] = j to dst[k] = i."""

    src: torch.Tensor  # [E]
    dst: torch.Tensor  # [E]
    e: torch.Tensor  # [E, 3]: unit vector e_ij, from j to i
    rbf: torch.Tensor  # [E, K]: radial basis rbf(r_ij)
    plan: ChunkPlan | None  # the fused CPU kernel's chunks; None: plain tensor ops


def edges(src, dst, e, rbf, dist, chunked: bool = False) -> Edges:
    """The edges for :func:`message`; ``chunked=True``: sorted by distance ``dist`` `[E]`, so
    that each chunk of the fused kernel covers a narrow band of basis columns, with their
    :class:`ChunkPlan`. The order of the edges changes no sum but its round-off."""
    if not chunked:
        return Edges(src, dst, e, rbf, None)
    order = torch.argsort(dist, stable=True)
    src, dst, e, rbf = src[order], dst[order], e[order], rbf[order]
    return Edges(src, dst, e, rbf, plan_chunks(rbf))


def message(phi: torch.Tensor, v: torch.Tensor | None, edges: Edges, weight: torch.Tensor,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous-filter messages j -> i summed into the receivers.

    phi `[N, 3F]` (phi(s), already scaled), v `[N, 3, F]` or None (v = 0: the a_ij v_j term is
    skipped), ``weight`` `[3F, K]` and ``bias`` `[3F]` (or None) of the filter W. With
    ``[a, b, c] = phi[src] * (rbf @ weight.T + bias)`` (F-blocks):
    ``ds = sum_j c`` `[N, F]` and ``dv = sum_j a * v_j + b (x) e`` `[N, 3, F]`.

    ``edges.plan=None``: plain tensor ops (gather, filter, multiply, ``index_add``) under
    autograd, any device. A :class:`ChunkPlan`: the fused CPU kernel, hand-written backward.
    """
    src, dst, e, rbf, plan = edges
    if plan is not None:
        return _chunked_message(phi, v, weight, bias, rbf, e, src, dst, plan.chunks)
    N, F = phi.shape[0], phi.shape[-1] // 3
    E = src.shape[0]
    x = phi.index_select(0, src) * nn.functional.linear(rbf, weight, bias)  # [E, 3F]
    a, b, c = x.split(F, dim=-1)  # [E, F] each
    dv = b.unsqueeze(1) * e.unsqueeze(2)  # [E, 3, F]: b_ij (x) e_ij
    if v is not None:  # + a_ij * v_j
        v_j = v.reshape(N, 3 * F).index_select(0, src).view(E, 3, F)
        dv = torch.addcmul(dv, a.unsqueeze(1), v_j)
    receivers = Reducer(dst, N)
    ds = receivers.sum(c)  # [N, F]
    dv = receivers.sum(dv.view(E, 3 * F)).view(N, 3, F)  # [N, 3, F]
    return ds, dv


@torch.compiler.disable  # a Python loop over data-dependent chunks: runs eagerly under torch.compile
def _chunked_message(*args):
    return _ChunkedMessage.apply(*args)


def _chunk_filter(rbf, weight, bias, c0, c1, lo, hi):
    """``W(rbf)`` for edges c0:c1 from basis columns lo:hi only: [m, 3F]."""
    if hi > lo:
        if bias is None:
            return rbf[c0:c1, lo:hi] @ weight[:, lo:hi].t()
        return torch.addmm(bias, rbf[c0:c1, lo:hi], weight[:, lo:hi].t())
    if bias is None:  # every basis value of the chunk is zero
        return rbf.new_zeros(c1 - c0, weight.shape[0])
    return bias.expand(c1 - c0, -1).clone()


class _ChunkedMessage(torch.autograd.Function):
    """:func:`message` fused over chunks of edges: for each chunk, gather, filter, multiply and
    ``index_add`` into the receivers while the chunk is in cache. No per-edge tensor is kept for
    backward: backward recomputes each chunk's filters and gathers and accumulates the gradients
    of phi, v and the filter's weight and bias. Same arithmetic as the plain path, edge by edge.
    """

    @staticmethod
    def forward(ctx, phi, v, weight, bias, rbf, e, src, dst, chunks):
        N, F3 = phi.shape
        F = F3 // 3
        ds = phi.new_zeros(N, F)
        dv = phi.new_zeros(N, F3)
        v2 = None if v is None else v.reshape(N, F3)
        for c0, c1, lo, hi in chunks:
            s_, d_, e_ = src[c0:c1], dst[c0:c1], e[c0:c1].unsqueeze(2)  # e_: [m, 3, 1]
            x = phi.index_select(0, s_).mul_(_chunk_filter(rbf, weight, bias, c0, c1, lo, hi))  # [m, 3F]
            a, b, c = x[:, :F].unsqueeze(1), x[:, F : 2 * F].unsqueeze(1), x[:, 2 * F :]
            ds.index_add_(0, d_, c)
            if v2 is None:
                m = b * e_  # [m, 3, F]
            else:
                m = v2.index_select(0, s_).view(-1, 3, F).mul_(a).addcmul_(b, e_)
            dv.index_add_(0, d_, m.view(-1, F3))
        ctx.save_for_backward(phi, v2, weight, bias, rbf, e, src, dst)
        ctx.chunks = chunks
        return ds, dv.view(N, 3, F)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ds, g_dv):
        phi, v2, weight, bias, rbf, e, src, dst = ctx.saved_tensors
        N, F3 = phi.shape
        F = F3 // 3
        g_ds = g_ds.contiguous()
        g_dv = g_dv.reshape(N, F3)
        need_phi, need_v, need_w, need_b = ctx.needs_input_grad[:4]
        grad_phi = torch.zeros_like(phi) if need_phi else None
        grad_v = torch.zeros_like(v2) if (need_v and v2 is not None) else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if (need_b and bias is not None) else None
        for c0, c1, lo, hi in ctx.chunks:
            s_, d_, e_ = src[c0:c1], dst[c0:c1], e[c0:c1].unsqueeze(2)
            R = _chunk_filter(rbf, weight, bias, c0, c1, lo, hi)  # [m, 3F]
            phi_j = phi.index_select(0, s_)
            G = g_dv.index_select(0, d_).view(-1, 3, F)  # d loss / d message_ij (vector part)
            gb = (G * e_).sum(1)  # [m, F]
            if v2 is None:
                ga = torch.zeros_like(gb)
            else:
                v_j = v2.index_select(0, s_).view(-1, 3, F)
                ga = (G * v_j).sum(1)
                if grad_v is not None:
                    a = (phi_j[:, :F] * R[:, :F]).unsqueeze(1)
                    grad_v.index_add_(0, s_, (G * a).view(-1, F3))
            gx = torch.cat([ga, gb, g_ds.index_select(0, d_)], dim=1)  # d loss / d x_ij: [m, 3F]
            if grad_phi is not None:
                grad_phi.index_add_(0, s_, gx * R)
            if grad_w is not None or grad_b is not None:
                gR = gx.mul_(phi_j)  # d loss / d W(rbf)_ij
                if grad_w is not None and hi > lo:
                    grad_w[:, lo:hi].addmm_(gR.t(), rbf[c0:c1, lo:hi])
                if grad_b is not None:
                    grad_b += gR.sum(0)
        if grad_v is not None:
            grad_v = grad_v.view(N, 3, F)
        return grad_phi, grad_v, grad_w, grad_b, None, None, None, None, None
