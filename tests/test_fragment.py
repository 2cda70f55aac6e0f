"""global_scope: fragment keeps the global scalar and vector per connected component of the
cutoff graph, so molecules out of each other's cutoff do not influence each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from leignn_ocp import ops
from leignn_ocp.model import LEIGNN
from leignn_ocp.testing import check_batching, check_rotation, ethanol, predict, roundoff_tol


def model(scope: str, use_pbc: bool = False, direct: bool = True) -> LEIGNN:
    torch.manual_seed(0)
    m = LEIGNN(hidden_channels=16, num_layers=3, num_rbf=8, cutoff=5.0, max_neighbors=50, use_pbc=use_pbc,
               direct_forces=direct, zero_init_energy=False, global_scope=scope)
    return m.to(torch.float32 if use_pbc else torch.float64).eval()


def apart(gap: float = 12.0, box: bool = False) -> tuple[Atoms, Atoms, Atoms]:
    """Ethanol and water with ``gap`` Å between them (beyond the 5 Å cutoff), together and alone."""
    a, b = ethanol(), molecule("H2O")
    b.positions += [a.positions[:, 0].max() - b.positions[:, 0].min() + gap, 0.3, -0.2]
    both = a + b
    if box:
        for x in (a, b, both):  # the same 40 Å box for all three: only the company differs
            x.set_cell(np.eye(3) * 40.0)
            x.positions += 5.0
            x.pbc = True
    return both, a, b


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("box", [False, True])
def test_fragments_apart_are_independent(direct, box):
    both, a, b = apart(box=box)
    dtype = torch.float32 if box else torch.float64
    for scope, independent in (("fragment", True), ("structure", False)):
        m = model(scope, use_pbc=box, direct=direct)
        e, f = predict(m, both, dtype)
        (ea, fa), (eb, fb) = predict(m, a, dtype), predict(m, b, dtype)
        de = (e - (ea + eb)).abs().item()
        df = (f - torch.cat([fa, fb])).abs().max().item()
        if independent:  # to round-off
            assert de < roundoff_tol(dtype, e.abs().item()) and df < roundoff_tol(dtype, f.abs().max().item()), \
                (scope, de, df)
        else:  # the paper's globals couple the two molecules
            assert de > 1e-3 and df > 1e-4, (scope, de, df)


def test_fragment_scope_batches_and_rotates():
    both, a, b = apart()
    m = model("fragment")
    check_batching(m, [both, a, ethanol(0.1), b, both])
    check_rotation(m, both)


def test_one_fragment_is_the_structure_scope():
    """A connected structure has one fragment: both scopes give the same numbers."""
    atoms = ethanol(0.05)
    e1, f1 = predict(model("fragment"), atoms)
    e2, f2 = predict(model("structure"), atoms)
    assert torch.allclose(e1, e2, atol=1e-12) and torch.allclose(f1, f2, atol=1e-12)


def test_connected_components():
    # 0-1-2 (a chain), 3 alone, 4-5, 6-7-8 (a triangle), edges one way only and out of order
    src = torch.tensor([1, 2, 5, 8, 6, 7])
    dst = torch.tensor([0, 1, 4, 6, 7, 8])
    frag, n = ops.connected_components(src, dst, 9)
    assert n == 4 and frag.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]
    # a long chain in a shuffled order still converges
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    frag, n = ops.connected_components(perm[1:], perm[:-1], 200)
    assert n == 1 and frag.eq(0).all()


def test_unknown_scope():
    with pytest.raises(ValueError, match=r"global_scope must be one of \('structure', 'fragment'\), got 'molecule'"):
        LEIGNN(global_scope="molecule")
