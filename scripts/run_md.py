#!/usr/bin/env python
"""Molecular dynamics from a LEIGNN checkpoint (ASE; trajectory in ASE .traj format).

Examples::

    # Nose-Hoover chain, 500 K, 0.5 fs, 5 ps, a frame every 10 steps
    python scripts/run_md.py --checkpoint runs/md/ethanol/checkpoints/<id>/best_checkpoint.pt \\
        --structure data/md/ethanol/start.traj --ensemble nose-hoover --temperature-K 500 \\
        --timestep-fs 0.5 --length-ps 5 --save-every 10 --seed 0 --out results/md/ethanol/leignn.traj

    # NVE from 300 K Maxwell-Boltzmann velocities
    python scripts/run_md.py --checkpoint ckpt.pt --structure POSCAR --ensemble nve \\
        --temperature-K 300 --steps 2000 --out nve.traj

Writes ``--out`` (frames with energy, forces, momenta, ``info["time_fs"]``) and a JSON
summary beside it (``--summary``, default ``<out>.json``). When the simulation blows up
(non-finite or huge forces, a molecular bond off by more than ``--bond-threshold`` A,
atoms closer than ``--min-distance`` A, runaway temperature) it stops, prints
``MD BLEW UP ...``, sets ``"blew_up": true`` in the summary and exits with status 3.
Direct-force LEIGNN models are not conservative: use a thermostat (the calculator warns).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from leignn_ocp.md.run import ENSEMBLES, EXIT_BLOWUP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="fairchem checkpoint of a LEIGNN model")
    p.add_argument("--structure", required=True, type=Path, help="start structure (any ASE format; last frame)")
    p.add_argument("--out", required=True, type=Path, help="output trajectory (.traj)")
    p.add_argument("--summary", type=Path, help="JSON summary (default: <out>.json)")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="nose-hoover")
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--temperature-K", type=float, default=300.0, help="thermostat (and initial) temperature")
    p.add_argument("--init-temperature-K", type=float, help="initial Maxwell-Boltzmann temperature (default: --temperature-K)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--length-ps", type=float, default=None)
    p.add_argument("--save-every", type=int, default=10, help="write a frame every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--friction-per-fs", type=float, default=0.01, help="Langevin friction")
    p.add_argument("--tdamp-fs", type=float, default=None, help="Nose-Hoover / Bussi / Berendsen time constant (default 100 steps)")
    p.add_argument("--keep-velocities", action="store_true", help="use the velocities stored in --structure")
    p.add_argument("--max-force", type=float, default=100.0, help="blow-up: largest force (eV/A)")
    p.add_argument("--bond-threshold", type=float, default=0.5, help="blow-up (molecules): bond deviation (A)")
    p.add_argument("--min-distance", type=float, default=0.5, help="blow-up (periodic): closest approach (A)")
    p.add_argument("--max-temperature-K", type=float, default=None, help="blow-up: temperature (default 10x target, periodic only)")
    p.add_argument("--check-every", type=int, default=None, help="blow-up check interval (default: --save-every)")
    p.add_argument("--no-stop", action="store_true", help="record a blow-up but keep going")
    p.add_argument("--gpu", action="store_true", help="run the model on the GPU")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ase.io import read

    from leignn_ocp.md.calculator import LEIGNNCalculator
    from leignn_ocp.md.run import BlowUpMonitor, run_md

    atoms = read(str(a.structure), -1)
    if a.length_ps is not None:
        steps = int(round(a.length_ps * 1000 / a.timestep_fs))
    else:
        steps = a.steps if a.steps is not None else 1000
    calc = LEIGNNCalculator(a.checkpoint, cpu=not a.gpu, seed=a.seed)
    max_t = a.max_temperature_K
    if max_t is None and atoms.pbc.any():
        max_t = max(10 * a.temperature_K, 5000.0)
    monitor = BlowUpMonitor(max_force=a.max_force, bond_threshold=a.bond_threshold,
                            min_distance=a.min_distance, max_temperature=max_t)
    summary = run_md(
        atoms, calc, a.out, ensemble=a.ensemble, timestep_fs=a.timestep_fs, temperature_K=a.temperature_K,
        steps=steps, save_every=a.save_every, seed=a.seed, friction_per_fs=a.friction_per_fs,
        tdamp_fs=a.tdamp_fs, init_temperature_K=a.init_temperature_K, keep_velocities=a.keep_velocities,
        monitor=monitor, check_every=a.check_every, stop_on_blowup=not a.no_stop,
        progress=not a.no_progress, summary_path=a.summary,
    )
    print(f"{summary['steps_done']} steps ({summary['simulated_ps']:.3f} ps) in {summary['wall_s']} s "
          f"({summary['ms_per_step']} ms/step) -> {summary['trajectory']}")
    return EXIT_BLOWUP if summary["blew_up"] else 0


if __name__ == "__main__":
    sys.exit(main())
