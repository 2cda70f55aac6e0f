"""Every config under configs/s2ef loads with fairchem's loader and builds its model; the LEIGNN
variants have the parameter counts the spec's equations imply for their switches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fairchem.core.common.registry import registry
from fairchem.core.common.utils import load_config, setup_imports

import leignn_ocp  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "s2ef").rglob("*.yml"))
SIZES = ["50k", "200k", "2M", "all", "default"]
MODELS = ["leignn", "vanilla", "vanilla_nmu", "schnet", "dimenet_plus_plus", "painn", "painn_direct", "gemnet_dt"]
_BUILT: dict[str, torch.nn.Module] = {}


def _load(path: Path) -> dict:
    config, dup_warning, dup_error = load_config(str(path))
    assert not dup_error, f"{path}: conflicting keys between includes: {dup_error}"
    return config


def _build(model_cfg: dict) -> torch.nn.Module:
    """Build (once per distinct model block) on CPU, as fairchem's trainer does."""
    key = json.dumps(model_cfg, sort_keys=True)
    if key not in _BUILT:
        setup_imports()
        kwargs = dict(model_cfg)
        cls = registry.get_model_class(kwargs.pop("name"))
        torch.manual_seed(0)
        _BUILT[key] = cls(**kwargs)
    return _BUILT[key]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_size_has_the_full_lineup():
    for size in SIZES:
        for name in ["base", *MODELS]:
            assert (REPO / "configs/s2ef" / size / f"{name}.yml").is_file(), f"missing {size}/{name}.yml"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs" / "s2ef")) for p in CONFIGS])
def test_config_loads_and_builds(path):
    config = _load(path)
    assert config["trainer"] == "ocp"
    ds = config["dataset"]
    assert {"train", "val"} <= set(ds), f"{path}: dataset needs train and val"
    # fairchem opens val and test in one process: the same LMDB folder twice fails
    assert "test" not in ds or ds["test"]["src"] != ds["val"]["src"], f"{path}: test and val are one folder"
    assert ds["train"]["format"] == "lmdb" and "normalizer" in ds["train"]["transforms"]
    assert set(config["outputs"]) == {"energy", "forces"}
    assert config["outputs"]["forces"]["train_on_free_atoms"] and config["outputs"]["forces"]["eval_on_free_atoms"]
    assert config["evaluation_metrics"]["primary_metric"] == "forces_mae"
    if path.name == "base.yml":
        return
    assert {"model", "loss_functions", "optim"} <= set(config)
    assert {next(iter(d)) for d in config["loss_functions"]} == {"energy", "forces"}
    assert config["optim"]["max_epochs"] > 0
    model = _build(config["model"])
    assert _n_params(model) > 0


@pytest.mark.parametrize("size", SIZES)
def test_ablations_differ_from_leignn_only_in_the_two_switches(size):
    d = REPO / "configs/s2ef" / size
    ref = _load(d / "leignn.yml")
    assert ref["model"]["update"] == "nmu" and ref["model"]["global_messages"] is True
    for name, switches in {"vanilla": ("painn", False), "vanilla_nmu": ("nmu", False)}.items():
        cfg = _load(d / f"{name}.yml")
        assert (cfg["model"]["update"], cfg["model"]["global_messages"]) == switches
        for key in ("update", "global_messages"):
            cfg["model"][key] = ref["model"][key]
        assert cfg == ref, f"{size}/{name}.yml differs from leignn.yml beyond update/global_messages"


def test_painn_direct_differs_from_painn_only_in_force_head():
    for size in SIZES:
        d = REPO / "configs/s2ef" / size
        a, b = _load(d / "painn.yml"), _load(d / "painn_direct.yml")
        assert a["model"]["direct_forces"] is False and b["model"]["direct_forces"] is True
        b["model"]["direct_forces"] = False
        assert a == b


