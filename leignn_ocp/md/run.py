"""MD driver: thermostats, trajectory writing, progress bar and blow-up detection.

``run_md`` runs any ASE calculator (``LEIGNNCalculator`` or a reference calculator) with

* ``langevin``     - ``ase.md.langevin.Langevin`` (friction in 1/fs)
* ``nose-hoover``  - ``ase.md.nose_hoover_chain.NoseHooverChainNVT`` (ASE >= 3.24; falls back
  to ``bussi`` with a warning on older ASE)
* ``bussi``        - ``ase.md.bussi.Bussi`` (stochastic velocity rescaling)
* ``berendsen``    - ``ase.md.nvtberendsen.NVTBerendsen``
* ``nve``          - ``ase.md.verlet.VelocityVerlet``

and writes an ASE ``.traj`` every ``save_every`` steps (step 0 included) with energy,
forces, momenta and ``atoms.info["time_fs"]``. A :class:`BlowUpMonitor` checks the state
every ``check_every`` steps and before every frame is written, and stops the run - it ends
early, the summary says ``blew_up: true`` with the reason, its name (``blowup_kind``) and the
step, and the ``leignn-md`` command exits with status 3 - when any of these happen:

* ``non_finite``: NaN / inf energy, forces, velocities or positions (checked at every step);
* ``model_error``: the calculator raised (the model refuses its input);
* ``force``: a force above ``max_force`` eV/A;
* ``bond`` (molecules: no periodic axis): a bond (ASE ``natural_cutoffs`` on the first frame)
  longer or shorter than its first-frame length by more than ``bond_threshold`` A (MDSim's 0.5 A);
* ``escaped``: an atom on its way to infinity along a non-periodic direction - for a molecule,
  ``escape_distance`` (10 A) farther from the centre of mass than any atom of the first frame; for
  a slab, that far outside the cell along its non-periodic cell vector;
* ``min_distance`` (periodic systems): two atoms closer than ``min_distance`` A;
* ``temperature``: the instantaneous temperature above ``max_temperature`` K (default 10x the
  target, at least 5000 K).

The trajectory holds only frames that passed the checks, each written whole (energy and forces
come from a snapshot, not the calculator, and an interrupted write is dropped), so
``ase.io.read(path, ":")`` reads it up to the last good frame after any blow-up.

Command line (``leignn-md``, also ``python scripts/run_md.py`` and ``python -m leignn_ocp.md.run``)::

    # Nose-Hoover chain, 500 K, 0.5 fs, 5 ps, a frame every 10 steps
    leignn-md --checkpoint runs/md/ethanol/checkpoints/<id>/best_checkpoint.pt \\
        --structure data/md/ethanol/start.traj --ensemble nose-hoover --temperature-K 500 \\
        --timestep-fs 0.5 --length-ps 5 --save-every 10 --seed 0 --out results/md/ethanol/leignn.traj

    # NVE from 300 K Maxwell-Boltzmann velocities
    leignn-md --checkpoint ckpt.pt --structure POSCAR --ensemble nve --temperature-K 300 \\
        --steps 2000 --out nve.traj

It writes ``--out`` (frames with energy, forces, momenta, ``info["time_fs"]``) and a JSON
summary beside it (``--summary``, default ``<out>.json``); on a blow-up it prints
``MD BLEW UP ...`` and exits with status 3; a checkpoint it cannot use (missing, truncated, not
LEIGNN's) is one line on stderr naming the file, and status 2, before anything is written.
Direct-force LEIGNN models are not conservative: use a thermostat (the calculator warns).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import Trajectory

log = logging.getLogger(__name__)

ENSEMBLES = ("langevin", "nose-hoover", "bussi", "berendsen", "nve")
EXIT_BLOWUP = 3
EXIT_BAD_CHECKPOINT = 2  # unreadable, truncated or not a LEIGNN checkpoint (argparse's status too)


class BlowUp(RuntimeError):
    """The simulation left physical territory; ``reason`` says how, ``kind`` names it (one of
    :data:`BLOWUP_KINDS`)."""

    def __init__(self, reason: str, step: int, kind: str):
        if kind not in BLOWUP_KINDS:
            raise ValueError(f"unknown blow-up kind {kind!r}; one of {BLOWUP_KINDS}")
        super().__init__(f"step {step}: {kind}: {reason}")
        self.reason = reason
        self.step = step
        self.kind = kind


# the named reasons a run stops for (the summary's ``blowup_kind``)
BLOWUP_KINDS = ("non_finite", "force", "bond", "min_distance", "escaped", "temperature", "model_error")
FATAL_KINDS = ("non_finite", "model_error")  # the run cannot go on, even with stop_on_blowup=False


def check_finite(atoms: Atoms, step: int, energy: bool = True) -> None:
    """:class:`BlowUp` ``non_finite`` naming the first atom with a NaN / inf position, velocity or
    force (and the energy, with ``energy``). Cheap: forces and energy are the calculator's cache."""
    named = [("forces", atoms.get_forces()), ("positions", atoms.get_positions()),
             ("velocities", atoms.get_momenta())]  # each [N, 3]; forces first: NaN forces make the others NaN
    for what, x in named:
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BlowUp(f"non-finite {what} ({int(bad.sum())} atoms; first atom {i} "
                         f"({atoms[i].symbol}): {x[i].tolist()})", step, "non_finite")
    if energy:
        e = atoms.get_potential_energy()
        if not np.isfinite(e):
            raise BlowUp(f"non-finite energy ({e})", step, "non_finite")


