"""``leignn-launch``: the ``fairchem`` CLI (same flags, same ``main()``) inside :func:`patched_fairchem`,
plus two things of its own: a leading ``main`` is ignored, and ``--scale-recipe-to-world-size``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from unittest import mock

from fairchem.core import _cli
from fairchem.core.common import utils as fc_utils

from leignn_ocp.launch.patches import patched_fairchem
from leignn_ocp.launch.recipe import LR_RULES, rescale_for_world_size

IGNORED_MAIN = (
    "leignn-launch: ignoring the leading `main` (the habit of OCP's old `python main.py`). Plain "
    "`fairchem` 1.10 takes no positional argument: there `main` becomes a config override and fails "
    "with `ValueError: not enough values to unpack`, so leave it out with plain fairchem."
)


def launch_parser() -> argparse.ArgumentParser:
    """The launcher's own flags; everything else goes to fairchem's parser unchanged."""
    p = argparse.ArgumentParser(prog="leignn-launch", add_help=False, allow_abbrev=False,
                                description="leignn-launch options (the fairchem CLI's own follow)")
    p.add_argument("--scale-recipe-to-world-size", action="store_true",
                   help="on world size W = --num-nodes x --num-gpus > 1, divide the recipe's step-counted "
                        "optim keys (eval_every, checkpoint_every, warmup_steps, lr_milestones) by W and "
                        "raise ema_decay to the power W, so the schedule means the same in epochs as on "
                        "one GPU; logs every change (off by default)")
    p.add_argument("--scale-lr", choices=sorted(LR_RULES), default="none",
                   help="with --scale-recipe-to-world-size: multiply optim.lr_initial (and min_lr) by W "
                        "(linear), sqrt(W) (sqrt) or nothing (none, default); batch_size stays per rank")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    """``(fairchem args, fairchem config overrides, launcher options)`` for ``argv`` (default:
    ``sys.argv[1:]``). The first two are exactly what fairchem's own parser makes of ``argv`` without
    a leading ``main`` and without the launcher's flags; ``options.ignored_main`` says whether a
    leading ``main`` was dropped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ignored_main = bool(argv) and argv[0] == "main"
    if ignored_main:
        argv = argv[1:]
    ours = launch_parser()
    options, rest = ours.parse_known_args(argv)
    if options.scale_lr != "none" and not options.scale_recipe_to_world_size:
        ours.error("--scale-lr needs --scale-recipe-to-world-size")
    if "-h" in rest or "--help" in rest:
        print(ours.format_help())
    args, overrides = _cli.flags.get_parser().parse_known_args(rest)
    options.ignored_main = ignored_main
    return args, overrides, options


def rescaling_build_config(build_config, scale_lr: str):
    """fairchem's ``build_config`` (as patched) followed by :func:`rescale_for_world_size` for world size
    ``args.num_nodes * args.num_gpus`` (what fairchem puts in ``config["world_size"]``), logging each
    change. Runs once, on the launching side: submitted and requeued jobs get the rescaled config."""

    def build(args, args_override, *rest, **kwargs):
        config = build_config(args, args_override, *rest, **kwargs)
        world_size = args.num_nodes * args.num_gpus
        config, lines = rescale_for_world_size(config, world_size, scale_lr)
        if not lines:
            logging.info(f"leignn_ocp.launch: world size {world_size}: recipe unchanged")
        for line in lines:
            logging.info(f"leignn_ocp.launch: {line}")
        return config

    return build


def main(argv: list[str] | None = None) -> int:
    """Run fairchem's ``main()`` on ``argv`` (default: ``sys.argv[1:]``) with the launcher's fixes."""
    args, overrides, options = parse_args(argv)
    fc_utils.setup_logging()  # fairchem's main() does the same first; here the note below is logged too
    if options.ignored_main:
        logging.warning(IGNORED_MAIN)
    with patched_fairchem():
        rescale = (mock.patch.object(_cli, "build_config", rescaling_build_config(_cli.build_config, options.scale_lr))
                   if options.scale_recipe_to_world_size else contextlib.nullcontext())
        with rescale:
            _cli.main(args, overrides)
    return 0
