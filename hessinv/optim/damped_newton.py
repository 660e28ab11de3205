r"""Damped Newton / Levenberg-Marquardt with exact solves ``(B + eps I)^-1 g``.

With the curvature ``B`` (the Hessian ``H`` by default, the Gauss-Newton matrix with
``curvature="ggn"``), the loss ``f``, the gradient ``g`` and the quadratic model
``m(s) = f + g^T s + 1/2 s^T B s`` at the current parameters, one step is

    s = -lr (B + eps I)^-1 g,

the minimiser of ``m(s) + eps/2 ||s||^2`` for ``lr = 1``. ``B + eps I`` is factorized
exactly in time linear in depth, with its exact inertia (docs/algorithm.md section 5):
``eps`` is raised until the factorization *says* ``B + eps I`` is positive definite, so
``p = (B + eps I)^-1 g`` is a descent direction (``g^T p > 0``) even on indefinite ``H``.
The Levenberg-Marquardt update of ``eps`` follows the outcome of the step:

    eps <- max(min_damping, damping_down * eps)    if f(x + s) < f(x)   (accepted)
    eps <- min(max_damping, damping_up * eps)      otherwise            (rejected, retried)

With ``curvature="ggn"`` (``B = J^T H_out J``, positive semidefinite for convex losses)
this is the classic Levenberg-Marquardt method; with the Hessian it is a damped Newton
method that also works where ``H`` is indefinite.
"""

from __future__ import annotations

import math

import torch

from hessinv.network.checks import nonnegative, positive, positive_int, real, within
from hessinv.optim.base import CurvatureOptimizer, Proposal, Trial, Verdict
from hessinv.optim.protocol import CurvatureProtocol, try_factorize

__all__ = ["DampedNewton"]


