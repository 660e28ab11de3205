r"""The exact trust-region subproblem (Moré-Sorensen), against :class:`CurvatureProtocol`.

For a symmetric ``B`` (the Hessian ``H``, possibly indefinite, or a Gauss-Newton
matrix), a gradient ``g`` and a radius ``Delta > 0``:

    min_s  psi(s) = g^T s + 1/2 s^T B s     s.t.  ||s|| <= Delta.

``s*`` solves it iff there is ``lam >= 0`` with

    (B + lam I) s* = -g,   B + lam I positive semidefinite,   lam (Delta - ||s*||) = 0.

With ``s(lam) = -(B + lam I)^-1 g`` for ``lam > max(0, -lambda_min(B))``, the boundary
solution is the root of the *secular equation*

    phi(lam) = 1/||s(lam)|| - 1/Delta = 0,

which is concave and increasing in ``lam``, so Newton's method on it,

    lam <- lam + (||s|| / ||q||)^2 (||s|| - Delta) / Delta,   ||q||^2 = s^T (B + lam I)^-1 s,

increases monotonically to the root from its left (``||s|| > Delta``); ``||q||`` costs one
more solve with the same factorization. Each factorization of ``B + lam I`` is exact
and comes with its exact inertia (the Riccati recursion, docs/algorithm.md section 5):
whether ``B + lam I`` is positive definite is *known*, never guessed, which is what makes
the bracket below safe on indefinite ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from hessinv.network.checks import positive
from hessinv.optim.protocol import CurvatureProtocol, check_curvature, try_factorize

__all__ = ["trust_region_subproblem", "TrustRegionSolution"]


class TrustRegionSolution(NamedTuple):
    """Result of :func:`trust_region_subproblem`.

    ``step``: the minimiser ``s``; ``lam``: its multiplier (``(B + lam I) s = -g`` up to the
    hard-case component); ``on_boundary``; ``hard_case``; ``factorizations`` and
    ``iterations`` used; ``n_negative``: negative eigenvalues of ``B`` (``None`` if unknown,
    i.e. when ``B`` itself is singular).

    >>> import torch
    >>> from hessinv.optim import TrustRegionSolution
    >>> sol = TrustRegionSolution(torch.zeros(2), 0.0, False, False, 1, 0, 0)
    >>> sol.on_boundary, sol.n_negative
    (False, 0)
    """

    step: torch.Tensor
    lam: float
    on_boundary: bool
    hard_case: bool
    factorizations: int
    iterations: int
    n_negative: int | None


def _diagonal_bounds(curvature: CurvatureProtocol) -> tuple[float, float]:
    """``(-min_i B_ii, max_i |B_ii|)``; the first is a lower bound on ``-lambda_min(B)``."""
    diag = curvature.diagonal()
    parts = diag.values() if isinstance(diag, Mapping) else [diag]
    values = torch.cat([torch.as_tensor(t).reshape(-1) for t in parts])
    if values.numel() == 0:
        return 0.0, 0.0
    return float(-values.min()), float(values.abs().max())


def _zero_curvature_solution(g: torch.Tensor, gnorm: float, radius: float) -> TrustRegionSolution:
    """``B = 0``: ``psi(s) = g^T s``, minimised by ``-Delta g / ||g||``, or by ``s = 0`` if ``g =
    0``."""
    if gnorm == 0.0:
        return TrustRegionSolution(torch.zeros_like(g), 0.0, False, False, 0, 0, 0)
    return TrustRegionSolution(-(radius / gnorm) * g, gnorm / radius, True, False, 0, 0, 0)


def _output_space_solution(
    curvature, g: torch.Tensor, radius: float, rtol: float
) -> TrustRegionSolution | None:
    """The subproblem for a Gauss-Newton matrix ``G = U^T U`` through the eigendecomposition
    ``U U^T = Q diag(e) Q^T`` (docs/algorithm.md section 14); ``None`` when ``curvature`` has
    no exact output space (then the general method runs).

    With ``y = Q^T U g`` and ``g_perp`` the part of ``g`` outside the row space of ``U``,
    ``||s(lam)||^2 = sum_i y_i^2 / (e_i (e_i + lam)^2) + ||g_perp||^2 / lam^2``, a scalar
    function: Newton's method on ``1/||s(lam)|| - 1/radius`` finds the multiplier without a
    sweep, and one solve (refined, the contract's) gives the step. ``G`` is positive
    semi-definite, so there is no hard case: ``lam = 0`` when ``g`` lies in the row space
    and ``||G^+ g|| <= radius`` (the minimum-norm Gauss-Newton step)."""
    if not callable(getattr(curvature, "output_space", None)):
        return None
    try:
        space = curvature.output_space()
    except ValueError:  # indefinite loss blocks
        return None
    if not space.exact:
        return None
    fresh = 0 if space.has_eigh else 1
    e, Q = space.eigh()
    e64 = e.double()
    y = (Q.T @ space.apply(list(g.reshape(-1, 1).split(list(curvature.stage_sizes)))))[:, 0]
    y64 = y.double()
    rows = e.numel()
    tol_e = max(rows, 1) * torch.finfo(e.dtype).eps * float(e64.abs().max() if rows else 0.0)
    keep = e64 > tol_e
    yk, ek = y64[keep], e64[keep]
    gg = float(g.double() @ g.double())
    inside = float((yk * yk / ek).sum())
    perp = gg - inside
    if perp <= 10 * max(rows, 1) * torch.finfo(g.dtype).eps * gg:
        perp = 0.0

    def norm2(lam: float) -> float:
        return float((yk * yk / (ek * (ek + lam) ** 2)).sum()) + (perp / lam**2 if perp else 0.0)

    if perp == 0.0 and norm2(0.0) <= radius * radius:
        # interior: s = -G^+ g = -U^T Q E^-2 Q^T U g over the kept eigenvalues
        coef = torch.zeros_like(y)
        coef[keep] = y[keep] / e[keep] ** 2
        s = -torch.cat(space.apply_T((Q @ coef)[:, None]))[:, 0]
        return TrustRegionSolution(s, 0.0, False, False, fresh, 0, 0)
    # boundary: 1/||s(lam)|| - 1/radius is concave increasing; Newton from the left.
    # ||s(lam)|| >= sqrt(perp) / lam, so the root is at least sqrt(perp) / radius (and the
    # iterates never reach a lam whose square underflows in perp / lam^2)
    lo, hi = (math.sqrt(perp) / radius if perp else 0.0), math.inf
    top = float(ek.max()) if ek.numel() else 0.0
    lam = max(math.sqrt(max(gg, 0.0)) / radius - top, lo) or 1e-300
    for _ in range(200):
        n2 = norm2(lam)
        if n2 > radius * radius:
            lo = lam
        else:
            hi = lam
        sn = math.sqrt(n2)
        if abs(sn - radius) <= 1e-3 * rtol * radius:
            break
        # d ||s||^2 / d lam = -2 sum y^2 / (e (e + lam)^3) - 2 perp / lam^3
        d = -2 * float((yk * yk / (ek * (ek + lam) ** 3)).sum()) - (
            2 * perp / lam**3 if perp else 0.0
        )
        # Newton on phi = 1/sn - 1/radius: phi' = -d / (2 sn^3)
        new = lam - (1 / sn - 1 / radius) / (-d / (2 * sn**3)) if d else math.nan
        if not lo < new < hi or not math.isfinite(new):
            new = 2 * lo + 1e-300 if math.isinf(hi) else 0.5 * (lo + hi)
        lam = new
    F, _ = try_factorize(curvature, lam)
    if F is None:
        return None
    s = -F.solve(g)
    snorm = float(torch.linalg.vector_norm(s))
    predicted = math.sqrt(norm2(lam))  # the scalar model's ||s(lam)||, within rtol of radius
    if abs(snorm - predicted) > 1e-6 * radius:
        return None  # the scalar model and the exact solve disagree: the general method
    if abs(snorm - radius) > rtol * radius:
        s = s * (radius / snorm)  # rounding of ||s(lam)|| only: onto the boundary
    return TrustRegionSolution(s, lam, True, False, fresh + (0 if F.reused_factors else 1), 1, 0)


#: ``B + lam_tiny I`` singular to working precision: ``n_negative`` counts the eigenvalues
#: below ``-_SINGULAR_SHIFT lam_tiny`` instead (one more factorization)
_SINGULAR_SHIFT = 1e4
#: upward trials from the previous multiplier while no upper bound of the root is known
_GROWTH = 1.25


def _counted(F) -> int:
    """1 for a new factorization (or a failed one), 0 for one that reused kept factors."""
    return 0 if F is not None and getattr(F, "reused_factors", False) else 1


def trust_region_subproblem(
    curvature: CurvatureProtocol,
    g: torch.Tensor,
    radius: float,
    *,
    rtol: float = 1e-10,
    hard_tol: float = 1e-10,
    max_iter: int = 100,
    inverse_iterations: int = 3,
    lam_init: float | None = None,
    n_negative: int | None = None,
) -> TrustRegionSolution:
    r"""Exact solution of ``min_s g^T s + 1/2 s^T B s  s.t. ||s|| <= radius`` (Moré-Sorensen).

    ``B`` is ``curvature`` (any :class:`~hessinv.optim.CurvatureProtocol`: its
    ``factorize``, ``matvec`` and ``diagonal`` are used; a :class:`hessinv.ChainHessian`
    computes its stage derivatives once and reuses them in every factorization).
    With ``s(lam) = -(B + lam I)^-1 g``:

    * if ``B`` is positive definite and ``||s(0)|| <= radius``, ``s(0)`` is the answer;
    * otherwise ``lam > max(0, -lambda_min(B))`` solves the secular equation
      ``phi(lam) = 1/||s(lam)|| - 1/radius = 0`` by the Newton steps of the module
      docstring, from the left of the root;
    * the first factorization is at ``lam_tiny = 100 u ||B||`` (the diagonal's scale), not
      at 0 (singular for any network with a softmax); its inertia gives ``n_negative``,
      the number of eigenvalues of ``B`` below ``-lam_tiny`` (below ``-1e4 lam_tiny`` when
      ``B + lam_tiny I`` is singular to working precision, at one more factorization);
      ``lam_init`` (the previous step's multiplier) is the first trial of the iteration
      when it lies in the bracket, which usually saves most of it; when ``B + lam_init I``
      is not positive definite the trials grow by ``1.25x`` from there until one is, and
      from its right the Newton steps go down by at most that factor;
    * ``n_negative``, known from an earlier solve with the same ``B`` that ended on the
      boundary at a larger radius (a retry with a smaller one), skips the factorization at
      ``lam_tiny``: the solution is on the boundary again, at a larger multiplier;
    * safeguards: a bracket ``[lam_L, lam_U]`` of the root. ``lam_L`` is raised to every
      ``lam`` at which the exact inertia says ``B + lam I`` is not positive definite
      (including where ``factorize`` raises :class:`~hessinv.errors.SingularMatrixError`)
      and to the lower bounds ``-min_i B_ii`` and ``-z^T B z`` (unit ``z``) of
      ``-lambda_min(B)``; a Newton step leaving the bracket is replaced by a bisection-type
      step ``lam_L + theta (lam_U - lam_L)`` (doubling while ``lam_U`` is unknown);
    * hard case (``g`` (nearly) orthogonal to the eigenvectors of ``lambda_min``, so
      ``||s(lam)|| < radius`` for all admissible ``lam``): ``z`` comes from inverse
      iteration with the factorization at ``lam`` just above ``-lambda_min``; the step is
      ``s + tau z`` with ``||s + tau z|| = radius`` (the root of smaller model value),
      accepted once ``tau^2 z^T (B + lam I) z <= hard_tol (s^T (B + lam I) s + lam radius^2)``:
      its model value is then within that relative gap of the optimum;
    * ``B = 0`` (zero diagonal and ``B z = 0`` for a random unit ``z``): the closed form,
      ``s = -radius g / ||g||``, or ``s = 0`` when ``g = 0`` as well (a loss that is constant
      in the parameters, e.g. behind a dead final ReLU).

    Example: an indefinite ``B`` and a boundary solution.

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> from hessinv.optim import trust_region_subproblem
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    >>> X, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    >>> H = hessinv.ChainHessian(model, nn.MSELoss(), X, y)
    >>> sol = trust_region_subproblem(H, H.gradient(), radius=0.1)
    >>> sol.on_boundary, round(float(sol.step.norm()), 12)
    (True, 0.1)
    """
    radius = positive(radius, "radius")
    curvature = check_curvature(curvature)
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor, got {type(g).__name__}")
    g = g.reshape(-1)
    if g.shape[0] != curvature.num_params:
        raise ValueError(
            f"g has {g.shape[0]} entries but the curvature has num_params={curvature.num_params}"
        )
    gnorm = float(torch.linalg.vector_norm(g))
    n = g.shape[0]

    def norm(v) -> float:
        return float(torch.linalg.vector_norm(v))

    def model_value(s) -> float:
        return float(g @ s + 0.5 * (s @ curvature.matvec(s)))

    gen = torch.Generator(device="cpu").manual_seed(12345)
    z = torch.randn(n, generator=gen, dtype=g.dtype).to(g.device)
    z = z / torch.linalg.vector_norm(z)
    neg_min_diag, scale = _diagonal_bounds(curvature)
    if scale == 0.0:
        # zero diagonal: B = 0, or B indefinite (trace 0); B z tells which (with probability 1)
        scale = norm(curvature.matvec(z))
        if scale == 0.0:
            return _zero_curvature_solution(g, gnorm, radius)

    spectral = _output_space_solution(curvature, g, radius, rtol)
    if spectral is not None:
        return spectral
    # The first factorization at lam_tiny (rounding level of ||B||), not at 0: B + 0 I is
    # singular for every network with a softmax (a null direction per sample), and at
    # lam_tiny the inertia counts the negative eigenvalues of B below -lam_tiny.
    lam_tiny = 100 * torch.finfo(g.dtype).eps * scale
    if n_negative is not None and lam_init is not None and lam_init > lam_tiny:
        # a retry with the same B and a smaller radius: boundary again, right of lam_init
        F, pd, nfact = None, False, 0
    else:
        F, pd = try_factorize(curvature, lam_tiny)
        nfact = _counted(F)
        if F is None:  # singular to working precision at lam_tiny: count below a larger shift
            lam_tiny *= _SINGULAR_SHIFT
            F, pd = try_factorize(curvature, lam_tiny)
            nfact += _counted(F)
        n_negative = None if F is None else int(F.inertia()[1])
    if pd:
        s = -F.solve(g)
        if norm(s) <= radius * (1 + rtol):  # interior: the Newton step, to rounding of lam
            return TrustRegionSolution(s, 0.0, False, False, nfact, 0, n_negative)
        lam_L, lam_U = 0.0, math.inf
        lam, current = lam_tiny, (F, s)
    else:
        lam_L, lam_U = max(lam_tiny, neg_min_diag), math.inf  # B + lam_L I is not PD
        lam, current = None, None
    if lam_init is not None and lam_L < lam_init < lam_U and lam_init > lam_tiny:
        # the previous step's multiplier: the root is usually near it
        if current is None or norm(current[1]) > radius:
            lam, current = lam_init, None

    def bracket_trial(theta: float) -> float:
        if math.isinf(lam_U):
            if lam_L > lam_tiny and lam_init is not None:
                # the root moved up from the last step's multiplier: grow geometrically from
                # there rather than jump by ||g|| / radius (Newton from far right is slow)
                return _GROWTH * lam_L
            return 2.0 * lam_L + max(gnorm / radius, 1e-8 * scale, 1e-300)
        return lam_L + theta * (lam_U - lam_L)

    if lam is None:
        lam = bracket_trial(0.5)
    best = None  # (model value, step, lam): best boundary point seen by the hard-case test
    it = 0
    for it in range(1, max_iter + 1):
        if current is None:
            F, pd = try_factorize(curvature, lam)
            nfact += _counted(F)
            if not pd:
                lam_L = max(lam_L, lam)
                lam = bracket_trial(0.5)
                continue
            current = (F, -F.solve(g))
        F, s = current
        current = None
        snorm = norm(s)
        if abs(snorm - radius) <= rtol * radius:
            return TrustRegionSolution(s, lam, True, False, nfact, it, n_negative)
        fallback = None
        if snorm > radius:
            lam_L = max(lam_L, lam)
        else:
            lam_U = min(lam_U, lam)
            # hard-case test with an approximate eigenvector of lambda_min (inverse iteration)
            for _ in range(inverse_iterations):
                z = F.solve(z)
                z = z / torch.linalg.vector_norm(z)
            rq = float(z @ curvature.matvec(z))  # >= lambda_min(B)
            rq_active = -rq >= lam_L  # the Rayleigh bound is the best lower bound we have
            lam_L = max(lam_L, -rq)
            sAs = max(-float(g @ s), 0.0)
            gap_scale = hard_tol * (sAs + lam * radius * radius)
            # psi(s) - psi* <= lam (radius^2 - ||s||^2) / 2: s itself is optimal enough
            # (hard case at lam = 0: B singular positive semidefinite; a lam at rounding
            # level, lam_tiny, cannot be told from 0)
            if lam <= lam_tiny or lam * (radius * radius - snorm * snorm) <= gap_scale:
                return TrustRegionSolution(s, lam, False, True, nfact, it, n_negative)
            zAz = max(rq + lam, 0.0)
            if zAz <= math.sqrt(hard_tol) * max(abs(lam), abs(rq), scale, 1e-300):
                zs = float(z @ s)
                # ||s + tau z|| = radius: tau^2 + 2 tau zs + (snorm^2 - radius^2) = 0
                disc = math.sqrt(zs * zs + max(radius * radius - snorm * snorm, 0.0))
                cands = [(model_value(s + tau * z), tau) for tau in (-zs + disc, -zs - disc)]
                mval, tau = min(cands)
                cand = s + tau * z
                if best is None or mval < best[0]:
                    best = (mval, cand, lam)
                # psi(s + tau z) - psi* <= tau^2 z^T (B + lam I) z / 2
                if tau * tau * zAz <= gap_scale:
                    return TrustRegionSolution(cand, lam, True, True, nfact, it, n_negative)
            # the lam at which either hard-case test would pass if lam_L were -lambda_min
            if rq_active:
                fallback = lam_L + 0.5 * gap_scale / max(radius * radius - snorm * snorm, 1e-300)
                fallback = max(fallback, lam_tiny)
        if lam_U - lam_L <= 1e-15 * max(abs(lam_U), 1e-300) and best is not None:
            break
        lam_new = -math.inf
        if snorm > 0:
            q2 = float(s @ F.solve(s))
            lam_new = lam + (snorm * snorm / q2) * (snorm - radius) / radius
            if lam_init is not None and snorm < radius:
                # warm start, right of the root: Newton overshoots far to the left on this
                # concave phi; step down geometrically, as upward from lam_init
                lam_new = max(lam_new, lam / _GROWTH)
        if not lam_L < lam_new < lam_U:
            if fallback is not None and lam_L < fallback < lam_U:
                lam_new = fallback
            else:
                lam_new = bracket_trial(0.5)
        lam = lam_new
    if best is not None:
        _, cand, lam_b = best
        return TrustRegionSolution(cand, lam_b, True, True, nfact, it, n_negative)
    raise RuntimeError(
        f"trust_region_subproblem did not converge in {max_iter} iterations "
        f"(bracket [{lam_L:.3e}, {lam_U:.3e}])"
    )
