"""ScaleFactor fitting (PaiNN, GemNet) with fairchem's own ``compute_scaling_factors``.

fairchem 1.10's ``python -m fairchem.core.modules.scaling.fit`` cannot run (its ``__main__`` reads
a flag the parser lacks) and saves the factors keyed by module path, while models load a
``scale_file`` keyed by ScaleFactor name; :func:`fit_scales` runs the same fitting code and writes
``{name: value}`` JSON for ``--model.scale_file=``, with a ``comment`` entry (which fairchem's
``load_scales_compat`` drops) saying what the factors were fitted on and by which command.
The fitted files shipped with the configs are in ``configs/s2ef/scales/`` (see its README.md).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path

from leignn_ocp import lineup

log = logging.getLogger(__name__)


def scale_factor_names(model) -> dict[str, str]:
    """{module path: ScaleFactor name} of a model (empty for models without ScaleFactors)."""
    from fairchem.core.modules.scaling import ScaleFactor

    return {path: (m.name or path) for path, m in model.named_modules() if isinstance(m, ScaleFactor)}


def has_scale_factors(config: str | Path) -> bool:
    """Whether the model a config describes has ScaleFactors to fit (built, fresh weights)."""
    return bool(scale_factor_names(lineup.build_model(lineup.load_config(config)["model"])))


def scale_factor_status(model_cfg: dict) -> dict[str, list[str]]:
    """{"fitted": [...], "unfitted": [...]} ScaleFactor names of the model a config block builds,
    its ``scale_file`` loaded by the model's own constructor, as ``fairchem --mode train`` builds it
    (a relative ``scale_file`` is looked up from the working directory, as fairchem does)."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.modules.scaling import ScaleFactor

    import leignn_ocp  # noqa: F401  (registers the model)

    setup_imports()
    model = registry.get_model_class(model_cfg["name"])(**{k: v for k, v in model_cfg.items() if k != "name"})
    status: dict[str, list[str]] = {"fitted": [], "unfitted": []}
    for path, m in model.named_modules():
        if isinstance(m, ScaleFactor):
            status["fitted" if m.fitted else "unfitted"].append(m.name or path)
    return status


def fit_scales(fairchem_argv: Sequence[str], out_json: Path, num_batches: int = 16) -> Path:
    """Fit a model's ScaleFactors on its config's training data and write a ``scale_file``.

    fairchem_argv: the arguments of ``fairchem --mode train ...`` (config, overrides, --cpu).
    Each factor is fitted in turn on ``num_batches`` training batches (``optim.batch_size``
    structures each, in the order of the trainer's sampler for ``--seed``) through the model at
    its initial weights: the factors scale activations to unit variance, a property of the
    architecture and the data rather than of the trained weights.
    """
    import torch
    from fairchem.core.common import distutils
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config
    from fairchem.core.modules.scaling.fit import compute_scaling_factors

    import leignn_ocp  # noqa: F401  (registers the model)

    args, overrides = flags.get_parser().parse_known_args(list(fairchem_argv))
    config = build_config(args, overrides)
    config["model"].pop("scale_file", None)  # fit all factors from scratch, no interactive prompt
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    raw = out_json.with_suffix(".by_path.pt")
    if raw.exists():
        raw.unlink()  # fairchem asks before overwriting
    config["checkpoint"] = str(raw)
    config["is_debug"] = True  # nothing but the scale file is written
    distutils.setup_env_local()
    compute_scaling_factors(config, num_batches=num_batches)
    by_path = {k: float(v) for k, v in torch.load(str(raw), map_location="cpu", weights_only=False).items()}
    raw.unlink()  # keyed by module path: nothing loads it; the JSON below is the scale file

    names = scale_factor_names(lineup.build_model(config["model"]))
    if not names:
        raise ValueError(f"model {config['model']['name']} has no ScaleFactor modules")
    missing = [p for p in names if p not in by_path]
    if missing:
        raise KeyError(f"{raw}: no fitted value for {missing[0]} (have {sorted(by_path)[:5]} ...)")
    scales = {name: by_path[path] for path, name in names.items()}
    out_json.write_text(json.dumps({"comment": fit_comment(config, fairchem_argv, out_json, num_batches),
                                    **scales}, indent=1) + "\n")
    log.info(f"scale factors -> {out_json}: " + ", ".join(f"{k} {v:.3f}" for k, v in scales.items()))
    return out_json


def fit_comment(config: dict, fairchem_argv: Sequence[str], out_json: Path, num_batches: int) -> str:
    """What a scale file was fitted on, and the command that refits it (the file's ``comment``)."""
    import fairchem.core
    import torch

    train = config["dataset"]["train"] if "train" in config["dataset"] else config["dataset"]
    batch = config["optim"].get("batch_size")
    seed = config.get("seed", config.get("cmd", {}).get("seed"))
    cmd = shlex.join(["leignn-evaluate", "fit-scales", "--out", str(out_json), "--num-batches", str(num_batches),
                      *map(str, fairchem_argv)])
    return (f"{config['model']['name']} ScaleFactors fitted by fairchem's compute_scaling_factors at the initial "
            f"weights (seed {seed}) on {num_batches} batches of {batch} structures of {train.get('src')} "
            f"({train.get('format', 'lmdb')}); fairchem-core {fairchem.core.__version__}, torch "
            f"{torch.__version__}. Command: {cmd}")
