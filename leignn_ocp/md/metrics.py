"""MD benchmark metrics as the MDSim benchmark defines them (Fu et al., "Forces are not
enough", TMLR 2023), for ASE trajectories.

* **Stability, molecules** - bonds are the atom pairs closer than the sum of ASE's
  ``natural_cutoffs`` in the first reference frame; the simulation is unstable from the
  first frame in which any bond length deviates by more than ``0.5`` A from its mean over
  the reference trajectory.
* **Stability, condensed phases** - the trajectory is cut into consecutive windows of
  ``1`` ps; the simulation collapses at the start of the first window whose RDF differs
  from the reference RDF by more than ``1.0`` (RDF MAE, below).
* **RDF MAE** - g(r) with ``500`` bins on ``[0, 6]`` A over minimum-image distances,
  averaged over frames; ``MAE = mean_r |g(r) - g_ref(r)| * r_max`` (the area between the
  curves). For molecules the same is done with h(r), the normalised distribution of all
  interatomic distances.
* **Diffusivity** - ``D = slope(MSD(tau)) / 6`` from the mean squared displacement of the
  chosen (mobile) species, averaged over all time origins, fitted on a range of lag times;
  reported in A^2/ps and in 1e-5 cm^2/s (the unit of the LEIGNN/MDSim tables).

Each ``evaluate_*`` function writes a JSON and PNGs; the array functions are plain numpy.
Times come from ``atoms.info["time_fs"]`` (written by ``leignn-md`` / :func:`leignn_ocp.md.run.run_md`
and ``leignn-md-reference``) or from an explicit ``frame_dt_fs``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

log = logging.getLogger(__name__)

A2_PER_PS_TO_1E5_CM2_PER_S = 10.0  # 1 A^2/ps = 1e-4 cm^2/s = 10 x 1e-5 cm^2/s

Frames = Sequence[Atoms]


# ----------------------------------------------------------------------------- helpers
def load_frames(traj: str | Path | Frames, index: str = ":") -> list[Atoms]:
    """A trajectory file (any ASE format) or an already loaded list of Atoms."""
    if isinstance(traj, (str, Path)):
        from ase.io import read

        frames = read(str(traj), index)
        return frames if isinstance(frames, list) else [frames]
    return list(traj)


def frame_times_ps(frames: Frames, frame_dt_fs: float | None = None) -> np.ndarray:
    """Time of every frame in ps: ``frame_dt_fs`` if given, else ``atoms.info["time_fs"]``."""
    if frame_dt_fs is not None:
        return np.arange(len(frames)) * frame_dt_fs / 1000.0
    try:
        t = np.array([a.info["time_fs"] for a in frames], dtype=float)
    except KeyError as err:
        raise ValueError("frames carry no info['time_fs']; pass frame_dt_fs") from err
    return (t - t[0]) / 1000.0


def _perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    vol = abs(np.linalg.det(cell))
    return np.array([vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def pair_distances(atoms: Atoms, r_max: float) -> np.ndarray:
    """All distances i<j below ``r_max``.

    Periodic cells use the minimum image (MDSim's convention) when that is exact, i.e.
    when ``r_max`` is at most half the smallest perpendicular width of the cell; for a
    smaller cell every periodic image within ``r_max`` is counted instead (ASE's neighbour
    list), which is the exact g(r) and agrees with the minimum image wherever that holds.
    """
    pos = atoms.get_positions()
    if not atoms.pbc.any():
        iu = np.triu_indices(len(atoms), 1)
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)[iu]
        return d[d < r_max]
    cell = np.asarray(atoms.cell)
    if not atoms.pbc.all():
        raise ValueError("pair_distances: mixed periodicity is not supported")
    if r_max <= 0.5 * _perpendicular_widths(cell).min() + 1e-12:
        from ase.geometry import find_mic

        iu = np.triu_indices(len(atoms), 1)
        vec = pos[iu[1]] - pos[iu[0]]
        _, d = find_mic(vec, cell, pbc=True)
        return d[d < r_max]
    if r_max <= _perpendicular_widths(cell).min():
        # every image within r_max of a wrapped fractional difference lies one shift away
        frac = np.linalg.solve(cell.T, pos.T).T
        iu = np.triu_indices(len(atoms), 1)
        df = frac[iu[1]] - frac[iu[0]]
        df -= np.round(df)
        shifts = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], float)
        d = np.linalg.norm((df[:, None, :] + shifts[None]) @ cell, axis=-1).ravel()
        own = np.linalg.norm(shifts @ cell, axis=-1)  # an atom and its own images
        own = np.repeat(own[own > 0], len(atoms)) if len(atoms) else own[:0]
        d = np.concatenate([d, np.sort(own)[::2]])  # +S and -S are one pair
        return d[d < r_max]
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, r_max, self_interaction=False)
    # each unordered pair once: i<j, and half of an atom's own images (they come as +S / -S)
    return np.concatenate([d[i < j], np.sort(d[i == j])[::2]])


# ----------------------------------------------------------------------------- RDF / h(r)
def rdf(frames: Frames, nbins: int = 500, r_max: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Radial distribution function g(r) of all atoms, averaged over ``frames``.

    ``g(r) = V / (N (N - 1) / 2) * n_pairs(r, r + dr) / (4/3 pi ((r + dr)^3 - r^3))`` per
    frame (pair counts over unordered pairs), then averaged. Returns bin centres and g.
    """
    edges = np.linspace(0.0, r_max, nbins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = np.zeros(nbins)
    cell = np.asarray(frames[0].cell)
    if r_max > 0.5 * _perpendicular_widths(cell).min():
        log.info("rdf: r_max %.2f exceeds half the cell width; counting all periodic images", r_max)
    for atoms in frames:
        n = len(atoms)
        hist, _ = np.histogram(pair_distances(atoms, r_max), bins=edges)
        g += hist * atoms.get_volume() / (0.5 * n * (n - 1)) / shell
    return 0.5 * (edges[1:] + edges[:-1]), g / len(frames)


def distance_histogram(frames: Frames, nbins: int = 500, r_max: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """h(r): normalised density of all interatomic distances (molecules), averaged over frames.

    ``sum(h) * dr == fraction of pairs closer than r_max`` (1 when r_max spans the molecule).
    """
    edges = np.linspace(0.0, r_max, nbins + 1)
    dr = edges[1] - edges[0]
    h = np.zeros(nbins)
    for atoms in frames:
        n = len(atoms)
        hist, _ = np.histogram(pair_distances(atoms, r_max), bins=edges)
        h += hist / (0.5 * n * (n - 1) * dr)
    return 0.5 * (edges[1:] + edges[:-1]), h / len(frames)


def curve_mae(g: np.ndarray, g_ref: np.ndarray, r_max: float = 6.0) -> float:
    """MDSim's RDF error: ``mean |g - g_ref| * r_max`` (the area between the two curves)."""
    return float(np.mean(np.abs(np.asarray(g) - np.asarray(g_ref))) * r_max)


# ----------------------------------------------------------------------------- stability
def find_bonds(atoms: Atoms, mult: float = 1.0, skin: float = 0.3) -> np.ndarray:
    """Bonded pairs [n_bonds, 2] (i < j) in this frame: distance below the sum of the two
    ASE ``natural_cutoffs`` (covalent radii x ``mult``) plus ``skin`` (0.3 A, the default
    skin of ASE's ``NeighborList``; without it C-H at 1.09 A exceeds 0.76 + 0.31 A)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    radii = np.asarray(natural_cutoffs(atoms, mult=mult)) + 0.5 * skin
    i, j = neighbor_list("ij", atoms, radii, self_interaction=False)
    bonds = sorted({(int(a), int(b)) for a, b in zip(i, j) if a < b})
    return np.array(bonds, dtype=int).reshape(-1, 2)


def bond_lengths(frames: Frames, bonds: np.ndarray) -> np.ndarray:
    """Bond lengths [T, n_bonds] (minimum image for periodic frames)."""
    out = np.empty((len(frames), len(bonds)))
    for t, atoms in enumerate(frames):
        pos = atoms.get_positions()
        vec = pos[bonds[:, 1]] - pos[bonds[:, 0]]
        if atoms.pbc.any():
            from ase.geometry import find_mic

            _, d = find_mic(vec, atoms.cell, pbc=atoms.pbc)
        else:
            d = np.linalg.norm(vec, axis=-1)
        out[t] = d
    return out


def bond_stability(frames: Frames, ref_frames: Frames | None = None, threshold: float = 0.5) -> dict:
    """MDSim's molecular stability criterion.

    Bonds come from ``natural_cutoffs`` on the first reference frame (``frames[0]`` when no
    reference is given); their reference lengths are the means over ``ref_frames`` (over
    ``frames[:1]`` when no reference is given). The first frame whose largest bond
    deviation exceeds ``threshold`` A is the first unstable frame.
    """
    ref = list(ref_frames) if ref_frames is not None else list(frames[:1])
    bonds = find_bonds(ref[0])
    if len(bonds) == 0:
        raise ValueError("bond_stability: no bonds found in the first reference frame")
    ref_len = bond_lengths(ref, bonds).mean(axis=0)
    dev = np.abs(bond_lengths(frames, bonds) - ref_len).max(axis=1)  # [T]
    bad = np.flatnonzero(dev > threshold)
    first = int(bad[0]) if bad.size else None
    return dict(
        bonds=bonds.tolist(),
        reference_bond_lengths=ref_len.tolist(),
        max_deviation=dev.tolist(),
        threshold_A=threshold,
        first_unstable_frame=first,
        stable=first is None,
    )


def rdf_stability(frames: Frames, ref_frames: Frames, times_ps: np.ndarray, window_ps: float = 1.0,
                  threshold: float = 1.0, nbins: int = 500, r_max: float = 6.0) -> dict:
    """MDSim's condensed-phase stability: RDF MAE of consecutive ``window_ps`` windows
    against the RDF of the whole reference; collapse at the start of the first window whose
    MAE exceeds ``threshold``."""
    _, g_ref = rdf(ref_frames, nbins, r_max)
    times_ps = np.asarray(times_ps, dtype=float)
    # whole windows only: a trailing part shorter than a window joins the last window
    n_win = max(1, int(np.floor((times_ps[-1] - times_ps[0]) / window_ps + 1e-9)))
    win_id = np.minimum(np.floor((times_ps - times_ps[0]) / window_ps + 1e-9).astype(int), n_win - 1)
    starts, maes = [], []
    for w in np.unique(win_id):
        idx = np.flatnonzero(win_id == w)
        _, g = rdf([frames[i] for i in idx], nbins, r_max)
        starts.append(float(times_ps[idx[0]]))
        maes.append(curve_mae(g, g_ref, r_max))
    bad = [k for k, m in enumerate(maes) if not np.isfinite(m) or m > threshold]
    first = bad[0] if bad else None
    return dict(
        window_ps=window_ps,
        threshold=threshold,
        window_start_ps=starts,
        window_rdf_mae=maes,
        first_unstable_window=first,
        stable=first is None,
    )


# ----------------------------------------------------------------------------- diffusivity
def unwrapped_positions(frames: Frames) -> np.ndarray:
    """Positions [T, N, 3] with periodic jumps removed (each frame-to-frame displacement
    taken as its minimum image, so frames must be closer than half a cell apart)."""
    pos = np.stack([a.get_positions() for a in frames])
    if not frames[0].pbc.any():
        return pos
    from ase.geometry import find_mic

    steps = np.diff(pos, axis=0)
    cell = frames[0].cell
    flat, _ = find_mic(steps.reshape(-1, 3), cell, pbc=frames[0].pbc)
    return np.concatenate([pos[:1], pos[:1] + np.cumsum(flat.reshape(steps.shape), axis=0)])


def msd(positions: np.ndarray, max_lag: int | None = None) -> np.ndarray:
    """MSD(lag) for lag = 0..max_lag, averaged over atoms and every time origin."""
    T = positions.shape[0]
    max_lag = T - 1 if max_lag is None else min(max_lag, T - 1)
    out = np.zeros(max_lag + 1)
    for lag in range(1, max_lag + 1):
        d = positions[lag:] - positions[:-lag]
        out[lag] = np.mean(np.sum(d * d, axis=-1))
    return out


def diffusivity(frames: Frames, times_ps: np.ndarray, species: Sequence[str] | None = None,
                max_lag_fraction: float = 0.5, fit_range: tuple[float, float] = (0.2, 1.0)) -> dict:
    """Self-diffusion coefficient from the time-origin-averaged MSD.

    MSD is computed for lags up to ``max_lag_fraction`` of the run (so every lag has many
    origins) and fitted with a straight line on ``fit_range`` (fractions of that maximum
    lag; the short-time ballistic part is skipped). ``D = slope / 6``.
    """
    times_ps = np.asarray(times_ps, dtype=float)
    dt = float(np.median(np.diff(times_ps)))
    sym = np.array(frames[0].get_chemical_symbols())
    sel = np.ones(len(sym), bool) if not species else np.isin(sym, list(species))
    pos = unwrapped_positions(frames)[:, sel]
    # remove the drift of the selected atoms' centre of mass (thermostats keep it at ~0)
    pos = pos - pos.mean(axis=1, keepdims=True) + pos[:1].mean(axis=1, keepdims=True)
    max_lag = max(2, int(max_lag_fraction * (len(frames) - 1)))
    m = msd(pos, max_lag)
    lags = np.arange(len(m)) * dt
    lo, hi = int(fit_range[0] * max_lag), max(int(fit_range[1] * max_lag), int(fit_range[0] * max_lag) + 2)
    slope, intercept = np.polyfit(lags[lo:hi + 1], m[lo:hi + 1], 1)
    d = slope / 6.0
    return dict(
        species=list(species) if species else "all",
        n_atoms=int(sel.sum()),
        D_A2_per_ps=float(d),
        **{"D_1e-5_cm2_per_s": float(d * A2_PER_PS_TO_1E5_CM2_PER_S)},
        fit_lag_ps=[float(lags[lo]), float(lags[min(hi, len(m) - 1)])],
        lag_ps=lags.tolist(),
        msd_A2=m.tolist(),
        fit_intercept_A2=float(intercept),
    )


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(r: np.ndarray, curves: dict[str, np.ndarray], path: Path, ylabel: str, title: str) -> None:
    plot_series(r, curves, None, path, "r (Å)", ylabel, title)


def plot_series(t: np.ndarray, series: dict[str, np.ndarray], threshold: float | None, path: Path,
                xlabel: str, ylabel: str, title: str, step: bool = False) -> None:
    """Curves sharing one x axis ``t``."""
    plot_lines({label: (t, y) for label, y in series.items()}, path, xlabel, ylabel, title, threshold, step)


def plot_lines(lines: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, xlabel: str, ylabel: str,
               title: str, threshold: float | None = None, step: bool = False) -> None:
    """One PNG with a line per ``label: (x, y)`` and an optional horizontal threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in lines.items():
        (ax.step if step else ax.plot)(x, y, label=label, lw=1.2, **({"where": "post"} if step else {}))
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluate
def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _clean(x.item())
    return x


def evaluate_molecule(traj: str | Path | Frames, reference: str | Path | Frames, out_dir: str | Path,
                      name: str = "model", frame_dt_fs: float | None = None,
                      threshold: float = 0.5, nbins: int = 500, r_max: float = 6.0) -> dict:
    """Bond stability, h(r) MAE (over the stable part) and the plots, for a molecule."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, ref = load_frames(traj), load_frames(reference)
    t = frame_times_ps(frames, frame_dt_fs)
    stab = bond_stability(frames, ref, threshold)
    first = stab["first_unstable_frame"]
    stable_frames = frames[:first] if first is not None else frames
    stable_ps = float(t[first]) if first is not None else float(t[-1])
    r, h_ref = distance_histogram(ref, nbins, r_max)
    h_mae = None
    curves = {"reference": h_ref}
    if len(stable_frames) > 0:
        _, h = distance_histogram(stable_frames, nbins, r_max)
        h_mae = curve_mae(h, h_ref, r_max)
        curves[name] = h
    res = dict(
        kind="molecule", name=name, n_frames=len(frames), length_ps=float(t[-1]),
        stable=stab["stable"], stable_ps=stable_ps, first_unstable_frame=first,
        bond_threshold_A=threshold, n_bonds=len(stab["bonds"]),
        max_bond_deviation_A=float(np.max(stab["max_deviation"])),
        hr_mae=h_mae, hr_bins=nbins, hr_r_max_A=r_max,
    )
    plot_curves(r, curves, out_dir / f"{name}_hr.png", "h(r) (1/Å)", f"{name}: h(r), MAE {h_mae if h_mae is None else round(h_mae, 4)}")
    plot_series(t, {name: np.array(stab["max_deviation"])}, threshold, out_dir / f"{name}_stability.png",
                "time (ps)", "max |bond length - reference mean| (Å)", f"{name}: bond stability")
    (out_dir / f"{name}_metrics.json").write_text(json.dumps(_clean(res), indent=2))
    return res


def evaluate_condensed(traj: str | Path | Frames, reference: str | Path | Frames, out_dir: str | Path,
                       name: str = "model", species: Sequence[str] | None = None,
                       frame_dt_fs: float | None = None, ref_frame_dt_fs: float | None = None,
                       window_ps: float = 1.0, threshold: float = 1.0, nbins: int = 500, r_max: float = 6.0,
                       reference_diffusivity: dict | None = None) -> dict:
    """RDF-window stability, RDF MAE (over the stable part), diffusivity and plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, ref = load_frames(traj), load_frames(reference)
    t = frame_times_ps(frames, frame_dt_fs)
    t_ref = frame_times_ps(ref, ref_frame_dt_fs)
    stab = rdf_stability(frames, ref, t, window_ps, threshold, nbins, r_max)
    first = stab["first_unstable_window"]
    stable_ps = stab["window_start_ps"][first] if first is not None else float(t[-1])
    n_stable = int(np.searchsorted(t, stable_ps, side="left")) if first is not None else len(frames)
    r, g_ref = rdf(ref, nbins, r_max)
    curves = {"reference": g_ref}
    g_mae = diff = None
    if n_stable >= 2:
        _, g = rdf(frames[:n_stable], nbins, r_max)
        g_mae = curve_mae(g, g_ref, r_max)
        curves[name] = g
        diff = diffusivity(frames[:n_stable], t[:n_stable], species)
    ref_diff = reference_diffusivity or diffusivity(ref, t_ref, species)
    res = dict(
        kind="condensed", name=name, n_frames=len(frames), length_ps=float(t[-1]),
        stable=stab["stable"], stable_ps=float(stable_ps), rdf_window_ps=window_ps, rdf_threshold=threshold,
        window_start_ps=stab["window_start_ps"], window_rdf_mae=stab["window_rdf_mae"],
        rdf_mae=g_mae, rdf_bins=nbins, rdf_r_max_A=r_max,
        **{
            "D_1e-5_cm2_per_s": None if diff is None else diff["D_1e-5_cm2_per_s"],
            "D_reference_1e-5_cm2_per_s": ref_diff["D_1e-5_cm2_per_s"],
            "D_abs_error_1e-5_cm2_per_s": None if diff is None
            else abs(diff["D_1e-5_cm2_per_s"] - ref_diff["D_1e-5_cm2_per_s"]),
        },
        diffusing_species=list(species) if species else "all",
    )
    plot_curves(r, curves, out_dir / f"{name}_rdf.png", "g(r)", f"{name}: RDF, MAE {g_mae if g_mae is None else round(g_mae, 4)}")
    plot_series(np.array(stab["window_start_ps"]), {name: np.array(stab["window_rdf_mae"], dtype=float)}, threshold,
                out_dir / f"{name}_stability.png", "window start (ps)", f"RDF MAE of {window_ps:g} ps window",
                f"{name}: RDF stability", step=True)
    if diff is not None:
        plot_lines({f"reference (D={ref_diff['D_1e-5_cm2_per_s']:.3g})": (ref_diff["lag_ps"], ref_diff["msd_A2"]),
                    f"{name} (D={diff['D_1e-5_cm2_per_s']:.3g})": (diff["lag_ps"], diff["msd_A2"])},
                   out_dir / f"{name}_msd.png", "lag (ps)", "MSD (Å²)", "MSD; D in 1e-5 cm²/s")
    (out_dir / f"{name}_metrics.json").write_text(json.dumps(_clean(res), indent=2))
    return res


def nve_energy_drift(frames: Frames, times_ps: np.ndarray) -> dict:
    """Total-energy drift of an NVE run: slope of a line fitted to E_tot(t) (eV/ps and
    meV/ps/atom) and the largest |E_tot(t) - E_tot(0)| per atom. Frames need an attached
    energy (``get_potential_energy``) and velocities."""
    e = np.array([a.get_potential_energy() + a.get_kinetic_energy() for a in frames])
    n = len(frames[0])
    times_ps = np.asarray(times_ps, dtype=float)
    slope = float(np.polyfit(times_ps, e, 1)[0]) if len(e) > 1 else 0.0
    return dict(
        n_atoms=n, length_ps=float(times_ps[-1] - times_ps[0]),
        drift_eV_per_ps=slope, drift_meV_per_ps_per_atom=1000 * slope / n,
        max_abs_dev_meV_per_atom=float(1000 * np.max(np.abs(e - e[0])) / n),
        total_energy_eV=e.tolist(), time_ps=times_ps.tolist(),
    )


warnings.filterwarnings("ignore", message=".*natural_cutoffs.*")
