"""Input checks of the models: bad structures stop with an error that names them.

Kept apart from ``model.py`` (which reads like the paper); the messages are part of the tested
behaviour (``tests/test_fuzz.py``, README "What the model refuses and why"). LEIGNN, CGCNN and MACE
share them. Cost: the flags of every check but the close-pair search are reduced on the device
and read back in one host sync; the close-pair search is one neighbour search at ``min_distance``
(PyG's ``radius_graph``), far smaller than the cutoff graph. ``leignn-benchmark`` times both.
"""

from __future__ import annotations

import itertools

import torch

# Atoms closer than this (Å) are taken for a duplicated atom. The shortest bond there is, H2's, is
# 0.74 Å; nuclei 0.1 Å apart repel by tens of keV, far outside anything a model was trained on.
# Below 0.01 Å fairchem's periodic graph drops the pair silently; at 0 the molecule path gives NaN.
MIN_DISTANCE = 0.1
# At most this many periodic images of the cell (fairchem's radius_graph_pbc searches
# prod(2 ceil(r_c / h_k) + 1) of them, h_k the cell's heights): 13^3, every height at least r_c / 6
# (1 Å at 6 Å). A real crystal's primitive cell needs 7^3 = 343 at 6 Å; what the cap stops is a
# mistyped cell, whose image search would otherwise fill the memory.
MAX_IMAGES = 13 ** 3

_SHIFTS = torch.tensor([s for s in itertools.product((-1, 0, 1), repeat=3) if any(s)])  # [26, 3]


def periodic_axes(data) -> list[bool]:
    """The axes fairchem's radius_graph_pbc treats as periodic: all three unless ``data.pbc`` says
    otherwise (per axis, the same for every structure of a batch)."""
    pbc = getattr(data, "pbc", None)
    if pbc is None:
        return [True, True, True]
    # [B, 3]; AtomsToGraphs' [3] per structure batches to [3B]; one host read for the three axes
    return pbc.reshape(-1, 3).bool().any(dim=0).tolist()


def cell_heights(cell: torch.Tensor) -> torch.Tensor:
    """Distances between opposite faces of each cell, [B, 3, 3] -> [B, 3] (float64): h_k = |V| /
    |a_{k+1} x a_{k+2}|. The cutoff sphere reaches ceil(r_c / h_k) images along a_k."""
    c = cell.detach().double()
    area = torch.stack([torch.linalg.cross(c[:, (k + 1) % 3], c[:, (k + 2) % 3]).norm(dim=-1)
                        for k in range(3)], dim=-1)  # [B, 3]
    vol = torch.linalg.det(c).abs().unsqueeze(-1)  # [B, 1]
    return vol / area.clamp_min(1e-300)


def wrap_positions(pos: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, axes: list[bool]) -> torch.Tensor:
    """Positions moved by whole lattice vectors into the cell along the periodic ``axes``.

    fairchem's radius_graph_pbc searches the images a pair inside the cell can need: an atom
    several cells away would lose neighbours. The shift is constant (no gradient), so energies,
    forces and -dE/dx are unchanged; atoms already inside the cell do not move at all.
    """
    frac = torch.linalg.solve(cell[batch].transpose(1, 2), pos.unsqueeze(-1)).squeeze(-1)  # [N, 3]
    shift = torch.floor(frac.detach()) * torch.tensor(axes, dtype=pos.dtype, device=pos.device)  # [N, 3]
    return pos - torch.einsum("nk,nkj->nj", shift, cell[batch])


# Up to this many atoms in a batch, close pairs come from every pair of a structure in every
# neighbouring image (one dense [27, N, N] distance tensor) instead of the ghost-atom neighbour
# search: on tiny cells and MD-size molecules the search's fixed cost (solve, nonzero, sort, PyG's
# kernel) is most of the check. Measured on one CPU thread (2- to 54-atom Cu batches): 0.23 vs
# 0.51 ms at 2 atoms, 0.30 vs 0.37 ms at 27, 0.84 vs 0.42 ms at 54.
DENSE_PAIRS_MAX_ATOMS = 32


