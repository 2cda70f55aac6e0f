"""LEIGNN: lightweight equivariant interaction GNN as a fairchem 1.10 model.

Every atom carries a scalar feature s `[N, F]` and a vector feature v `[N, 3, F]`
(spatial axis before the channel axis, so channel-mixing Linears never mix x/y/z);
every graph carries a global scalar g `[B, F]` and global vector u `[B, 3, F]`.
See ``shared/design/LEIGNN.md`` for the equations this file implements.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad, get_max_neighbors_mask
from fairchem.core.models.base import GraphModelMixin
from fairchem.core.models.gemnet.layers.base_layers import ScaledSiLU
from fairchem.core.models.gemnet.layers.embedding_block import AtomEmbedding
from fairchem.core.models.gemnet.layers.radial_basis import RadialBasis

UPDATES = ("nmu", "painn")


def _mlp(n_in: int, n_hidden: int, n_out: int, act_out: bool = False) -> nn.Sequential:
    layers = [nn.Linear(n_in, n_hidden), ScaledSiLU(), nn.Linear(n_hidden, n_out)]
    if act_out:
        layers.append(ScaledSiLU())
    return nn.Sequential(*layers)


def _full(x: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 tensors (mixed precision), anything else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Reducer:
    """Sums rows into groups: per-edge messages into their receivers, atoms into their graph.

    ``index_add`` (a serial row-wise add on CPU, atomics on GPU, fused by inductor under
    ``torch.compile``); its backward is a plain row gather. Edges may come in any order.
    """

    def __init__(self, index: torch.Tensor, size: int, counts: torch.Tensor | None = None) -> None:
        self.index = index
        self.size = size
        self._counts = None if counts is None else counts.clamp(min=1)  # rows per group

    def sum(self, x: torch.Tensor) -> torch.Tensor:  # [M, ...] -> [size, ...]
        x = _full(x)  # accumulate half / bfloat16 terms (autocast) in float32
        return x.new_zeros((self.size, *x.shape[1:])).index_add_(0, self.index, x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.bincount(self.index, minlength=self.size).clamp(min=1)
        total = self.sum(x)
        return total / self._counts.to(total.dtype).view(-1, *([1] * (x.dim() - 1)))


@torch.compiler.disable  # a Python loop over data-dependent chunks: runs eagerly under torch.compile
def _chunked_message(*args):
    return _ChunkedMessage.apply(*args)


class RadialFilter:
    """The edges' radial basis ``rbf(r_ij)`` and how the CPU path walks over the edges.

    ``chunked=True`` (CPU, direct forces; the model has sorted the edges by distance):
    the edges are cut into chunks of ``chunk`` consecutive edges, which the fused message
    (``_ChunkedMessage``) processes one at a time so that every per-edge temporary stays
    in cache. Within a chunk only the contiguous range of basis columns in which some edge
    has a value above ``rel_tol`` times that edge's largest one enters ``W(rbf)``: with
    OC20's 128 Gaussians, each one spacing wide, that is ~20 columns, since 9.6 widths
    from its centre a Gaussian is below 1e-20 of the largest one. The skipped products are
    far below float64 round-off, so the filters equal the dense ``Linear`` to round-off; a
    basis that is not localised simply keeps all its columns.
    """

    def __init__(self, rbf: torch.Tensor, chunked: bool = False, chunk: int = 128,
                 rel_tol: float = 1e-20) -> None:
        self.rbf = rbf
        self.chunks = None  # [(first edge, end edge, first column, end column)]
        self.fraction = 1.0  # share of the dense W(rbf) products actually computed
        if chunked and rbf.shape[0] > 0 and not rbf.requires_grad:
            self.chunks, self.fraction = _plan_chunks(rbf, chunk, rel_tol)


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


def _chunk_filter(rbf, weight, bias, c0, c1, lo, hi):
    """``W(rbf)`` for edges c0:c1 from basis columns lo:hi only: [m, 3F]."""
    if hi > lo:
        return torch.addmm(bias, rbf[c0:c1, lo:hi], weight[:, lo:hi].t())
    return bias.expand(c1 - c0, -1).clone()  # every basis value of the chunk is zero


class _ChunkedMessage(torch.autograd.Function):
    """Step 2 fused over chunks of edges (CPU, direct forces): for each chunk, gather,
    filter, multiply and ``index_add`` into the receivers while the chunk is in cache.
    No per-edge tensor is kept for backward: backward recomputes each chunk's filters and
    gathers (cheap next to the memory traffic saved) and accumulates the gradients of
    phi(s), v and the filter's weight and bias. Same arithmetic as ``Message``'s plain
    path, edge by edge.
    """

    @staticmethod
    def forward(ctx, phi, v, weight, bias, rbf, e, src, dst, chunks, v_zero):
        N, F3 = phi.shape
        F = F3 // 3
        ds = phi.new_zeros(N, F)
        dv = phi.new_zeros(N, F3)
        v2 = v.reshape(N, F3)
        for c0, c1, lo, hi in chunks:
            s_, d_, e_ = src[c0:c1], dst[c0:c1], e[c0:c1].unsqueeze(2)  # e_: [m, 3, 1]
            x = phi.index_select(0, s_).mul_(_chunk_filter(rbf, weight, bias, c0, c1, lo, hi))  # [m, 3F]
            a, b, c = x[:, :F].unsqueeze(1), x[:, F : 2 * F].unsqueeze(1), x[:, 2 * F :]
            ds.index_add_(0, d_, c)
            if v_zero:
                m = b * e_  # [m, 3, F]
            else:
                m = v2.index_select(0, s_).view(-1, 3, F).mul_(a).addcmul_(b, e_)
            dv.index_add_(0, d_, m.view(-1, F3))
        ctx.save_for_backward(phi, v2, weight, bias, rbf, e, src, dst)
        ctx.chunks, ctx.v_zero = chunks, v_zero
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
        grad_v = torch.zeros_like(v2) if (need_v and not ctx.v_zero) else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for c0, c1, lo, hi in ctx.chunks:
            s_, d_, e_ = src[c0:c1], dst[c0:c1], e[c0:c1].unsqueeze(2)
            R = _chunk_filter(rbf, weight, bias, c0, c1, lo, hi)  # [m, 3F]
            phi_j = phi.index_select(0, s_)
            G = g_dv.index_select(0, d_).view(-1, 3, F)  # d loss / d message_ij (vector part)
            gb = (G * e_).sum(1)  # [m, F]
            if ctx.v_zero:
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
        return grad_phi, grad_v, grad_w, grad_b, None, None, None, None, None, None


def _split_linear(x: torch.Tensor, lin: nn.Linear, F: int, y: torch.Tensor, index: torch.Tensor):
    """``lin(cat([x, y[index]], -1))`` with the second half computed once per row of ``y``.

    ``y`` is per graph and ``index`` maps atoms to graphs, so the half of the matmul that
    reads ``y`` runs on B rows instead of N. Same numbers up to round-off.
    """
    w_x, w_y = lin.weight.split(F, dim=1)  # [out, F] each (split: its backward is one cat)
    return nn.functional.linear(x, w_x) + nn.functional.linear(y, w_y, lin.bias).index_select(0, index)


class GlobalDistribute(nn.Module):
    """Step 1 (paper eqs. 5-6): every atom reads its graph's global scalar and vector."""

    def __init__(self, F: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * F, F, F, act_out=True)
        self.lin_v = nn.Linear(F, F, bias=False)

    def forward(self, s, v, g, u, batch, v_zero: bool = False):
        F = s.shape[-1]
        mlp = self.mlp  # Linear(2F->F), sigma, Linear(F->F), sigma on [s || g_b(i)]
        h = mlp[1](_split_linear(s, mlp[0], F, g, batch))
        s = s + mlp[3](mlp[2](h))  # [N, F]
        if v_zero:  # first layer: v = u = 0, so W_d (v + u_b(i)) = W_d u_b(i), computed per graph
            v = v + self.lin_v(u).index_select(0, batch)
        else:
            v = v + self.lin_v(v + u.index_select(0, batch))  # [N, 3, F]
        return s, v


