"""Molecular dynamics with LEIGNN: ASE calculator, MD driver, MDSim metrics, reference data.

* :mod:`leignn_ocp.md.calculator` - ``LEIGNNCalculator`` (ASE calculator from a checkpoint)
* :mod:`leignn_ocp.md.run`        - ``run_md`` (Langevin / Nose-Hoover / Bussi / Berendsen / NVE
  with blow-up detection)
* :mod:`leignn_ocp.md.metrics`    - stability (bond / RDF window), RDF and h(r) MAE, diffusivity
* :mod:`leignn_ocp.md.reference`  - reference systems made with GFN2-xTB (tblite) and EMT
* :mod:`leignn_ocp.md.benchmark`  - ``run_benchmark`` (reference, fairchem training, MD, metrics)
* :mod:`leignn_ocp.md.relax`      - ``relax.relax`` (BFGS / FIRE with a step cap and warnings)

Commands: ``leignn-md`` (``run``), ``leignn-md-reference``, ``leignn-md-benchmark``, ``leignn-relax``.

Names are imported lazily so that ``leignn_ocp.md.metrics`` works without loading fairchem.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LEIGNNCalculator": "leignn_ocp.md.calculator",
    "run_md": "leignn_ocp.md.run",
    "make_dynamics": "leignn_ocp.md.run",
    "BlowUpMonitor": "leignn_ocp.md.run",
    "BlowUp": "leignn_ocp.md.run",
    "evaluate_molecule": "leignn_ocp.md.metrics",
    "evaluate_condensed": "leignn_ocp.md.metrics",
    "run_benchmark": "leignn_ocp.md.benchmark",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