def close_pairs(pos, batch, cell=None, axes=(False, False, False), r: float = MIN_DISTANCE):
    """Pairs of atoms closer than ``r``, across periodic images where ``axes`` say so.

    Positions are wrapped into the cell. Small batches (at most ``DENSE_PAIRS_MAX_ATOMS`` atoms)
    compare every pair of a structure in the 27 images around it; larger ones give the atoms within
    r of a face a ghost copy on the far side (at most 26 each, corners included), so one
    non-periodic search at radius r sees every periodic pair. Either is exact when the cell heights
    are at least r (checked before): a pair closer than r is then at most one image apart along
    each lattice vector. Returns receiver, sender (atom indices of the batch) and distance, [P] each.
    """
    n = pos.shape[0]
    pos = pos.detach()
    if n <= DENSE_PAIRS_MAX_ATOMS:
        return _close_pairs_dense(pos, batch, cell, axes, r)
    from torch_geometric.nn import radius_graph

    owner = torch.arange(n, device=pos.device)
    if cell is not None and any(axes):
        cell, ax, frac, x = _wrapped_fractional(pos, batch, cell, axes)
        margin = (r / cell_heights(cell)).to(pos.dtype)[batch]  # [N, 3] in fractional units
        near_lo = (frac < margin) & ax  # a ghost at +a_k sees the far face
        near_hi = (frac > 1 - margin) & ax
        s = _SHIFTS.to(pos.device)  # [26, 3]
        need = ((s == 0) | ((s == 1) & near_lo[:, None]) | ((s == -1) & near_hi[:, None])).all(-1)  # [N, 26]
        atom, k = need.nonzero(as_tuple=True)
        ghosts = x[atom] + torch.einsum("gk,gkj->gj", s[k].to(pos.dtype), cell[batch[atom]])  # [G, 3]
        pos, owner = torch.cat([x, ghosts]), torch.cat([owner, atom])
    b = batch[owner]
    order = torch.argsort(b, stable=True)  # radius_graph wants the batch vector sorted
    pos, owner, b = pos[order], owner[order], b[order]
    src, dst = radius_graph(pos, r=r, batch=b, loop=False, max_num_neighbors=8)
    d = (pos[src] - pos[dst]).norm(dim=-1)
    keep = (owner[src] != owner[dst]) & (d < r)
    return owner[dst][keep], owner[src][keep], d[keep]


def _wrapped_fractional(pos, batch, cell, axes):
    """(cell in the positions' dtype, periodic-axis mask [3], fractional coordinates wrapped into
    [0, 1) along those axes [N, 3], the wrapped positions [N, 3])."""
    cell = cell.detach().to(pos.dtype)
    ax = torch.tensor(axes, device=pos.device)
    frac = torch.linalg.solve(cell[batch].transpose(1, 2), pos.unsqueeze(-1)).squeeze(-1)  # [N, 3]
    frac = torch.where(ax, frac - torch.floor(frac), frac)
    return cell, ax, frac, torch.einsum("nk,nkj->nj", frac, cell[batch])


def _close_pairs_dense(pos, batch, cell, axes, r: float):
    """:func:`close_pairs` by brute force over the ordered pairs (i, j) of each structure, [S, N, N]."""
    n = pos.shape[0]
    x, shifts = pos, pos.new_zeros(1, 3)  # [N, 3], [1, 3]: molecules have one image
    if cell is not None and any(axes):
        cell, ax, _, x = _wrapped_fractional(pos, batch, cell, axes)
        s = torch.cat([_SHIFTS.new_zeros(1, 3), _SHIFTS]).to(pos.device)  # [27, 3]
        shifts = s[(s[:, ~ax] == 0).all(-1)].to(pos.dtype)  # [S, 3]: steps along periodic axes only
    image = torch.einsum("sk,nkj->snj", shifts, cell[batch]) if shifts.shape[0] > 1 else shifts[:, None]  # [S, N|1, 3]
    d = (x[None, None, :] + image[:, None] - x[None, :, None]).norm(dim=-1)  # [S, N, N]: |x_j + image - x_i|
    idx = torch.arange(n, device=pos.device)
    pair = (batch[:, None] == batch[None, :]) & (idx[:, None] != idx[None, :])  # [N, N]
    close = (d < r) & pair  # [S, N, N]
    _, i, j = close.nonzero(as_tuple=True)
    return i, j, d[close]


