"""What the optimizers need from a curvature object, as runtime-checkable protocols.

A *curvature* is a symmetric ``n x n`` matrix ``B`` of the loss in the ``n`` trainable
parameters at the stored parameters of a model on one batch, together with that
loss ``f`` and its gradient ``g``. The optimizers use it through the quadratic model

    m(s) = f + g^T s + 1/2 s^T B s

and through exact factorizations of ``B + eps I``. Two curvatures come with hessinv:

* :class:`hessinv.ChainHessian`: ``B = H``, the exact Hessian (possibly indefinite);
* ``hessinv.ChainGGN``: ``B = J^T H_out J``, the generalized Gauss-Newton matrix
  (positive semidefinite for convex losses).

Both factorize ``B + eps I`` stage by stage in time linear in depth (the Riccati
recursion, docs/algorithm.md section 5), which also gives the exact inertia (the
numbers of positive, negative and zero eigenvalues) and ``log|det|`` from those of the
stage Schur complements; wide ``Linear`` stages use the subspace form of
docs/algorithm.md section 8. Any other object with these members works too, e.g. a
dense matrix in a test.

Conventions: every flat vector is a ``(n,)`` tensor (or ``(n, k)`` for ``k`` vectors)
in the model's ``named_parameters()`` order (that of ``ChainHessian.param_names``), of
the curvature's ``dtype`` and ``device``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from hessinv.errors import SingularMatrixError

__all__ = ["CurvatureProtocol", "FactorizationProtocol", "check_curvature", "try_factorize"]


@runtime_checkable
class FactorizationProtocol(Protocol):
    """An exact factorization of ``B + damping I``, reusable for many right-hand sides.

    Members:
        damping: the ``eps`` of ``B + eps I`` (float).
        is_positive_definite: ``True`` iff ``B + eps I`` is positive definite, i.e.
            ``inertia() == (n, 0, 0)``.
        solve(g): ``(B + eps I)^-1 g`` for a flat ``(n,)`` or ``(n, k)`` tensor (same shape back).
        inertia(): ``(n_pos, n_neg, n_zero)`` eigenvalue counts of ``B + eps I``, exact
            (always available; ``n_zero`` is 0 since a singular matrix is not factorized).
        logdet(): ``(sign, log|det(B + eps I)|)`` as 0-d tensors.

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> from hessinv.optim import FactorizationProtocol
    >>> X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    >>> H = hessinv.ChainHessian(nn.Sequential(nn.Linear(2, 1)).double(), nn.MSELoss(), X, y)
    >>> isinstance(H.factorize(1.0), FactorizationProtocol)
    True
    """

    damping: float
    is_positive_definite: bool

    def solve(self, g: torch.Tensor) -> torch.Tensor: ...

    def inertia(self) -> tuple[int, int, int]: ...

    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class CurvatureProtocol(Protocol):
    """A symmetric curvature matrix ``B`` of a loss, with the loss and gradient it belongs to.

    Members:
        num_params: ``n``.
        dtype, device: of every tensor it takes and returns.
        loss: the loss ``f`` at the stored parameters (0-d tensor).
        gradient(): ``g``, a flat ``(n,)`` tensor.
        matvec(v): ``B v`` for a flat ``(n,)`` or ``(n, k)`` tensor (same shape back).
        diagonal(): the diagonal of ``B`` as ``{name: tensor}`` (any shapes: the optimizers
            only use its smallest and largest entries, for brackets and scales).
        factorize(damping): a :class:`FactorizationProtocol` of ``B + damping I`` (``damping``
            any finite real); raises :class:`hessinv.errors.SingularMatrixError` when that
            matrix is singular.

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> from hessinv.optim import CurvatureProtocol
    >>> X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    >>> H = hessinv.ChainHessian(nn.Sequential(nn.Linear(2, 1)).double(), nn.MSELoss(), X, y)
    >>> isinstance(H, CurvatureProtocol), isinstance(object(), CurvatureProtocol)
    (True, False)
    """

    num_params: int
    dtype: torch.dtype
    device: torch.device
    loss: torch.Tensor

    def gradient(self) -> torch.Tensor: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def diagonal(self) -> dict[str, torch.Tensor]: ...

    def factorize(self, damping: float) -> FactorizationProtocol: ...


def _missing_members(obj, protocol) -> list[str]:
    names = [n for n in getattr(protocol, "__annotations__", {}) if not n.startswith("_")]
    names += [
        n
        for n, v in vars(protocol).items()
        if callable(v) and not n.startswith("_") and n not in names
    ]
    return [n for n in names if not hasattr(obj, n)]


def check_curvature(obj, what: str = "curvature") -> CurvatureProtocol:
    """``obj`` if it satisfies :class:`CurvatureProtocol`, else a ``TypeError`` naming ``what``."""
    if not isinstance(obj, CurvatureProtocol):
        missing = _missing_members(obj, CurvatureProtocol)
        detail = f" (missing: {', '.join(missing)})" if missing else ""
        raise TypeError(
            f"{what} must satisfy hessinv.optim.CurvatureProtocol (num_params, dtype, device, "
            f"loss, gradient, matvec, diagonal, factorize), got {type(obj).__name__}{detail}"
        )
    return obj


def try_factorize(
    curvature: CurvatureProtocol, damping: float
) -> tuple[FactorizationProtocol | None, bool]:
    """``(F, positive_definite)`` for ``B + damping I``; ``(None, False)`` when it is singular.

    A singular ``B + damping I`` is not positive definite, which is all the optimizers
    need to know about it (they then raise ``damping``).
    """
    try:
        F = curvature.factorize(damping)
    except SingularMatrixError:
        return None, False
    return F, bool(F.is_positive_definite)
