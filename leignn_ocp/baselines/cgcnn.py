"""CGCNN (Xie & Grossman, Phys. Rev. Lett. 120, 145301, 2018) as a fairchem 1.10 S2EF model.

fairchem 1.10 no longer ships CGCNN; this is written from the paper's equations. Per structure:

    v_i^0 = Linear(k_i)        k_i: the paper's 92-dim k-hot element features (fairchem's
                               KHOT_EMBEDDINGS table, Z = 1..100), mapped to F channels
    u_ij  = Gaussians(d_ij)    G Gaussians on [0, r_c] (PyG's GaussianSmearing)
    z_ij  = v_i (+) v_j (+) u_ij                                  [E, 2F + G]
    a_ij  = BN_e(z_ij W + b),   W = [W_f | W_s], b = [b_f | b_s]  [E, 2F]
    v_i'  = v_i + BN_v( sum_j sigmoid(a_ij^f) * softplus(a_ij^s) )  (paper eq. 5)   [N, F]
    E     = sum_i MLP(v_i^L)   softplus MLP: F -> fc -> ... -> fc -> 1              [B]
    F_i   = -dE/dx_i           autograd (conservative forces)                        [N, 3]

Batch norm sits where the authors' published CGCNN puts it: on the gate / core pre-activations
of every edge and on the summed message of every atom (in eval mode both are fixed affine maps,
so a prediction does not depend on what else is in the batch). Eq. 5 has no activation after
the residual sum, and none is applied here.

Differences from the paper, each for OC20's S2EF task:
- readout: an atom-wise MLP then a SUM over atoms (extensive total energy) instead of the
  paper's mean pool followed by the MLP (an intensive per-atom property);
- graph: fairchem's ``generate_graph`` (periodic images, at most ``max_neighbors`` nearest within
  ``cutoff``; 6 A / 50 as fairchem's OC20 CGCNN) instead of the paper's 12 nearest within 8 A;
- ``smooth_cutoff`` (off by default, paper-faithful): multiply every edge's message by fairchem's
  polynomial envelope of d_ij / r_c, so energy and forces stay continuous as a neighbour crosses
  r_c (in eval mode; the hard cutoff of the paper makes them jump).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as fn
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad, get_max_neighbors_mask
from fairchem.core.datasets.embeddings import KHOT_EMBEDDINGS
from fairchem.core.models.base import GraphModelMixin
from fairchem.core.models.gemnet.layers.radial_basis import PolynomialEnvelope
from torch import nn
from torch_geometric.nn.models.schnet import GaussianSmearing

from leignn_ocp.checks import check_input

# Old fairchem/OCP CGCNN argument names -> this class's (a clear error instead of a silent default).
_RENAMED = {
    "atom_embedding_size": "hidden_channels",
    "num_graph_conv_layers": "num_layers",
    "fc_feat_size": "fc_channels",
}
MAX_Z = max(KHOT_EMBEDDINGS)  # 100: the k-hot table covers H..Fm


def khot_table() -> torch.Tensor:
    """The paper's element features as a [MAX_Z + 1, 92] table (row 0, no element, all zero)."""
    width = len(KHOT_EMBEDDINGS[1])
    table = torch.zeros(MAX_Z + 1, width)
    for z, row in KHOT_EMBEDDINGS.items():
        table[z] = torch.tensor(row, dtype=table.dtype)
    return table


