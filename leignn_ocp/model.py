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
from torch_scatter import scatter

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


class GlobalDistribute(nn.Module):
    """Step 1 (paper eqs. 5-6): every atom reads its graph's global scalar and vector."""

    def __init__(self, F: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * F, F, F, act_out=True)
        self.lin_v = nn.Linear(F, F, bias=False)

    def forward(self, s, v, g, u, batch):
        s = s + self.mlp(torch.cat([s, g[batch]], dim=-1))  # [N, 2F] -> [N, F]
        v = v + self.lin_v(v + u[batch])  # [N, 3, F]
        return s, v


class GlobalAggregate(nn.Module):
    """Step 4 (paper eqs. 7-8): per-graph means feed the global entities.

    Means (not sums) keep the model extensive: a supercell has the same means.
    """

    def __init__(self, F: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * F, F, F, act_out=True)
        self.lin_v = nn.Linear(F, F, bias=False)

    def forward(self, s, v, g, u, batch):
        B = g.shape[0]
        s_mean = scatter(s, batch, dim=0, dim_size=B, reduce="mean")  # [B, F]
        v_mean = scatter(v, batch, dim=0, dim_size=B, reduce="mean")  # [B, 3, F]
        g = g + self.mlp(torch.cat([s_mean, g], dim=-1))
        u = u + self.lin_v(v_mean + u)
        return g, u


class Message(nn.Module):
    """Step 2 (paper eqs. 1-2): continuous-filter messages j -> i.

    One gather of the sender features and one scatter of the stacked
    scalar+vector message per layer.
    """

    def __init__(self, F: int, num_rbf: int) -> None:
        super().__init__()
        self.F = F
        self.phi = _mlp(F, F // 2, 3 * F)
        self.rbf_proj = nn.Linear(num_rbf, 3 * F)
        self.inv_sqrt_3 = 1.0 / math.sqrt(3.0)
        self.inv_sqrt_F = 1.0 / math.sqrt(F)

    def forward(self, s, v, rbf, e, src, dst):
        N, F = s.shape
        # sender features side by side so one gather serves both: [N, 3F + 3F]
        node = torch.cat([self.phi(s), v.reshape(N, 3 * F)], dim=-1)
        node_j = node.index_select(0, src)  # [E, 6F]
        x = node_j[:, : 3 * F] * self.rbf_proj(rbf) * self.inv_sqrt_3  # [E, 3F]
        v_j = node_j[:, 3 * F :].view(-1, 3, F)  # [E, 3, F]
        a, b, c = x.split(F, dim=-1)  # [E, F] each
        dv = (a.unsqueeze(1) * v_j + b.unsqueeze(1) * e.unsqueeze(2)) * self.inv_sqrt_F
        msg = torch.cat([c.unsqueeze(1), dv], dim=1)  # [E, 4, F]: row 0 scalar, rows 1-3 vector
        agg = scatter(msg, dst, dim=0, dim_size=N, reduce="sum")  # [N, 4, F]
        return agg[:, 0], agg[:, 1:]


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
    def __init__(self, F: int, num_rbf: int, update: str, global_messages: bool, norm_eps: float):
        super().__init__()
        self.distribute = GlobalDistribute(F) if global_messages else None
        self.message = Message(F, num_rbf)
        self.update = Update(F, update, norm_eps)
        self.aggregate = GlobalAggregate(F) if global_messages else None
        self.inv_sqrt_2 = 1.0 / math.sqrt(2.0)

    def forward(self, s, v, g, u, batch, rbf, e, src, dst):
        if self.distribute is not None:
            s, v = self.distribute(s, v, g, u, batch)
        ds, dv = self.message(s, v, rbf, e, src, dst)
        s = (s + ds) * self.inv_sqrt_2
        v = v + dv
        s, v = self.update(s, v)
        if self.aggregate is not None:
            g, u = self.aggregate(s, v, g, u, batch)
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
            InteractionLayer(F, num_rbf, update, global_messages, norm_eps) for _ in range(num_layers)
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
        # fairchem's distance vector is p_j - p_i (+ image offset); e_ij points from j to i
        e = -vec / dist.unsqueeze(-1)  # [E, 3]
        rbf = self.radial_basis(dist)  # [E, num_rbf], envelope applied

        s = self.atom_emb(z)  # [N, F]
        F = s.shape[-1]
        v = s.new_zeros(s.shape[0], 3, F)  # [N, 3, F]
        if self.global_emb is not None:
            g = self.global_emb.to(s.dtype).expand(B, F)  # [B, F]
            u = s.new_zeros(B, 3, F)  # [B, 3, F]
        else:
            g = u = None

        for layer in self.layers:
            s, v, g, u = layer(s, v, g, u, batch, rbf, e, src, dst)

        energy = scatter(self.out_energy(s).squeeze(-1), batch, dim=0, dim_size=B, reduce="sum")  # [B]
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
