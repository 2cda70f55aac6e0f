"""leignn_ocp.graph: fairchem's periodic radius graph, edge for edge, from a linear-time search."""

from __future__ import annotations

import pytest
import torch
from ase.build import add_adsorbate, bulk, fcc111
from fairchem.core.common.utils import radius_graph_pbc

from leignn_ocp import LEIGNN
from leignn_ocp.batching import atoms_to_batch
from leignn_ocp.graph import radius_graph_pbc_cells


def _crystal(repeat, seed=0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


def _slab(seed=2):
    slab = fcc111("Cu", (3, 3, 4), vacuum=8.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.rattle(0.02, seed=seed)
    return slab


def _skewed():
    atoms = bulk("Cu", "fcc", a=3.6)  # the primitive cell: 60° between lattice vectors, 1 atom
    atoms.rattle(0.05, seed=1)
    return atoms.repeat((2, 1, 3))


CASES = {
    "108-atom crystal": ([_crystal((3, 3, 3))], (True,) * 3, 50),
    "a batch of two sizes": ([_crystal((2, 2, 2), 1), _crystal((3, 3, 3), 2)], (True,) * 3, 50),
    "1-atom primitive cell (7^3 images)": ([bulk("Cu", "fcc", a=3.6)], (True,) * 3, 50),
    "skewed cell": ([_skewed()], (True,) * 3, 30),
    "slab and bulk": ([_slab(), _skewed()], (True,) * 3, 50),
    "slab, periodic in-plane only": ([_slab()], (True, True, False), 50),
    "no neighbour cap reached": ([_crystal((2, 2, 2))], (True,) * 3, 1000),
    "fcc shells cut by the cap (ties)": ([bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))], (True,) * 3, 50),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_edges_offsets_and_counts_as_fairchem(case):
    atoms, pbc, k = CASES[case]
    b = atoms_to_batch(atoms)
    want = radius_graph_pbc(b, 6.0, k, True, pbc=list(pbc))
    got = radius_graph_pbc_cells(b.pos, b.cell, b.natoms, b.batch, 6.0, k, True, list(pbc))
    assert want[0].shape[1] > 0
    for w, g, what in zip(want, got, ("edge_index", "cell_offsets", "neighbours per structure")):
        assert w.shape == g.shape and torch.equal(w, g), what


@pytest.mark.parametrize("direct_forces", [True, False])
def test_leignn_gives_the_same_numbers_with_either_search(direct_forces):
    atoms = [_crystal((2, 2, 2)), _slab()]
    out = {}
    for graph in ("fairchem", "cells"):
        torch.manual_seed(0)
        model = LEIGNN(hidden_channels=16, num_layers=2, num_rbf=16, max_neighbors=50, use_pbc=True,
                       direct_forces=direct_forces, zero_init_energy=False, pbc_graph=graph).eval()
        batch = atoms_to_batch(atoms)
        with torch.set_grad_enabled(not direct_forces):
            o = model(batch)
        out[graph] = (o["energy"].detach(), o["forces"].detach())
    for a, b in zip(out["fairchem"], out["cells"]):
        assert a.abs().max() > 1e-6
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_takes_the_tree_search_for_large_batches_on_cpu(monkeypatch):
    import leignn_ocp.graph as graph

    calls = []
    real = graph.radius_graph_pbc_cells
    monkeypatch.setattr(graph, "radius_graph_pbc_cells", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    model = LEIGNN(hidden_channels=8, num_layers=1, num_rbf=8, use_pbc=True, max_neighbors=50).eval()
    assert model.pbc_graph == "auto"
    with torch.no_grad():
        model(atoms_to_batch([_crystal((2, 2, 1))]))  # 16 atoms: fairchem's search
        model(atoms_to_batch([_crystal((2, 2, 1))] * 2))  # 2 x 16 atoms: the tree's (the batch counts)
        model(atoms_to_batch([_crystal((4, 4, 4))]))  # 256 atoms: the tree's
    assert calls == [32, 256]
    with pytest.raises(ValueError, match=r"pbc_graph must be one of \('auto', 'fairchem', 'cells'\), got 'kd'"):
        LEIGNN(pbc_graph="kd")


def test_the_timing_command_reports_equal_edges(capsys):
    from leignn_ocp.graph import main

    threads = torch.get_num_threads()
    try:
        assert main(["--repeats", "2x2x2,3x3x3", "--fairchem-max", "200"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("same edges: True" in line for line in lines), lines


def test_the_timing_command_times_a_forward_with_either_search(capsys, repo, monkeypatch):
    from leignn_ocp.graph import main

    monkeypatch.chdir(repo)  # fairchem resolves the config's includes against the cwd
    threads = torch.get_num_threads()
    try:
        assert main(["--repeats", "2x2x2", "--cutoff", "4.5", "--lattice", "3.63",
                     "--forward", "configs/md/cu_liquid_leignn.yml"]) == 0
    finally:
        torch.set_num_threads(threads)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("32 atoms") and "same edges: True" in line and "same forces: True" in line, line
    assert "ms with fairchem's search" in line and "ms with the tree's" in line
