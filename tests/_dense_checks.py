"""Checks of a factorization of ``H + eps I`` against the dense matrix, with stated bounds.

Bounds (float64, u = 2.2e-16, the library's contract of docs/algorithm.md section 11):

* backward error ``beta <= 1e-12`` (asserted on the reported value and on our own);
* forward error of a solve ``<= 2 cond(M) beta`` (first-order perturbation bound) with
  ``cond`` from ``eigvalsh``; we allow ``10 cond beta_bound + 1e-13``;
* ``log|det|`` moves by at most ``sum_i |d lambda_i| / |lambda_i| <= n beta ||M|| / min|lambda|
  = n cond beta``; the dense ``slogdet`` itself carries ``n cond u``;
* inertia exact when ``min |lambda| > 1e-10 ||M||`` (the contract's gap; asserted only then).
"""

from __future__ import annotations

import torch

BOUND = 1e-12


def dense_backward_error(M, x, g) -> float:
    r = M @ x - g
    num = torch.linalg.vector_norm(r, dim=0)
    den = torch.linalg.matrix_norm(M, 2) * torch.linalg.vector_norm(
        x, dim=0
    ) + torch.linalg.vector_norm(g, dim=0)
    return float((num / den).max())


def check_factorization(H, D, eps, k=3, seed=0, method="riccati"):
    """Factor ``H + eps I`` and compare solve (``k`` right-hand sides), logdet and inertia."""
    n = D.shape[0]
    M = D + eps * torch.eye(n, dtype=D.dtype)
    lam = torch.linalg.eigvalsh(M)
    norm, gap = float(lam.abs().max()), float(lam.abs().min())
    cond = norm / gap
    F = H.factorize(eps, method=method)
    g = torch.randn(n, k, dtype=D.dtype, generator=torch.Generator().manual_seed(seed))
    x = F.solve(g)
    ref = torch.linalg.solve(M, g)
    assert F.backward_error <= BOUND, F.backward_error
    assert dense_backward_error(M, x, g) <= 10 * BOUND, dense_backward_error(M, x, g)
    err = float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))
    assert err <= 10 * cond * BOUND + 1e-13, (err, cond)
    x1 = F.solve(g[:, 0])  # one column, same factorization
    assert float(torch.linalg.norm(x1 - x[:, 0])) <= (10 * cond * BOUND + 1e-13) * float(
        torch.linalg.norm(x[:, 0])
    )
    sign, logabsdet = F.logdet()
    ref_sign, ref_logabsdet = torch.linalg.slogdet(M)
    if gap > 1e-10 * norm:
        assert float(sign) == float(ref_sign)
        assert abs(float(logabsdet - ref_logabsdet)) <= 10 * n * cond * BOUND + 1e-9 * abs(
            float(ref_logabsdet)
        ), (float(logabsdet), float(ref_logabsdet))
        if method == "riccati":
            counts = (int((lam > 0).sum()), int((lam < 0).sum()), 0)
            assert F.inertia() == counts, (F.inertia(), counts)
            assert F.is_positive_definite == (counts[1] == 0)
    return F
