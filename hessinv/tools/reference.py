"""Reference computations the library is checked and benchmarked against.

* :func:`dense_hessian`: the full Hessian from ``torch.func.hessian`` over the trainable
  parameters (cubic time, quadratic memory in depth: only for small models; for models
  where forward-over-reverse differentiation is unreliable, e.g. LayerNorm, compare
  with reverse-over-reverse autograd instead, as ``tests/_autograd_reference.py`` does).
* :func:`conjugate_gradient`: CG on Hessian-vector products: fast and accurate on positive
  definite systems, it stops at the first direction of negative curvature otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, hessian

from hessinv.derivatives.base import quiet_forward_ad

__all__ = ["dense_hessian", "CGResult", "conjugate_gradient"]


def dense_hessian(
    model: nn.Module | Sequence[nn.Module],
    loss_fn: Callable[..., torch.Tensor],
    inputs: Any,
    targets: Any,
) -> torch.Tensor:
    """``(n, n)`` Hessian of ``loss_fn(model(inputs), targets)`` by ``torch.func.hessian``.

    Parameters are the trainable ones, in ``named_parameters()`` order, each
    flattened row-major (the order of :attr:`hessinv.ChainHessian.param_names`).
    """
    module = model if isinstance(model, nn.Module) else nn.Sequential(*model)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split(sizes)
        params = {n: t.reshape(s) for (n, _), t, s in zip(named, pieces, shapes, strict=True)}
        return loss_fn(functional_call(module, params, (inputs,)), targets)

    with quiet_forward_ad():  # torch.func.hessian is forward-over-reverse
        return hessian(loss_of)(flat)


class CGResult(NamedTuple):
    """``x``: the iterate; ``iterations``: products used; ``converged``; ``residual``: relative."""

    x: torch.Tensor
    iterations: int
    converged: bool
    residual: float


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    damping: float = 0.0,
    rtol: float = 1e-8,
    maxiter: int | None = None,
) -> CGResult:
    """Solve ``(H + damping I) x = b`` by conjugate gradients on ``matvec``.

    Stops when ``||r|| <= rtol ||b||`` or after ``maxiter`` (default ``10 n``) products,
    or when a direction of non-positive curvature shows up (CG needs a positive
    definite matrix): then ``converged`` is False.

    >>> import torch
    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> res = conjugate_gradient(lambda v: M @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> res.converged, torch.allclose(M @ res.x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    (True, True)
    """
    n = b.shape[0]
    maxiter = 10 * n if maxiter is None else maxiter
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    bnorm = torch.linalg.vector_norm(b)
    if bnorm == 0:
        return CGResult(x, 0, True, 0.0)
    for it in range(1, maxiter + 1):
        Ap = matvec(p) + damping * p
        curvature = p @ Ap
        if curvature <= 0:
            return CGResult(x, it, False, float(torch.sqrt(rr) / bnorm))
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        if torch.sqrt(rr_new) <= rtol * bnorm:
            return CGResult(x, it, True, float(torch.sqrt(rr_new) / bnorm))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return CGResult(x, maxiter, False, float(torch.sqrt(rr) / bnorm))