class GlobalAggregate(nn.Module):
    """Step 4 (paper eqs. 7-8): per-graph means feed the global entities.

    Means (not sums) keep the model extensive: a supercell has the same means.
    """

    def __init__(self, F: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * F, F, F, act_out=True)
        self.lin_v = nn.Linear(F, F, bias=False)

    def forward(self, s, v, g, u, graphs: Reducer):
        s_mean = graphs.mean(s)  # [B, F]
        v_mean = graphs.mean(v)  # [B, 3, F]
        g = g + self.mlp(torch.cat([s_mean, g], dim=-1))
        u = u + self.lin_v(v_mean + u)
        return g, u


class Message(nn.Module):
    """Step 2 (paper eqs. 1-2): continuous-filter messages j -> i.

    Per edge: a gather of phi(s_j) (and of v_j after the first layer, where v = 0), the
    radial filter, two multiply-adds and an ``index_add`` into the receivers. The 1/sqrt(3)
    and 1/sqrt(F) factors are folded into phi(s) per atom instead of applied per edge. On
    CPU with direct forces the whole step runs fused over cache-sized chunks of edges
    (``_ChunkedMessage``); elsewhere (GPU, energy-gradient forces) as plain tensor ops.
    """

    def __init__(self, F: int, num_rbf: int) -> None:
        super().__init__()
        self.F = F
        self.phi = _mlp(F, F // 2, 3 * F)
        self.rbf_proj = nn.Linear(num_rbf, 3 * F)
        self.inv_sqrt_3 = 1.0 / math.sqrt(3.0)
        self.inv_sqrt_F = 1.0 / math.sqrt(F)

    def forward(self, s, v, rbf, e, src, receivers: Reducer, v_zero: bool = False):
        N, F = s.shape
        E = src.shape[0]
        scale = s.new_full((3 * F,), self.inv_sqrt_3 * self.inv_sqrt_F)
        scale[2 * F :] = self.inv_sqrt_3  # a, b carry 1/sqrt(3F); c only 1/sqrt(3)
        phi = self.phi(s) * scale  # [N, 3F]
        if rbf.chunks is not None:  # CPU: fused over cache-sized chunks of edges
            return _chunked_message(phi, v, self.rbf_proj.weight, self.rbf_proj.bias, rbf.rbf, e,
                                    src, receivers.index, rbf.chunks, v_zero)
        x = phi.index_select(0, src) * self.rbf_proj(rbf.rbf)  # [E, 3F]; rbf: a RadialFilter
        a, b, c = x.split(F, dim=-1)  # [E, F] each
        dv = b.unsqueeze(1) * e.unsqueeze(2)  # [E, 3, F]: b_ij (x) e_ij
        if not v_zero:  # + a_ij * v_j (v = 0 before the first message)
            v_j = v.reshape(N, 3 * F).index_select(0, src).view(E, 3, F)
            dv = torch.addcmul(dv, a.unsqueeze(1), v_j)
        ds = receivers.sum(c)  # [N, F]
        dv = receivers.sum(dv.view(E, 3 * F)).view(N, 3, F)  # [N, 3, F]
        return ds, dv


class Update(nn.Module):
    """Step 3: local update, NMU (paper eqs. 3-4) or PaiNN's (the Vanilla ablation).

    Both read the same MLP of [s || |V|]; only how its three outputs are used differs,
    so both variants have the same parameter count.
    """

    def __init__(self, F: int, update: str, norm_eps: float) -> None:
        super().__init__()
        self.F = F
        self.update = update
        self.norm_eps = norm_eps
        self.lin_uv = nn.Linear(F, 2 * F, bias=False)
        self.mlp = _mlp(2 * F, F, 3 * F)
        self.inv_sqrt_2 = 1.0 / math.sqrt(2.0)
        self.inv_sqrt_F = 1.0 / math.sqrt(F)

    def forward(self, s, v):
        U, V = self.lin_uv(v).split(self.F, dim=-1)  # [N, 3, F] each
        V_norm = torch.sqrt(V.pow(2).sum(dim=1) + self.norm_eps)  # [N, F]; finite grad at V=0
        h = self.mlp(torch.cat([s, V_norm], dim=-1))  # [N, 3F]
        if self.update == "nmu":
            p, q, t = h.split(self.F, dim=-1)
            s = s + q * self.inv_sqrt_2 + s * torch.tanh(t)
            v = v + p.unsqueeze(1) * U
        else:
            a_vv, a_sv, a_ss = h.split(self.F, dim=-1)
            uv = (U * V).sum(dim=1) * self.inv_sqrt_F  # [N, F]
            s = s + (a_ss + a_sv * uv) * self.inv_sqrt_2
            v = v + a_vv.unsqueeze(1) * U
        return s, v


class InteractionLayer(nn.Module):
    """Steps 1-4 of one layer. ``aggregate=False`` for the last layer: nothing reads
    the global entities after it, and unused parameters would break DDP."""

    def __init__(
        self, F: int, num_rbf: int, update: str, global_messages: bool, norm_eps: float,
        aggregate: bool = True,
    ):
        super().__init__()
        self.distribute = GlobalDistribute(F) if global_messages else None
        self.message = Message(F, num_rbf)
        self.update = Update(F, update, norm_eps)
        self.aggregate = GlobalAggregate(F) if (global_messages and aggregate) else None
        self.inv_sqrt_2 = 1.0 / math.sqrt(2.0)

    def forward(self, s, v, g, u, batch, rbf, e, src, receivers: Reducer, graphs: Reducer,
                v_zero: bool = False):
        """``v_zero``: v and u are known to be exactly zero (first layer); the terms they
        multiply are skipped, which changes no number."""
        if self.distribute is not None:
            s, v = self.distribute(s, v, g, u, batch, v_zero)
        ds, dv = self.message(s, v, rbf, e, src, receivers, v_zero)
        s = (s + ds) * self.inv_sqrt_2
        v = v + dv
        s, v = self.update(s, v)
        if self.aggregate is not None:
            g, u = self.aggregate(s, v, g, u, graphs)
        return s, v, g, u


@registry.register_model("leignn")
class LEIGNN(nn.Module, GraphModelMixin):
    """LEIGNN energy + force model for fairchem's OCPTrainer.

    Switches (all YAML-visible): ``update`` = "nmu" | "painn" and ``global_messages``
    give LEIGNN (nmu, true), Vanilla+NMU (nmu, false) and Vanilla (painn, false);
    ``direct_forces`` picks the vector-feature force head (paper) or -dE/dx (conservative).
    ``zero_init_energy`` starts the energy readout's last layer at zero: the energy is a sum of
    per-atom terms, so random readout weights put an initial error of order N x (normalised
    energy) on every structure, which a short run spends its steps removing (measured on the
    embedded data, 150 steps: energy MAE 13.3 eV -> 0.42 eV, force MAE 330 -> 266 meV/A).
    """

    chunked_messages = True  # CPU: _ChunkedMessage (False: the plain per-edge tensors)

    def __init__(
        self,
        hidden_channels: int = 512,
        num_layers: int = 4,
        num_rbf: int = 128,
        cutoff: float = 6.0,
        max_neighbors: int = 20,
        rbf: dict | None = None,
        envelope: dict | None = None,
        update: str = "nmu",
        global_messages: bool = True,
        direct_forces: bool = True,
        regress_forces: bool = True,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        otf_graph: bool = True,
        enforce_max_neighbors_strictly: bool = True,
        num_elements: int = 118,
        norm_eps: float = 1e-8,
        zero_init_energy: bool = True,
    ) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"LEIGNN: update must be one of {UPDATES}, got {update!r}")
        if hidden_channels < 2 or hidden_channels % 2:
            raise ValueError(f"LEIGNN: hidden_channels must be an even number >= 2, got {hidden_channels}")
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.num_rbf = num_rbf
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        self.update = update
        self.global_messages = global_messages
        self.direct_forces = direct_forces
        self.regress_forces = regress_forces
        self.use_pbc = use_pbc
        self.use_pbc_single = use_pbc_single
        self.otf_graph = otf_graph
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.num_elements = num_elements
        self.zero_init_energy = zero_init_energy

        F = hidden_channels
        self.atom_emb = AtomEmbedding(F, num_elements)
        self.radial_basis = RadialBasis(
            num_radial=num_rbf,
            cutoff=cutoff,
            rbf=rbf or {"name": "gaussian"},
            envelope=envelope or {"name": "polynomial", "exponent": 5},
        )
        # one trainable row, copied for every graph; u starts at zero
        self.global_emb = nn.Parameter(torch.randn(1, F)) if global_messages else None
        self.layers = nn.ModuleList(
            InteractionLayer(F, num_rbf, update, global_messages, norm_eps, aggregate=k < num_layers - 1)
            for k in range(num_layers)
        )
        self.out_energy = _mlp(F, F // 2, 1)
        self.out_forces = nn.Linear(F, 1, bias=False) if (regress_forces and direct_forces) else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.zero_init_energy:
            nn.init.zeros_(self.out_energy[-1].weight)  # initial energy = 0 (the normaliser's mean)

    def _check_input(self, data) -> None:
        """Raise on input the model would otherwise turn into NaN or garbage."""
        z = data.atomic_numbers
        if z.numel() == 0:
            raise ValueError("LEIGNN: empty structure (no atoms)")
        if not torch.isfinite(data.pos).all():
            bad = (~torch.isfinite(data.pos).all(dim=-1)).nonzero().flatten().tolist()
            raise ValueError(f"LEIGNN: non-finite positions for atoms {bad[:10]}")
        zl = z.long()
        if (zl.to(z.dtype) != z).any() or zl.min() < 1 or zl.max() > self.num_elements:
            bad = sorted(set(z[(zl < 1) | (zl > self.num_elements) | (zl.to(z.dtype) != z)].tolist()))
            raise ValueError(
                f"LEIGNN: atomic numbers {bad} outside the embedding (1..{self.num_elements})"
            )
        if self.use_pbc:
            cell = getattr(data, "cell", None)
            if cell is None:
                raise ValueError("LEIGNN: use_pbc=True but the structure has no cell")
            cell = cell.view(-1, 3, 3)
            if not torch.isfinite(cell).all():
                raise ValueError("LEIGNN: use_pbc=True but the cell has non-finite entries")
            vol = torch.linalg.det(cell.double()).abs()
            pbc = getattr(data, "pbc", None)
            if pbc is None or bool(torch.atleast_2d(pbc).any()):
                if (vol < 1e-6).any():
                    bad = (vol < 1e-6).nonzero().flatten().tolist()
                    raise ValueError(
                        f"LEIGNN: use_pbc=True but structures {bad} in the batch have a zero-volume "
                        "cell (periodic structure without a cell)"
                    )

    def _graph(self, data):
        """Edges j -> i within the cutoff, at most ``max_neighbors`` nearest per receiver i.

        The periodic path is fairchem's ``radius_graph_pbc`` (nearest K). PyG's
        ``radius_graph`` behind the non-periodic path keeps an arbitrary K, which would
        make the energy depend on atom order, so there we take every neighbour and keep
        the K nearest with fairchem's own mask.
        """
        if self.use_pbc or not self.otf_graph:
            graph = self.generate_graph(data)
            src, dst = graph.edge_index
            return src, dst, graph.edge_distance, graph.edge_distance_vec
        graph = self.generate_graph(data, max_neighbors=max(int(data.natoms.max()), 1))
        order = torch.argsort(graph.edge_index[1], stable=True)  # the mask wants receivers sorted
        src, dst = graph.edge_index[:, order]
        dist, vec = graph.edge_distance[order], graph.edge_distance_vec[order]
        keep, _ = get_max_neighbors_mask(
            natoms=data.natoms,
            index=dst,
            atom_distance=dist.detach() ** 2,
            max_num_neighbors_threshold=self.max_neighbors,
            enforce_max_strictly=self.enforce_max_neighbors_strictly,
        )
        return src[keep], dst[keep], dist[keep], vec[keep]

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        self._check_input(data)
        pos = data.pos
        if self.regress_forces and not self.direct_forces:
            pos.requires_grad_(True)
        batch = data.batch
        B = data.natoms.numel()
        z = data.atomic_numbers.long()

        src, dst, dist, vec = self._graph(data)  # j (sender), i (receiver), [E], [E, 3]
        N = z.shape[0]
        # CPU with direct forces: the fused, chunked message (see RadialFilter), with the
        # edges sorted by distance (the order of edges changes no sum but round-off).
        chunked = self.chunked_messages and pos.device.type == "cpu" and not pos.requires_grad
        if chunked:
            order = torch.argsort(dist, stable=True)
            src, dst, dist, vec = src[order], dst[order], dist[order], vec[order]
        receivers = Reducer(dst, N)  # edges -> atoms
        graphs = Reducer(batch, B, data.natoms)  # atoms -> graphs
        # fairchem's distance vector is p_j - p_i (+ image offset); e_ij points from j to i
        e = -vec / dist.unsqueeze(-1)  # [E, 3]
        rbf = RadialFilter(self.radial_basis(dist), chunked)  # [E, num_rbf], envelope applied

        s = self.atom_emb(z)  # [N, F]
        F = s.shape[-1]
        v = s.new_zeros(N, 3, F)  # [N, 3, F]
        if self.global_emb is not None:
            g = self.global_emb.to(s.dtype).expand(B, F)  # [B, F]
            u = s.new_zeros(B, 3, F)  # [B, 3, F]
        else:
            g = u = None

        for k, layer in enumerate(self.layers):
            s, v, g, u = layer(s, v, g, u, batch, rbf, e, src, receivers, graphs, v_zero=k == 0)

        # Readout heads in the features' own precision even under autocast (mixed precision):
        # the energy is a sum of many per-atom terms and the forces are the targets.
        with torch.autocast(device_type=pos.device.type, enabled=False):
            s, v = _full(s), _full(v)
            energy = graphs.sum(self.out_energy(s).squeeze(-1))  # [B]
            forces = self.out_forces(v).squeeze(-1) if self.out_forces is not None else None  # [N, 3]
        out = {"energy": energy}
        if self.regress_forces:
            if self.direct_forces:
                out["forces"] = forces
            else:
                out["forces"] = -torch.autograd.grad(
                    energy, pos, grad_outputs=torch.ones_like(energy), create_graph=self.training
                )[0]
        return out

    def __repr__(self) -> str:
        return (
            f"LEIGNN(hidden_channels={self.hidden_channels}, num_layers={self.num_layers}, "
            f"num_rbf={self.num_rbf}, cutoff={self.cutoff}, max_neighbors={self.max_neighbors}, "
            f"update={self.update!r}, global_messages={self.global_messages}, "
            f"direct_forces={self.direct_forces})"
        )
