"""The periodic radius graph in linear time: fairchem's edges from a tree search over image atoms.

fairchem's ``radius_graph_pbc`` measures every pair of atoms of a structure in every image of its
cell it searches, N^2 x (2R+1)^3 distances: at 1,000 atoms it takes longer than LEIGNN's own
forward, and its memory ends a few thousand atoms later (:func:`main` times both searches;
README, "Large periodic systems"). :func:`radius_graph_pbc_cells` builds the same graph from the images of the
atoms near the cell (the image offsets fairchem would search, the ones that reach within the
cutoff of the cell) and one PyG / torch_cluster ``radius`` query (a k-d tree on CPU): O(N) for a
fixed density. It keeps fairchem's conventions and order: candidates sorted by (receiver i,
sender j, image in fairchem's ``cartesian_prod`` order), the same radius and 0.01 Å masks, and
fairchem's own ``get_max_neighbors_mask``, so that the K nearest are chosen as fairchem chooses
them (``tests/test_graph.py`` checks the edge lists are equal).
"""

from __future__ import annotations

import itertools

import torch
from fairchem.core.common.utils import get_max_neighbors_mask

from leignn_ocp.checks import cell_heights


@torch.compiler.disable  # eager under torch.compile: torch_cluster's radius has no fake-tensor kernel
def radius_graph_pbc_cells(pos: torch.Tensor, cell: torch.Tensor, natoms: torch.Tensor, batch: torch.Tensor,
                           radius: float, max_num_neighbors_threshold: int, enforce_max_neighbors_strictly: bool,
                           pbc: list[bool]):
    """fairchem's ``radius_graph_pbc`` outputs (edge_index [2, E] as (sender j, receiver i),
    integer-valued image offsets [E, 3] of j, edges per structure [B]) for positions [N, 3] and
    cells [B, 3, 3]; ``pbc``: the periodic axes (the same for the batch, as fairchem requires)."""
    from torch_cluster import radius as tree_radius

    device = pos.device
    cell = cell.view(-1, 3, 3)
    x = pos.detach()
    # images fairchem searches: R_k = ceil(r / h_k) along each periodic axis (the batch's largest)
    heights = cell_heights(cell)  # [B, 3]
    reps = [int(torch.ceil(radius / heights[:, k]).max()) if pbc[k] else 0 for k in range(3)]
    steps = torch.tensor(list(itertools.product(*[range(-r, r + 1) for r in reps])),
                         dtype=x.dtype, device=device)  # [S, 3], fairchem's cartesian_prod order
    # an image atom can be within r of an atom of the structure only if its fractional
    # coordinates reach within r / h_k of the range the structure's atoms span
    frac = torch.linalg.solve(cell[batch].transpose(1, 2).to(x.dtype), x.unsqueeze(-1)).squeeze(-1)  # [N, 3]
    n_struct = natoms.numel()
    lo = torch.full((n_struct, 3), float("inf"), dtype=x.dtype, device=device).scatter_reduce(
        0, batch[:, None].expand(-1, 3), frac, "amin")
    hi = torch.full((n_struct, 3), float("-inf"), dtype=x.dtype, device=device).scatter_reduce(
        0, batch[:, None].expand(-1, 3), frac, "amax")
    margin = (radius / heights).to(x.dtype) * (1 + 1e-6) + 1e-9  # [B, 3]
    f_img = frac[:, None, :] + steps[None]  # [N, S, 3]
    b = batch[:, None]
    keep = ((f_img >= (lo - margin)[b]) & (f_img <= (hi + margin)[b])).all(-1)  # [N, S]
    atom, step = keep.nonzero(as_tuple=True)  # image atoms, sorted by atom (so by structure)
    img_pos = x[atom] + torch.einsum("gk,gkj->gj", steps[step], cell[batch[atom]].to(x.dtype))  # [G, 3]
    # every image atom within r of each atom (the tree's radius test may differ from fairchem's
    # r^2 <= radius^2 in the last bit: search a hair wider, then apply fairchem's test)
    images = keep.sum(dim=1)  # [N]: image atoms of each atom
    per_query = int(images.new_zeros(n_struct).index_add_(0, batch, images).max())  # most of one structure
    rows, cols = tree_radius(img_pos, x, radius * (1 + 1e-6), batch_x=batch[atom], batch_y=batch,
                             max_num_neighbors=max(per_query, 1))
    i, j, s = rows, atom[cols], step[cols]
    offsets = steps[s]  # [P, 3]
    # the distance as fairchem computes it: pos_j + (cell^T offset) - pos_i, squared and summed
    shift = torch.bmm(cell[batch[i]].transpose(1, 2).float(), offsets.float().unsqueeze(-1)).squeeze(-1)
    d2 = torch.sum((pos.detach()[i].float() - (pos.detach()[j].float() + shift)) ** 2, dim=1)
    mask = (d2 <= radius * radius) & (d2 > 0.0001)
    i, j, s, d2 = i[mask], j[mask], s[mask], d2[mask]
    n = pos.shape[0]
    order = torch.argsort((i * n + j) * steps.shape[0] + s)  # fairchem's candidate order
    i, j, s, d2 = i[order], j[order], s[order], d2[order]
    keep_k, neighbors = get_max_neighbors_mask(
        natoms=natoms, index=i, atom_distance=d2, max_num_neighbors_threshold=max_num_neighbors_threshold,
        enforce_max_strictly=enforce_max_neighbors_strictly)
    i, j, s = i[keep_k], j[keep_k], s[keep_k]
    return torch.stack((j, i)), steps[s].float(), neighbors


