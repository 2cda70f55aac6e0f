"""Reference MD systems for the LEIGNN MD benchmark, made offline with real calculators.

Three systems play the roles of the MDSim benchmark's data sets (Fu et al., TMLR 2023):

* ``ethanol``   - MD17-like: one ethanol molecule, GFN2-xTB (``tblite``), Nose-Hoover
                  chain at 500 K, 0.5 fs (MDSim's molecular protocol).
* ``cu_liquid`` - LiPS-like condensed phase: liquid copper in a periodic box, ASE EMT,
                  melted at 3000 K, then Nose-Hoover chain at 1500 K, 2 fs.
* ``cu_solid``  - the solid: fcc copper (108 atoms) at 800 K, ASE EMT, Nose-Hoover chain, 2 fs.

For each system the script writes, under ``--out/<system>/``:

* ``reference.traj``  production trajectory (ASE format, energy + forces on every frame,
                      ``atoms.info["time_fs"]``): the reference the metrics compare against;
* ``replicate.traj``  an independent run (other seed, same protocol, length of a model
                      run): the noise floor of every metric ("the reference's own numbers");
* ``train/``, ``val/`` fairchem S2EF LMDBs (``data.lmdb``) of disjoint frames drawn at random
                      from ``reference.traj``, the way MD17 models are trained on MD17 frames;
                      a frame's ``sid`` is its index in ``reference.traj``;
* ``split_frames.json`` which ``reference.traj`` frames are in ``train/`` and ``val/``; the
                      others are the test frames model MD starts from;
* ``reference.json``  protocol, timings and where everything is.

Usage::

    leignn-md-reference --system all --out data/md
    leignn-md-reference --system ethanol --ref-ps 10 --n-train 1000
    python scripts/make_md_reference.py --system cu_liquid      # the same, old spelling

The trajectory stage needs only ``ase`` (+ ``tblite`` for ethanol); the LMDB stage needs
torch / torch_geometric (the project's virtualenv).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import Trajectory, read

SYSTEMS = {
    "ethanol": dict(
        calculator="GFN2-xTB (tblite)",
        temperature_K=500.0,
        timestep_fs=0.5,
        save_every=10,  # 5 fs between frames
        equil_ps=1.0,
        ref_ps=50.0,  # as long as a model run (the paper's 50 ps): the reference's own h(r) noise stays small
        replicate_ps=50.0,
        tdamp_fs=50.0,
        n_train=1000,
        n_val=200,
        periodic=False,
    ),
    "cu_liquid": dict(
        calculator="ASE EMT",
        temperature_K=1500.0,
        melt_temperature_K=3000.0,
        timestep_fs=2.0,
        save_every=10,  # 20 fs between frames
        melt_ps=2.0,
        equil_ps=2.0,
        ref_ps=50.0,
        replicate_ps=50.0,
        tdamp_fs=100.0,
        n_train=300,
        n_val=50,
        periodic=True,
        size=3,  # 3x3x3 fcc cells = 108 atoms
        lattice_A=3.75,  # ~ liquid Cu density (8.96 * (3.61/3.75)^3 = 8.0 g/cm3)
    ),
}
# the solid: the liquid's box, model protocol and data sizes, not melted, at 800 K (0.6 of Cu's
# melting point: a hot crystal that stays one) and EMT's 3.59 A lattice expanded by ~1 %
SYSTEMS["cu_solid"] = {**{k: v for k, v in SYSTEMS["cu_liquid"].items() if not k.startswith("melt")},
                       "temperature_K": 800.0, "lattice_A": 3.63}

SPLIT_FRAMES = "split_frames.json"


def make_calculator(system: str):
    if system == "ethanol":
        try:
            from tblite.ase import TBLite
        except ImportError as err:  # see docs/notes/md.md, "tblite and torch's OpenMP runtime"
            raise ImportError(
                "GFN2-xTB needs tblite, imported before torch: torch's bundled libgomp shares "
                "the soname libgomp.so.1 but lacks GOMP_5.0, which tblite's extension needs. "
                "Install tblite and import tblite.ase (or leignn_ocp) before torch.") from err

        return TBLite(method="GFN2-xTB", verbosity=0)
    from ase.calculators.emt import EMT

    return EMT()


def initial_atoms(system: str, spec: dict) -> Atoms:
    if system == "ethanol":
        from ase.build import molecule

        atoms = molecule("CH3CH2OH")
        atoms.pbc = False
        return atoms
    from ase.lattice.cubic import FaceCenteredCubic

    n = spec["size"]
    return FaceCenteredCubic("Cu", size=(n, n, n), latticeconstant=spec["lattice_A"], pbc=True)


def thermalise(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


def nose_hoover(atoms: Atoms, spec: dict, temperature_K: float | None = None):
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    return NoseHooverChainNVT(
        atoms,
        timestep=spec["timestep_fs"] * units.fs,
        temperature_K=temperature_K or spec["temperature_K"],
        tdamp=spec["tdamp_fs"] * units.fs,
    )


def run_segment(atoms, dyn, n_steps: int, traj_path: Path | None, save_every: int, t0_fs: float = 0.0):
    """Run ``n_steps``; write every ``save_every``-th frame (from step 0) with its time."""
    writer = Trajectory(str(traj_path), "w") if traj_path else None
    dt_fs = dyn.dt / units.fs
    start = dyn.nsteps

    def write():
        atoms.info["time_fs"] = t0_fs + (dyn.nsteps - start) * dt_fs
        writer.write(atoms)

    if writer is not None:
        dyn.attach(write, interval=save_every)
    try:
        dyn.run(n_steps)
    finally:
        if writer is not None:
            writer.close()
            dyn.observers.clear()


def make_trajectories(system: str, out: Path, spec: dict, seed: int, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start_state = None
    for run_name, run_ps, run_seed in (("reference", spec["ref_ps"], seed), ("replicate", spec["replicate_ps"], seed + 1)):
        rng = np.random.default_rng(run_seed)
        atoms = initial_atoms(system, spec)
        atoms.calc = make_calculator(system)
        t = time.perf_counter()
        if spec.get("melt_ps"):
            # melt the crystal, then equilibrate the liquid at the target temperature
            from ase.md.langevin import Langevin

            thermalise(atoms, spec["melt_temperature_K"], rng)
            melt = Langevin(atoms, timestep=spec["timestep_fs"] * units.fs,
                            temperature_K=spec["melt_temperature_K"], friction=0.02 / units.fs, rng=rng)
            melt.run(int(round(spec["melt_ps"] * 1000 / spec["timestep_fs"])))
        else:
            thermalise(atoms, spec["temperature_K"], rng)
        dyn = nose_hoover(atoms, spec)
        dyn.run(int(round(spec["equil_ps"] * 1000 / spec["timestep_fs"])))
        if run_name == "reference":
            start_state = atoms.copy()
            start_state.set_velocities(atoms.get_velocities())
        n_steps = int(round(run_ps * 1000 / spec["timestep_fs"]))
        run_segment(atoms, dyn, n_steps, out / f"{run_name}.traj", spec["save_every"])
        timings[f"{run_name}_s"] = round(time.perf_counter() - t, 1)
        log(f"[{system}] {run_name}: {run_ps} ps in {timings[f'{run_name}_s']} s -> {out / f'{run_name}.traj'}")
    # the equilibrated start of the reference production run: where model MD starts from
    from ase.io import write

    write(str(out / "start.traj"), start_state)
    return timings


def frames_to_lmdb(frames, path: Path, sids: Sequence[int] | None = None) -> int:
    """Write ASE frames (with energy and forces) as a fairchem S2EF LMDB directory, through
    fairchem's ``AtomsToGraphs`` (``batching.labelled_data``) and the package's atomic LMDB writer.

    ``sids`` name the frames (default ``0 .. len(frames) - 1``); give LMDBs that are read
    side by side distinct sids, since fairchem's evaluation keys predictions by sid."""
    import torch

    from leignn_ocp.batching import labelled_data
    from leignn_ocp.data import write_lmdb_dir

    sids = list(range(len(frames))) if sids is None else [int(i) for i in sids]
    if len(sids) != len(frames) or len(set(sids)) != len(sids):
        raise ValueError("frames_to_lmdb: need one distinct sid per frame")
    data = []
    for sid, atoms in zip(sids, frames):
        d = labelled_data(atoms, pbc=True)
        d.sid = torch.tensor([sid])
        d.fid = torch.tensor([0])
        d.energy = float(d.energy)
        data.append(d)
    write_lmdb_dir(path, data)
    return len(frames)


