r"""The step template shared by the second-order optimizers, as a ``torch.optim.Optimizer``.

Design (docs/algorithm.md sections 5, 14):

* **An optimizer of the parameters, built from the model.** The curvature needs the model
  and the loss, so ``DampedNewton(model, loss_fn, ...)``; the parameters it updates are
  ``params`` (default: those of ``model`` with ``requires_grad``), given like any
  ``torch.optim`` optimizer's -- tensors, names from ``model.named_parameters()``, or
  parameter groups (dicts with ``"params"``). Their union is the ``params=`` of the
  curvature: the others are constants.
* **Hyper-parameters live in ``param_groups``**, so learning-rate schedulers and
  ``state_dict()`` / ``load_state_dict()`` work as for any optimizer. ``lr`` may differ
  between groups (each scales its own part of the step); the others (``damping``,
  ``radius``, ...) are one value for all groups, since one factorization covers all the
  parameters: they are kept equal in every group, and the adaptive ones (``damping``,
  ``radius``) and ``step_count`` are updated there.
* **``step`` takes the batch**: ``opt.step(inputs, targets)`` (or
  ``opt.step(inputs=..., targets=...)``). The exact curvature is built on that batch, and
  the loss is evaluated on it to accept or reject the step, so a ``closure`` (which returns
  a loss but not the batch) cannot replace it and is refused with a message that says what
  to pass. ``zero_grad()`` works (the step itself does not read ``.grad``).

One call ``loss = opt.step(inputs, targets)`` at parameters ``x`` on a batch:

1. builds the curvature ``B`` on the batch (the exact Hessian :class:`hessinv.ChainHessian`,
   the Gauss-Newton matrix :class:`hessinv.ChainGGN` or any
   :class:`~hessinv.optim.CurvatureProtocol` from a factory), with the loss ``f`` and the
   gradient ``g``; ``B + damping I`` is factorized exactly, in time linear in depth;
2. asks the optimizer for a step ``s`` (its ``_propose``) and evaluates the quadratic model

       m(s) = f + g^T s + 1/2 s^T B s,

   the *predicted reduction* ``pred = m(0) - m(s)`` (one product ``B s``), the loss
   ``f(x + s)`` on the same batch, the *actual reduction* ``ared = f(x) - f(x + s)`` and
   ``rho = ared / pred``; the step has *converged* when ``pred`` and ``-ared`` are both at
   rounding level (``100 eps_mach max(|f|, f_scale)``, ``f_scale`` the largest loss seen):
   then ``rho = 1``. If ``pred <= 0`` otherwise, or the new loss is not finite,
   ``rho = -inf``;
3. lets the optimizer accept or reject the step and adapt its damping or radius (its
   ``_adapt``); a rejected step restores the parameters exactly and is retried with the
   adapted state and the same ``B`` (at most ``max_tries`` loss evaluations in all);
4. records ``last_step`` (``loss``, ``new_loss``, ``accepted``, ``converged``, ``tries``,
   ``factorizations``, ``step_norm``, ``predicted_reduction``, ``actual_reduction``,
   ``rho`` and the optimizer's own entries) and returns ``f``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from hessinv.curvature.hessian import ChainGGN, ChainHessian
from hessinv.distributed import DataParallelGGN, DataParallelHessian
from hessinv.network.checks import ORACLES, check_loss_fn, check_model, parameter_named, positive
from hessinv.optim.protocol import CurvatureProtocol, check_curvature

__all__ = ["CurvatureOptimizer", "Proposal", "Trial", "Verdict", "resolve_curvature"]

_BUILTIN_CURVATURES = {"hessian": ChainHessian, "ggn": ChainGGN}
_DATA_PARALLEL_CURVATURES = {"hessian": DataParallelHessian, "ggn": DataParallelGGN}

CurvatureFactory = Callable[..., CurvatureProtocol]


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


def _builtin_curvature(cls, oracle: str, names, model, loss_fn, inputs, targets, **kw):
    return cls(model, loss_fn, inputs, targets, params=names, oracle=oracle, progress=False, **kw)


def resolve_curvature(
    curvature, oracle: str = "auto", names=None, process_group: Any = None
) -> CurvatureFactory:
    """A factory ``(model, loss_fn, inputs, targets) -> curvature`` for the ``curvature`` argument.

    ``"hessian"``: :class:`hessinv.ChainHessian`; ``"ggn"``: :class:`hessinv.ChainGGN` (both on
    the parameters ``names``; with a ``process_group``, their data-parallel versions
    :class:`hessinv.distributed.DataParallelHessian` and ``DataParallelGGN`` on it); a
    callable: used as it is (what it returns is checked when called).
    """
    if isinstance(curvature, str):
        if curvature not in _BUILTIN_CURVATURES:
            raise ValueError(
                f"curvature must be 'hessian', 'ggn' or a callable "
                f"(model, loss_fn, inputs, targets) -> curvature, got {curvature!r}"
            )
        if process_group is not None:
            cls = _DATA_PARALLEL_CURVATURES[curvature]
            return functools.partial(
                _builtin_curvature, cls, oracle, names, process_group=process_group
            )
        return functools.partial(_builtin_curvature, _BUILTIN_CURVATURES[curvature], oracle, names)
    if process_group is not None:
        raise TypeError(
            "with process_group=, curvature must be 'hessian' or 'ggn' (the data-parallel "
            "curvatures also evaluate the trial loss on the global batch)"
        )
    if callable(curvature):
        return curvature
    raise TypeError(
        "curvature must be 'hessian', 'ggn' or a callable (model, loss_fn, inputs, targets) "
        f"-> curvature, got {type(curvature).__name__}"
    )


def rounding_level(f0: float, dtype: torch.dtype, scale: float = 0.0) -> float:
    """Loss changes below this are rounding noise: the step has converged. ``scale``: the
    largest loss seen, so that a fit that has reached its rounding floor (``f`` near ``1e-31``
    in a least-squares problem whose losses were O(1)) counts as converged."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 2.2e-16
    return 100 * eps * max(abs(f0), scale, 1e-300)


