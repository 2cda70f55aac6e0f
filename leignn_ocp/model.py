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
from torch_scatter import segment_csr

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


class Reducer:
    """Sums rows into groups: per-edge messages into their receivers, atoms into their graph.

    On CPU with the group index sorted (fairchem's graphs come sorted by receiver; the
    model sorts them otherwise) this is a CSR segment sum (``torch_scatter.segment_csr``):
    deterministic and an order of magnitude faster there than a scatter-add, whose
    backward is a plain gather. On GPU, and under ``torch.compile`` (which fuses it into
    the surrounding elementwise code), it is ``index_add``. Both give the same sums up
    to floating-point round-off.
    """

    def __init__(self, index: torch.Tensor, size: int, sorted_index: bool) -> None:
        self.index = index
        self.size = size
        self.ptr = None
        if sorted_index and index.device.type == "cpu" and not _compiling():
            counts = torch.bincount(index, minlength=size)
            self.counts = counts
            self.ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def sum(self, x: torch.Tensor) -> torch.Tensor:  # [M, ...] -> [size, ...]
        if self.ptr is not None:
            return segment_csr(x, self.ptr, reduce="sum")
        return x.new_zeros((self.size, *x.shape[1:])).index_add_(0, self.index, x)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        counts = self.counts if self.ptr is not None else torch.bincount(self.index, minlength=self.size)
        return self.sum(x) / counts.clamp(min=1).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _is_sorted(index: torch.Tensor) -> bool:
    """Only asked on CPU (on GPU the answer would cost a device sync)."""
    return index.numel() < 2 or bool((index[1:] >= index[:-1]).all())


def _split_linear(x: torch.Tensor, lin: nn.Linear, F: int, y: torch.Tensor, index: torch.Tensor):
    """``lin(cat([x, y[index]], -1))`` with the second half computed once per row of ``y``.

    ``y`` is per graph and ``index`` maps atoms to graphs, so the half of the matmul that
    reads ``y`` runs on B rows instead of N. Same numbers up to round-off.
    """
    w = lin.weight  # [out, 2F]
    return nn.functional.linear(x, w[:, :F]) + nn.functional.linear(y, w[:, F:], lin.bias).index_select(0, index)


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

    Per edge: one gather of phi(s_j) (and of v_j after the first layer), the rbf filter,
    two fused multiply-adds and a segment sum into the receivers. The 1/sqrt(3) and
    1/sqrt(F) factors are folded into phi(s) per atom instead of applied per edge.
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
        x = phi.index_select(0, src) * self.rbf_proj(rbf)  # [E, 3F]
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
    """

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
        cpu = pos.device.type == "cpu" and not _compiling()
        if cpu and not _is_sorted(dst):  # receivers in order, for the segment sums
            order = torch.argsort(dst, stable=True)
            src, dst, dist, vec = src[order], dst[order], dist[order], vec[order]
        receivers = Reducer(dst, N, sorted_index=cpu)  # edges -> atoms
        graphs = Reducer(batch, B, sorted_index=cpu and _is_sorted(batch))  # atoms -> graphs
        # fairchem's distance vector is p_j - p_i (+ image offset); e_ij points from j to i
        e = -vec / dist.unsqueeze(-1)  # [E, 3]
        rbf = self.radial_basis(dist)  # [E, num_rbf], envelope applied

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

        energy = graphs.sum(self.out_energy(s).squeeze(-1))  # [B]
        out = {"energy": energy}
        if self.regress_forces:
            if self.direct_forces:
                out["forces"] = self.out_forces(v).squeeze(-1)  # [N, 3, 1] -> [N, 3]
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
