"""Second-order optimizers built on the exact Hessian of a chain network.

Both optimizers build a :class:`hessinv.ChainHessian` on the batch passed to
``step`` and use its exact factorization of ``H + lam I`` (ALGORITHM.md section 5),
which costs time linear in depth. Notation for one step at parameters ``x`` on a
batch: ``f`` the loss, ``g`` its gradient, ``H`` its Hessian and

    m(s) = f + g^T s + 1/2 s^T H s

the quadratic model of the loss around ``x``. The *predicted reduction* of a step
``s`` is ``m(0) - m(s)``, the *actual reduction* is ``f(x) - f(x + s)`` and
``rho = actual / predicted``.

* :class:`DampedNewton`: Levenberg-Marquardt damped Newton,
  ``s = -lr (H + eps I)^-1 g``, with ``eps`` adapted by the outcome of each step.
* :class:`TrustRegionNewton`: the exact (Moré-Sorensen) solution of the trust-region
  subproblem ``min m(s) s.t. ||s|| <= radius``, with the inertia of ``H + lam I``
  to tell where ``H + lam I`` is positive definite; the radius adapts with ``rho``.
* :func:`trust_region_subproblem`: that subproblem solver on its own.

Both update the model's parameters in place, like ``torch.optim`` optimizers, but
take the batch in ``step(inputs, targets)`` since they need the whole batch to
build ``H`` (and re-evaluate the loss on it to accept or reject the step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .chain import build_chain
from .hessian import ChainHessian
from .riccati import SingularStageError
from .vectors import flatten

__all__ = ["DampedNewton", "TrustRegionNewton", "trust_region_subproblem", "TrustRegionSolution"]


# ---------------------------------------------------------------------------- argument checks
def _real(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _positive(value, name: str, allow_inf: bool = False) -> float:
    value = _real(value, name)
    if not value > 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def _nonnegative(value, name: str, allow_inf: bool = False) -> float:
    value = _real(value, name)
    if value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_model(model) -> nn.Module:
    if isinstance(model, nn.Sequential):
        return model
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        return nn.Sequential(*model)
    raise TypeError(
        "model must be a torch.nn.Sequential or a non-empty list of nn.Module stages, got "
        f"{type(model).__name__}"
    )


# ---------------------------------------------------------------------------- shared machinery
class _ChainOptimizer:
    """Parameter bookkeeping shared by the two optimizers."""

    _HYPER: tuple[str, ...] = ()
    _STATE: tuple[str, ...] = ()

    def __init__(self, model, loss_fn, oracle: str):
        self._model_arg = model
        self._module = _check_model(model)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if oracle not in ("auto", "generic", "analytic"):
            raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
        self.loss_fn = loss_fn
        self.oracle = oracle
        names = build_chain(model).param_names
        named = dict(self._module.named_parameters())
        self._params = [named[n] for n in names]
        self.param_names = names
        self.step_count = 0
        self.last_step: dict = {}

    @property
    def model(self):
        return self._model_arg

    # parameters as one flat vector, in ChainHessian.param_names order
    def _get_flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params]).clone()

    def _set_flat(self, vec: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self._params:
                n = p.numel()
                p.copy_(vec[offset : offset + n].view_as(p))
                offset += n

    def _batch_loss(self, inputs, targets) -> float:
        with torch.no_grad():
            return float(self.loss_fn(self._module(inputs), targets))

    def _hessian(self, inputs, targets) -> ChainHessian:
        return ChainHessian(self._model_arg, self.loss_fn, inputs, targets, oracle=self.oracle)

    # state
    def state_dict(self) -> dict:
        """Hyper-parameters and adaptive state (a plain dict of Python numbers)."""
        out = {k: getattr(self, k) for k in self._HYPER + self._STATE}
        out["step_count"] = self.step_count
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (values are validated)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        expected = set(self._HYPER + self._STATE + ("step_count",))
        missing, extra = expected - set(state), set(state) - expected
        if missing or extra:
            raise ValueError(
                f"state_dict keys do not match {type(self).__name__}: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        kwargs = {k: state[k] for k in self._HYPER}
        self._configure(**kwargs)
        self._load_adaptive(state)
        count = state["step_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"step_count must be a non-negative int, got {count!r}")
        self.step_count = count

    def _configure(self, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError

    def _load_adaptive(self, state: dict):  # pragma: no cover - overridden
        raise NotImplementedError


def _factorize(hessian, lam: float):
    """``(F, positive_definite)`` for ``H + lam I``; ``(None, False)`` when it is singular.

    A singular stage Schur complement means ``H + lam I`` is not positive definite, so no
    (expensive) pivoted fallback factorization is made just to learn that.
    """
    try:
        F = hessian.factorize(lam, fallback=False)
    except SingularStageError:
        return None, False
    pd = getattr(F, "method", "riccati") == "riccati" and bool(F.is_positive_definite)
    return F, pd


def _rounding_level(f0: float, dtype: torch.dtype) -> float:
    """Loss changes below this are rounding noise: the step has converged."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 2.2e-16
    return 100 * eps * max(abs(f0), 1e-300)


