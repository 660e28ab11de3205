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
this is the classic Levenberg-Marquardt method, factored in output space when that is
cheapest (docs/algorithm.md section 14: every damping of a step reuses one Gram matrix);
with the Hessian it is a damped Newton method that also works where ``H`` is indefinite.
"""

from __future__ import annotations

import math

import torch

from hessinv.network.checks import nonnegative, positive, positive_int, real, within
from hessinv.optim.base import CurvatureOptimizer, Proposal, Trial, Verdict
from hessinv.optim.protocol import CurvatureProtocol, try_factorize

__all__ = ["DampedNewton"]


class DampedNewton(CurvatureOptimizer):
    r"""Levenberg-Marquardt damped Newton with the exact solve ``(B + eps I)^-1 g``; a
    ``torch.optim.Optimizer`` (see :mod:`hessinv.optim.base` for the design).

    One call ``loss = opt.step(inputs, targets)``:

    1. builds the curvature ``B`` on the batch, with loss ``f`` and gradient ``g``;
    2. factorizes ``B + eps I``; while it is not positive definite (the exact inertia
       says so; a singular one counts as not positive definite) ``eps <- eps * damping_up``,
       so ``p = (B + eps I)^-1 g`` is always a descent direction (``g^T p > 0``);
    3. proposes ``s = -lr p`` (``lr`` of each parameter's group), rescaled to norm
       ``max_step_norm`` if longer;
    4. evaluates the loss ``f(x + s)`` on the same batch. If it is lower than ``f``
       the step is accepted and ``eps <- eps * damping_down``; otherwise the
       parameters are restored, ``eps <- eps * damping_up`` and steps 2-4 are retried,
       at most ``max_tries`` times in all (reusing the stage derivatives of ``B``).
       A step that changes the loss only at rounding level is accepted as converged
       (``eps`` kept).

    ``eps`` (``damping`` in ``param_groups``) stays in ``[min_damping, max_damping]``
    (raising it from 0 goes to at least ``max(min_damping, 1e-8)``). If
    ``B + max_damping I`` is still indefinite the direction falls back to the gradient,
    ``p = g / max_damping``.

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
            (:class:`hessinv.ChainGGN`: classic Levenberg-Marquardt) or a factory
            ``(model, loss_fn, inputs, targets) -> curvature`` returning a
            :class:`~hessinv.optim.CurvatureProtocol`.
        params: the parameters to optimize (tensors, names or parameter groups; default: the
            model's with ``requires_grad``); the others are constants of the curvature.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for the default one) when each rank steps on its own shard of the batch: the
            curvature, the gradient and the trial losses are those of the union of the shards
            (:mod:`hessinv.distributed`), so every rank takes the same step. ``None``: one
            process.

    ``step`` returns the batch loss *before* the step, as a Python float. After it,
    ``opt.last_step`` holds: ``damping`` (the ``eps`` of the last try), ``accepted``,
    ``converged``, ``step_norm``, ``predicted_reduction``, ``actual_reduction``, ``rho``,
    ``tries`` (loss evaluations), ``factorizations``, ``direction`` (``"newton"`` or
    ``"gradient"``), ``method`` (the factorization's route), ``loss`` and ``new_loss``.

    Example: logistic regression (one stage) with a learning-rate schedule.

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.optim import DampedNewton
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = (X[:, 0] + 0.5 * torch.randn(40, generator=g, dtype=torch.float64) > 0).long()
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 2)).double()
    >>> opt = DampedNewton(model, nn.CrossEntropyLoss(), damping=1e-3)
    >>> isinstance(opt, torch.optim.Optimizer)
    True
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    >>> losses = []
    >>> for _ in range(8):
    ...     losses.append(opt.step(X, y))
    ...     sched.step()
    >>> losses[-1] < 0.5 * losses[0], opt.last_step["accepted"], opt.param_groups[0]["lr"]
    (True, True, 0.25)
    """

    _SHARED = (
        "damping_up",
        "damping_down",
        "min_damping",
        "max_damping",
        "max_step_norm",
        "max_tries",
    )
    _ADAPTIVE = ("damping",)

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
        params=None,
        process_group=None,
    ):
        defaults = {
            "lr": positive(lr, "lr"),
            "damping": damping,
            "damping_up": damping_up,
            "damping_down": damping_down,
            "min_damping": min_damping,
            "max_damping": max_damping,
            "max_step_norm": max_step_norm,
            "max_tries": max_tries,
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

    def _check_hyper(self, hyper: dict) -> None:
        damping_up = real(hyper["damping_up"], "damping_up")
        if not 1 < damping_up < math.inf:
            raise ValueError(f"damping_up must be > 1 and finite, got {damping_up}")
        damping_down = real(hyper["damping_down"], "damping_down")
        if not 0 < damping_down <= 1:
            raise ValueError(f"damping_down must be in (0, 1], got {damping_down}")
        min_damping = nonnegative(hyper["min_damping"], "min_damping")
        max_damping = positive(hyper["max_damping"], "max_damping")
        if min_damping > max_damping:
            raise ValueError(f"min_damping {min_damping} exceeds max_damping {max_damping}")
        if hyper["max_step_norm"] is not None:
            positive(hyper["max_step_norm"], "max_step_norm")
        positive_int(hyper["max_tries"], "max_tries")
        within(
            nonnegative(hyper["damping"], "damping"),
            "damping",
            min_damping,
            max_damping,
            "min_damping, max_damping",
        )

    @property
    def damping(self) -> float:
        """The current ``eps`` (kept in ``param_groups``)."""
        return float(self.param_groups[0]["damping"])

    @staticmethod
    def _raise(eps: float, hyper: dict) -> float:
        return min(hyper["max_damping"], max(eps * hyper["damping_up"], hyper["min_damping"], 1e-8))

    @staticmethod
    def _lower(eps: float, hyper: dict) -> float:
        return max(hyper["min_damping"], eps * hyper["damping_down"])

    # ------------------------------------------------------------------ template hooks
    def _propose(self, curvature: CurvatureProtocol, g: torch.Tensor, hyper: dict) -> Proposal:
        # the smallest eps (on the multiplicative grid from the current one) with B + eps I PD
        eps, factorizations = hyper["damping"], 0
        while True:
            F, pd = try_factorize(curvature, eps)
            factorizations += 0 if F is not None and getattr(F, "reused_factors", False) else 1
            if pd or eps >= hyper["max_damping"]:
                break
            eps = self._raise(eps, hyper)
        if pd:
            p, direction = F.solve(g), "newton"
        else:
            p, direction = g / eps, "gradient"
        method = getattr(F, "method", None) if pd else None
        return Proposal(
            -p, factorizations, {"damping": eps, "direction": direction, "method": method}
        )

    def _adapt(self, proposal: Proposal, trial: Trial, hyper: dict) -> Verdict:
        eps = proposal.diagnostics["damping"]
        if math.isfinite(trial.new_loss) and trial.new_loss < trial.loss:
            return Verdict(
                accepted=True, diagnostics={"adapted": {"damping": self._lower(eps, hyper)}}
            )
        if trial.converged:  # the loss changes only at rounding level: keep eps
            return Verdict(accepted=True, diagnostics={"adapted": {"damping": eps}})
        return Verdict(
            accepted=False, diagnostics={"adapted": {"damping": self._raise(eps, hyper)}}
        )
