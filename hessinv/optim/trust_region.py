r"""Trust-region Newton with the exact subproblem solution.

With the curvature ``B`` (the Hessian ``H`` by default, possibly indefinite), the loss
``f``, the gradient ``g`` and the quadratic model ``m(s) = f + g^T s + 1/2 s^T B s`` at
the current parameters ``x``, one step solves

    s = argmin_{||s|| <= radius} m(s)

exactly (Moré-Sorensen: Newton's method on the secular equation
``1/||(B + lam I)^-1 g|| = 1/radius``, bracketed by the exact inertia of ``B + lam I``,
docs/algorithm.md section 5; see :mod:`hessinv.optim.subproblem`), and compares the
actual with the predicted reduction,

    rho = (f(x) - f(x + s)) / (m(0) - m(s)).

The radius follows ``rho``: ``radius <- shrink * min(radius, ||s||)`` if ``rho < 1/4``,
``radius <- min(grow * radius, max_radius)`` if ``rho > 3/4`` and the step is on the
boundary; the step is accepted if ``rho > eta``. With ``g = 0`` and ``B = 0`` (a loss
that is constant in the parameters) the step is ``0`` and counts as converged.
"""

from __future__ import annotations

import math

import torch

from hessinv.network.checks import positive, positive_int, real, within
from hessinv.optim.base import CurvatureOptimizer, Proposal, Trial, Verdict
from hessinv.optim.protocol import CurvatureProtocol
from hessinv.optim.subproblem import trust_region_subproblem

__all__ = ["TrustRegionNewton"]


class TrustRegionNewton(CurvatureOptimizer):
    r"""Trust-region Newton with the exact subproblem solution (see
    :func:`trust_region_subproblem`).

    One call ``loss = opt.step(inputs, targets)`` (the step template of
    :mod:`hessinv.optim.base`):

    1. builds the curvature ``B`` on the batch, with loss ``f`` and gradient ``g``;
    2. solves ``s = argmin_{||s|| <= radius} g^T s + 1/2 s^T B s`` exactly, whether ``B``
       is definite or not (``B + lam I`` factorized at a few ``lam``, all reusing the
       stage derivatives of ``B``);
    3. ``rho = (f(x) - f(x + s)) / (m(0) - m(s))`` on the same batch;
       ``radius <- shrink * min(radius, ||s||)`` if ``rho < 0.25``,
       ``radius <- min(grow * radius, max_radius)`` if ``rho > 0.75`` and ``||s|| = radius``;
    4. accepts the step if ``rho > eta``; otherwise restores the parameters and retries
       with the smaller radius, at most ``max_tries`` tries in all (same ``B``).

    ``radius`` never drops below ``min_radius``.

    Args:
        model, loss_fn, oracle, curvature: as for :class:`DampedNewton`.
        radius: initial trust radius (> 0, Euclidean norm in parameter space).
        max_radius, min_radius: bounds on the radius.
        eta: acceptance threshold on ``rho``, in ``[0, 0.25)``.
        shrink, grow: radius factors, in ``(0, 1)`` and ``> 1``.
        max_tries: subproblem solves per step (>= 1).
        rtol, hard_tol: tolerances of the subproblem solver.

    ``step`` returns the batch loss before the step as a Python float. ``opt.last_step``
    holds ``radius`` (of the last try), ``new_radius``, ``accepted``, ``step_norm``,
    ``on_boundary``, ``hard_case``, ``lam``, ``predicted_reduction``, ``actual_reduction``,
    ``rho``, ``converged`` (predicted and actual change at rounding level: accepted, radius
    kept), ``tries``, ``factorizations``, ``n_negative`` (negative eigenvalues of the
    batch curvature), ``loss`` and ``new_loss``.

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.optim import TrustRegionNewton
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = (X[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64) > 0).long()
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 2)).double()
    >>> opt = TrustRegionNewton(model, nn.CrossEntropyLoss(), radius=1.0)
    >>> losses = [opt.step(X, y) for _ in range(8)]
    >>> losses[-1] < 0.5 * losses[0]
    True
    """

    _HYPER = (
        "max_radius",
        "min_radius",
        "eta",
        "shrink",
        "grow",
        "max_tries",
        "rtol",
        "hard_tol",
    )
    _STATE = ("radius",)

    def __init__(
        self,
        model,
        loss_fn,
        radius: float = 1.0,
        max_radius: float = 100.0,
        eta: float = 0.1,
        min_radius: float = 1e-10,
        shrink: float = 0.25,
        grow: float = 2.0,
        max_tries: int = 5,
        rtol: float = 1e-10,
        hard_tol: float = 1e-10,
        oracle: str = "auto",
        *,
        curvature="hessian",
    ):
        super().__init__(model, loss_fn, oracle, curvature)
        self._configure(
            max_radius=max_radius,
            min_radius=min_radius,
            eta=eta,
            shrink=shrink,
            grow=grow,
            max_tries=max_tries,
            rtol=rtol,
            hard_tol=hard_tol,
        )
        self.radius = self._check_radius(radius)

    def _configure(self, max_radius, min_radius, eta, shrink, grow, max_tries, rtol, hard_tol):
        max_radius = positive(max_radius, "max_radius", allow_inf=True)
        min_radius = positive(min_radius, "min_radius")
        if min_radius > max_radius:
            raise ValueError(f"min_radius {min_radius} exceeds max_radius {max_radius}")
        eta = real(eta, "eta")
        if not 0 <= eta < 0.25:
            raise ValueError(f"eta must be in [0, 0.25), got {eta}")
        shrink = real(shrink, "shrink")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}")
        grow = real(grow, "grow")
        if not 1 < grow < math.inf:
            raise ValueError(f"grow must be > 1 and finite, got {grow}")
        self.max_radius, self.min_radius, self.eta = max_radius, min_radius, eta
        self.shrink, self.grow = shrink, grow
        self.max_tries = positive_int(max_tries, "max_tries")
        self.rtol = positive(rtol, "rtol")
        self.hard_tol = positive(hard_tol, "hard_tol")

    def _check_radius(self, radius) -> float:
        radius = real(radius, "radius")
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        return within(radius, "radius", self.min_radius, self.max_radius, "min_radius, max_radius")

    def _load_adaptive(self, state):
        self.radius = self._check_radius(state["radius"])

    # ------------------------------------------------------------------ template hooks
    def _propose(self, curvature: CurvatureProtocol, g: torch.Tensor) -> Proposal:
        sol = trust_region_subproblem(
            curvature, g, self.radius, rtol=self.rtol, hard_tol=self.hard_tol
        )
        diagnostics = {
            "radius": self.radius,
            "on_boundary": sol.on_boundary,
            "hard_case": sol.hard_case,
            "lam": sol.lam,
            "n_negative": sol.n_negative,
        }
        return Proposal(sol.step, sol.factorizations, diagnostics)

    def _adapt(self, proposal: Proposal, trial: Trial) -> Verdict:
        radius = proposal.diagnostics["radius"]
        rho = trial.rho
        if trial.converged:
            pass  # the loss changes at rounding level only: keep the radius
        elif rho < 0.25:
            self.radius = max(self.min_radius, self.shrink * min(radius, trial.step_norm))
        elif rho > 0.75 and proposal.diagnostics["on_boundary"]:
            self.radius = min(self.max_radius, self.grow * radius)
        accepted = trial.converged or (rho > self.eta and trial.new_loss <= trial.loss)
        stop = not accepted and self.radius <= self.min_radius and radius <= self.min_radius
        return Verdict(accepted=accepted, stop=stop, diagnostics={"new_radius": self.radius})