@dataclass
class BlowUpMonitor:
    """Checks an MD state for blow-up; see the module docstring for the criteria."""

    max_force: float = 100.0
    bond_threshold: float | None = 0.5
    min_distance: float = 0.5
    max_temperature: float | None = None
    escape_distance: float | None = 10.0
    bonds: np.ndarray | None = field(default=None, repr=False)
    bond_ref: np.ndarray | None = field(default=None, repr=False)
    radius_ref: float | None = field(default=None, repr=False)  # molecules: largest first-frame distance to the COM

    def setup(self, atoms: Atoms) -> None:
        self.bonds = self.bond_ref = self.radius_ref = None
        if not atoms.pbc.any():
            self.radius_ref = float(np.linalg.norm(atoms.positions - atoms.get_center_of_mass(), axis=1).max())
            if self.bond_threshold is not None:
                from leignn_ocp.md.metrics import bond_lengths, find_bonds

                self.bonds = find_bonds(atoms)
                self.bond_ref = bond_lengths([atoms], self.bonds)[0] if len(self.bonds) else None

    def check(self, atoms: Atoms, step: int) -> None:
        check_finite(atoms, step)
        forces = atoms.get_forces()
        fnorm = np.sqrt((forces ** 2).sum(axis=1))  # [N]
        if fnorm.max() > self.max_force:
            i = int(fnorm.argmax())
            raise BlowUp(f"force {fnorm[i]:.1f} eV/A on atom {i} ({atoms[i].symbol}) above max_force "
                         f"{self.max_force:g}", step, "force")
        self.check_escape(atoms, step)
        if self.bonds is not None and self.bond_ref is not None and len(self.bonds):
            from leignn_ocp.md.metrics import bond_lengths

            dev = np.abs(bond_lengths([atoms], self.bonds)[0] - self.bond_ref)
            k = int(dev.argmax())
            if dev[k] > self.bond_threshold:
                i, j = self.bonds[k]
                raise BlowUp(f"bond {i}-{j} deviates {dev[k]:.2f} A from its initial length "
                             f"(threshold {self.bond_threshold:g} A)", step, "bond")
        if atoms.pbc.any():
            from ase.neighborlist import neighbor_list

            d = neighbor_list("d", atoms, self.min_distance)
            if len(d):
                raise BlowUp(f"two atoms {d.min():.2f} A apart (min_distance {self.min_distance:g} A)", step,
                             "min_distance")
        if self.max_temperature is not None:
            temp = atoms.get_temperature()
            if temp > self.max_temperature:
                raise BlowUp(f"temperature {temp:.0f} K above max_temperature {self.max_temperature:g} K", step,
                             "temperature")

    def check_escape(self, atoms: Atoms, step: int) -> None:
        """An atom on its way to infinity along a non-periodic direction: for a molecule, farther from
        the centre of mass than any atom of the first frame by ``escape_distance``; with some axes
        periodic (a slab), outside the cell along a non-periodic cell vector by ``escape_distance``."""
        if self.escape_distance is None:
            return
        pos = atoms.get_positions()
        if not atoms.pbc.any():
            if self.radius_ref is None:
                return
            r = np.linalg.norm(pos - atoms.get_center_of_mass(), axis=1)  # [N]
            i = int(r.argmax())
            if r[i] > self.radius_ref + self.escape_distance:
                raise BlowUp(f"atom {i} ({atoms[i].symbol}) is {r[i]:.1f} A from the centre of mass, "
                             f"{r[i] - self.radius_ref:.1f} A farther than any atom of the first frame "
                             f"(escape_distance {self.escape_distance:g} A): it is flying off", step, "escaped")
        elif atoms.cell.rank == 3 and not atoms.pbc.all():
            inv = np.linalg.inv(atoms.cell.array)  # [3, 3]; column k: reciprocal vector b_k (no 2 pi)
            s = pos @ inv  # [N, 3] fractional, not wrapped
            height = 1.0 / np.linalg.norm(inv, axis=0)  # [3] distance between the two faces across axis k
            out = np.maximum(np.maximum(-s, s - 1.0), 0.0) * height  # [N, 3] distance outside the cell
            out[:, atoms.pbc] = 0.0
            i, k = np.unravel_index(int(out.argmax()), out.shape)
            if out[i, k] > self.escape_distance:
                raise BlowUp(f"atom {i} ({atoms[i].symbol}) left the box: {out[i, k]:.1f} A outside the cell "
                             f"along its non-periodic axis {'abc'[k]} (escape_distance {self.escape_distance:g} A)",
                             step, "escaped")


