r"""The step template shared by the second-order optimizers.

One call ``loss = opt.step(inputs, targets)`` at parameters ``x`` on a batch:

1. builds the curvature ``B`` on the batch (the exact Hessian :class:`hessinv.ChainHessian`,
   the Gauss-Newton matrix ``hessinv.ChainGGN`` or any
   :class:`~hessinv.optim.CurvatureProtocol` from a factory), with the loss ``f`` and the
   gradient ``g``; ``B + eps I`` is factorized exactly, in time linear in depth
   (docs/algorithm.md section 5);
2. asks the optimizer for a step ``s`` (its ``_propose``) and evaluates the quadratic model

       m(s) = f + g^T s + 1/2 s^T B s,

   the *predicted reduction* ``pred = m(0) - m(s)`` (one product ``B s``), the loss
   ``f(x + s)`` on the same batch, the *actual reduction* ``ared = f(x) - f(x + s)`` and

       rho = ared / pred;

   the step has *converged* when ``pred`` and ``-ared`` are both at rounding level
   (``100 eps_mach |f|``): then ``rho = 1``. If ``pred <= 0`` otherwise, or the new loss is
   not finite, ``rho = -inf``;
3. lets the optimizer accept or reject the step and adapt its damping or radius (its
   ``_adapt``); a rejected step restores the parameters exactly and is retried with the
   adapted state and the same ``B`` (at most ``max_tries`` loss evaluations in all);
4. records ``last_step`` (``loss``, ``new_loss``, ``accepted``, ``converged``, ``tries``,
   ``factorizations``, ``step_norm``, ``predicted_reduction``, ``actual_reduction``,
   ``rho`` and the optimizer's own entries) and returns ``f``.

``state_dict()`` / ``load_state_dict()`` hold the hyper-parameters and the adaptive state
as plain Python numbers (not the choice of curvature, which may be a function).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from hessinv.curvature.hessian import ChainGGN, ChainHessian
from hessinv.network.chain import build_chain
from hessinv.network.checks import check_loss_fn, check_model
from hessinv.optim.protocol import CurvatureProtocol, check_curvature

__all__ = ["CurvatureOptimizer", "Proposal", "Trial", "Verdict", "resolve_curvature"]

_BUILTIN_CURVATURES = {"hessian": ChainHessian, "ggn": ChainGGN}
_ORACLES = ("auto", "generic", "analytic")

CurvatureFactory = Callable[[Any, Any, Any, Any], CurvatureProtocol]


class Proposal(NamedTuple):
    """A step proposed by an optimizer: ``step`` (flat), the ``factorizations`` it took, and
    ``diagnostics`` recorded in ``last_step`` (and read back by the optimizer's ``_adapt``)."""

    step: torch.Tensor
    factorizations: int
    diagnostics: dict


class Trial(NamedTuple):
    """The outcome of trying a step: see the module docstring for the quantities."""

    step_norm: float
    predicted_reduction: float
    actual_reduction: float
    rho: float
    loss: float
    new_loss: float
    converged: bool


class Verdict(NamedTuple):
    """An optimizer's decision on a trial: ``accepted``; ``stop`` retrying after a rejection;
    ``diagnostics`` to record (e.g. the adapted radius)."""

    accepted: bool
    stop: bool = False
    diagnostics: dict | None = None


def _builtin_curvature(cls, oracle: str, model, loss_fn, inputs, targets):
    return cls(model, loss_fn, inputs, targets, oracle=oracle)


def resolve_curvature(curvature, oracle: str = "auto") -> CurvatureFactory:
    """A factory ``(model, loss_fn, inputs, targets) -> curvature`` for the ``curvature`` argument.

    ``"hessian"``: :class:`hessinv.ChainHessian`; ``"ggn"``: :class:`hessinv.ChainGGN`; a
    callable: used as it is (what it returns is checked when called).
    """
    if isinstance(curvature, str):
        if curvature not in _BUILTIN_CURVATURES:
            raise ValueError(
                f"curvature must be 'hessian', 'ggn' or a callable "
                f"(model, loss_fn, inputs, targets) -> curvature, got {curvature!r}"
            )
        return functools.partial(_builtin_curvature, _BUILTIN_CURVATURES[curvature], oracle)
    if callable(curvature):
        return curvature
    raise TypeError(
        "curvature must be 'hessian', 'ggn' or a callable (model, loss_fn, inputs, targets) "
        f"-> curvature, got {type(curvature).__name__}"
    )


def rounding_level(f0: float, dtype: torch.dtype) -> float:
    """Loss changes below this are rounding noise: the step has converged."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 2.2e-16
    return 100 * eps * max(abs(f0), 1e-300)


class CurvatureOptimizer:
    """The step template (module docstring); subclasses implement the hooks

    * ``_propose(curvature, g) -> Proposal``: the step, from the current adaptive state;
    * ``_adapt(proposal, trial) -> Verdict``: accept or reject, update the adaptive state;
    * ``_configure(**hyper)`` / ``_load_adaptive(state)``: validate and set the names in
      ``_HYPER`` / ``_STATE`` (used by :meth:`load_state_dict`),

    and set ``max_tries``. A minimal example, the plain Newton step:

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.optim.base import CurvatureOptimizer, Proposal, Verdict
    >>> class Newton(CurvatureOptimizer):
    ...     max_tries = 1
    ...     def _propose(self, curvature, g):
    ...         return Proposal(-curvature.factorize(0.0).solve(g), 1, {})
    ...     def _adapt(self, proposal, trial):
    ...         return Verdict(trial.new_loss <= trial.loss)
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    >>> opt = Newton(nn.Sequential(nn.Linear(3, 1)).double(), nn.MSELoss())
    >>> losses = [opt.step(X, y) for _ in range(3)]   # least squares: one step solves it
    >>> losses[1] < losses[0], opt.last_step["converged"], opt.step_count
    (True, True, 3)
    """

    _HYPER: tuple[str, ...] = ()
    _STATE: tuple[str, ...] = ()
    max_tries: int = 1

    def __init__(self, model, loss_fn, oracle: str = "auto", curvature="hessian"):
        self._model_arg = model
        self._module = check_model(model)
        self.loss_fn = check_loss_fn(loss_fn)
        if oracle not in _ORACLES:
            raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
        self.oracle = oracle
        self._curvature_factory = resolve_curvature(curvature, oracle)
        self.curvature = curvature
        names = build_chain(model).param_names
        named = dict(self._module.named_parameters())
        self._params = [named[n] for n in names]
        self.param_names = names
        self.num_params = sum(p.numel() for p in self._params)
        self.step_count = 0
        self.last_step: dict = {}

    @property
    def model(self):
        return self._model_arg

    # ------------------------------------------------------------------ parameters
    # one flat vector in the curvature's order (named_parameters(), = ChainHessian.param_names)
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

    def _build_curvature(self, inputs, targets) -> CurvatureProtocol:
        curvature = self._curvature_factory(self._model_arg, self.loss_fn, inputs, targets)
        check_curvature(curvature, "the object the curvature factory returned")
        if curvature.num_params != self.num_params:
            raise ValueError(
                f"the curvature has num_params={curvature.num_params} but the model has "
                f"{self.num_params} trainable parameters"
            )
        return curvature

    # ------------------------------------------------------------------ the step
    def step(self, inputs, targets) -> float:
        """One step on the batch ``(inputs, targets)``; returns the batch loss before it (float)."""
        curvature = self._build_curvature(inputs, targets)
        f0 = float(curvature.loss)
        g = curvature.gradient().reshape(-1)
        x0 = self._get_flat()
        noise = rounding_level(f0, g.dtype)
        info: dict = {
            "loss": f0,
            "accepted": False,
            "converged": False,
            "tries": 0,
            "factorizations": 0,
        }
        for _ in range(self.max_tries):
            proposal = self._propose(curvature, g)
            s = proposal.step.reshape(-1)
            predicted = -float(g @ s + 0.5 * (s @ curvature.matvec(s)))
            self._set_flat(x0 + s)
            f1 = self._batch_loss(inputs, targets)
            actual = f0 - f1
            converged = predicted <= noise and math.isfinite(f1) and -actual <= noise
            if converged:
                rho = 1.0  # the loss changes at rounding level only
            elif predicted > 0 and math.isfinite(f1):
                rho = actual / predicted
            else:
                rho = -math.inf
            trial = Trial(
                step_norm=float(torch.linalg.vector_norm(s)),
                predicted_reduction=predicted,
                actual_reduction=actual,
                rho=rho,
                loss=f0,
                new_loss=f1,
                converged=converged,
            )
            verdict = self._adapt(proposal, trial)
            accepted = bool(verdict.accepted)
            info["tries"] += 1
            info["factorizations"] += proposal.factorizations
            info.update(proposal.diagnostics)
            info.update(verdict.diagnostics or {})
            info.update(
                accepted=accepted,
                converged=converged,
                step_norm=trial.step_norm,
                predicted_reduction=predicted,
                actual_reduction=actual,
                rho=rho,
                new_loss=f1 if accepted else f0,
            )
            if accepted:
                break
            self._set_flat(x0)
            if verdict.stop:
                break
        self.step_count += 1
        self.last_step = info
        return f0

    def _propose(self, curvature: CurvatureProtocol, g: torch.Tensor) -> Proposal:
        raise NotImplementedError  # pragma: no cover

    def _adapt(self, proposal: Proposal, trial: Trial) -> Verdict:
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ state
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
        self._configure(**{k: state[k] for k in self._HYPER})
        self._load_adaptive(state)
        count = state["step_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"step_count must be a non-negative int, got {count!r}")
        self.step_count = count

    def _configure(self, **hyper) -> None:
        if hyper:  # pragma: no cover - subclasses with hyper-parameters override
            raise NotImplementedError

    def _load_adaptive(self, state: dict) -> None:
        pass