class DampedNewton(CurvatureOptimizer):
    r"""Levenberg-Marquardt damped Newton with the exact solve ``(B + eps I)^-1 g``.

    One call ``loss = opt.step(inputs, targets)`` (the step template of
    :mod:`hessinv.optim.base`):

    1. builds the curvature ``B`` on the batch, with loss ``f`` and gradient ``g``;
    2. factorizes ``B + eps I``; while it is not positive definite (the exact inertia
       says so; a singular one counts as not positive definite) ``eps <- eps * damping_up``,
       so ``p = (B + eps I)^-1 g`` is always a descent direction (``g^T p > 0``);
    3. proposes ``s = -lr p``, rescaled to norm ``max_step_norm`` if longer;
    4. evaluates the loss ``f(x + s)`` on the same batch. If it is lower than ``f``
       the step is accepted and ``eps <- eps * damping_down``; otherwise the
       parameters are restored, ``eps <- eps * damping_up`` and steps 2-4 are retried,
       at most ``max_tries`` times in all (reusing the stage derivatives of ``B``).
       A step that changes the loss only at rounding level is accepted as converged
       (``eps`` kept).

    ``eps`` stays in ``[min_damping, max_damping]`` (raising it from 0 goes to at
    least ``max(min_damping, 1e-8)``). If ``B + max_damping I`` is still indefinite
    the direction falls back to the gradient, ``p = g / max_damping``.

    Args:
        model: ``nn.Sequential`` (or list of modules) whose parameters are updated in place.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar.
        lr: step length multiplier (> 0); 1 is the full damped Newton step.
        damping: initial ``eps`` (>= 0).
        damping_up, damping_down: factors (``> 1`` and in ``(0, 1]``) after a failure / success.
        min_damping, max_damping: bounds on ``eps``.
        max_step_norm: optional bound on ``||s||``.
        max_tries: loss evaluations per step (>= 1).
        oracle: passed to the built-in curvatures.
        curvature: ``"hessian"`` (default, :class:`hessinv.ChainHessian`), ``"ggn"``
            (``hessinv.ChainGGN``: classic Levenberg-Marquardt) or a factory
            ``(model, loss_fn, inputs, targets) -> curvature`` returning a
            :class:`~hessinv.optim.CurvatureProtocol`.

    ``step`` returns the batch loss *before* the step, as a Python float. After it,
    ``opt.last_step`` holds: ``damping`` (the ``eps`` of the last try), ``accepted``,
    ``converged``, ``step_norm``, ``predicted_reduction``, ``actual_reduction``, ``rho``,
    ``tries`` (loss evaluations), ``factorizations``, ``direction`` (``"newton"`` or
    ``"gradient"``), ``loss`` and ``new_loss``.

    Example: logistic regression (one stage); a few steps approach the minimum.

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.optim import DampedNewton
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = (X[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64) > 0).long()
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 2)).double()
    >>> opt = DampedNewton(model, nn.CrossEntropyLoss(), damping=1e-3)
    >>> losses = [opt.step(X, y) for _ in range(8)]
    >>> losses[-1] < 0.5 * losses[0], opt.last_step["accepted"]
    (True, True)
    """

    _HYPER = (
        "lr",
        "damping_up",
        "damping_down",
        "min_damping",
        "max_damping",
        "max_step_norm",
        "max_tries",
    )
    _STATE = ("damping",)

    def __init__(
        self,
        model,
        loss_fn,
        lr: float = 1.0,
        damping: float = 1e-2,
        damping_up: float = 8.0,
        damping_down: float = 0.5,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        max_step_norm: float | None = None,
        max_tries: int = 10,
        oracle: str = "auto",
        *,
        curvature="hessian",
    ):
        super().__init__(model, loss_fn, oracle, curvature)
        self._configure(
            lr=lr,
            damping_up=damping_up,
            damping_down=damping_down,
            min_damping=min_damping,
            max_damping=max_damping,
            max_step_norm=max_step_norm,
            max_tries=max_tries,
        )
        self.damping = self._check_damping(damping)

    def _configure(
        self, lr, damping_up, damping_down, min_damping, max_damping, max_step_norm, max_tries
    ):
        lr = positive(lr, "lr")
        damping_up = real(damping_up, "damping_up")
        if not 1 < damping_up < math.inf:
            raise ValueError(f"damping_up must be > 1 and finite, got {damping_up}")
        damping_down = real(damping_down, "damping_down")
        if not 0 < damping_down <= 1:
            raise ValueError(f"damping_down must be in (0, 1], got {damping_down}")
        min_damping = nonnegative(min_damping, "min_damping")
        max_damping = positive(max_damping, "max_damping")
        if min_damping > max_damping:
            raise ValueError(f"min_damping {min_damping} exceeds max_damping {max_damping}")
        if max_step_norm is not None:
            max_step_norm = positive(max_step_norm, "max_step_norm")
        max_tries = positive_int(max_tries, "max_tries")
        self.lr, self.damping_up, self.damping_down = lr, damping_up, damping_down
        self.min_damping, self.max_damping = min_damping, max_damping
        self.max_step_norm, self.max_tries = max_step_norm, max_tries

    def _check_damping(self, damping) -> float:
        return within(
            nonnegative(damping, "damping"),
            "damping",
            self.min_damping,
            self.max_damping,
            "min_damping, max_damping",
        )

    def _load_adaptive(self, state):
        self.damping = self._check_damping(state["damping"])

    def _raise(self, eps: float) -> float:
        return min(self.max_damping, max(eps * self.damping_up, self.min_damping, 1e-8))

    def _lower(self, eps: float) -> float:
        return max(self.min_damping, eps * self.damping_down)

    # ------------------------------------------------------------------ template hooks
    def _propose(self, curvature: CurvatureProtocol, g: torch.Tensor) -> Proposal:
        # the smallest eps (on the multiplicative grid from self.damping) with B + eps I PD
        eps, factorizations = self.damping, 0
        while True:
            F, pd = try_factorize(curvature, eps)
            factorizations += 1
            if pd or eps >= self.max_damping:
                break
            eps = self._raise(eps)
        if pd:
            p, direction = F.solve(g), "newton"
        else:
            p, direction = g / eps, "gradient"
        s = -self.lr * p
        snorm = float(torch.linalg.vector_norm(s))
        if self.max_step_norm is not None and snorm > self.max_step_norm:
            s = s * (self.max_step_norm / snorm)
        return Proposal(s, factorizations, {"damping": eps, "direction": direction})

    def _adapt(self, proposal: Proposal, trial: Trial) -> Verdict:
        eps = proposal.diagnostics["damping"]
        if math.isfinite(trial.new_loss) and trial.new_loss < trial.loss:
            self.damping = self._lower(eps)
            return Verdict(accepted=True)
        if trial.converged:  # the loss changes only at rounding level: keep eps
            return Verdict(accepted=True)
        self.damping = self._raise(eps)
        return Verdict(accepted=False)