def _n_negative(F) -> int | None:
    if F is None:
        return None
    try:
        return int(F.inertia()[1])
    except (RuntimeError, AttributeError):
        return None


# ---------------------------------------------------------------------------- damped Newton
class DampedNewton(_ChainOptimizer):
    r"""Levenberg-Marquardt damped Newton with the exact solve ``(H + eps I)^-1 g``.

    One call ``loss = opt.step(inputs, targets)``:

    1. builds ``H`` on the batch, with loss ``f`` and gradient ``g``;
    2. factorizes ``H + eps I``; while it is not positive definite (the inertia of
       the stage Schur complements says so exactly) ``eps <- eps * damping_up``, so
       ``p = (H + eps I)^-1 g`` is always a descent direction (``g^T p > 0``);
    3. proposes ``s = -lr p``, rescaled to norm ``max_step_norm`` if longer;
    4. evaluates the loss ``f(x + s)`` on the same batch. If it is lower than ``f``
       the step is accepted and ``eps <- eps * damping_down``; otherwise the
       parameters are restored, ``eps <- eps * damping_up`` and steps 2-4 are retried,
       at most ``max_tries`` times in all (reusing the stage derivatives of ``H``).

    ``eps`` stays in ``[min_damping, max_damping]`` (raising it from 0 goes to at
    least ``max(min_damping, 1e-8)``). If ``H + max_damping I`` is still indefinite
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
        oracle: passed to :class:`hessinv.ChainHessian`.

    ``step`` returns the batch loss *before* the step, as a Python float. After it,
    ``opt.last_step`` holds: ``damping`` (the ``eps`` of the last try), ``accepted``,
    ``step_norm``, ``predicted_reduction``, ``actual_reduction``, ``rho``, ``tries``
    (loss evaluations), ``factorizations``, ``direction`` (``"newton"`` or
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
        "lr", "damping_up", "damping_down", "min_damping", "max_damping", "max_step_norm",
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
    ):
        super().__init__(model, loss_fn, oracle)
        self._configure(
            lr=lr, damping_up=damping_up, damping_down=damping_down, min_damping=min_damping,
            max_damping=max_damping, max_step_norm=max_step_norm, max_tries=max_tries,
        )
        self.damping = self._check_damping(damping)

    def _configure(
        self, lr, damping_up, damping_down, min_damping, max_damping, max_step_norm, max_tries
    ):
        lr = _positive(lr, "lr")
        damping_up = _real(damping_up, "damping_up")
        if not 1 < damping_up < math.inf:
            raise ValueError(f"damping_up must be > 1 and finite, got {damping_up}")
        damping_down = _real(damping_down, "damping_down")
        if not 0 < damping_down <= 1:
            raise ValueError(f"damping_down must be in (0, 1], got {damping_down}")
        min_damping = _nonnegative(min_damping, "min_damping")
        max_damping = _positive(max_damping, "max_damping")
        if min_damping > max_damping:
            raise ValueError(f"min_damping {min_damping} exceeds max_damping {max_damping}")
        if max_step_norm is not None:
            max_step_norm = _positive(max_step_norm, "max_step_norm")
        max_tries = _positive_int(max_tries, "max_tries")
        self.lr, self.damping_up, self.damping_down = lr, damping_up, damping_down
        self.min_damping, self.max_damping = min_damping, max_damping
        self.max_step_norm, self.max_tries = max_step_norm, max_tries

    def _check_damping(self, damping) -> float:
        damping = _nonnegative(damping, "damping")
        if not self.min_damping <= damping <= self.max_damping:
            raise ValueError(
                f"damping {damping} must lie in [min_damping, max_damping] = "
                f"[{self.min_damping}, {self.max_damping}]"
            )
        return damping

    def _load_adaptive(self, state):
        self.damping = self._check_damping(state["damping"])

    def _raise(self, eps: float) -> float:
        return min(self.max_damping, max(eps * self.damping_up, self.min_damping, 1e-8))

    def _lower(self, eps: float) -> float:
        return max(self.min_damping, eps * self.damping_down)

    def step(self, inputs, targets) -> float:
        """One damped Newton step on the batch; returns the batch loss before it (float)."""
        H = self._hessian(inputs, targets)
        f0 = float(H.loss)
        g = H.gradient()
        x0 = self._get_flat()
        eps = self.damping
        info = {
            "loss": f0, "accepted": False, "converged": False, "tries": 0, "factorizations": 0
        }
        for _ in range(self.max_tries):
            # the smallest eps (on the multiplicative grid) with H + eps I positive definite
            while True:
                F, pd = _factorize(H, eps)
                info["factorizations"] += 1
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
                snorm = self.max_step_norm
            predicted = -float(g @ s + 0.5 * (s @ H.matvec(s)))
            self._set_flat(x0 + s)
            f1 = self._batch_loss(inputs, targets)
            info["tries"] += 1
            actual = f0 - f1
            info.update(
                damping=eps, step_norm=snorm, predicted_reduction=predicted,
                actual_reduction=actual, rho=actual / predicted if predicted != 0 else math.nan,
                direction=direction, new_loss=f1,
            )
            if math.isfinite(f1) and f1 < f0:
                info["accepted"] = True
                self.damping = self._lower(eps)
                break
            noise = _rounding_level(f0, g.dtype)
            if predicted <= noise and math.isfinite(f1) and f1 - f0 <= noise:
                # converged: the step changes the loss only at rounding level; keep eps
                info["accepted"] = True
                info["converged"] = True
                break
            self._set_flat(x0)
            info["new_loss"] = f0
            eps = self._raise(eps)
            self.damping = eps
        self.step_count += 1
        self.last_step = info
        return f0


# ---------------------------------------------------------------------------- trust region
class TrustRegionSolution(NamedTuple):
    """Result of :func:`trust_region_subproblem`.

    ``step``: the minimiser ``s``; ``lam``: its multiplier (``(H + lam I) s = -g`` up to the
    hard-case component); ``on_boundary``; ``hard_case``; ``factorizations`` and
    ``iterations`` used; ``n_negative``: negative eigenvalues of ``H`` (``None`` if unknown).
    """

    step: torch.Tensor
    lam: float
    on_boundary: bool
    hard_case: bool
    factorizations: int
    iterations: int
    n_negative: int | None


def _diagonal_bounds(hessian) -> tuple[float, float]:
    """``(-min_i H_ii, max_i |H_ii|)``; the first is a lower bound on ``-lambda_min(H)``."""
    try:
        diag = hessian.diagonal()
    except (AttributeError, NotImplementedError):
        return 0.0, 1.0
    diag = diag if isinstance(diag, torch.Tensor) else flatten(diag)
    return float(-diag.min()), float(diag.abs().max())


def trust_region_subproblem(
    hessian,
    g: torch.Tensor,
    radius: float,
    *,
    rtol: float = 1e-10,
    hard_tol: float = 1e-10,
    max_iter: int = 100,
    inverse_iterations: int = 3,
) -> TrustRegionSolution:
    r"""Exact solution of ``min_s g^T s + 1/2 s^T H s  s.t. ||s|| <= radius`` (Moré-Sorensen).

    ``s`` solves it iff ``(H + lam I) s = -g``, ``H + lam I`` is positive semidefinite,
    ``lam >= 0`` and ``lam (radius - ||s||) = 0``. With ``s(lam) = -(H + lam I)^-1 g``:

    * if ``H`` is positive definite and ``||s(0)|| <= radius``, ``s(0)`` is the answer;
    * otherwise ``lam > max(0, -lambda_min(H))`` solves the secular equation
      ``phi(lam) = 1/||s(lam)|| - 1/radius = 0`` (concave, increasing), by Newton steps
      ``lam <- lam + (||s|| / ||q||)^2 (||s|| - radius) / radius`` with
      ``||q||^2 = s^T (H + lam I)^-1 s`` (one extra solve with the same factorization).
      From the left of the root (``||s|| > radius``) these increase monotonically to it;
    * safeguards: a bracket ``[lam_L, lam_U]`` of the root. ``lam_L`` is raised to every
      ``lam`` at which the factorization reports ``H + lam I`` not positive definite (the
      exact inertia of the stage Schur complements: no guessing on indefinite ``H``) and
      to the lower bounds ``-min_i H_ii`` and ``-z^T H z`` (unit ``z``) of
      ``-lambda_min(H)``; a Newton step leaving the bracket is replaced by a bisection-type
      step ``lam_L + theta (lam_U - lam_L)`` (doubling while ``lam_U`` is unknown);
    * hard case (``g`` (nearly) orthogonal to the eigenvectors of ``lambda_min``, so
      ``||s(lam)|| < radius`` for all admissible ``lam``): ``z`` comes from inverse
      iteration with the factorization at ``lam`` just above ``-lambda_min``; the step is
      ``s + tau z`` with ``||s + tau z|| = radius`` (the root of smaller model value),
      accepted once ``tau^2 z^T (H + lam I) z <= hard_tol (s^T (H + lam I) s + lam radius^2)``:
      its model value is then within that relative gap of the optimum.

    ``hessian`` needs ``factorize(lam)`` (returning an object with ``solve`` and
    ``is_positive_definite``) and ``matvec`` (``diagonal`` optional), as
    :class:`hessinv.ChainHessian` has; its stage derivatives are computed once and
    reused by every factorization.
    """
    radius = _positive(radius, "radius")
    g = g.reshape(-1)
    gnorm = float(torch.linalg.vector_norm(g))
    n = g.shape[0]
    nfact = 0

    def norm(v) -> float:
        return float(torch.linalg.vector_norm(v))

    def model_value(s) -> float:
        return float(g @ s + 0.5 * (s @ hessian.matvec(s)))

    F, pd = _factorize(hessian, 0.0)
    nfact += 1
    n_negative = _n_negative(F)
    neg_min_diag, scale = _diagonal_bounds(hessian)
    lam_tiny = 100 * torch.finfo(g.dtype).eps * scale
    if pd:
        s = -F.solve(g)
        if norm(s) <= radius * (1 + rtol):
            return TrustRegionSolution(s, 0.0, False, False, nfact, 0, n_negative)
        lam_L, lam_U = 0.0, math.inf
        lam, current = 0.0, (F, s)
    else:
        lam_L, lam_U = max(0.0, neg_min_diag), math.inf  # H + lam_L I is not PD
        lam, current = None, None

    def bracket_trial(theta: float) -> float:
        if math.isinf(lam_U):
            return 2.0 * lam_L + max(gnorm / radius, 1e-8 * scale, 1e-300)
        return lam_L + theta * (lam_U - lam_L)

    if lam is None:
        lam = bracket_trial(0.5)
    gen = torch.Generator(device="cpu").manual_seed(12345)
    z = torch.randn(n, generator=gen, dtype=g.dtype).to(g.device)
    z = z / torch.linalg.vector_norm(z)
    best = None  # (model value, step, lam): best boundary point seen by the hard-case test
    it = 0
    for it in range(1, max_iter + 1):
        if current is None:
            F, pd = _factorize(hessian, lam)
            nfact += 1
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
            rq = float(z @ hessian.matvec(z))  # >= lambda_min(H)
            rq_active = -rq >= lam_L  # the Rayleigh bound is the best lower bound we have
            lam_L = max(lam_L, -rq)
            sAs = max(-float(g @ s), 0.0)
            gap_scale = hard_tol * (sAs + lam * radius * radius)
            # psi(s) - psi* <= lam (radius^2 - ||s||^2) / 2: s itself is optimal enough
            # (hard case at lam = 0: H singular positive semidefinite; a lam at rounding
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
                # psi(s + tau z) - psi* <= tau^2 z^T (H + lam I) z / 2
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


class TrustRegionNewton(_ChainOptimizer):
    r"""Trust-region Newton with the exact subproblem solution (see :func:`trust_region_subproblem`).

    One call ``loss = opt.step(inputs, targets)``:

    1. builds ``H`` on the batch, with loss ``f`` and gradient ``g``;
    2. solves ``s = argmin_{||s|| <= radius} g^T s + 1/2 s^T H s`` exactly, whether ``H``
       is definite or not (``H + lam I`` factorized at a few ``lam``, all reusing the
       stage derivatives of ``H``);
    3. ``rho = (f(x) - f(x + s)) / (m(0) - m(s))`` on the same batch;
       ``radius <- shrink * min(radius, ||s||)`` if ``rho < 0.25``,
       ``radius <- min(grow * radius, max_radius)`` if ``rho > 0.75`` and ``||s|| = radius``;
    4. accepts the step if ``rho > eta``; otherwise restores the parameters and retries
       with the smaller radius, at most ``max_tries`` tries in all (same ``H``).

    ``radius`` never drops below ``min_radius``.

    Args:
        model, loss_fn, oracle: as for :class:`DampedNewton`.
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
    batch Hessian), ``loss`` and ``new_loss``.

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
        "max_radius", "min_radius", "eta", "shrink", "grow", "max_tries", "rtol", "hard_tol",
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
    ):
        super().__init__(model, loss_fn, oracle)
        self._configure(
            max_radius=max_radius, min_radius=min_radius, eta=eta, shrink=shrink, grow=grow,
            max_tries=max_tries, rtol=rtol, hard_tol=hard_tol,
        )
        self.radius = self._check_radius(radius)

    def _configure(self, max_radius, min_radius, eta, shrink, grow, max_tries, rtol, hard_tol):
        max_radius = _positive(max_radius, "max_radius", allow_inf=True)
        min_radius = _positive(min_radius, "min_radius")
        if min_radius > max_radius:
            raise ValueError(f"min_radius {min_radius} exceeds max_radius {max_radius}")
        eta = _real(eta, "eta")
        if not 0 <= eta < 0.25:
            raise ValueError(f"eta must be in [0, 0.25), got {eta}")
        shrink = _real(shrink, "shrink")
        if not 0 < shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}")
        grow = _real(grow, "grow")
        if not 1 < grow < math.inf:
            raise ValueError(f"grow must be > 1 and finite, got {grow}")
        self.max_radius, self.min_radius, self.eta = max_radius, min_radius, eta
        self.shrink, self.grow = shrink, grow
        self.max_tries = _positive_int(max_tries, "max_tries")
        self.rtol = _positive(rtol, "rtol")
        self.hard_tol = _positive(hard_tol, "hard_tol")

    def _check_radius(self, radius) -> float:
        radius = _real(radius, "radius")
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        if not self.min_radius <= radius <= self.max_radius:
            raise ValueError(
                f"radius {radius} must lie in [min_radius, max_radius] = "
                f"[{self.min_radius}, {self.max_radius}]"
            )
        return radius

    def _load_adaptive(self, state):
        self.radius = self._check_radius(state["radius"])

    def step(self, inputs, targets) -> float:
        """One trust-region step on the batch; returns the batch loss before it (float)."""
        H = self._hessian(inputs, targets)
        f0 = float(H.loss)
        g = H.gradient()
        x0 = self._get_flat()
        info = {"loss": f0, "accepted": False, "tries": 0, "factorizations": 0}
        for _ in range(self.max_tries):
            radius = self.radius
            sol = trust_region_subproblem(H, g, radius, rtol=self.rtol, hard_tol=self.hard_tol)
            s = sol.step
            snorm = float(torch.linalg.vector_norm(s))
            predicted = -float(g @ s + 0.5 * (s @ H.matvec(s)))
            self._set_flat(x0 + s)
            f1 = self._batch_loss(inputs, targets)
            actual = f0 - f1
            noise = _rounding_level(f0, g.dtype)
            converged = predicted <= noise and math.isfinite(f1) and -actual <= noise
            if converged:
                rho = 1.0  # converged: the loss changes at rounding level only
            elif predicted > 0 and math.isfinite(f1):
                rho = actual / predicted
            else:
                rho = -math.inf
            if converged:
                pass
            elif rho < 0.25:
                self.radius = max(self.min_radius, self.shrink * min(radius, snorm))
            elif rho > 0.75 and sol.on_boundary:
                self.radius = min(self.max_radius, self.grow * radius)
            info["tries"] += 1
            info["factorizations"] += sol.factorizations
            accepted = converged or (rho > self.eta and f1 <= f0)
            info.update(
                radius=radius, new_radius=self.radius, accepted=accepted, step_norm=snorm,
                on_boundary=sol.on_boundary, hard_case=sol.hard_case, lam=sol.lam,
                predicted_reduction=predicted, actual_reduction=actual, rho=rho,
                n_negative=sol.n_negative, new_loss=f1 if accepted else f0, converged=converged,
            )
            if accepted:
                break
            self._set_flat(x0)
            if self.radius <= self.min_radius and radius <= self.min_radius:
                break
        self.step_count += 1
        self.last_step = info
        return f0
