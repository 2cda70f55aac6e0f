"""Fixtures shared by the test modules; the builders live in leignn_ocp.testing (one of each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leignn_ocp import testing
from leignn_ocp.testing import emt_slab_frames, fairchem_cli, write_s2ef_lmdb  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment for a test's subprocess (two threads unless set, the repository importable)."""
    return testing.cli_env(REPO)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def pytest_terminal_summary(terminalreporter):
    """The fuzz suite's closing report: every input class tried, its cases and its failures."""
    report = getattr(terminalreporter.config, "leignn_fuzz_report", None)  # set by test_fuzz_suite
    if report:
        terminalreporter.section("fuzz report")
        for line in report:
            terminalreporter.write_line(line)
