"""LEIGNN: lightweight equivariant interaction GNN as a fairchem 1.10 model.

Every atom carries a scalar feature s `[N, F]` and a vector feature v `[N, 3, F]`
(spatial axis before the channel axis, so channel-mixing Linears never mix x/y/z);
every graph carries a global scalar g `[B, F]` and global vector u `[B, 3, F]`.
The equations are those of ``shared/design/LEIGNN.md``, quoted in each block's docstring
(sigma = ScaledSiLU, b(i) = graph of atom i, (x) = outer product, || = concatenation).
How the sums run (fused CPU kernels, per-graph terms) lives in ``leignn_ocp/ops.py``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad, get_max_neighbors_mask
from fairchem.core.models.base import GraphModelMixin
from fairchem.core.models.gemnet.layers.base_layers import ScaledSiLU
from fairchem.core.models.gemnet.layers.embedding_block import AtomEmbedding
from fairchem.core.models.gemnet.layers.radial_basis import RadialBasis

from leignn_ocp import ops
from leignn_ocp.checks import MAX_IMAGES, MIN_DISTANCE, check_edge_lengths, check_input, wrap_positions

UPDATES = ("nmu", "painn")
GLOBAL_SCOPES = ("structure", "fragment")
PBC_GRAPHS = ("auto", "fairchem", "cells")
# "auto" takes leignn_ocp.graph's linear search (on CPU) from this many atoms in a batch, all structures
# together: fairchem's search costs sum_b N_b^2 x images, the tree's N; measured 2026-12-06 (1 thread):
# tree 1.3 vs 1.7 ms at 27 atoms, 6 vs 45 ms for 16 OC20-size slabs, 1.7 vs 17 ms at 108; 1.7 vs 1.2 at 16
CELL_SEARCH_MIN_ATOMS = 24


def _mlp(n_in: int, n_hidden: int, n_out: int, act_out: bool = False) -> nn.Sequential:
    """Linear(n_in->n_hidden), sigma, Linear(n_hidden->n_out)[, sigma]."""
    last = [ScaledSiLU()] if act_out else []
    return nn.Sequential(nn.Linear(n_in, n_hidden), ScaledSiLU(), nn.Linear(n_hidden, n_out), *last)


class GlobalDistribute(nn.Module):
    """Step 1, global message distributing (paper eqs. 5-6): every atom reads its graph's globals.

        s_i <- s_i + MLP_d([s_i || g_b(i)])     MLP_d: Linear(2F->F), sigma, Linear(F->F), sigma
        v_i <- v_i + W_d (v_i + u_b(i))         W_d: Linear(F->F), no bias

    ``v=None`` stands for v = 0 in the first layer, where u = 0 too: then W_d (v_i + u_b(i)) = 0
    and v stays None, so that the message step can skip its products with v.
    """

    def __init__(self, F: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * F, F, F, act_out=True)
        self.lin_v = nn.Linear(F, F, bias=False)

    def forward(self, s, v, g, u, batch):
        if v is None:  # W_d times 0, as the equation has it: W_d stays in the autograd graph (DDP)
            g = g + ops.times_zero(self.lin_v.weight)  # [B, F]
        s = s + ops.mlp_on_cat(self.mlp, s, g, batch)  # [N, F]; MLP_d([s_i || g_b(i)])
        if v is not None:
            v = v + self.lin_v(v + u.index_select(0, batch))  # [N, 3, F]
        return s, v


class Message(nn.Module):
    """Step 2, local message passing (paper eqs. 1-2), for each edge j -> i:

        [a_ij, b_ij, c_ij] = phi(s_j) * W(rbf(r_ij)) / sqrt(3)   three F-blocks
        ds_i = sum_j c_ij                                        [N, F]
        dv_i = sum_j (a_ij * v_j + b_ij (x) e_ij) / sqrt(F)      [N, 3, F]

    phi: Linear(F->F/2), sigma, Linear(F/2->3F); W: Linear(num_rbf->3F), with a bias only if
    ``filter_bias`` (a bias b keeps phi(s_j) * b on an edge at r_c, where rbf = 0, so the energy
    jumps as a neighbour crosses the cutoff; without it every edge term vanishes there). The 1/sqrt(3) and
    1/sqrt(F) are folded into phi(s), per atom instead of per edge; ``ops.message`` does the
    gather, filter and sum. ``v=None`` stands for v = 0 (the a_ij * v_j term is skipped).
    """

    def __init__(self, F: int, num_rbf: int, filter_bias: bool = True) -> None:
        super().__init__()
        self.phi = _mlp(F, F // 2, 3 * F)
        self.rbf_proj = nn.Linear(num_rbf, 3 * F, bias=filter_bias)  # W
        self.inv_sqrt_3 = 1.0 / math.sqrt(3.0)
        self.inv_sqrt_F = 1.0 / math.sqrt(F)

    def forward(self, s, v, edges: ops.Edges):
        F = s.shape[-1]
        scale = s.new_full((3 * F,), self.inv_sqrt_3 * self.inv_sqrt_F)
        scale[2 * F :] = self.inv_sqrt_3  # a, b carry 1/sqrt(3F); c only 1/sqrt(3)
        phi = self.phi(s) * scale  # [N, 3F]
        return ops.message(phi, v, edges, self.rbf_proj.weight, self.rbf_proj.bias)  # [N, F], [N, 3, F]


class Update(nn.Module):
    """Step 3, local message updating: NMU (paper eqs. 3-4) or PaiNN's (the Vanilla ablation).

        [U_i, V_i] = W_u v_i                     W_u: Linear(F->2F), no bias
        h_i = MLP_u([s_i || |V_i|])              MLP_u: Linear(2F->F), sigma, Linear(F->3F)
    NMU, [p_i, q_i, t_i] = h_i:
        s_i <- s_i + q_i / sqrt(2) + s_i * tanh(t_i)
        v_i <- v_i + p_i * U_i
    PaiNN, [a_vv, a_sv, a_ss] = h_i:
        s_i <- s_i + (a_ss + a_sv * <U_i, V_i> / sqrt(F)) / sqrt(2)
        v_i <- v_i + a_vv * U_i

    |V_i| = sqrt(sum_xyz V^2 + eps): finite gradient at V = 0. Both variants have the same parameters.
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
        V_norm = torch.sqrt(V.pow(2).sum(dim=1) + self.norm_eps)  # [N, F]
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


