r"""Exact curvature as a preconditioner for any ``torch.optim`` optimizer.

The paper suggests preconditioning stochastic gradient descent with the exact solve. With
``P = CurvaturePreconditioner(model, loss_fn, curvature="ggn", damping=1e-3, every=k)``:

* ``P.update(inputs, targets)`` builds the curvature ``C`` (the Gauss-Newton matrix ``G`` by
  default, or the Hessian ``H``) on that batch and factorizes ``C + damping I`` exactly --
  on the first call and then every ``k``-th call; the other calls keep the factorization
  (stale curvature, fresh gradients);
* ``P.precondition_()`` replaces the ``.grad`` of the parameters by
  ``(C + damping I)^-1 grad`` (one solve for all of them), so that the optimizer's next
  ``step()`` (SGD, Adam, ...) takes the preconditioned step.

``damping`` is absolute, or with ``relative=True`` a multiple of ``tr(C) / n`` (the mean
curvature, docs/algorithm.md section 6), measured at each refresh. For ``C = G`` the
factorization takes the output-space route when it is cheapest (section 14): a refresh
then costs one Gram matrix of ``B r x B r`` and a Cholesky, and a solve two sweeps.
For the Hessian, ``C + damping I`` must be positive definite for the preconditioned step to
be a descent direction: a refresh that finds it indefinite raises, naming the damping.

>>> import torch
>>> from torch import nn
>>> from hessinv.optim import CurvaturePreconditioner
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
>>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
>>> P = CurvaturePreconditioner(model, nn.CrossEntropyLoss(), damping=1e-2, every=10)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> losses = []
>>> for _ in range(5):
...     opt.zero_grad()
...     loss = nn.CrossEntropyLoss()(model(X), y)
...     loss.backward()
...     refreshed = P.update(X, y)
...     _ = P.precondition_()
...     opt.step()
...     losses.append(loss.item())
>>> losses[-1] < losses[0], P.refreshes
(True, 1)
"""

from __future__ import annotations

from typing import Any

import torch

from hessinv.curvature.factorization import Factorization
from hessinv.curvature.hessian import ChainGGN, ChainHessian
from hessinv.distributed import DataParallelGGN, DataParallelHessian
from hessinv.errors import SingularMatrixError
from hessinv.network.checks import check_loss_fn, check_model, nonnegative, positive_int

__all__ = ["CurvaturePreconditioner"]

_CURVATURES = {"ggn": ChainGGN, "hessian": ChainHessian}
_DATA_PARALLEL = {"ggn": DataParallelGGN, "hessian": DataParallelHessian}


class CurvaturePreconditioner:
    """Replace gradients by exact curvature solves (see the module docstring).

    Args:
        model: ``nn.Sequential`` (or list of modules).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar.
        curvature: ``"ggn"`` (default) or ``"hessian"``.
        damping: ``>= 0``; absolute, or relative to ``tr(C) / n`` with ``relative=True``.
        every: refresh the factorization on every ``every``-th :meth:`update` (the first
            included).
        params: the parameters (tensors or names; default: those with ``requires_grad``);
            the others are constants of the curvature, and their gradients are left as
            they are.
        method: the factorization's route (``"auto"``: the cheapest, section 15).
        process_group: under DDP, the ``torch.distributed`` process group whose ranks hold
            shards of the batch: the curvature is that of the union of the shards
            (:mod:`hessinv.distributed`) and the same on every rank, like the gradients DDP
            averages. ``None``: one process.

    Attributes: ``factorization`` (the current one, ``None`` before the first update),
    ``damping_used`` (its absolute damping), ``refreshes``, ``updates``.
    """

    def __init__(
        self,
        model,
        loss_fn,
        curvature: str = "ggn",
        damping: float = 1e-3,
        every: int = 1,
        *,
        relative: bool = False,
        params=None,
        method: str = "auto",
        oracle: str = "auto",
        process_group: Any = None,
    ) -> None:
        self._module = check_model(model)
        self._model_arg = model
        self.loss_fn = check_loss_fn(loss_fn)
        if curvature not in _CURVATURES:
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        self.curvature = curvature
        self.damping = nonnegative(damping, "damping")
        self.every = positive_int(every, "every")
        self.relative = bool(relative)
        self.method, self.oracle = method, oracle
        self._classes, self._group = _CURVATURES, {}
        if process_group is not None:
            self._classes, self._group = _DATA_PARALLEL, {"process_group": process_group}
        named = dict(self._module.named_parameters())
        if params is None:
            self.param_names = tuple(n for n, p in named.items() if p.requires_grad)
        else:
            ids = {id(p): n for n, p in named.items()}
            names = []
            for item in params:
                if isinstance(item, str) and item in named:
                    names.append(item)
                elif isinstance(item, torch.Tensor) and id(item) in ids:
                    names.append(ids[id(item)])
                else:
                    raise ValueError(f"params: {item!r} is not a parameter (or name) of the model")
            order = list(named)
            self.param_names = tuple(sorted(set(names), key=order.index))
        if not self.param_names:
            raise ValueError("no parameters to precondition")
        self._params = [named[n] for n in self.param_names]
        self.factorization: Factorization | None = None
        self._dtype = torch.float64
        self.damping_used: float | None = None
        self.refreshes = 0
        self.updates = 0

    def update(self, inputs: Any, targets: Any) -> bool:
        """Count one step; on the first and every ``every``-th, build the curvature on this
        batch and factorize it. Returns whether it refreshed."""
        refresh = self.updates % self.every == 0
        self.updates += 1
        if not refresh:
            return False
        cls = self._classes[self.curvature]
        C = cls(
            self._model_arg,
            self.loss_fn,
            inputs,
            targets,
            params=list(self.param_names),
            oracle=self.oracle,
            progress=False,
            **self._group,
        )
        damping = self.damping
        if self.relative:
            damping *= max(float(C.trace()) / C.num_params, torch.finfo(C.dtype).tiny)
        F = C.factorize(damping, method=self.method)
        if self.curvature == "hessian" and not F.is_positive_definite:
            raise SingularMatrixError(
                f"H + {damping:g} I is indefinite ({F.inertia()[1]} negative eigenvalues): the "
                "preconditioned step would not be a descent direction; raise the damping or "
                "use curvature='ggn'",
                damping,
            )
        self.factorization, self.damping_used, self._dtype = F, damping, C.dtype
        self.refreshes += 1
        return True

    @torch.no_grad()
    def precondition_(self) -> CurvaturePreconditioner:
        """``grad <- (C + damping I)^-1 grad`` for the parameters, in place (a parameter
        without ``.grad`` counts as a zero gradient and gets one). Raises ``RuntimeError``
        before the first :meth:`update`."""
        F = self.factorization
        if F is None:
            raise RuntimeError("call update(inputs, targets) before precondition_()")
        g = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self._dtype)
                for p in self._params
            ]
        )
        x = F.solve(g)
        offset = 0
        for p in self._params:
            n = p.numel()
            piece = x[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)
            offset += n
        return self
