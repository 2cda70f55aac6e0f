"""Input checks of the LEIGNN model: bad structures stop with an error that names them.

Kept apart from ``model.py`` (which reads like the paper); the messages are part of the
tested behaviour.
"""

from __future__ import annotations

import torch


def check_input(data, num_elements: int, use_pbc: bool) -> None:
    """Raise on input the model would otherwise turn into NaN or garbage."""
    z = data.atomic_numbers
    if z.numel() == 0:
        raise ValueError("LEIGNN: empty structure (no atoms)")
    if not torch.isfinite(data.pos).all():
        bad = (~torch.isfinite(data.pos).all(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"LEIGNN: non-finite positions for atoms {bad[:10]}")
    zl = z.long()
    if (zl.to(z.dtype) != z).any() or zl.min() < 1 or zl.max() > num_elements:
        bad = sorted(set(z[(zl < 1) | (zl > num_elements) | (zl.to(z.dtype) != z)].tolist()))
        raise ValueError(
            f"LEIGNN: atomic numbers {bad} outside the embedding (1..{num_elements})"
        )
    if use_pbc:
        cell = getattr(data, "cell", None)
        if cell is None:
            raise ValueError("LEIGNN: use_pbc=True but the structure has no cell")
        cell = cell.view(-1, 3, 3)
        if not torch.isfinite(cell).all():
            raise ValueError("LEIGNN: use_pbc=True but the cell has non-finite entries")
        vol = torch.linalg.det(cell.double()).abs()
        pbc = getattr(data, "pbc", None)
        if pbc is None or bool(torch.atleast_2d(pbc).any()):
            if (vol < 1e-6).any():
                bad = (vol < 1e-6).nonzero().flatten().tolist()
                raise ValueError(
                    f"LEIGNN: use_pbc=True but structures {bad} in the batch have a zero-volume "
                    "cell (periodic structure without a cell)"
                )


def check_baseline_input(data, use_pbc: bool, model: str) -> None:
    """The checks the baselines of ``leignn_ocp.baselines`` share: atoms present, finite positions,
    and a cell of non-zero volume on the periodic path. Element tables are each model's own."""
    if data.atomic_numbers.numel() == 0:
        raise ValueError(f"{model}: empty structure (no atoms)")
    if not torch.isfinite(data.pos).all():
        raise ValueError(f"{model}: non-finite atom positions")
    if use_pbc:
        cell = getattr(data, "cell", None)
        if cell is None:
            raise ValueError(f"{model}: use_pbc=True but the structure has no cell")
        vol = torch.linalg.det(cell.view(-1, 3, 3).detach().double()).abs()
        if not (vol > 1e-6).all():  # also NaN
            bad = (~(vol > 1e-6)).nonzero().flatten().tolist()
            raise ValueError(f"{model}: use_pbc=True but structures {bad} of the batch have a "
                             "zero-volume cell (a molecule needs use_pbc=False)")
