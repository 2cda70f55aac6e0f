"""The fairchem-core series the launcher's patches were written for, checked when
:mod:`leignn_ocp.launch` is imported (stdlib only: it runs before any fairchem internals are imported,
which another fairchem version may not have). ``import leignn_ocp`` (the model plugin) never runs it."""

from __future__ import annotations

import os
import warnings
from importlib import metadata

WRITTEN_FOR = "1.10"  # fairchem-core series whose internals the patches replace
VERSION_ENV = "LEIGNN_LAUNCH_ANY_FAIRCHEM"  # =1: use the launcher with another fairchem-core anyway (warns)


def installed_fairchem() -> str:
    try:
        return metadata.version("fairchem-core")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def is_supported(found: str, series: str = WRITTEN_FOR) -> bool:
    return found == series or found.startswith(series + ".")


def check_fairchem_version(found: str | None = None) -> None:
    """Refuse (ImportError) a fairchem-core other than :data:`WRITTEN_FOR`.x, naming both versions,
    unless :data:`VERSION_ENV` is ``1`` (then warn)."""
    found = installed_fairchem() if found is None else found
    if is_supported(found):
        return
    have = "fairchem-core is not installed" if found == "(not installed)" else f"fairchem-core {found} is installed"
    msg = (f"leignn_ocp.launch (leignn-launch) patches fairchem-core {WRITTEN_FOR}.x internals, but {have}. "
           f"Install fairchem-core=={WRITTEN_FOR}.* (the version pyproject.toml pins), or use the plain "
           f"`fairchem` CLI without the launcher's fixes (the LEIGNN model itself does not need the launcher), "
           f"or set {VERSION_ENV}=1 to try the launcher anyway.")
    refuse_unless_overridden(ImportError(msg), stacklevel=3)


def refuse_unless_overridden(error: Exception, stacklevel: int = 2) -> None:
    """Raise ``error`` (a version mismatch), or only warn with its message when :data:`VERSION_ENV` is ``1``."""
    if os.environ.get(VERSION_ENV) != "1":
        raise error
    warnings.warn(str(error), stacklevel=stacklevel)