class CGConv(nn.Module):
    """One CGCNN convolution (paper eq. 5) with its two batch norms.

    ``lin`` is the paper's single map of z_ij = v_i (+) v_j (+) u_ij: its weight [2F, 2F + G]
    stacks W_f over W_s (gate rows first) and its columns follow the concatenation. Forward
    applies the column blocks to v_i, v_j and u_ij apart (z W = v_i W_i + v_j W_j + u_ij W_u), so
    the atom terms cost one product per atom instead of one per edge; the numbers are the same.
    """

    def __init__(self, hidden_channels: int, num_gaussians: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.lin = nn.Linear(2 * hidden_channels + num_gaussians, 2 * hidden_channels)
        self.bn_edge = nn.BatchNorm1d(2 * hidden_channels)
        self.bn_node = nn.BatchNorm1d(hidden_channels)

    def forward(self, v, u, src, dst, envelope=None):
        """v [N, F], u [E, G], edges src = j -> dst = i, envelope [E] or None -> v' [N, F]."""
        F = self.hidden_channels
        W = self.lin.weight  # [2F, 2F + G]
        a = (
            fn.linear(v, W[:, :F], self.lin.bias)[dst]  # v_i W_i + b  [E, 2F]
            + fn.linear(v, W[:, F:2 * F])[src]  # v_j W_j     [E, 2F]
            + fn.linear(u, W[:, 2 * F:])  # u_ij W_u    [E, 2F]
        )
        gate, core = self.bn_edge(a).chunk(2, dim=-1)  # [E, F] each
        m = torch.sigmoid(gate) * fn.softplus(core)  # [E, F]
        if envelope is not None:
            m = m * envelope.unsqueeze(-1)
        agg = torch.zeros_like(v).index_add_(0, dst, m)  # sum over j of edges j -> i  [N, F]
        return v + self.bn_node(agg)


@registry.register_model("cgcnn")
class CGCNN(nn.Module, GraphModelMixin):
    """CGCNN energy model with -dE/dx forces for fairchem's OCPTrainer (equations: module docstring).

    hidden_channels: F, the atom feature size (fairchem's old ``atom_embedding_size``).
    num_layers: convolutions (old ``num_graph_conv_layers``).
    fc_channels, num_fc_layers: the readout MLP, F -> fc, then num_fc_layers - 1 more fc -> fc
        layers (each followed by softplus), then fc -> 1 (old ``fc_feat_size`` / ``num_fc_layers``).
    num_gaussians: G, Gaussians on [0, cutoff] for u_ij.
    cutoff, max_neighbors, use_pbc, use_pbc_single, otf_graph, enforce_max_neighbors_strictly:
        the graph, as fairchem's ``generate_graph`` reads them.
    smooth_cutoff, envelope_exponent: messages times the polynomial envelope of d / r_c (off:
        the paper's hard cutoff).
    regress_forces: forces by autograd; direct_forces must stay False (CGCNN has no force head).
    """

    def __init__(
        self, hidden_channels: int = 128, num_layers: int = 2, fc_channels: int = 128,
        num_fc_layers: int = 3, num_gaussians: int = 100, cutoff: float = 6.0, max_neighbors: int = 50,
        smooth_cutoff: bool = False, envelope_exponent: int = 5, regress_forces: bool = True,
        direct_forces: bool = False, use_pbc: bool = True, use_pbc_single: bool = False,
        otf_graph: bool = True, enforce_max_neighbors_strictly: bool = True, **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(_unknown_message(unknown))
        for name, value, low in (("hidden_channels", hidden_channels, 1), ("num_layers", num_layers, 1),
                                 ("fc_channels", fc_channels, 1), ("num_fc_layers", num_fc_layers, 1),
                                 ("num_gaussians", num_gaussians, 2), ("max_neighbors", max_neighbors, 1),
                                 ("envelope_exponent", envelope_exponent, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CGCNN: {name} must be an integer >= {low}, got {value!r}")
        if not cutoff > 0:
            raise ValueError(f"CGCNN: cutoff must be > 0, got {cutoff!r}")
        if direct_forces:
            raise ValueError("CGCNN: direct_forces=True is not supported; CGCNN has no force head and "
                             "predicts F = -dE/dx (set direct_forces: False)")
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.fc_channels = fc_channels
        self.num_fc_layers = num_fc_layers
        self.num_gaussians = num_gaussians
        self.cutoff = float(cutoff)
        self.max_neighbors = max_neighbors
        self.smooth_cutoff = smooth_cutoff
        self.regress_forces = regress_forces
        self.direct_forces = False  # read by fairchem's conditional_grad
        self.use_pbc = use_pbc
        self.use_pbc_single = use_pbc_single
        self.otf_graph = otf_graph
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly

        self.register_buffer("khot", khot_table(), persistent=False)  # [101, 92], fixed features
        self.atom_embedding = nn.Linear(self.khot.shape[1], hidden_channels)
        self.distance_expansion = GaussianSmearing(0.0, self.cutoff, num_gaussians)
        self.envelope = PolynomialEnvelope(envelope_exponent) if smooth_cutoff else None
        self.convs = nn.ModuleList(CGConv(hidden_channels, num_gaussians) for _ in range(num_layers))
        widths = [hidden_channels] + [fc_channels] * num_fc_layers
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.Softplus()]
        self.energy_mlp = nn.Sequential(*layers, nn.Linear(fc_channels, 1))

    def _graph(self, data):
        """Edges j -> i within the cutoff, at most ``max_neighbors`` nearest per receiver i.

        Periodic: fairchem's ``radius_graph_pbc`` (K nearest). Non-periodic: PyG's
        ``radius_graph`` behind ``generate_graph`` keeps an arbitrary K, which would make the
        energy depend on atom order, so every neighbour is taken and fairchem's mask keeps the
        K nearest.
        """
        if self.use_pbc or not self.otf_graph:
            graph = self.generate_graph(data)
            return graph.edge_index[0], graph.edge_index[1], graph.edge_distance
        graph = self.generate_graph(data, max_neighbors=max(int(data.natoms.max()), 1))
        order = torch.argsort(graph.edge_index[1], stable=True)  # the mask wants receivers sorted
        src, dst = graph.edge_index[:, order]
        dist = graph.edge_distance[order]
        keep, _ = get_max_neighbors_mask(
            natoms=data.natoms, index=dst,
            atom_distance=(dist.detach() ** 2).to(torch.get_default_dtype()),
            max_num_neighbors_threshold=self.max_neighbors,
            enforce_max_strictly=self.enforce_max_neighbors_strictly,
        )
        return src[keep], dst[keep], dist[keep]

    def _check_input(self, data) -> None:
        check_input(data, model="CGCNN", use_pbc=self.use_pbc, cutoff=self.cutoff, num_elements=MAX_Z,
                    elements="the k-hot element table")

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        self._check_input(data)
        pos = data.pos
        if self.regress_forces:
            pos.requires_grad_(True)
        src, dst, dist = self._graph(data)  # j (sender), i (receiver), [E]
        u = self.distance_expansion(dist).to(pos.dtype)  # [E, G]
        env = self.envelope(dist / self.cutoff) if self.envelope is not None else None  # [E]

        v = self.atom_embedding(self.khot[data.atomic_numbers.long()].to(pos.dtype))  # [N, F]
        for conv in self.convs:
            v = conv(v, u, src, dst, env)
        # the readout in the positions' precision even under autocast: a sum of many atom terms
        with torch.autocast(device_type=pos.device.type, enabled=False):
            e_atom = self.energy_mlp(v.to(pos.dtype)).squeeze(-1)  # [N]
            energy = e_atom.new_zeros(data.natoms.numel()).index_add_(0, data.batch, e_atom)  # [B]
        out = {"energy": energy}
        if self.regress_forces:
            out["forces"] = -torch.autograd.grad(
                energy, pos, grad_outputs=torch.ones_like(energy), create_graph=self.training
            )[0]  # [N, 3]
        return out

    @torch.jit.ignore
    def no_weight_decay(self) -> list[str]:
        """fairchem's rule (biases, the atom embedding) plus the batch-norm scales: decaying a
        norm's scale towards 0 shrinks the activations it has just normalised."""
        norms = [f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.BatchNorm1d)]
        return sorted(set(super().no_weight_decay()) | set(norms))

    def __repr__(self) -> str:
        return (f"CGCNN(hidden_channels={self.hidden_channels}, num_layers={self.num_layers}, "
                f"fc_channels={self.fc_channels}, num_fc_layers={self.num_fc_layers}, "
                f"num_gaussians={self.num_gaussians}, cutoff={self.cutoff}, "
                f"max_neighbors={self.max_neighbors}, smooth_cutoff={self.smooth_cutoff})")


def _unknown_message(unknown: dict) -> str:
    known = [p for p in inspect.signature(CGCNN.__init__).parameters if p not in ("self", "unknown")]
    hints = [f"{k} (use {_RENAMED[k]})" if k in _RENAMED else k for k in sorted(unknown)]
    return f"CGCNN: unknown argument(s) {', '.join(hints)}; known: {', '.join(known)}"
