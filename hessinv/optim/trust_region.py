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

The subproblem starts from the previous step's multiplier (a certified lower bound where the
inertia gives one), so a step typically takes one to three factorizations; for the
Gauss-Newton matrix in output space it takes none after the first eigendecomposition
(docs/algorithm.md section 14). The radius follows ``rho``:
``radius <- shrink * min(radius, ||s||)`` if ``rho < 1/4``,
``radius <- min(grow * radius, max_radius)`` if ``rho > 3/4`` and the step is on the
boundary; the step is accepted if ``rho > eta``. With ``g = 0`` and ``B = 0`` (a loss
that is constant in the parameters) the step is ``0`` and counts as converged.
"""

from __future__ import annotations

import math
import weakref

import torch

from hessinv.network.checks import positive, positive_int, real, within
from hessinv.optim.base import CurvatureOptimizer, Proposal, Trial, Verdict
from hessinv.optim.protocol import CurvatureProtocol
from hessinv.optim.subproblem import trust_region_subproblem

__all__ = ["TrustRegionNewton"]


class TrustRegionNewton(CurvatureOptimizer):
    r"""Trust-region Newton with the exact subproblem solution (:func:`trust_region_subproblem`);
    a ``torch.optim.Optimizer`` (see :mod:`hessinv.optim.base` for the design).

    One call ``loss = opt.step(inputs, targets)``:

    1. builds the curvature ``B`` on the batch, with loss ``f`` and gradient ``g``;
    2. solves ``s = argmin_{||s|| <= radius} g^T s + 1/2 s^T B s`` exactly, whether ``B``
       is definite or not (``B + lam I`` factorized at a few ``lam``, all reusing the
       stage derivatives of ``B``, starting from the previous step's ``lam``);
    3. ``rho = (f(x) - f(x + s)) / (m(0) - m(s))`` on the same batch;
       ``radius <- shrink * min(radius, ||s||)`` if ``rho < 0.25``,
       ``radius <- min(grow * radius, max_radius)`` if ``rho > 0.75`` and ``||s|| = radius``;
    4. accepts the step if ``rho > eta``; otherwise restores the parameters and retries
       with the smaller radius, at most ``max_tries`` tries in all (same ``B``).

    ``radius`` (in ``param_groups``) never drops below ``min_radius``. ``lr`` (default 1)
    scales the step of each group after the subproblem is solved.

    Args:
        model, loss_fn, oracle, curvature, params, process_group: as for :class:`DampedNewton`.
        radius: initial trust radius (> 0, Euclidean norm in parameter space).
        max_radius, min_radius: bounds on the radius.
        eta: acceptance threshold on ``rho``, in ``[0, 0.25)``.
        shrink, grow: radius factors, in ``(0, 1)`` and ``> 1``.
        max_tries: subproblem solves per step (>= 1).
        rtol: a boundary step may have ``| ||s|| - radius | <= rtol radius``; it is then the
            exact minimiser for the radius ``||s||`` (``(B + lam I) s = -g`` with
            ``B + lam I`` positive semidefinite), so a loose ``rtol`` (default ``1e-2``)
            changes the radius slightly, not the step's exactness, and saves factorizations.
        hard_tol: tolerance of the subproblem's hard case.

    ``step`` returns the batch loss before the step as a Python float. ``opt.last_step``
    holds ``radius`` (of the last try), ``new_radius``, ``accepted``, ``step_norm``,
    ``on_boundary``, ``hard_case``, ``lam``, ``predicted_reduction``, ``actual_reduction``,
    ``rho``, ``converged`` (predicted and actual change at rounding level: accepted, radius
    kept), ``tries``, ``factorizations`` (new factorizations; the output space's kept
    eigendecomposition serves every ``lam`` for free), ``n_negative`` (negative eigenvalues
    of the batch curvature, below ``-100 u ||B||``), ``loss`` and ``new_loss``.

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
    >>> losses[-1] < 0.5 * losses[0], opt.last_step["n_negative"]
    (True, 0)
    """

    _SHARED = ("max_radius", "min_radius", "eta", "shrink", "grow", "max_tries", "rtol", "hard_tol")
    _ADAPTIVE = ("radius", "multiplier")

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
        rtol: float = 1e-2,
        hard_tol: float = 1e-10,
        oracle: str = "auto",
        *,
        curvature="hessian",
        params=None,
        lr: float = 1.0,
        process_group=None,
    ):
        defaults = {
            "lr": positive(lr, "lr"),
            "radius": radius,
            "max_radius": max_radius,
            "eta": eta,
            "min_radius": min_radius,
            "shrink": shrink,
            "grow": grow,
            "max_tries": max_tries,
            "rtol": rtol,
            "hard_tol": hard_tol,
            "multiplier": 0.0,
        }
        super().__init__(
            model,
            loss_fn,
            params,
            defaults,
            oracle=oracle,
            curvature=curvature,
            process_group=process_group,
        )
        #: (the curvature, multiplier, n_negative) of the last boundary try, for a retry
        self._last_try: tuple[weakref.ref, float, int | None] | None = None

    def _check_hyper(self, hyper: dict) -> None:
        max_radius = positive(hyper["max_radius"], "max_radius", allow_inf=True)
        min_radius = positive(hyper["min_radius"], "min_radius")
        if min_radius > max_radius:
            raise ValueError(f"min_radius {min_radius} exceeds max_radius {max_radius}")
        eta = real(hyper["eta"], "eta")
        if not 0 <= eta < 0.25:
            raise ValueError(f"eta must be in [0, 0.25), got {eta}")
        shrink = real(hyper["shrink"], "shrink")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}")
        grow = real(hyper["grow"], "grow")
        if not 1 < grow < math.inf:
            raise ValueError(f"grow must be > 1 and finite, got {grow}")
        positive_int(hyper["max_tries"], "max_tries")
        positive(hyper["rtol"], "rtol")
        positive(hyper["hard_tol"], "hard_tol")
        radius = real(hyper["radius"], "radius")
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        within(radius, "radius", min_radius, max_radius, "min_radius, max_radius")
        if real(hyper["multiplier"], "multiplier") < 0:
            raise ValueError(f"multiplier must be >= 0, got {hyper['multiplier']}")

    @property
    def radius(self) -> float:
        """The current trust radius (kept in ``param_groups``)."""
        return float(self.param_groups[0]["radius"])

    # ------------------------------------------------------------------ template hooks
    def _propose(self, curvature: CurvatureProtocol, g: torch.Tensor, hyper: dict) -> Proposal:
        # a retry within the step (same curvature, smaller radius) starts where the last try
        # ended: its multiplier and its count of negative eigenvalues (no new factorization)
        last = self._last_try
        retry = last if last is not None and last[0]() is curvature else None
        sol = trust_region_subproblem(
            curvature,
            g,
            hyper["radius"],
            rtol=hyper["rtol"],
            hard_tol=hyper["hard_tol"],
            lam_init=(retry[1] if retry else hyper["multiplier"]) or None,
            n_negative=retry[2] if retry else None,
        )
        self._last_try = (
            (weakref.ref(curvature), sol.lam, sol.n_negative) if sol.on_boundary else None
        )
        diagnostics = {
            "radius": hyper["radius"],
            "on_boundary": sol.on_boundary,
            "hard_case": sol.hard_case,
            "lam": sol.lam,
            "n_negative": sol.n_negative,
        }
        return Proposal(sol.step, sol.factorizations, diagnostics)

    def _adapt(self, proposal: Proposal, trial: Trial, hyper: dict) -> Verdict:
        radius = proposal.diagnostics["radius"]
        new = radius
        rho = trial.rho
        if trial.converged:
            pass  # the loss changes at rounding level only: keep the radius
        elif rho < 0.25:
            new = max(hyper["min_radius"], hyper["shrink"] * min(radius, trial.step_norm))
        elif rho > 0.75 and proposal.diagnostics["on_boundary"]:
            new = min(hyper["max_radius"], hyper["grow"] * radius)
        accepted = trial.converged or (rho > hyper["eta"] and trial.new_loss <= trial.loss)
        stop = not accepted and new <= hyper["min_radius"] and radius <= hyper["min_radius"]
        adapted = {"radius": new}
        if accepted:  # the next step's subproblem starts from this multiplier
            adapted["multiplier"] = float(proposal.diagnostics["lam"])
        return Verdict(
            accepted=accepted, stop=stop, diagnostics={"new_radius": new, "adapted": adapted}
        )