def default_max_temperature(temperature_K: float) -> float:
    """The blow-up temperature when none is given: 10x the target, at least 5000 K."""
    return max(10 * temperature_K, 5000.0)


def snapshot(atoms: Atoms, time_fs: float) -> Atoms:
    """A copy with the energy and forces already computed (a SinglePointCalculator): writing it runs
    no calculator, so a frame is written whole or not at all."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.info["time_fs"] = time_fs
    frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    return frame


def make_dynamics(atoms: Atoms, ensemble: str, timestep_fs: float, temperature_K: float,
                  friction_per_fs: float = 0.01, tdamp_fs: float | None = None,
                  rng: np.random.Generator | None = None):
    """The ASE integrator for ``ensemble`` (see the module docstring)."""
    dt = timestep_fs * units.fs
    tdamp = (tdamp_fs if tdamp_fs is not None else 100 * timestep_fs) * units.fs
    rng = rng or np.random.default_rng()
    if ensemble == "nose-hoover":
        try:
            from ase.md.nose_hoover_chain import NoseHooverChainNVT
        except ImportError:
            log.warning("this ASE has no NoseHooverChainNVT; using the Bussi thermostat instead")
            ensemble = "bussi"
        else:
            return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature_K, tdamp=tdamp)
    if ensemble == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, timestep=dt, temperature_K=temperature_K,
                        friction=friction_per_fs / units.fs, rng=rng)
    if ensemble == "bussi":
        from ase.md.bussi import Bussi

        return Bussi(atoms, timestep=dt, temperature_K=temperature_K, taut=tdamp, rng=rng)
    if ensemble == "berendsen":
        from ase.md.nvtberendsen import NVTBerendsen

        return NVTBerendsen(atoms, timestep=dt, temperature_K=temperature_K, taut=tdamp)
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    raise ValueError(f"unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")


def init_velocities(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann velocities, zero total momentum (and zero rotation for molecules)."""
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 2:
        ZeroRotation(atoms)