@torch.compiler.disable  # eager under torch.compile: host-side branching, and PyG's search has no fake kernel
def check_input(data, *, model: str, use_pbc: bool, cutoff: float, num_elements: int | None = None,
                min_distance: float = MIN_DISTANCE, max_images: int = MAX_IMAGES,
                pairs_in_graph: bool = False, elements: str = "the embedding") -> list[bool] | None:
    """Raise ValueError on input a model would turn into NaN, a silently wrong graph or garbage.

    ``num_elements``: atomic numbers must be whole and in 1..num_elements (None: the caller checks
    its own element table). ``min_distance`` (Å, 0 turns the search off): no two atoms, nor an
    atom and a periodic image of another, closer than this. ``max_images``: the most periodic
    images of the cell the cutoff graph may need. ``pairs_in_graph``: the caller checks the
    non-periodic pairs on its own graph (:func:`check_edge_lengths`), so the search runs only on the
    periodic path, where fairchem's graph drops pairs under 0.01 Å. ``elements``: what the range
    1..num_elements is called in the error. Returns the periodic axes of the batch (as fairchem's
    graph reads ``data.pbc``) on the periodic path, else None.
    """
    pos, z, natoms = data.pos, data.atomic_numbers, data.natoms
    # ---- shapes: known on the host, no sync
    if z.numel() == 0:
        raise ValueError(f"{model}: empty structure (no atoms)")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"{model}: positions must be [N, 3], got {list(pos.shape)}")
    n = pos.shape[0]
    if z.dim() != 1 or z.shape[0] != n:
        raise ValueError(f"{model}: atomic_numbers must be [N] = [{n}] (one per position), got {list(z.shape)}")
    if not torch.is_tensor(natoms) or natoms.dim() != 1:
        raise ValueError(f"{model}: natoms must be a [B] tensor of a batch (fairchem's data_list_collater), "
                         f"got {natoms!r}")
    nb = natoms.numel()
    batch = getattr(data, "batch", None)
    if batch is None or batch.shape != (n,):
        raise ValueError(f"{model}: batch must be [N] = [{n}] (the structure of each atom), "
                         f"got {None if batch is None else list(batch.shape)}")
    pbc = getattr(data, "pbc", None)
    if pbc is not None and pbc.numel() != 3 * nb:
        raise ValueError(f"{model}: pbc must be [B, 3] = [{nb}, 3] (or [3] per structure), got {list(pbc.shape)}")
    axes = periodic_axes(data)
    periodic = use_pbc and any(axes)
    if use_pbc:
        cell = getattr(data, "cell", None)
        if cell is None:
            raise ValueError(f"{model}: use_pbc=True but the structure has no cell")
        if cell.shape not in {(nb, 3, 3), (nb * 3, 3)}:
            raise ValueError(f"{model}: cell must be [B, 3, 3] = [{nb}, 3, 3] (one per structure), "
                             f"got {list(cell.shape)}")
        cell = cell.view(nb, 3, 3)

    # ---- values: flags on the device, one sync
    flags = {"positions": torch.isfinite(pos).all()}
    if num_elements is not None:
        zl = z.long()
        flags["elements"] = ((zl.to(z.dtype) == z) & (zl >= 1) & (zl <= num_elements)).all()
    counts = torch.zeros(nb, dtype=torch.long, device=pos.device).index_add_(
        0, batch.long().clamp(0, nb - 1), torch.ones_like(batch, dtype=torch.long))
    flags["batch"] = ((batch >= 0) & (batch < nb)).all() & (batch[1:] >= batch[:-1]).all() & \
        (counts == natoms).all() & (natoms > 0).all()
    if periodic:
        flags["cell_finite"] = torch.isfinite(cell).all()
        vol = torch.linalg.det(cell.detach().double()).abs()
        flags["cell_volume"] = (vol > 1e-6).all()  # also False for NaN
        h = cell_heights(cell)[:, axes]  # [B, periodic axes]
        flags["cell_height"] = (h >= min_distance).all()
        images = (2 * torch.ceil(cutoff / h) + 1).prod(dim=-1)  # [B]
        flags["images"] = (images <= max_images).all()
    ok = dict(zip(flags, torch.stack(list(flags.values())).tolist()))

    if not ok["positions"]:
        bad = (~torch.isfinite(pos).all(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"{model}: non-finite positions for atoms {bad[:10]}")
    if not ok.get("elements", True):
        zl = z.long()
        bad = sorted(set(z[(zl < 1) | (zl > num_elements) | (zl.to(z.dtype) != z)].tolist()))
        raise ValueError(f"{model}: atomic numbers {bad} outside {elements} (1..{num_elements})")
    if not ok["batch"]:
        raise ValueError(f"{model}: inconsistent batch: natoms {natoms.tolist()[:10]} (sum {int(natoms.sum())}) "
                         f"but {n} atoms with per-structure counts {counts.tolist()[:10]}; batch must be "
                         f"sorted, in 0..{nb - 1}, and every structure needs an atom")
    if periodic:
        if not ok["cell_finite"]:
            raise ValueError(f"{model}: use_pbc=True but the cell has non-finite entries")
        if not ok["cell_volume"]:
            bad = (~(vol > 1e-6)).nonzero().flatten().tolist()
            raise ValueError(f"{model}: use_pbc=True but structures {bad} in the batch have a zero-volume "
                             "cell (periodic structure without a cell; a molecule needs use_pbc=False)")
        if not ok["cell_height"]:
            s, k = (h < min_distance).nonzero()[0].tolist()
            axis = [i for i, a in enumerate(axes) if a][k]
            raise ValueError(f"{model}: structure {s} has a degenerate cell: {h[s, k].item():.3g} Å between "
                             f"the faces along lattice vector {axis} (under min_distance={min_distance} Å, "
                             f"every atom sits on its own periodic image)")
        if not ok["images"]:
            s = int(images.argmax())
            raise ValueError(f"{model}: structure {s} would need {int(images[s])} periodic images for the "
                             f"{cutoff} Å cutoff (cell heights {[round(x, 3) for x in h[s].tolist()]} Å; "
                             f"max_images={max_images}): is the cell in Å and right?")
    if min_distance > 0 and (periodic or not pairs_in_graph):
        i, j, d = close_pairs(pos, batch, cell if periodic else None,
                              axes if periodic else (False,) * 3, min_distance)
        _raise_closest(i, j, d, batch, model, min_distance, periodic)
    return axes if periodic else None


def check_edge_lengths(dist, src, dst, batch, *, model: str, min_distance: float = MIN_DISTANCE) -> None:
    """The close-pair check on a non-periodic graph that holds every pair within the cutoff (nearest
    first): one reduction, instead of :func:`close_pairs`' search (``check_input(pairs_in_graph=True)``)."""
    if min_distance > 0 and dist.numel() and bool(dist.min() < min_distance):
        close = dist < min_distance
        _raise_closest(dst[close], src[close], dist[close].detach(), batch, model, min_distance, False)


def _raise_closest(i, j, d, batch, model: str, min_distance: float, periodic: bool) -> None:
    """The error for the closest of the pairs (i, j) at distances d [P], if there is one."""
    if not i.numel():
        return
    k = int(d.argmin())
    s = int(batch[i[k]])
    first = int((batch < s).sum())  # the structure's first atom in the batch
    a, b = sorted((int(i[k]) - first, int(j[k]) - first))
    where = " (through a periodic image)" if periodic else ""
    raise ValueError(f"{model}: atoms {a} and {b} of structure {s} are {d[k].item():.3g} Å apart{where}, "
                     f"under min_distance={min_distance} Å: a duplicated atom?")