def _closure_refused(name: str) -> TypeError:
    return TypeError(
        f"{name}.step takes the batch, not a closure: call opt.step(inputs, targets) (or "
        "opt.step(inputs=..., targets=...)); it builds the exact curvature of "
        "loss_fn(model(inputs), targets) on that batch and evaluates the loss there itself"
    )


class CurvatureOptimizer(torch.optim.Optimizer):
    """The step template (module docstring); subclasses implement the hooks

    * ``_propose(curvature, g, hyper) -> Proposal``: the step, from the current state;
    * ``_adapt(proposal, trial, hyper) -> Verdict``: accept or reject, and return the new
      values of the adaptive hyper-parameters in ``Verdict.diagnostics["adapted"]``;
    * ``_check_hyper(hyper)``: validate the shared hyper-parameters (a dict),

    and list ``_SHARED`` (hyper-parameters one value for all groups) and ``_ADAPTIVE``
    (those the optimizer adapts). A minimal example, the plain Newton step:

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.optim.base import CurvatureOptimizer, Proposal, Verdict
    >>> class Newton(CurvatureOptimizer):
    ...     def _propose(self, curvature, g, hyper):
    ...         return Proposal(-curvature.factorize(0.0).solve(g), 1, {})
    ...     def _adapt(self, proposal, trial, hyper):
    ...         return Verdict(trial.new_loss <= trial.loss)
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    >>> opt = Newton(nn.Sequential(nn.Linear(3, 1)).double(), nn.MSELoss())
    >>> losses = [opt.step(X, y) for _ in range(3)]   # least squares: one step solves it
    >>> losses[1] < losses[0], opt.last_step["converged"], opt.step_count
    (True, True, 3)
    """

    _SHARED: tuple[str, ...] = ("max_tries",)
    _ADAPTIVE: tuple[str, ...] = ()

    def __init__(
        self,
        model,
        loss_fn,
        params=None,
        defaults: dict[str, Any] | None = None,
        *,
        oracle: str = "auto",
        curvature="hessian",
        process_group: Any = None,
    ):
        self._module = check_model(model)
        self._model_arg = model
        self.loss_fn = check_loss_fn(loss_fn)
        if oracle not in ORACLES:
            raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
        defaults = {"lr": 1.0, "max_tries": 1, "step_count": 0, **(defaults or {})}
        super().__init__(self._param_groups(params), defaults)
        named = list(self._module.named_parameters())
        chosen = {id(p) for group in self.param_groups for p in group["params"]}
        self.param_names = tuple(n for n, p in named if id(p) in chosen)
        if len(self.param_names) != len(chosen):
            raise ValueError("params must be parameters of the model (each once)")
        lookup = dict(named)
        self._params = [lookup[n] for n in self.param_names]
        self.num_params = sum(p.numel() for p in self._params)
        self._lr_vector: torch.Tensor | None = None
        self.oracle = oracle
        self.curvature = curvature
        self._curvature_factory = resolve_curvature(
            curvature, oracle, list(self.param_names), process_group
        )
        self.process_group = process_group
        self.last_step: dict = {}
        self._loss_scale = 0.0
        self._check_groups()

    def _param_groups(self, params) -> list:
        """``params`` as ``torch.optim`` takes them, names resolved to the model's tensors."""
        named = dict(self._module.named_parameters())
        if params is None:
            chosen = [p for p in self._module.parameters() if p.requires_grad]
            if not chosen:
                raise ValueError("the model has no parameters with requires_grad")
            return chosen

        def resolve(items) -> list:
            if isinstance(items, (torch.Tensor, str)) or not isinstance(items, Iterable):
                items = [items]
            out = []
            for item in items:
                if isinstance(item, str):
                    out.append(parameter_named(named, item))
                elif isinstance(item, torch.Tensor):
                    out.append(item)
                else:
                    raise TypeError(
                        f"params entries must be tensors, names or parameter groups (dicts), "
                        f"got {type(item).__name__}"
                    )
            return out

        params = list(params)
        if params and all(isinstance(g, dict) for g in params):
            return [{**g, "params": resolve(g["params"])} for g in params]
        return resolve(params)

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def model(self):
        return self._model_arg

    @property
    def step_count(self) -> int:
        """Steps taken (kept in ``param_groups``, so it round-trips with ``state_dict``)."""
        return int(self.param_groups[0]["step_count"])

    def hyper(self) -> dict[str, Any]:
        """The shared hyper-parameters (one value for every group), validated."""
        return self._check_groups()

    def _check_groups(self) -> dict[str, Any]:
        first = self.param_groups[0]
        for group in self.param_groups:
            positive(group["lr"], "lr")
            for key in (*self._SHARED, *self._ADAPTIVE, "step_count"):
                if group[key] != first[key]:
                    raise ValueError(
                        f"{key} differs between parameter groups ({first[key]!r} and "
                        f"{group[key]!r}); one factorization covers every group, so only lr "
                        "may differ"
                    )
        hyper = {key: first[key] for key in (*self._SHARED, *self._ADAPTIVE)}
        self._check_hyper(hyper)
        count = first["step_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"step_count must be a non-negative int, got {count!r}")
        return hyper

    def _check_hyper(self, hyper: dict[str, Any]) -> None:
        pass

    def _set_shared(self, **values) -> None:
        for group in self.param_groups:
            group.update(values)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then the hyper-parameters are
        validated (a clear error names a bad value)."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise TypeError(
                "state_dict must be what state_dict() returned (a dict with 'state' and "
                f"'param_groups'), got {type(state_dict).__name__}"
            )
        missing = [
            k
            for k in (*self._SHARED, *self._ADAPTIVE, "lr", "step_count")
            if any(k not in g for g in state_dict["param_groups"])
        ]
        if missing:
            raise ValueError(f"state_dict param_groups lack {missing}")
        saved = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        try:
            self._check_groups()
        except (TypeError, ValueError):
            for group, old in zip(self.param_groups, saved, strict=True):
                group.update({k: v for k, v in old.items() if k != "params"})
            raise
        self._lr_vector = None

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

    def _lr(self, like: torch.Tensor) -> torch.Tensor | float:
        """The learning rate per parameter entry (a float when every group has the same)."""
        rates = {float(g["lr"]) for g in self.param_groups}
        if len(rates) == 1:
            return rates.pop()
        of = {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}
        return torch.cat([like.new_full((p.numel(),), of[id(p)]) for p in self._params])

    def _batch_loss(self, inputs, targets, curvature) -> float:
        """The loss on the batch at the current parameters; under a ``process_group`` on the
        global batch (every rank's), through the data-parallel curvature."""
        with torch.no_grad():
            outputs = self._module(inputs)
            if self.process_group is not None:
                return float(curvature.loss_at(outputs))
            return float(self.loss_fn(outputs, targets))

    def _build_curvature(self, inputs, targets) -> CurvatureProtocol:
        curvature = self._curvature_factory(self._model_arg, self.loss_fn, inputs, targets)
        check_curvature(curvature, "the object the curvature factory returned")
        if curvature.num_params != self.num_params:
            raise ValueError(
                f"the curvature has num_params={curvature.num_params} but the optimizer has "
                f"{self.num_params} parameters"
            )
        return curvature

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, inputs=None, targets=None, *, closure=None) -> float:  # type: ignore[override]
        """One step on the batch ``(inputs, targets)``; returns the batch loss before it (float)."""
        name = type(self).__name__
        if closure is not None or (
            callable(inputs) and targets is None and not isinstance(inputs, torch.Tensor)
        ):
            raise _closure_refused(name)
        if inputs is None or targets is None:
            raise TypeError(f"{name}.step needs the batch: opt.step(inputs, targets)")
        hyper = self.hyper()
        with torch.enable_grad():
            curvature = self._build_curvature(inputs, targets)
        f0 = float(curvature.loss)
        g = curvature.gradient().reshape(-1)
        x0 = self._get_flat()
        self._loss_scale = max(self._loss_scale, abs(f0))
        noise = rounding_level(f0, g.dtype, self._loss_scale)
        lr = self._lr(g)
        info: dict = {
            "loss": f0,
            "accepted": False,
            "converged": False,
            "tries": 0,
            "factorizations": 0,
        }
        for _ in range(hyper["max_tries"]):
            proposal = self._propose(curvature, g, hyper)
            s = proposal.step.reshape(-1) * lr
            bound = hyper.get("max_step_norm")
            if bound is not None:  # after the learning rate: ||s|| itself is bounded
                snorm = float(torch.linalg.vector_norm(s))
                if snorm > bound:
                    s = s * (bound / snorm)
            predicted = -float(g @ s + 0.5 * (s @ curvature.matvec(s)))
            self._set_flat(x0 + s)
            f1 = self._batch_loss(inputs, targets, curvature)
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
            verdict = self._adapt(proposal, trial, hyper)
            accepted = bool(verdict.accepted)
            diagnostics = dict(verdict.diagnostics or {})
            adapted = diagnostics.pop("adapted", {})
            hyper.update(adapted)
            self._set_shared(**adapted)
            info["tries"] += 1
            info["factorizations"] += proposal.factorizations
            info.update(proposal.diagnostics)
            info.update(diagnostics)
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
        self._set_shared(step_count=self.step_count + 1)
        self.last_step = info
        return f0

    def _propose(self, curvature: CurvatureProtocol, g: torch.Tensor, hyper: dict) -> Proposal:
        raise NotImplementedError  # pragma: no cover

    def _adapt(self, proposal: Proposal, trial: Trial, hyper: dict) -> Verdict:
        raise NotImplementedError  # pragma: no cover