def run_md(atoms: Atoms, calc, traj_path: str | Path, ensemble: str = "nose-hoover",
           timestep_fs: float = 0.5, temperature_K: float = 300.0, steps: int = 1000,
           save_every: int = 10, seed: int = 0, friction_per_fs: float = 0.01,
           tdamp_fs: float | None = None, init_temperature_K: float | None = None,
           keep_velocities: bool = False, monitor: BlowUpMonitor | None = None,
           check_every: int | None = None, stop_on_blowup: bool = True, progress: bool = True,
           summary_path: str | Path | None = None) -> dict:
    """Run MD and return (and write, next to the trajectory) a JSON summary.

    ``init_temperature_K`` sets the Maxwell-Boltzmann velocities (default: ``temperature_K``);
    ``keep_velocities`` keeps the velocities ``atoms`` already has. With
    ``stop_on_blowup=False`` a blow-up is only recorded (first occurrence) and the run goes
    on, except for the kinds it cannot go on from (:data:`FATAL_KINDS`: non-finite values, a
    model that fails).

    Every step is checked for non-finite positions, velocities and forces; the whole monitor
    runs every ``check_every`` steps and before every frame is written, so the trajectory holds
    only frames that passed (a frame is written complete or not at all; see :func:`snapshot`).
    """
    traj_path = Path(traj_path)
    traj_path.parent.mkdir(parents=True, exist_ok=True)
    if save_every < 1 or (check_every is not None and check_every < 1):
        raise ValueError(f"save_every and check_every must be >= 1 steps, not {save_every} / {check_every}")
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.calc = calc
    if not keep_velocities or not np.any(atoms.get_velocities()):
        init_velocities(atoms, init_temperature_K if init_temperature_K is not None else temperature_K, rng)
    dyn = make_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs, tdamp_fs, rng)
    if monitor is None:
        monitor = BlowUpMonitor(max_temperature=default_max_temperature(temperature_K))
    monitor.setup(atoms)
    check_every = check_every or save_every

    writer = Trajectory(str(traj_path), "w")
    state = dict(blowup=None, last_ok=None, frames=0)

    def record(err: BlowUp) -> None:
        if state["blowup"] is None:
            state["blowup"] = err
            log.error("MD blew up at step %d (%.3f ps): %s: %s", err.step, err.step * timestep_fs / 1000,
                      err.kind, err.reason)
        if stop_on_blowup or err.kind in FATAL_KINDS:
            raise err

    def observe() -> None:
        """Every step: the finite check; then the monitor and the frame where they are due."""
        n = dyn.nsteps
        save, full = n % save_every == 0, n % check_every == 0
        try:
            check_finite(atoms, n, energy=save or full)
            if save or full:
                monitor.check(atoms, n)
        except BlowUp as err:
            record(err)
        state["last_ok"] = n
        if save:
            write_frame(writer, snapshot(atoms, n * timestep_fs))
            state["frames"] += 1
        if bar is not None and n > 0:
            bar.update(1)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"MD {ensemble} {temperature_K:g} K", unit="step", mininterval=1.0)
    dyn.attach(observe, interval=1)

    t0 = time.perf_counter()
    try:
        dyn.run(steps)
    except BlowUp:
        pass
    except (ValueError, RuntimeError, FloatingPointError) as err:  # the model refused the state
        step = 0 if state["last_ok"] is None else state["last_ok"] + 1
        state["blowup"] = BlowUp(f"model evaluation failed: {type(err).__name__}: {err}", step, "model_error")
        log.error("MD stopped at step %d: %s", step, err)
    finally:
        wall = time.perf_counter() - t0
        writer.close()
        if bar is not None:
            bar.close()
    err = state["blowup"]
    summary = dict(
        trajectory=str(traj_path), ensemble=ensemble, timestep_fs=timestep_fs, temperature_K=temperature_K,
        steps_requested=steps, steps_done=int(dyn.nsteps), simulated_ps=dyn.nsteps * timestep_fs / 1000,
        save_every=save_every, frame_interval_fs=save_every * timestep_fs, frames_written=state["frames"],
        seed=seed, n_atoms=len(atoms),
        blew_up=err is not None, blowup_kind=None if err is None else err.kind,
        blowup_reason=None if err is None else err.reason,
        blowup_step=None if err is None else err.step,
        blowup_ps=None if err is None else err.step * timestep_fs / 1000,
        wall_s=round(wall, 2), ms_per_step=round(1000 * wall / max(dyn.nsteps, 1), 3),
        direct_forces=getattr(calc, "direct_forces", None),
    )
    summary_path = Path(summary_path) if summary_path else traj_path.with_suffix(".json")
    summary_path.write_text(json.dumps(summary, indent=2))
    if err is not None:
        print(f"MD BLEW UP at step {err.step} ({summary['blowup_ps']:.3f} ps): {err.kind}: {err.reason}; "
              f"trajectory up to there ({state['frames']} frames) in {traj_path}")
    return summary


