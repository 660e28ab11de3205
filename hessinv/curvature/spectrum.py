"""Spectrum tools on the exact operator and factorization (docs/algorithm.md section 12).

* :func:`lanczos`: ``k`` steps of symmetric Lanczos with full reorthogonalisation on a
  product ``v -> H v``. Its Ritz values lie inside the spectrum, so ``theta_min >=
  lambda_min`` and ``theta_max <= lambda_max``; each Ritz pair ``(theta, y)`` has an
  eigenvalue of ``H`` within its residual ``|beta_k s_k|`` (Kahan's bound).
* :func:`smallest_eigenvalue`: Lanczos for an estimate and a residual-sized bracket,
  certified by the exact inertia: ``n_neg(H - sigma I) = 0`` proves
  ``lambda_min >= sigma``; bisection on the inertia narrows the bracket when needed.
* Eigenvalue counts in an interval: ``n_neg(H - b I) - n_neg(H - a I)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hessinv.errors import SingularMatrixError

__all__ = ["lanczos", "EigenvalueBracket", "smallest_eigenvalue", "eigenvalue_count"]


def lanczos(matvec, n: int, steps: int, dtype, device, seed: int = 0):
    """``(ritz_values, residuals)`` after ``min(steps, n)`` Lanczos steps from a seeded start.

    ``ritz_values`` ascending; ``residuals[i] = |beta_k s_{k,i}|`` bounds the distance from
    ``ritz_values[i]`` to the nearest eigenvalue.
    """
    k = min(steps, n)
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, dtype=dtype, device=device, generator=gen)
    q = q / torch.linalg.vector_norm(q)
    Qs = torch.empty(k, n, dtype=dtype, device=device)
    alpha = torch.zeros(k, dtype=dtype)
    beta = torch.zeros(k, dtype=dtype)
    m = k
    for j in range(k):
        Qs[j] = q
        w = matvec(q)
        alpha[j] = float(q @ w)
        w = w - Qs[: j + 1].T @ (Qs[: j + 1] @ w)  # full reorthogonalisation (twice)
        w = w - Qs[: j + 1].T @ (Qs[: j + 1] @ w)
        b = float(torch.linalg.vector_norm(w))
        beta[j] = b
        if b <= 1e-14 * max(abs(float(alpha[: j + 1].abs().max())), 1e-300):
            m = j + 1  # invariant subspace found: the Ritz values are eigenvalues
            beta[j] = 0.0
            break
        q = w / b
    T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    residual = (beta[m - 1] * S[-1, :]).abs()
    return theta, residual


class EigenvalueBracket(NamedTuple):
    """``lower <= lambda_min <= upper``, certified by ``factorizations`` exact inertias."""

    lower: float
    upper: float
    estimate: float
    factorizations: int
    lanczos_steps: int


def _count_below(curvature, value: float) -> int:
    """``#{eigenvalues of C < value}`` from the inertia of ``C - value I`` (damping ``-value``)."""
    return curvature.factorize(-value, progress=False).inertia()[1]


def smallest_eigenvalue(curvature, rel_tol: float = 1e-3, steps: int = 60) -> EigenvalueBracket:
    """A certified bracket of ``lambda_min(H)`` (see the module docstring).

    Lanczos gives ``theta`` (``>= lambda_min``) and a residual ``r``. Then
    ``sigma = theta - max(r, rel_tol |theta|)``: if ``H - sigma I`` has no negative
    eigenvalue, ``[sigma, theta]`` is certified by one factorization. Otherwise Lanczos
    missed eigenvalues below (a cluster it did not resolve); the bracket is then moved
    down by doubling and closed by bisection on the inertia.
    """
    n = curvature.num_params
    theta_all, res_all = lanczos(
        curvature.flat_matvec, n, steps, curvature.dtype, curvature.device, seed=1
    )
    theta, r = float(theta_all[0]), float(res_all[0])
    spread = max(float(theta_all[-1] - theta_all[0]), abs(theta), 1e-300)
    width = max(r, rel_tol * max(abs(theta), 1e-12 * spread))
    count = 0
    # theta >= lambda_min in exact arithmetic; the computed Ritz value may undershoot by rounding
    upper = theta + 100 * len(theta_all) * torch.finfo(curvature.dtype).eps * spread
    lower = theta - width
    while True:
        count += 1
        try:
            below = _count_below(curvature, lower)
        except SingularMatrixError:
            lower -= 1e-6 * spread
            continue
        if below == 0:
            break
        upper = lower  # at least one eigenvalue lies below: move the bracket down
        width *= 2
        lower = upper - width
    while upper - lower > rel_tol * max(abs(lower), abs(upper), 1e-12 * spread):
        mid = 0.5 * (lower + upper)
        count += 1
        try:
            below = _count_below(curvature, mid)
        except SingularMatrixError:  # mid is an eigenvalue: the bracket is tight enough there
            upper = mid
            break
        lower, upper = (mid, upper) if below == 0 else (lower, mid)
    return EigenvalueBracket(lower, upper, theta, count, len(theta_all))


def eigenvalue_count(curvature, lower: float, upper: float) -> int:
    """Number of eigenvalues of ``H`` in ``[lower, upper)``, from two exact inertias."""
    if not lower < upper:
        raise ValueError(f"need lower < upper, got {lower} and {upper}")
    return _count_below(curvature, upper) - _count_below(curvature, lower)