def test_main_config_is_the_papers_recipe():
    c = _load(REPO / "configs/s2ef/200k/leignn.yml")
    m, o = c["model"], c["optim"]
    assert m["name"] == "leignn_ocp.LEIGNN"
    assert (m["hidden_channels"], m["num_layers"], m["num_rbf"], m["cutoff"], m["max_neighbors"]) == (512, 4, 128, 6.0, 20)
    assert m["use_pbc"] and m["direct_forces"] and m["envelope"] == {"name": "polynomial", "exponent": 5}
    assert c["loss_functions"] == [{"energy": {"fn": "mae", "coefficient": 1}}, {"forces": {"fn": "mae", "coefficient": 50}}]
    assert (o["optimizer"], o["optimizer_params"], o["lr_initial"], o["weight_decay"]) == ("AdamW", {"amsgrad": True}, 2e-4, 0.0)
    assert (o["ema_decay"], o["clip_grad_norm"], o["batch_size"]) == (0.999, 50, 32)
    assert (o["scheduler"], o["mode"], o["factor"], o["patience"], o["min_lr"]) == ("ReduceLROnPlateau", "min", 0.8, 5, 1e-6)
    assert c["dataset"]["train"]["src"] == "data/s2ef/200k_split/train"
    assert c["dataset"]["val"]["src"] == "data/s2ef/200k_split/val"
    assert "test" not in c["dataset"]  # the four OC20 val splits are scored by scripts/evaluate.py
    c50 = _load(REPO / "configs/s2ef/50k/leignn.yml")
    assert c50["dataset"]["train"]["src"] == "data/s2ef/50k/train" and c50["dataset"]["val"]["src"] == "data/s2ef/50k/val"


def expected_leignn_params(F: int, L: int, R: int, update: str, global_messages: bool, n_elem: int = 118) -> int:
    """Trainable parameters of LEIGNN, counted from the equations of shared/design/LEIGNN.md."""
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    embed = n_elem * F
    message = lin(F, F // 2) + lin(F // 2, 3 * F) + lin(R, 3 * F)  # phi and W(rbf)
    # NMU and PaiNN's update read the same W_u and MLP_u ([s || |V|] -> 3F); only the use differs
    upd = lin(F, 2 * F, bias=False) + lin(2 * F, F) + lin(F, 3 * F)
    block = lin(2 * F, F) + lin(F, F) + lin(F, F, bias=False)  # MLP_d / MLP_a and W_d / W_a
    # every layer distributes; all but the last aggregate (nothing reads the last aggregate)
    glob = (L * block + (L - 1) * block + F) if global_messages else 0  # + the global embedding row
    readout = lin(F, F // 2) + lin(F // 2, 1) + lin(F, 1, bias=False)
    return embed + L * (message + upd) + glob + readout


@pytest.mark.parametrize("size", ["default", "200k"])
def test_leignn_variants_parameter_counts(size):
    d = REPO / "configs/s2ef" / size
    counts = {}
    for name in ("leignn", "vanilla", "vanilla_nmu"):
        m = _load(d / f"{name}.yml")["model"]
        got = _n_params(_build(m))
        want = expected_leignn_params(m["hidden_channels"], m["num_layers"], m["num_rbf"], m["update"], m["global_messages"])
        assert got == want, f"{size}/{name}: {got} parameters, the spec implies {want}"
        counts[name] = got
    F, L = _load(d / "leignn.yml")["model"]["hidden_channels"], _load(d / "leignn.yml")["model"]["num_layers"]
    assert counts["vanilla"] == counts["vanilla_nmu"]  # the update switch adds no parameters
    assert counts["leignn"] - counts["vanilla_nmu"] == (2 * L - 1) * (4 * F * F + 2 * F) + F  # the global steps


def test_expected_formula_by_hand():
    # F=2, L=1, R=1, no globals: embedding 118*2, phi (2*1+1)+(1*6+6), W(rbf) 1*6+6, W_u 2*4,
    # MLP_u (4*2+2)+(2*6+6), readout (2*1+1)+(1*1+1)+2*1
    assert expected_leignn_params(2, 1, 1, "painn", False) == 236 + 15 + 12 + 8 + 28 + 7
    # globals: one distribute block (4*2+2)+(2*2+2)+2*2 = 20 (a single layer is the last, so
    # no aggregate) and the global embedding row (2); two layers add a second layer and
    # two more blocks (its distribute and the first layer's aggregate)
    assert expected_leignn_params(2, 1, 1, "nmu", True) == 306 + 20 + 2
    assert expected_leignn_params(2, 2, 1, "nmu", True) == 306 + (15 + 12 + 8 + 28) + 3 * 20 + 2