def write_frame(writer: Trajectory, frame: Atoms) -> None:
    """Append one frame; if the write is interrupted (an exception, Ctrl-C), drop what it had written
    so far: ASE's ulm writer would otherwise commit the half-written frame when the file is closed."""
    try:
        writer.write(frame)
    except BaseException:
        backend = getattr(writer, "backend", None)
        if backend is not None and isinstance(getattr(backend, "data", None), dict):
            backend.data = {k: v for k, v in backend.data.items() if k == "_little_endian"}  # unsynced item
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leignn-md", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="fairchem checkpoint of a LEIGNN model")
    p.add_argument("--structure", required=True, type=Path, help="start structure (any ASE format; last frame)")
    p.add_argument("--out", required=True, type=Path, help="output trajectory (.traj)")
    p.add_argument("--summary", type=Path, help="JSON summary (default: <out>.json)")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="nose-hoover")
    p.add_argument("--timestep-fs", type=float, default=0.5)
    p.add_argument("--temperature-K", type=float, default=300.0, help="thermostat (and initial) temperature")
    p.add_argument("--init-temperature-K", type=float,
                   help="initial Maxwell-Boltzmann temperature (default: --temperature-K)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--length-ps", type=float, default=None)
    p.add_argument("--save-every", type=int, default=10, help="write a frame every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--friction-per-fs", type=float, default=0.01, help="Langevin friction")
    p.add_argument("--tdamp-fs", type=float, default=None,
                   help="Nose-Hoover / Bussi / Berendsen time constant (default 100 steps)")
    p.add_argument("--keep-velocities", action="store_true", help="use the velocities stored in --structure")
    p.add_argument("--max-force", type=float, default=100.0, help="blow-up: largest force (eV/A)")
    p.add_argument("--bond-threshold", type=float, default=0.5, help="blow-up (molecules): bond deviation (A)")
    p.add_argument("--min-distance", type=float, default=0.5, help="blow-up (periodic): closest approach (A)")
    p.add_argument("--max-temperature-K", type=float, default=None,
                   help="blow-up: temperature (default 10x target, at least 5000 K)")
    p.add_argument("--escape-distance", type=float, default=10.0,
                   help="blow-up: an atom this far (A) beyond the structure along a non-periodic direction "
                        "(0: off)")
    p.add_argument("--check-every", type=int, default=None, help="blow-up check interval (default: --save-every)")
    p.add_argument("--no-stop", action="store_true", help="record a blow-up but keep going")
    p.add_argument("--gpu", action="store_true", help="run the model on the GPU")
    p.add_argument("--compile", action="store_true",
                   help="run the model under torch.compile (a first call of ~1 min, then faster steps on small "
                        "molecules; see docs/results/md_throughput)")
    p.add_argument("--no-reuse", action="store_true",
                   help="fairchem's own calculate on every step (default: keep the batch, replace positions)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    """``leignn-md``: MD from a LEIGNN checkpoint; exit status 3 when the run blew up."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ase.io import read

    from leignn_ocp.md.calculator import LEIGNNCalculator

    atoms = read(str(a.structure), -1)
    if a.length_ps is not None:
        steps = int(round(a.length_ps * 1000 / a.timestep_fs))
    else:
        steps = a.steps if a.steps is not None else 1000
    from leignn_ocp.trainer import CheckpointError

    try:
        calc = LEIGNNCalculator(a.checkpoint, cpu=not a.gpu, seed=a.seed, reuse=not a.no_reuse, compile=a.compile)
    except (CheckpointError, FileNotFoundError) as err:  # the message names the file and the problem
        print(f"leignn-md: {err}", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    max_t = a.max_temperature_K
    if max_t is None:
        max_t = default_max_temperature(a.temperature_K)
    monitor = BlowUpMonitor(max_force=a.max_force, bond_threshold=a.bond_threshold,
                            min_distance=a.min_distance, max_temperature=max_t,
                            escape_distance=a.escape_distance if a.escape_distance > 0 else None)
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
    raise SystemExit(main())
