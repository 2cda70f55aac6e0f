"""``leignn-launch``: the ``fairchem`` CLI (same flags, same ``main()``) inside :func:`patched_fairchem`."""

from __future__ import annotations

from fairchem.core import _cli

from leignn_ocp.launch.patches import patched_fairchem


def main(argv: list[str] | None = None) -> int:
    """Run fairchem's ``main()`` on ``argv`` (default: ``sys.argv[1:]``) with the launcher's fixes."""
    with patched_fairchem():
        if argv is None:
            _cli.main()
        else:
            args, override_args = _cli.flags.get_parser().parse_known_args(argv)
            _cli.main(args, override_args)
    return 0