def make_lmdbs(system: str, out: Path, spec: dict, seed: int, n_train: int | None = None,
               n_val: int | None = None, log=print) -> dict:
    frames = read(str(out / "reference.traj"), ":")
    n_train = n_train or spec["n_train"]
    n_val = n_val or spec["n_val"]
    if n_train + n_val > len(frames):
        raise SystemExit(f"{system}: asked for {n_train}+{n_val} frames, the reference has {len(frames)}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(frames))
    tr, va = sorted(idx[:n_train].tolist()), sorted(idx[n_train:n_train + n_val].tolist())
    frames_to_lmdb([frames[i] for i in tr], out / "train", sids=tr)  # disjoint: distinct sids
    frames_to_lmdb([frames[i] for i in va], out / "val", sids=va)
    # the rest are test frames, where model MD starts (leignn_ocp.md.benchmark.start_frame)
    (out / SPLIT_FRAMES).write_text(json.dumps({"train": tr, "val": va}))
    e = np.array([frames[i].get_potential_energy() for i in tr])
    f = np.concatenate([frames[i].get_forces() for i in tr])
    stats = dict(n_train=len(tr), n_val=len(va), energy_mean=float(e.mean()), energy_std=float(e.std()),
                 forces_rms=float(np.sqrt((f ** 2).mean())))
    log(f"[{system}] LMDBs: {len(tr)} train / {len(va)} val frames -> {out}/train, {out}/val")
    return stats


def main(argv=None) -> int:
    """``leignn-md-reference``."""
    p = argparse.ArgumentParser(prog="leignn-md-reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=[*SYSTEMS, "all"], default="all")
    p.add_argument("--out", type=Path, default=Path("data/md"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-ps", type=float, help="length of the reference production run")
    p.add_argument("--replicate-ps", type=float, help="length of the independent replicate run")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--stage", choices=["all", "traj", "lmdb"], default="all",
                   help="traj: trajectories only (needs ase/tblite); lmdb: LMDBs from existing trajectories")
    a = p.parse_args(argv)
    for system in SYSTEMS if a.system == "all" else [a.system]:
        spec = dict(SYSTEMS[system])
        if a.ref_ps:
            spec["ref_ps"] = a.ref_ps
        if a.replicate_ps:
            spec["replicate_ps"] = a.replicate_ps
        out = a.out / system
        meta_path = out / "reference.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if a.stage in ("all", "traj"):
            meta = dict(system=system, seed=a.seed, protocol=spec, frame_interval_fs=spec["timestep_fs"] * spec["save_every"],
                        timings=make_trajectories(system, out, spec, a.seed))
        if a.stage in ("all", "lmdb"):
            meta["lmdb"] = make_lmdbs(system, out, spec, a.seed, a.n_train, a.n_val)
        meta_path.write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