class GlobalAggregate(nn.Module):
    """Step 4, global message aggregating (paper eqs. 7-8), per graph b:

        g_b <- g_b + MLP_a([mean_{i in b} s_i || g_b])    MLP_a like MLP_d
        u_b <- u_b + W_a (mean_{i in b} v_i + u_b)        W_a: Linear(F->F), no bias

    Means (not sums) keep the model extensive: a supercell has the same means.
    """

    def __init__(self, F: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * F, F, F, act_out=True)
        self.lin_v = nn.Linear(F, F, bias=False)

    def forward(self, s, v, g, u, graphs: ops.Reducer):
        s_mean = graphs.mean(s)  # [N, F] -> [B, F]
        v_mean = graphs.mean(v)  # [N, 3, F] -> [B, 3, F]
        g = g + self.mlp(torch.cat([s_mean, g], dim=-1))
        u = u + self.lin_v(v_mean + u)
        return g, u


class InteractionLayer(nn.Module):
    """Steps 1-4 of one layer; between steps 2 and 3:

        s_i <- (s_i + ds_i) / sqrt(2);   v_i <- v_i + dv_i

    ``aggregate=False`` for the last layer: nothing reads the globals after it, and unused
    parameters would break DDP. ``v=None`` stands for v = 0 (the first layer).
    """

    def __init__(self, F: int, num_rbf: int, update: str, global_messages: bool, norm_eps: float,
                 aggregate: bool = True, filter_bias: bool = True) -> None:
        super().__init__()
        self.distribute = GlobalDistribute(F) if global_messages else None
        self.message = Message(F, num_rbf, filter_bias)
        self.update = Update(F, update, norm_eps)
        self.aggregate = GlobalAggregate(F) if (global_messages and aggregate) else None
        self.inv_sqrt_2 = 1.0 / math.sqrt(2.0)

    def forward(self, s, v, g, u, batch, edges: ops.Edges, graphs: ops.Reducer):
        if self.distribute is not None:
            s, v = self.distribute(s, v, g, u, batch)
        ds, dv = self.message(s, v, edges)
        s = (s + ds) * self.inv_sqrt_2
        v = dv if v is None else v + dv
        s, v = self.update(s, v)
        if self.aggregate is not None:
            g, u = self.aggregate(s, v, g, u, graphs)
        return s, v, g, u


