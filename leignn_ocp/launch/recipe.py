"""Keep a one-GPU recipe's meaning on W ranks (``--scale-recipe-to-world-size``, opt-in).

fairchem counts schedules in optimizer steps and ``optim.batch_size`` is per rank, so on W ranks an
epoch has W times fewer steps: every step-counted key then spans W times more data than the recipe
meant (validation, warm-up and LR milestones come W times later in epochs; a run can end before its
warm-up does). :func:`rescale_for_world_size` divides those keys by W; optionally it scales the
learning rate too. The effective batch (``batch_size`` x W) is left as it is.
"""

from __future__ import annotations

import copy
import math

# optim keys of fairchem 1.10 counted in optimizer steps (ocp_trainer: eval_every, checkpoint_every;
# utils.warmup_lr_lambda, the default LambdaLR: warmup_steps, lr_milestones). ReduceLROnPlateau's
# patience / cooldown count validations, which stay as many once eval_every is rescaled.
STEP_KEYS = ("eval_every", "checkpoint_every", "warmup_steps")
STEP_LIST_KEYS = ("lr_milestones",)
LR_RULES = {"none": lambda w: 1.0, "linear": float, "sqrt": math.sqrt}  # lr factor for w ranks
LR_KEYS = ("lr_initial", "min_lr")  # min_lr: ReduceLROnPlateau's floor, kept relative to lr_initial
MIN_MILESTONE = 100  # fairchem's warmup_lr_lambda takes any milestone below 100 for an epoch count


def rescale_for_world_size(config: dict, world_size: int, scale_lr: str = "none") -> tuple[dict, list[str]]:
    """A copy of ``config`` whose step-counted ``optim`` keys cover the same number of samples on
    ``world_size`` ranks as the recipe on one, and the log lines saying what changed (old -> new).

    Step counts are divided by ``world_size`` (integer division, at least 1); ``optim.ema_decay`` (a
    per-step factor) is raised to the power ``world_size``; with ``scale_lr`` = ``linear`` / ``sqrt``
    ``optim.lr_initial`` (and ``optim.min_lr``) are multiplied by ``world_size`` / its square root.
    ``world_size`` 1 returns an unchanged copy and no lines."""
    if scale_lr not in LR_RULES:
        raise ValueError(f"scale_lr must be one of {sorted(LR_RULES)}, not {scale_lr!r}")
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, not {world_size!r}")
    world_size = int(world_size)
    new = copy.deepcopy(config)
    optim = new.get("optim")
    if world_size == 1 or not isinstance(optim, dict):
        return new, []

    def steps(value) -> int:
        return max(1, int(value) // world_size)

    batch = optim.get("batch_size")
    lines = [
        f"world size {world_size}: optim.batch_size={batch} is per rank, so each optimizer step sees "
        f"{batch} x {world_size} = {batch * world_size if isinstance(batch, int) else '?'} structures; "
        f"step-counted optim keys are divided by {world_size} to keep the recipe's schedule in epochs"
    ]
    for key in STEP_KEYS:
        old = optim.get(key)
        if old is None or (key == "checkpoint_every" and old <= 0):  # -1: only at the end
            continue
        optim[key] = steps(old)
        lines.append(f"optim.{key}: {old} -> {optim[key]}")
    if optim.get("eval_every") is None:
        lines.append("optim.eval_every unset: fairchem validates once per epoch at any world size (unchanged)")
    for key in STEP_LIST_KEYS:
        old = optim.get(key)
        if old is None:
            continue
        optim[key] = [steps(v) for v in old]
        lines.append(f"optim.{key}: {list(old)} -> {optim[key]}")
        if "scheduler" not in optim and any(v < MIN_MILESTONE for v in optim[key]):
            raise ValueError(
                f"optim.{key} {optim[key]} on {world_size} ranks: fairchem refuses milestones below "
                f"{MIN_MILESTONE} (it reads them as epochs); use fewer ranks or set the milestones yourself"
            )
    if optim.get("ema_decay") is not None:
        old = optim["ema_decay"]
        optim["ema_decay"] = old**world_size
        lines.append(f"optim.ema_decay: {old} -> {optim['ema_decay']:.6g} (per-step decay ^ {world_size}: "
                     "the same averaging window in structures)")
    factor = LR_RULES[scale_lr](world_size)
    for key in LR_KEYS:
        if factor == 1.0 or not isinstance(optim.get(key), (int, float)):
            continue
        old = optim[key]
        optim[key] = old * factor
        lines.append(f"optim.{key}: {old} -> {optim[key]:.6g} ({scale_lr} learning-rate scaling, x{factor:.6g})")
    if factor == 1.0:
        lines.append(f"optim.lr_initial: {optim.get('lr_initial')} unchanged (--scale-lr none) "
                     f"for a {world_size}x larger effective batch")
    return new, lines
