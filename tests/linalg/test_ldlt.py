"""Bunch-Kaufman in explicit form ``P L D L^T P^T`` (hessinv.linalg.ldlt) against dense linear
algebra."""

from __future__ import annotations

import pytest
import torch

from hessinv.linalg.ldlt import bunch_kaufman


@pytest.mark.parametrize("seed", range(40))
def test_explicit_bunch_kaufman(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 60, (), generator=gen))
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    G = A + A.T
    if seed % 2 == 0:
        G.diagonal().zero_()  # forces 2x2 pivots
    f = bunch_kaufman(G)
    assert f is not None
    # the explicit factors reproduce G to rounding (backward stable: ||E|| ~ n u ||G|| growth)
    P = torch.eye(n, dtype=torch.float64)[f.perm].T
    D = torch.diag(f.d) + torch.diag(f.e[:-1], 1) + torch.diag(f.e[:-1], -1)
    assert float((P @ f.L @ D @ f.L.T @ P.T - G).abs().max()) <= 100 * n * 2.2e-16 * float(
        G.abs().max()
    )
    assert torch.equal(torch.tril(f.L), f.L) and torch.all(torch.diagonal(f.L) == 1)
    B = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    x = f.solve(B)
    beta = float((G @ x - B).norm() / (torch.linalg.matrix_norm(G, 2) * x.norm() + B.norm()))
    assert beta <= 100 * n * 2.2e-16
    ev = torch.linalg.eigvalsh(G)
    if float(ev.abs().min()) > 1e-10 * float(ev.abs().max()):
        assert tuple(f.inertia.tolist()) == (int((ev > 0).sum()), int((ev < 0).sum()))
        sign, logabsdet = torch.linalg.slogdet(G)
        assert float(f.sign) == float(sign)
        cond = float(ev.abs().max() / ev.abs().min())
        assert abs(float(f.logabsdet - logabsdet)) <= 10 * n * cond * 1e-14


def test_singular_matrix_gives_none_or_a_zero_pivot():
    G = torch.zeros(3, 3, dtype=torch.float64)
    f = bunch_kaufman(G)
    assert f is None or float(f.smallest) == 0.0
