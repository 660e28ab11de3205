"""Spectrum tools (docs/algorithm.md section 12) against ``eigvalsh`` of the dense Hessian."""

from __future__ import annotations

import pytest
import torch
from _chains import make_problem

import hessinv
from hessinv.curvature.spectrum import lanczos


@pytest.mark.parametrize("seed", range(4))
def test_eigenvalue_count_is_exact(seed):
    problem = make_problem(depth=3, width=4, batch=5, seed=40 + seed)
    H = hessinv.ChainHessian(*problem)
    ev = torch.linalg.eigvalsh(hessinv.dense_hessian(*problem))
    for lower, upper in ((-0.3, -0.01), (-0.05, 0.07), (0.013, 2.0), (-10.0, 10.0)):
        ref = int(((ev >= lower) & (ev < upper)).sum())
        assert H.eigenvalue_count(lower, upper) == ref
    with pytest.raises(ValueError, match="lower < upper"):
        H.eigenvalue_count(1.0, 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_smallest_eigenvalue_bracket_is_certified(seed):
    problem = make_problem(depth=4, width=5, batch=6, seed=50 + seed, loss="mse")
    H = hessinv.ChainHessian(*problem)
    lam_min = float(torch.linalg.eigvalsh(hessinv.dense_hessian(*problem))[0])
    b = H.smallest_eigenvalue(rel_tol=1e-3)
    assert b.lower <= lam_min <= b.upper
    assert b.upper - b.lower <= 1e-3 * max(abs(b.lower), abs(b.upper)) + 1e-14
    assert b.factorizations <= 5


def test_lanczos_ritz_values_lie_inside_the_spectrum():
    problem = make_problem(depth=3, width=4, batch=4, seed=60)
    H = hessinv.ChainHessian(*problem)
    ev = torch.linalg.eigvalsh(hessinv.dense_hessian(*problem))
    theta, res = lanczos(H.flat_matvec, H.num_params, 10, H.dtype, H.device)
    assert float(theta[0]) >= float(ev[0]) - 1e-12 and float(theta[-1]) <= float(ev[-1]) + 1e-12
    for t, r in zip(theta.tolist(), res.tolist(), strict=True):  # an eigenvalue within r
        assert float((ev - t).abs().min()) <= r + 1e-10
    lo, hi = H.spectrum_estimate()
    assert float(ev[0]) - 1e-12 <= lo <= hi <= float(ev[-1]) + 1e-12


def test_trace_is_the_sum_of_eigenvalues():
    problem = make_problem(depth=3, width=4, batch=3, seed=61)
    H = hessinv.ChainHessian(*problem)
    D = hessinv.dense_hessian(*problem)
    assert abs(float(H.trace() - torch.trace(D))) <= 1e-13 * float(D.abs().sum())