@registry.register_model("leignn")
class LEIGNN(nn.Module, GraphModelMixin):
    """LEIGNN energy + force model for fairchem's OCPTrainer.

    Initial state: s_i = Embedding(Z_i), v_i = 0, g_b = one trainable row, u_b = 0; then L
    ``InteractionLayer``s and the readout (paper eq. 9):

        E = sum_i MLP_E(s_i)     MLP_E: Linear(F->F/2), sigma, Linear(F/2->1)     [B]
        F_i = W_F v_i            W_F: Linear(F->1), no bias                       [N, 3]

    Switches (all YAML-visible): ``update`` = "nmu" | "painn" and ``global_messages``
    give LEIGNN (nmu, true), Vanilla+NMU (nmu, false) and Vanilla (painn, false);
    ``direct_forces`` picks the vector-feature force head (paper) or -dE/dx (conservative).
    ``zero_init_energy`` starts MLP_E's last layer at zero, so every structure's initial
    energy is the normaliser's mean (why: ``docs/notes/model.md``).
    ``filter_bias``: the radial filter W has a bias (as PaiNN's; every measured number so far);
    False makes energy and forces continuous as a neighbour crosses r_c (``Message``).
    ``chunked_messages``: on CPU with direct forces (no gradient on positions) the message step
    runs as ``ops.message``'s fused, chunked kernel; False (or GPU): plain tensor ops, same numbers.
    ``chunked_min_edges``: below this many edges the plain ops are used even then (on small
    graphs the kernel's per-chunk Python costs more than it saves; the default 512 is measured).
    ``global_scope``: the global scalar and vector g, u belong to each structure (paper), or to
    each "fragment", a connected component of the cutoff graph: then two molecules out of each
    other's cutoff in one box do not see each other (energies and forces are those of each alone);
    the price is a jump where two fragments come within r_c and merge.
    ``pbc_graph``: who searches the periodic on-the-fly graph: "fairchem" (radius_graph_pbc, every
    pair of a structure in every image: quadratic), "cells" (``leignn_ocp.graph``: the same edges
    from a tree search over the image atoms near the cell, linear), or "auto": "cells" on CPU once
    a batch has ``CELL_SEARCH_MIN_ATOMS`` atoms in all (``python -m leignn_ocp.graph`` times both).
    ``min_distance`` (Å) and ``max_images``: input checks (``leignn_ocp.checks``): atoms closer
    than min_distance (0: unchecked) and cells that need more periodic images are refused.
    """

    def __init__(
        self, hidden_channels: int = 512, num_layers: int = 4, num_rbf: int = 128, cutoff: float = 6.0,
        max_neighbors: int = 20, rbf: dict | None = None, envelope: dict | None = None,
        update: str = "nmu", global_messages: bool = True, direct_forces: bool = True,
        regress_forces: bool = True, use_pbc: bool = True, use_pbc_single: bool = False,
        otf_graph: bool = True, enforce_max_neighbors_strictly: bool = True, num_elements: int = 118,
        norm_eps: float = 1e-8, zero_init_energy: bool = True, chunked_messages: bool = True,
        chunked_min_edges: int = 512,
        filter_bias: bool = True, min_distance: float = MIN_DISTANCE, max_images: int = MAX_IMAGES,
        global_scope: str = "structure", pbc_graph: str = "auto",
    ) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"LEIGNN: update must be one of {UPDATES}, got {update!r}")
        if pbc_graph not in PBC_GRAPHS:
            raise ValueError(f"LEIGNN: pbc_graph must be one of {PBC_GRAPHS}, got {pbc_graph!r}")
        if global_scope not in GLOBAL_SCOPES:
            raise ValueError(f"LEIGNN: global_scope must be one of {GLOBAL_SCOPES}, got {global_scope!r}")
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
        self.chunked_messages = chunked_messages
        self.chunked_min_edges = int(chunked_min_edges)
        self.filter_bias = filter_bias
        self.min_distance = min_distance
        self.max_images = max_images
        self.global_scope = global_scope
        self.pbc_graph = pbc_graph

        F = hidden_channels
        self.atom_emb = AtomEmbedding(F, num_elements)
        self.radial_basis = RadialBasis(  # rbf(r): Gaussians on r / r_c times a smooth envelope
            num_radial=num_rbf, cutoff=cutoff, rbf=rbf or {"name": "gaussian"},
            envelope=envelope or {"name": "polynomial", "exponent": 5})
        # g_b: one trainable row, copied for every graph; u starts at zero
        self.global_emb = nn.Parameter(torch.randn(1, F)) if global_messages else None
        self.layers = nn.ModuleList(
            InteractionLayer(F, num_rbf, update, global_messages, norm_eps,
                             aggregate=k < num_layers - 1, filter_bias=filter_bias)
            for k in range(num_layers)
        )
        self.out_energy = _mlp(F, F // 2, 1)  # MLP_E
        self.out_forces = nn.Linear(F, 1, bias=False) if (regress_forces and direct_forces) else None  # W_F
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.zero_init_energy:
            nn.init.zeros_(self.out_energy[-1].weight)  # initial energy = 0 (the normaliser's mean)

    def _graph(self, data, axes: list[bool] | None):
        """Edges j -> i within the cutoff, at most ``max_neighbors`` nearest per receiver i.

        The periodic path is fairchem's ``radius_graph_pbc`` (nearest K). PyG's
        ``radius_graph`` behind the non-periodic path keeps an arbitrary K, which would
        make the energy depend on atom order, so there we take every neighbour and keep
        the K nearest with fairchem's own mask. ``axes``: the periodic axes (check_input's).
        """
        if axes and self.otf_graph and self._cell_search(data):
            from fairchem.core.common.utils import get_pbc_distances

            from leignn_ocp.graph import radius_graph_pbc_cells

            edge_index, offsets, neighbors = radius_graph_pbc_cells(
                data.pos, data.cell, data.natoms, data.batch, self.cutoff, self.max_neighbors,
                self.enforce_max_neighbors_strictly, axes)
            out = get_pbc_distances(data.pos, edge_index, data.cell, offsets, neighbors, return_distance_vec=True)
            src, dst = out["edge_index"]
            return src, dst, out["distances"], out["distance_vec"]
        if self.use_pbc or not self.otf_graph:
            graph = self.generate_graph(data)
            src, dst = graph.edge_index
            return src, dst, graph.edge_distance, graph.edge_distance_vec
        return self._molecule_graph(data)

    def _cell_search(self, data) -> bool:
        """Whether the periodic graph comes from ``leignn_ocp.graph`` (the same edges as fairchem's
        radius_graph_pbc, in linear instead of quadratic time) rather than fairchem's search."""
        if self.pbc_graph == "auto":  # CPU, and a batch large enough for N^2 to cost
            return data.pos.device.type == "cpu" and data.pos.shape[0] >= CELL_SEARCH_MIN_ATOMS
        return self.pbc_graph == "cells"

    @torch.compiler.disable  # eager under torch.compile: PyG's radius search has no fake-tensor kernel
    def _molecule_graph(self, data):
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

    @property
    def _pairs_in_graph(self) -> bool:
        """The molecule path's graph (PyG's radius_graph, every neighbour, then the nearest K) holds
        every close pair; the periodic one (fairchem's radius_graph_pbc) drops pairs under 0.01 Å."""
        return not self.use_pbc and self.otf_graph

    def _wrapped(self, data, axes: list[bool] | None):
        """``data`` with positions inside the cell along the periodic ``axes`` (check_input's) for the
        on-the-fly graph (a shallow copy: the caller's batch is left as it was); edges read from an
        LMDB keep their offsets."""
        if not (axes and self.otf_graph):
            return data
        out = copy.copy(data)
        out.pos = wrap_positions(data.pos, data.cell.view(-1, 3, 3).to(data.pos.dtype), data.batch, axes)
        return out

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        axes = check_input(data, model="LEIGNN", use_pbc=self.use_pbc, cutoff=self.cutoff,  # periodic axes or None
                           num_elements=self.num_elements, min_distance=self.min_distance,
                           max_images=self.max_images, pairs_in_graph=self._pairs_in_graph)
        pos = data.pos
        if self.regress_forces and not self.direct_forces:
            pos.requires_grad_(True)
        data = self._wrapped(data, axes)
        batch = data.batch
        B = data.natoms.numel()
        z = data.atomic_numbers.long()

        src, dst, dist, vec = self._graph(data, axes)  # j (sender), i (receiver), [E], [E, 3]
        if self._pairs_in_graph:  # every pair within r_c is in it, nearest first: no search needed
            check_edge_lengths(dist, src, dst, batch, model="LEIGNN", min_distance=self.min_distance)
        # fairchem's distance vector is p_j - p_i (+ image offset); e_ij points from j to i
        e = -vec / dist.unsqueeze(-1)  # [E, 3]
        chunked = (self.chunked_messages and pos.device.type == "cpu" and not pos.requires_grad
                   and src.numel() >= self.chunked_min_edges)  # E is a shape: no host sync
        edges = ops.edges(src, dst, e, self.radial_basis(dist), dist, chunked)  # rbf: [E, num_rbf]
        graphs = ops.Reducer(batch, B, data.natoms)  # atoms -> graphs
        owner, groups = batch, graphs  # who owns the globals: structures, or (fragment) components
        if self.global_emb is not None and self.global_scope == "fragment":
            owner, C = ops.connected_components(src, dst, z.numel())  # [N] in 0..C-1
            groups = ops.Reducer(owner, C)
        G = groups.size  # B, or C fragments

        s = self.atom_emb(z)  # [N, F]
        v = None  # v = 0 [N, 3, F]: None lets the first layer skip the products with it
        if self.global_emb is not None:
            g = self.global_emb.to(s.dtype).expand(G, -1)  # [G, F]
            u = s.new_zeros(G, 3, s.shape[-1])  # [G, 3, F]
        else:
            g = u = None
        for layer in self.layers:
            s, v, g, u = layer(s, v, g, u, owner, edges, groups)

        # Readout heads in the features' own precision even under autocast (mixed precision):
        # the energy is a sum of many per-atom terms and the forces are the targets.
        with torch.autocast(device_type=pos.device.type, enabled=False):
            s, v = ops.full_precision(s), ops.full_precision(v)
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
            f"direct_forces={self.direct_forces}, global_scope={self.global_scope!r})"
        )
