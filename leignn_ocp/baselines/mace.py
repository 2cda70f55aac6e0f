"""MACE (Batatia et al., NeurIPS 2022) as a fairchem 1.10 S2EF model, around mace-torch's own model.

Nothing of MACE is re-implemented here: the network is ``mace.modules.ScaleShiftMACE`` built from
mace-torch's blocks as its ``run_train`` builds ``--model MACE`` (first layer
``RealAgnosticInteractionBlock``, later ones ``RealAgnosticResidualInteractionBlock``, Bessel radial
basis times the polynomial cutoff, a gated non-linear last readout), and its forces are its own
``F = -dE/dx`` by autograd. This class only does what fairchem's trainer needs around it:

- graph: fairchem's ``GraphModelMixin.generate_graph`` (periodic images, ``cutoff``, at most
  ``max_neighbors`` nearest per receiving atom, ``otf_graph``), translated into MACE's input dict;
- elements: ``node_attrs`` is a one-hot over Z = 1..``num_elements`` (100: H..Fm, every element of
  OC20 and then some) or over an explicit ``atomic_numbers`` list, as MACE's ``AtomicNumberTable``
  of those Z gives;
- energies: OC20 S2EF energies are referenced (adsorption) energies and fairchem's normaliser
  removes their mean and scale, so MACE's isolated-atom energies E0 are all 0 and its
  scale / shift default to 1 / 0 (``atomic_inter_scale`` / ``atomic_inter_shift`` set them as
  MACE's own training would, for a run without fairchem's normaliser).

Edge convention. fairchem's edge k runs from source j = ``edge_index[0, k]`` to target
i = ``edge_index[1, k]`` (messages flow j -> i; ``max_neighbors`` caps the edges of each target i),
with integer ``cell_offsets`` o_k applied to the source: fairchem's ``distance_vec`` is
``x_j + o_k @ cell - x_i``. MACE's edge (sender s, receiver r) has the vector
``x_r - x_s + shifts`` (``get_edge_vectors_and_lengths``), i.e. from the sender's image to the
receiver, and messages flow s -> r. So sender = j, receiver = i, and
``shifts = -o_k @ cell`` (``unit_shifts = -o_k``): MACE's vectors are minus fairchem's
``distance_vec``, edge by edge, and each atom aggregates from its ``max_neighbors`` nearest.
(The other shift sign gives periodic edges wrong lengths; reversing the edges as well gives the
same edge set on an uncapped, symmetric graph, but would cap senders instead of receivers.)
tests/test_mace.py checks this against ``AtomicData.from_config`` (MACE's own matscipy neighbour
list) on periodic structures: the same (sender, receiver, unit shift, vector) for every edge, and
the same energy, forces and equivariant node features.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import numpy as np
import torch
from e3nn import o3
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import conditional_grad, get_max_neighbors_mask
from fairchem.core.models.base import GraphModelMixin
from mace import modules as mace_modules
from torch import nn

from leignn_ocp.checks import check_input

# Names a MACE user may reach for -> this class's (a clear error instead of a silent default).
_RENAMED = {
    "r_max": "cutoff",
    "num_radial_basis": "num_bessel",
    "num_cutoff_basis": "num_polynomial_cutoff",
    "interaction_cls": "interaction (a block name, e.g. 'RealAgnosticResidualInteractionBlock')",
    "interaction_cls_first": "interaction_first (a block name, e.g. 'RealAgnosticInteractionBlock')",
    "atomic_energies": "nothing: E0 is 0 (fairchem's normaliser handles the reference)",
    "E0s": "nothing: E0 is 0 (fairchem's normaliser handles the reference)",
    "num_channels": "hidden_irreps (e.g. '128x0e + 128x1o')",
    "max_L": "hidden_irreps (e.g. '128x0e + 128x1o')",
}
MAX_Z = 118


def _int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"MACE: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _irreps(name: str, value) -> o3.Irreps:
    try:
        return o3.Irreps(value)
    except (ValueError, AssertionError, TypeError) as err:
        raise ValueError(f"MACE: {name} {value!r} is not an e3nn irreps string such as "
                         f"'128x0e + 128x1o' ({err})") from None


@registry.register_model("mace")
class MACE(nn.Module, GraphModelMixin):
    """MACE energy model with -dE/dx forces for fairchem's OCPTrainer (conventions: module docstring).

    hidden_irreps: node features, e.g. "128x0e + 128x1o" (one multiplicity for every l, 0e included).
    num_interactions: message-passing layers (MACE's default 2).
    max_ell: highest l of the edge spherical harmonics.
    correlation: body order - 1 of the product basis, one int or one per layer.
    MLP_irreps: hidden irreps of the last (non-linear) readout, scalars only, e.g. "16x0e".
    num_bessel, num_polynomial_cutoff: Bessel radial functions and the cutoff polynomial's p.
    radial_MLP: hidden widths of the radial MLP that maps the Bessel features to the tensor-product weights.
    avg_num_neighbors: MACE divides every aggregated message by it (MACE's run_train measures it
        on the training set; see configs/s2ef/models/mace.yml for the value used).
    interaction, interaction_first: block names from ``mace.modules.interaction_classes``.
    gate: the last readout's non-linearity, a key of ``mace.modules.gate_dict`` ("silu").
    num_elements: the element table, Z = 1..num_elements (one-hot node attributes; default 100).
    atomic_numbers: instead, an explicit element table (MACE's z_table), e.g. a dataset's elements.
    atomic_inter_scale, atomic_inter_shift: MACE's per-atom scale and shift of the interaction
        energy (1 and 0: fairchem's normaliser does this job).
    cutoff, max_neighbors, use_pbc, use_pbc_single, otf_graph, enforce_max_neighbors_strictly:
        the graph, as fairchem's ``generate_graph`` reads them (``cutoff`` is MACE's r_max).
    regress_forces: forces by autograd; direct_forces must stay False (MACE has no force head).
    """

    def __init__(
        self, hidden_irreps: str = "128x0e + 128x1o", num_interactions: int = 2, max_ell: int = 3,
        correlation: int | list[int] = 3, MLP_irreps: str = "16x0e", num_bessel: int = 8,
        num_polynomial_cutoff: int = 5, radial_MLP: list[int] | None = None, avg_num_neighbors: float = 1.0,
        interaction: str = "RealAgnosticResidualInteractionBlock",
        interaction_first: str = "RealAgnosticInteractionBlock", gate: str = "silu",
        num_elements: int | None = None, atomic_numbers: list[int] | None = None,
        atomic_inter_scale: float = 1.0, atomic_inter_shift: float = 0.0,
        cutoff: float = 6.0, max_neighbors: int = 50, regress_forces: bool = True, direct_forces: bool = False,
        use_pbc: bool = True, use_pbc_single: bool = False, otf_graph: bool = True,
        enforce_max_neighbors_strictly: bool = True, **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(_unknown_message(unknown))
        num_interactions = _int_at_least("num_interactions", num_interactions, 1)
        max_ell = _int_at_least("max_ell", max_ell, 0)
        num_bessel = _int_at_least("num_bessel", num_bessel, 1)
        num_polynomial_cutoff = _int_at_least("num_polynomial_cutoff", num_polynomial_cutoff, 1)
        max_neighbors = _int_at_least("max_neighbors", max_neighbors, 1)
        zs = _element_table(num_elements, atomic_numbers)
        num_elements = len(zs)
        correlations = [correlation] * num_interactions if not isinstance(correlation, (list, tuple)) \
            else list(correlation)
        if len(correlations) != num_interactions:
            raise ValueError(f"MACE: correlation {correlation!r} must be one integer or one per "
                             f"interaction ({num_interactions})")
        for c in correlations:
            _int_at_least("correlation", c, 1)
        hidden = _irreps("hidden_irreps", hidden_irreps)
        mlp = _irreps("MLP_irreps", MLP_irreps)
        if hidden.count(o3.Irrep(0, 1)) == 0:
            raise ValueError(f"MACE: hidden_irreps {hidden_irreps!r} has no scalars (0e); the energy "
                             "readout needs them")
        if len({mul for mul, _ in hidden}) != 1:
            raise ValueError(f"MACE: hidden_irreps {hidden_irreps!r} must use one multiplicity for every "
                             "irrep, e.g. '128x0e + 128x1o' (as MACE's run_train requires)")
        if max(ir.l for _, ir in hidden) > max_ell:
            raise ValueError(f"MACE: hidden_irreps {hidden_irreps!r} has l > max_ell = {max_ell}")
        if mlp.dim == 0 or any(ir.l != 0 for _, ir in mlp):
            raise ValueError(f"MACE: MLP_irreps {MLP_irreps!r} must be scalars only, e.g. '16x0e'")
        radial_MLP = [64, 64, 64] if radial_MLP is None else list(radial_MLP)
        for w in radial_MLP:
            _int_at_least("radial_MLP width", w, 1)
        for name, block in (("interaction", interaction), ("interaction_first", interaction_first)):
            if block not in mace_modules.interaction_classes:
                raise ValueError(f"MACE: {name} {block!r} is not a mace-torch interaction block; known: "
                                 f"{', '.join(mace_modules.interaction_classes)}")
        if gate not in mace_modules.gate_dict:
            raise ValueError(f"MACE: gate {gate!r} is not one of {', '.join(mace_modules.gate_dict)}")
        if not avg_num_neighbors > 0:
            raise ValueError(f"MACE: avg_num_neighbors must be > 0, got {avg_num_neighbors!r}")
        if not cutoff > 0:
            raise ValueError(f"MACE: cutoff must be > 0, got {cutoff!r}")
        if direct_forces:
            raise ValueError("MACE: direct_forces=True is not supported; MACE has no force head and "
                             "predicts F = -dE/dx (set direct_forces: False)")

        self.cutoff = float(cutoff)
        self.max_neighbors = max_neighbors
        self.num_elements = num_elements
        self.atomic_numbers = zs
        # Z -> row of the one-hot (-1: not in the table), as MACE's atomic_numbers_to_indices
        index = torch.full((MAX_Z + 1,), -1, dtype=torch.long)
        index[torch.tensor(zs)] = torch.arange(num_elements)
        self.register_buffer("z_index", index, persistent=False)
        self.regress_forces = regress_forces
        self.direct_forces = False  # read by fairchem's conditional_grad
        self.use_pbc = use_pbc
        self.use_pbc_single = use_pbc_single
        self.otf_graph = otf_graph
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self._settings = dict(hidden_irreps=str(hidden), num_interactions=num_interactions, max_ell=max_ell,
                              correlation=correlations, MLP_irreps=str(mlp), num_bessel=num_bessel)

        # MACE's run_train --model MACE: ScaleShiftMACE, first layer non-residual
        self.mace = mace_modules.ScaleShiftMACE(
            r_max=self.cutoff,
            num_bessel=num_bessel,
            num_polynomial_cutoff=num_polynomial_cutoff,
            max_ell=max_ell,
            interaction_cls=mace_modules.interaction_classes[interaction],
            interaction_cls_first=mace_modules.interaction_classes[interaction_first],
            num_interactions=num_interactions,
            num_elements=num_elements,
            hidden_irreps=hidden,
            MLP_irreps=mlp,
            atomic_energies=np.zeros(num_elements),
            avg_num_neighbors=float(avg_num_neighbors),
            atomic_numbers=zs,
            correlation=correlations,
            gate=mace_modules.gate_dict[gate],
            radial_MLP=radial_MLP,
            atomic_inter_scale=float(atomic_inter_scale),
            atomic_inter_shift=float(atomic_inter_shift),
        )

    # ------------------------------------------------------------------ fairchem batch -> MACE dict

    def _graph(self, data):
        """Edges (sender j, receiver i) and integer image offsets o of j, [2, E] and [E, 3].

        Periodic: fairchem's ``radius_graph_pbc`` (the K nearest per receiver). Non-periodic:
        PyG's ``radius_graph`` behind ``generate_graph`` keeps an arbitrary K, which would make
        the energy depend on atom order, so every neighbour is taken and fairchem's mask keeps the
        K nearest.
        """
        if self.use_pbc:
            # fairchem's radius_graph_pbc runs in float32 only; the graph (indices and integer
            # offsets) is all that is kept, so it is built from a float32 view of the structure
            with _default_float32():  # its neighbour cap allocates in the default dtype
                graph = self.generate_graph(_float32_geometry(data))
            edge_index, offsets = graph.edge_index, graph.cell_offsets
            if offsets.shape[0] != edge_index.shape[1]:
                # get_pbc_distances filters zero-length edges out of edge_index but returns the
                # unfiltered cell_offsets; radius_graph_pbc never makes such edges (it drops pairs
                # closer than 0.01 A), so this only guards the pairing of the two
                raise RuntimeError(f"MACE: fairchem's graph has {edge_index.shape[1]} edges but "
                                   f"{offsets.shape[0]} cell offsets")
            return edge_index, offsets
        graph = self.generate_graph(data, max_neighbors=max(int(data.natoms.max()), 1))
        order = torch.argsort(graph.edge_index[1], stable=True)  # the mask wants receivers sorted
        edge_index = graph.edge_index[:, order]
        dist = graph.edge_distance[order]
        keep, _ = get_max_neighbors_mask(
            natoms=data.natoms, index=edge_index[1],
            atom_distance=(dist.detach() ** 2).to(torch.get_default_dtype()),
            max_num_neighbors_threshold=self.max_neighbors,
            enforce_max_strictly=self.enforce_max_neighbors_strictly,
        )
        edge_index = edge_index[:, keep]
        return edge_index, torch.zeros(edge_index.shape[1], 3, dtype=torch.long, device=edge_index.device)

    def mace_input(self, data) -> dict[str, torch.Tensor]:
        """The dict ``mace.modules.MACE.forward`` reads, for a fairchem batch (see module docstring)."""
        pos = data.pos  # [N, 3]
        n_graphs = data.natoms.numel()
        edge_index, offsets = self._graph(data)  # [2, E], [E, 3]
        cell = getattr(data, "cell", None)
        cell = pos.new_zeros(n_graphs, 3, 3) if cell is None or not self.use_pbc else cell.view(-1, 3, 3).to(pos.dtype)
        unit_shifts = -offsets.to(pos.dtype)  # [E, 3], MACE's sign (module docstring)
        # the image shift of each edge in the positions' precision (fairchem's own are float32)
        edge_cell = cell[data.batch[edge_index[1]]]  # [E, 3, 3]
        shifts = torch.einsum("ek,ekd->ed", unit_shifts, edge_cell)  # [E, 3]
        ptr = torch.cat([data.natoms.new_zeros(1), torch.cumsum(data.natoms, 0)])  # [B + 1]
        node_attrs = nn.functional.one_hot(self.z_index[data.atomic_numbers.long()], self.num_elements)  # [N, Z]
        return {
            "positions": pos,
            "node_attrs": node_attrs.to(pos.dtype),
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": unit_shifts,
            "cell": cell.reshape(-1, 3),  # [3B, 3], as MACE's own batches stack them
            "batch": data.batch,
            "ptr": ptr,
        }

    def _check_input(self, data) -> None:
        check_input(data, model="MACE", use_pbc=self.use_pbc, cutoff=self.cutoff)
        z = data.atomic_numbers
        outside = (z.long().to(z.dtype) != z) | (z < 1) | (z > MAX_Z)
        bad = z[outside | (self.z_index[z.long().clamp(0, MAX_Z)] < 0)]
        if bad.numel():
            raise ValueError(f"MACE: atomic numbers {sorted(set(bad.tolist()))} are not in the element table "
                             f"({_describe_table(self.atomic_numbers)}; num_elements / atomic_numbers)")

    @conditional_grad(torch.enable_grad())
    def forward(self, data) -> dict[str, torch.Tensor]:
        self._check_input(data)
        # MACE differentiates its own energy (create_graph while training, for the force loss)
        out = self.mace(self.mace_input(data), training=self.training, compute_force=self.regress_forces)
        result = {"energy": out["energy"]}  # [B]
        if self.regress_forces:
            result["forces"] = out["forces"]  # [N, 3]
        return result

    @torch.jit.ignore
    def no_weight_decay(self) -> list[str]:
        """MACE's own weight-decay groups (mace/tools/scripts_utils.get_params_options): decay only
        the interactions' linear / skip_tp_full weights and the product basis; the node embedding,
        the other interaction parameters (radial MLPs, skip tensor products) and the readouts
        are exempt."""
        decayed = {f"mace.interactions.{n}" for n, _ in self.mace.interactions.named_parameters()
                   if "linear.weight" in n or "skip_tp_full.weight" in n}
        decayed |= {f"mace.products.{n}" for n, _ in self.mace.products.named_parameters()}
        return sorted(n for n, _ in self.named_parameters() if n not in decayed)

    def __deepcopy__(self, memo):
        """A deep copy that shares e3nn's TorchScript functions (e3nn 0.5+'s SphericalHarmonics
        holds one, and TorchScript functions cannot be copied); they hold no state."""
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, torch.jit.ScriptFunction):
                    memo[id(value)] = value
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __repr__(self) -> str:
        s = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        return f"MACE({s}, num_elements={self.num_elements}, cutoff={self.cutoff}, max_neighbors={self.max_neighbors})"


def _element_table(num_elements, atomic_numbers) -> list[int]:
    """The sorted Z of the one-hot: 1..num_elements (default 100), or the ``atomic_numbers`` given
    (MACE's z_table; its run_train takes the elements of the training set)."""
    if atomic_numbers is None:
        n = 100 if num_elements is None else _int_at_least("num_elements", num_elements, 1)
        if n > MAX_Z:
            raise ValueError(f"MACE: num_elements must be <= {MAX_Z}, got {n}")
        return list(range(1, n + 1))
    zs = [_int_at_least("atomic_numbers entry", z, 1) for z in atomic_numbers]
    if not zs or max(zs) > MAX_Z or len(set(zs)) != len(zs):
        raise ValueError(f"MACE: atomic_numbers must be distinct atomic numbers in 1..{MAX_Z}, got {atomic_numbers!r}")
    if num_elements is not None and num_elements != len(zs):
        raise ValueError(f"MACE: num_elements {num_elements!r} disagrees with the {len(zs)} atomic_numbers given "
                         "(give one of the two)")
    return sorted(zs)


def _describe_table(zs: list[int]) -> str:
    return f"Z = 1..{len(zs)}" if zs == list(range(1, len(zs) + 1)) else f"Z in {zs}"


@contextlib.contextmanager
def _default_float32():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _float32_geometry(data):
    """A shallow copy of a fairchem batch whose positions and cell are detached float32 copies."""
    view = copy.copy(data)
    view.pos = data.pos.detach().float()
    view.cell = data.cell.detach().float()
    return view


def _unknown_message(unknown: dict) -> str:
    known = [p for p in inspect.signature(MACE.__init__).parameters if p not in ("self", "unknown")]
    hints = [f"{k} (use {_RENAMED[k]})" if k in _RENAMED else k for k in sorted(unknown)]
    return f"MACE: unknown argument(s) {', '.join(hints)}; known: {', '.join(known)}"
