"""The compared models: the one registry that configs, tables, benchmarks and tests read.

Adding a baseline means one :class:`Entry` here plus its ``configs/s2ef/models/<key>.yml``
recipe (and a leaf per data size); every table, benchmark and model test picks it up.
Published numbers are the paper's (Yang et al., npj Comput. Mater. 2024; see
``shared/design/LEIGNN.md``), OC20-200K, energy MAE meV / force MAE meV/Å.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# (submission key, LMDB folder suffix, column title): OC20's four S2EF evaluation splits
SPLITS: tuple[tuple[str, str, str], ...] = (
    ("id", "id", "ID"),
    ("ood_ads", "ood_ads", "OOD-Ads"),
    ("ood_cat", "ood_cat", "OOD-Cat"),
    ("ood_both", "ood_both", "OOD-Both"),
)
SPLIT_TITLES: tuple[str, ...] = tuple(t for _, _, t in SPLITS)


@dataclass(frozen=True)
class Entry:
    """One row of the line-up.

    key: the config stem (``configs/s2ef/<size>/<key>.yml``) and the name used on command lines.
    label: the row title in tables and plots.
    conservative: forces are -dE/dx (autograd at inference) in its recipe.
    switches: LEIGNN constructor switches that define an ablation (empty for baselines).
    tiny: constructor overrides that shrink the model for tests and smoke benchmarks.
    published: paper Table 1 on OC20-200K, {split title: (energy meV, force meV/Å)}.
    published_50k_id: paper Table 2 on OC20-50K ID (energy, force), where reported.
    aliases: older spellings of ``key`` still accepted on command lines.
    benchmarked: in the efficiency benchmark's default list.
    """

    key: str
    label: str
    conservative: bool
    switches: dict = field(default_factory=dict)
    tiny: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    published_50k_id: tuple[float, float] | None = None
    aliases: tuple[str, ...] = ()
    benchmarked: bool = True  # False: costs exactly what another entry costs (an initialisation switch)

    @property
    def is_leignn(self) -> bool:
        return bool(self.switches)


def _row(*values: float) -> dict:
    """(E, F) x 4 splits in SPLITS order -> {title: (E, F)}."""
    return {t: (values[2 * i], values[2 * i + 1]) for i, t in enumerate(SPLIT_TITLES)}


_LEIGNN_TINY = {"hidden_channels": 16, "num_layers": 2, "num_rbf": 8}

# In the paper's Table 1 order; the LEIGNN ablations (Table 2) last.
ENTRIES: tuple[Entry, ...] = (
    Entry("schnet", "SchNet", conservative=True,
          tiny={"hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 8},
          published=_row(975, 59.6, 1077, 66.8, 975, 59.5, 1204, 77.9)),
    Entry("cgcnn", "CGCNN", conservative=True,
          tiny={"hidden_channels": 16, "num_layers": 2, "num_gaussians": 8},
          published=_row(1111, 75.0, 1261, 80.7, 1097, 74.1, 1383, 91.9)),
    Entry("painn", "PaiNN", conservative=True,
          tiny={"hidden_channels": 16, "num_layers": 2, "num_rbf": 8, "max_neighbors": 12},
          published=_row(482, 52.7, 570, 58.8, 499, 52.4, 704, 74.0)),
    Entry("painn_direct", "PaiNN (direct forces)", conservative=False,
          tiny={"hidden_channels": 16, "num_layers": 2, "num_rbf": 8, "max_neighbors": 12},
          published=_row(457, 46.6, 571, 53.5, 497, 46.9, 689, 63.4)),
    Entry("dimenet_plus_plus", "DimeNet++", conservative=True,
          tiny={"hidden_channels": 16, "out_emb_channels": 16, "int_emb_size": 8, "basis_emb_size": 4,
                "num_blocks": 1, "num_radial": 4, "num_spherical": 3},
          published=_row(497, 48.7, 547, 55.9, 522, 48.6, 671, 65.3), aliases=("dimenetpp",)),
    Entry("gemnet_dt", "GemNet-dT", conservative=False,
          tiny={"num_blocks": 1, "emb_size_atom": 16, "emb_size_edge": 16, "emb_size_trip": 8,
                "emb_size_rbf": 4, "emb_size_cbf": 4, "emb_size_bil_trip": 8, "num_radial": 8,
                "num_spherical": 3, "max_neighbors": 12},
          published=_row(443, 41.3, 516, 46.7, 548, 41.6, 717, 55.3)),
    Entry("mace", "MACE", conservative=True,
          tiny={"hidden_irreps": "8x0e + 8x1o", "num_interactions": 2, "num_bessel": 4, "max_ell": 2,
                "correlation": 2, "MLP_irreps": "4x0e",
                # mace-torch divides messages by it; the recipe's 46.6 makes a molecule's tiny energy
                # fall below the kit's non-triviality floor
                "avg_num_neighbors": 1.0},
          published=_row(565, 51.3, 657, 59.8, 589, 51.3, 802, 68.6)),
    Entry("vanilla", "Vanilla", conservative=False,
          switches={"update": "painn", "global_messages": False}, tiny=_LEIGNN_TINY,
          published={"ID": (434, 44.7)}, published_50k_id=(568, 53.1)),
    Entry("vanilla_nmu", "Vanilla + NMU", conservative=False,
          switches={"update": "nmu", "global_messages": False}, tiny=_LEIGNN_TINY,
          published={"ID": (427, 44.7)}, published_50k_id=(552, 52.4)),
    Entry("leignn", "LEIGNN", conservative=False,
          switches={"update": "nmu", "global_messages": True}, tiny=_LEIGNN_TINY,
          published=_row(415, 43.9, 502, 49.6, 452, 43.9, 613, 58.1), published_50k_id=(531, 51.2)),
    # not in the paper: LEIGNN with its energy readout zeroed at the start, which no baseline has
    Entry("leignn_zero_init", "LEIGNN (zero-init energy)", conservative=False,
          switches={"update": "nmu", "global_messages": True, "zero_init_energy": True}, tiny=_LEIGNN_TINY,
          benchmarked=False),
)

MODELS: dict[str, Entry] = {e.key: e for e in ENTRIES}
KEYS: tuple[str, ...] = tuple(MODELS)
# The three LEIGNN variants of the paper's Table 2: key -> constructor switches.
VARIANTS: dict[str, dict] = {e.key: dict(e.switches) for e in ENTRIES if e.is_leignn and e.published}
# OC20 folders that hold every entry's leaf config; "default" is the embedded data.
SIZES: tuple[str, ...] = ("default", "50k", "200k", "2M", "all")


def get(name: str) -> Entry:
    """The entry for a key, alias or label; a clear error listing the known keys otherwise."""
    for e in ENTRIES:
        if name in (e.key, e.label, *e.aliases):
            return e
    raise KeyError(f"unknown model {name!r}; the line-up has {', '.join(KEYS)}")


def label(name: str) -> str:
    """Row title for a key; unknown names (user checkpoints) are kept as given."""
    try:
        return get(name).label
    except KeyError:
        return name


# --------------------------------------------------------------------------- configs -> models


def config_path(key: str, size: str = "default", config_root: str | Path = "configs/s2ef") -> Path:
    """``<config_root>/<size>/<key>.yml``; ``config_root`` is relative to the working directory
    (the repository root, as for ``fairchem --config-yml``) unless absolute."""
    path = Path(config_root) / size / f"{get(key).key}.yml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config {path} (run from the repository root or pass the configs folder explicitly)"
        )
    return path


def load_config(path: str | Path) -> dict:
    """A config with its ``includes:`` merged, by fairchem's own loader; conflicts are errors."""
    from fairchem.core.common.utils import load_config as fc_load_config

    config, _dup_warning, dup_error = fc_load_config(str(path))
    if dup_error:
        raise ValueError(f"{path}: keys set by more than one included file: {dup_error}")
    return config


def build_model(model_cfg: dict, overrides: dict | None = None, seed: int | None = None):
    """The model a config's ``model:`` block describes, through fairchem's registry, fresh weights.

    ``scale_file`` is dropped: fitted ScaleFactors are loaded with a checkpoint's state dict.
    """
    import torch
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    import leignn_ocp  # noqa: F401  (registers the model)

    setup_imports()
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("name", "scale_file")}
    kwargs.update(overrides or {})
    if seed is not None:
        torch.manual_seed(seed)
    return registry.get_model_class(model_cfg["name"])(**kwargs)


def count_params(model) -> int:
    """Trainable parameters (buffers and frozen tensors not counted), as tables report them."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
