"""ScaleFactor fitting (PaiNN, GemNet) with fairchem's own ``compute_scaling_factors``.

fairchem 1.10's ``python -m fairchem.core.modules.scaling.fit`` cannot run (its ``__main__`` reads
a flag the parser lacks) and saves the factors keyed by module path, while models load a
``scale_file`` keyed by ScaleFactor name; :func:`fit_scales` runs the same fitting code and writes
``{name: value}`` JSON for ``--model.scale_file=``.
"""

from __future__ import annotations

import json
import logging
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


def fit_scales(fairchem_argv: Sequence[str], out_json: Path, num_batches: int = 16) -> Path:
    """Fit a model's ScaleFactors on its config's training data and write a ``scale_file``.

    fairchem_argv: the arguments of ``fairchem --mode train ...`` (config, overrides, --cpu).
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

    names = scale_factor_names(lineup.build_model(config["model"]))
    if not names:
        raise ValueError(f"model {config['model']['name']} has no ScaleFactor modules")
    missing = [p for p in names if p not in by_path]
    if missing:
        raise KeyError(f"{raw}: no fitted value for {missing[0]} (have {sorted(by_path)[:5]} ...)")
    scales = {name: by_path[path] for path, name in names.items()}
    out_json.write_text(json.dumps({"comment": f"fairchem compute_scaling_factors, {num_batches} batches of "
                                                f"{config['dataset']['train'].get('src')}", **scales}, indent=1))
    log.info(f"scale factors -> {out_json}: " + ", ".join(f"{k} {v:.3f}" for k, v in scales.items()))
    return out_json
