"""An ASE constraint that moves a group of atoms as one rigid body (used to sample adsorbates).

Why not ASE's FixBondLengths (SHAKE/RATTLE) over all pairs of an adsorbate: that system is
over-determined and does not converge for larger adsorbates (docs/notes/data.md); projecting onto
rigid motions is exact and cheap.
"""

from __future__ import annotations

import numpy as np


def _kabsch(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``ref`` [n,3] rotated and translated onto ``new`` [n,3] (least squares, no reflection)."""
    rc, nc = ref.mean(0), new.mean(0)
    h = (ref - rc).T @ (new - nc)  # [3,3]
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return (ref - rc) @ rot.T + nc


class RigidBody:
    """Keeps ``indices`` at their current internal geometry; they translate and rotate together.

    Positions are projected onto the best rigid fit of the reference geometry; forces onto the
    6 rigid-body modes (net force and torque), so optimizers relax only the body's pose.
    Positions are taken unwrapped (a molecule must not straddle the cell boundary when created).
    """

    def __init__(self, indices, positions: np.ndarray):
        self.index = np.asarray(indices, dtype=int)
        self.ref = np.array(positions, dtype=float)[self.index]  # [n,3]

    def adjust_positions(self, atoms, new):
        if len(self.index) > 1:
            new[self.index] = _kabsch(self.ref, new[self.index])

    def adjust_forces(self, atoms, forces):
        f = forces[self.index]  # [n,3]
        r = atoms.positions[self.index] - atoms.positions[self.index].mean(0)  # [n,3]
        v = f.mean(0)
        if len(self.index) > 1:
            torque = np.cross(r, f).sum(0)
            inertia = (r * r).sum() * np.eye(3) - r.T @ r  # [3,3]
            omega = np.linalg.pinv(inertia, rcond=1e-8) @ torque
            forces[self.index] = v + np.cross(omega, r)
        else:
            forces[self.index] = v

    def adjust_momenta(self, atoms, momenta):  # pragma: no cover - not used by optimizers here
        self.adjust_forces(atoms, momenta)

    def get_removed_dof(self, atoms):
        n = len(self.index)
        return max(0, 3 * n - 6) if n > 2 else (1 if n == 2 else 0)

    def index_shuffle(self, atoms, ind):
        raise NotImplementedError  # dropped when atoms are sliced (e.g. by anomaly detection)

    def todict(self):
        return {"name": "RigidBody", "kwargs": {"indices": self.index.tolist()}}

    def __repr__(self):
        return f"RigidBody({len(self.index)} atoms)"