def main(argv=None) -> int:
    """``python -m leignn_ocp.graph``: both searches timed on rattled fcc Cu supercells (``--cutoff``, 50
    neighbours, one thread); fairchem's only up to ``--fairchem-max`` atoms (its memory is N^2).
    ``--forward CONFIG``: also a LEIGNN forward (CONFIG's model block, one set of weights) with each
    search, median of interleaved rounds, and whether the forces are bit-identical."""
    import argparse
    import statistics
    import time

    from ase.build import bulk

    from leignn_ocp.batching import atoms_to_batch

    p = argparse.ArgumentParser(prog="python -m leignn_ocp.graph", description=main.__doc__)
    p.add_argument("--repeats", default="3x3x3,5x5x5,5x5x10,10x10x10,10x10x20", help="conventional cells, AxBxC,...")
    p.add_argument("--fairchem-max", type=int, default=1000)
    p.add_argument("--cutoff", type=float, default=6.0)
    p.add_argument("--lattice", type=float, default=3.61, help="fcc lattice constant (Å)")
    p.add_argument("--forward", metavar="CONFIG", help="time a LEIGNN forward of this config's model block too")
    a = p.parse_args(argv)
    from fairchem.core.common.utils import radius_graph_pbc

    torch.set_num_threads(1)
    models = None
    if a.forward:
        from leignn_ocp.lineup import build_model, load_config

        block = load_config(a.forward)["model"]
        models = {g: build_model(dict(block, pbc_graph=g), seed=0).eval() for g in ("fairchem", "cells")}
        models["cells"].load_state_dict(models["fairchem"].state_dict())
    for rep in a.repeats.split(","):
        atoms = bulk("Cu", "fcc", a=a.lattice, cubic=True).repeat(tuple(int(x) for x in rep.split("x")))
        atoms.rattle(0.05, seed=0)
        b = atoms_to_batch([atoms])
        args = (b.pos, b.cell, b.natoms, b.batch, a.cutoff, 50, True, [True] * 3)
        radius_graph_pbc_cells(*args)  # warm-up
        t0 = time.perf_counter()
        ours = radius_graph_pbc_cells(*args)
        line = f"{len(atoms)} atoms, {ours[0].shape[1]} edges: tree search {1e3 * (time.perf_counter() - t0):.1f} ms"
        if len(atoms) <= a.fairchem_max:
            t0 = time.perf_counter()
            theirs = radius_graph_pbc(b, a.cutoff, 50, True)
            same = all(torch.equal(x, y) for x, y in zip(theirs, ours))
            line += f", fairchem's radius_graph_pbc {1e3 * (time.perf_counter() - t0):.1f} ms, same edges: {same}"
            if models:
                times = {g: [] for g in models}
                with torch.no_grad():
                    forces = {g: m(b.clone())["forces"] for g, m in models.items()}  # [N, 3]; also the warm-up
                    for _ in range(5):
                        for g, m in models.items():
                            t0 = time.perf_counter()
                            m(b.clone())
                            times[g].append(1e3 * (time.perf_counter() - t0))
                line += (f"; forward {statistics.median(times['fairchem']):.1f} ms with fairchem's search, "
                         f"{statistics.median(times['cells']):.1f} ms with the tree's, same forces: "
                         f"{torch.equal(forces['fairchem'], forces['cells'])}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
