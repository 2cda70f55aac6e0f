"""Every model of the line-up (leignn_ocp.lineup.ENTRIES), built tiny from its default config
through fairchem's registry, runs through the shared model-test kit; and the kit's checks do
fail on models that break what they check."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from leignn_ocp import lineup
from leignn_ocp.testing import (
    ModelCase,
    ModelTests,
    check_batching,
    check_extensive,
    check_cutoff_smoothness,
    check_numeric_gradient,
    check_symmetry,
    cu_bulk,
    ethanol,
)

REPO = Path(__file__).resolve().parents[1]

# Known failures, each with the reason (a strict xfail: fixing one makes its test fail until
# the entry here goes); measured numbers in docs/notes/testing.md.
_DIRECTED = ("fairchem's symmetrize_edges assumes an undirected graph; the max_neighbors cap of the "
             "config (20, tiny 12) makes a slab's graph directed, so which copy of an edge survives "
             "depends on atom order and image layout (passes with max_neighbors=200)")
_FILTER_BIAS = ("the radial filter Linear(rbf) has a bias, so an edge at r_c still carries "
                "x_j * b: energy jumps at r_c once the bias is non-zero")
_HARD_CUTOFF = ("the CGCNN paper's hard cutoff (smooth_cutoff: False in the config): an edge at r_c still "
                "carries sigmoid(.) * softplus(.) > 0, so the energy jumps as a neighbour leaves (0.019 eV "
                "fresh, 0.22 eV perturbed); smooth_cutoff=True passes (tests/test_cgcnn.py)")
KNOWN_FAILURES: dict[str, dict[str, str]] = {
    "cgcnn": {"smoothness": _HARD_CUTOFF, "smoothness_trained": _HARD_CUTOFF},
    "painn": {"permutation": _DIRECTED, "extensive": _DIRECTED, "smoothness_trained": _FILTER_BIAS,
              "gradient": "on the periodic path (boxed molecule) its autograd forces differ from -dE/dx "
                          "by O(1) while finite differences at h = 1e-2 and 3e-3 agree; cause not traced"},
    "dimenet_plus_plus": {"gradient": "fairchem 1.10 detaches the positions of its triplet angles "
                                      "(dimenet_plus_plus.py, pos[idx].detach()), so its forces miss "
                                      "the angular term of -dE/dx"},
    "painn_direct": {"permutation": _DIRECTED, "extensive": _DIRECTED, "smoothness_trained": _FILTER_BIAS},
    "gemnet_dt": {"permutation": _DIRECTED, "extensive": _DIRECTED},
    **{e.key: {"smoothness_trained": _FILTER_BIAS} for e in lineup.ENTRIES if e.is_leignn},
}


def _random_readouts(model: torch.nn.Module) -> None:
    """Glorot weights for any Linear initialised to zero (DimeNet++'s output layers): a zero
    readout makes every energy 0 and every energy check pass for nothing."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.detach().any():
            torch.nn.init.xavier_uniform_(m.weight)


# Per-model settings of the kit, each with its reason.
SETTINGS: dict[str, dict] = {
    # fairchem 1.10's PaiNN: use_pbc=False with gradient forces raises (generate_graph_values
    # writes into the edge distances autograd needs), and its periodic graph is float32-only.
    # Molecules run boxed on the periodic path, in float32; finite differences with a 1e-2 A
    # step (round-off eps |E| / h ~ 2e-4 eV/A, truncation ~ h^2 |F''| ~ 1e-4) and 20x that as tolerance.
    "painn": {"molecule_pbc": True, "dtype": torch.float32,
              "gradient": {"h": 1e-2, "rtol": 1e-2, "atol": 5e-3}},
}


def lineup_case(entry: lineup.Entry) -> ModelCase:
    cfg = lineup.load_config(lineup.config_path(entry.key, "default", REPO / "configs/s2ef"))["model"]
    # a zero energy readout would make every energy check pass trivially
    fixed = {"zero_init_energy": False} if entry.is_leignn else {}
    built: dict = {}

    def build(use_pbc: bool, dtype: torch.dtype, **overrides) -> torch.nn.Module:
        # built once per override set (DimeNet++ spends ~7 s on its sympy basis); fairchem's
        # models read use_pbc in forward only, so one build serves both paths
        key = tuple(sorted(overrides.items()))
        if key not in built:
            built[key] = lineup.build_model(cfg, {**entry.tiny, **fixed, **overrides}, seed=0)
            _random_readouts(built[key])
        model = copy.deepcopy(built[key])
        model.use_pbc = use_pbc
        return model.to(dtype).eval()

    return ModelCase(name=entry.key, build=build, conservative=entry.conservative,
                     known_failures=KNOWN_FAILURES.get(entry.key, {}), **SETTINGS.get(entry.key, {}))


CASES = [lineup_case(e) for e in lineup.ENTRIES]


class TestLineup(ModelTests):
    @pytest.fixture(params=CASES, ids=str, scope="class")
    def case(self, request):
        return request.param


def test_every_entry_is_under_test():
    assert [c.name for c in CASES] == list(lineup.KEYS)


# --------------------------------------------------------------------------- the kit can fail


class PairModel(torch.nn.Module):
    """E = sum over pairs within r_c of w * (1 - r/r_c)^p (p = 0: a hard cutoff), forces by
    autograd; ``bias`` adds a term that depends on absolute positions; ``leak`` couples graphs."""

    def __init__(self, cutoff=3.0, p=3, bias=None, leak=False, chirality=False):
        super().__init__()
        self.cutoff, self.p, self.bias, self.leak, self.chirality = cutoff, p, bias, leak, chirality

    def forward(self, data):
        pos = data.pos.requires_grad_(True)
        with torch.enable_grad():
            i, j = torch.triu_indices(pos.shape[0], pos.shape[0], 1)
            same = data.batch[i] == data.batch[j]
            i, j = i[same], j[same]
            r = (pos[i] - pos[j]).norm(dim=-1)
            w = data.atomic_numbers[i].to(pos.dtype) * data.atomic_numbers[j].to(pos.dtype) / 64.0
            term = torch.where(r < self.cutoff, w * (1 - r / self.cutoff).clamp(min=0) ** self.p, 0 * r)
            e_atom = pos.new_zeros(pos.shape[0]).index_add(0, i, term)
            if self.bias is not None:
                e_atom = e_atom + pos @ pos.new_tensor(self.bias)
            if self.chirality:  # a pseudoscalar: changes sign under reflection
                d = pos[1:4] - pos[0]
                e_atom = e_atom + 0.1 * torch.linalg.det(d)
            energy = pos.new_zeros(int(data.natoms.numel())).index_add(0, data.batch, e_atom)
            if self.leak:
                energy = energy + 0.01 * energy.sum()
            forces = -torch.autograd.grad(energy.sum(), pos)[0]
        return {"energy": energy.detach(), "forces": forces}


class _Halved(torch.nn.Module):
    """Forces at half of -dE/dx: not the gradient of the energy."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, data):
        out = self.model(data)
        return {"energy": out["energy"], "forces": 0.5 * out["forces"]}


def test_kit_passes_a_smooth_pair_model():
    model = PairModel()
    for kind in ("rotation", "reflection", "translation", "permutation"):
        check_symmetry(model, ethanol(), kind)
    check_batching(model, [ethanol(), ethanol(rattle=0.1)])
    check_numeric_gradient(model, ethanol(rattle=0.05, seed=3))
    check_cutoff_smoothness(model, ethanol())


@pytest.mark.parametrize("model,check,match", [
    (PairModel(bias=[0.1, 0.0, 0.0]), lambda m: check_symmetry(m, ethanol(), "translation"), "translation"),
    (PairModel(bias=[0.1, 0.0, 0.0]), lambda m: check_symmetry(m, ethanol(), "rotation"), "rotation"),
    (PairModel(chirality=True), lambda m: check_symmetry(m, ethanol(), "reflection"), "reflection"),
    (PairModel(chirality=True), lambda m: check_symmetry(m, ethanol(), "permutation"), "permutation"),
    (PairModel(leak=True), lambda m: check_batching(m, [ethanol(), ethanol(rattle=0.1)]), "batching"),
    (PairModel(p=0), lambda m: check_cutoff_smoothness(m, ethanol()), "cutoff smoothness"),
    # blind to the cell: a 2x1x1 supercell is a bigger cluster with other surfaces, not two copies
    (PairModel(), lambda m: check_extensive(m, cu_bulk(), torch.float64), "extensivity"),
    (PairModel(), lambda m: check_numeric_gradient(_Halved(m), ethanol(rattle=0.05, seed=3)), "gradient"),
], ids=["translation", "rotation", "reflection", "permutation", "batching", "smoothness", "extensivity",
        "gradient"])
def test_kit_names_the_broken_property(model, check, match):
    with pytest.raises(AssertionError, match=match):
        check(model)
