"""A small dense implementation of :class:`hessinv.optim.CurvatureProtocol`, for tests.

``DenseCurvature(B, g, loss)`` wraps a dense symmetric matrix; its factorization of
``B + damping I`` is an eigendecomposition (``torch.linalg.eigh``), so the inertia is
exact and ``SingularMatrixError`` is raised when an eigenvalue is zero to working
precision (``|w| <= n eps max|w|``, the ``matrix_rank`` tolerance).
``DenseCurvature.from_model`` builds the dense Hessian or Gauss-Newton matrix of a model
with ``torch.func`` (independent of the structured code of hessinv), in the model's
``named_parameters()`` order.
"""

from __future__ import annotations

import torch
from torch import nn

from hessinv.errors import SingularMatrixError

__all__ = ["DenseCurvature", "DenseFactorization", "dense_hessian_factory", "dense_ggn_factory"]


class DenseFactorization:
    """``B + damping I = Q diag(w) Q^T``; satisfies ``FactorizationProtocol``."""

    def __init__(self, matrix: torch.Tensor, damping: float):
        n = matrix.shape[0]
        eye = torch.eye(n, dtype=matrix.dtype, device=matrix.device)
        w, Q = torch.linalg.eigh(matrix + damping * eye)
        top = float(w.abs().max()) if n else 0.0
        tol = max(n, 1) * torch.finfo(matrix.dtype).eps * top
        nullity = int((w.abs() <= tol).sum())
        if nullity:
            raise SingularMatrixError(
                f"B + {damping} I is singular: {nullity} eigenvalue(s) within {tol:.1e} of 0",
                damping,
                nullity,
            )
        self.damping = float(damping)
        self._w, self._Q = w, Q

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        b = g.reshape(g.shape[0], -1)
        x = self._Q @ ((self._Q.T @ b) / self._w[:, None])
        return x.reshape(g.shape)

    def inertia(self) -> tuple[int, int, int]:
        return int((self._w > 0).sum()), int((self._w < 0).sum()), 0

    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sign(self._w).prod(), self._w.abs().log().sum()

    @property
    def is_positive_definite(self) -> bool:
        return bool((self._w > 0).all())


class DenseCurvature:
    """A dense symmetric ``B`` with a gradient and a loss; satisfies ``CurvatureProtocol``."""

    def __init__(self, matrix: torch.Tensor, gradient: torch.Tensor | None = None, loss=0.0):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        scale = float(matrix.abs().max()) if matrix.numel() else 0.0
        if scale and float((matrix - matrix.T).abs().max()) > 1e-10 * scale:
            raise ValueError("matrix must be symmetric")
        self._B = 0.5 * (matrix + matrix.T)
        n = matrix.shape[0]
        if gradient is None:
            gradient = torch.zeros(n, dtype=matrix.dtype, device=matrix.device)
        if gradient.shape != (n,):
            raise ValueError(f"gradient must have shape ({n},), got {tuple(gradient.shape)}")
        self._g = gradient.detach().clone()
        self._loss = torch.as_tensor(loss, dtype=matrix.dtype, device=matrix.device).detach()

    num_params = property(lambda self: self._B.shape[0])
    dtype = property(lambda self: self._B.dtype)
    device = property(lambda self: self._B.device)
    loss = property(lambda self: self._loss)
    matrix = property(lambda self: self._B)

    def gradient(self) -> torch.Tensor:
        return self._g.clone()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] != self.num_params:
            raise ValueError(f"v must have {self.num_params} rows, got shape {tuple(v.shape)}")
        return self._B @ v

    def diagonal(self) -> dict[str, torch.Tensor]:
        return {"B": torch.diagonal(self._B).clone()}

    def factorize(self, damping: float) -> DenseFactorization:
        return DenseFactorization(self._B, float(damping))

    @classmethod
    def from_model(cls, model, loss_fn, inputs, targets, kind: str = "hessian") -> DenseCurvature:
        """The dense Hessian (``kind="hessian"``) or Gauss-Newton matrix (``"ggn"``) of a model."""
        if isinstance(model, (list, tuple)):
            model = nn.Sequential(*model)
        named = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        shapes = [p.shape for _, p in named]
        sizes = [p.numel() for _, p in named]
        theta = torch.cat([p.reshape(-1) for _, p in named])

        def outputs(t):
            params = {n: c.view(s) for n, c, s in zip(names, t.split(sizes), shapes, strict=True)}
            return torch.func.functional_call(model, params, (inputs,))

        def loss_of(t):
            return loss_fn(outputs(t), targets)

        loss = loss_of(theta).detach()
        grad = torch.func.grad(loss_of)(theta).detach()
        if kind == "hessian":
            B = torch.func.hessian(loss_of)(theta)
        elif kind == "ggn":
            out = outputs(theta).detach()
            J = torch.func.jacrev(outputs)(theta).reshape(out.numel(), -1)
            H_out = torch.func.hessian(lambda o: loss_fn(o.view_as(out), targets))(out.reshape(-1))
            B = J.T @ H_out @ J
        else:
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        return cls(B.detach(), grad, loss)


def dense_hessian_factory(model, loss_fn, inputs, targets) -> DenseCurvature:
    """A ``curvature=`` factory for the optimizers: the dense Hessian."""
    return DenseCurvature.from_model(model, loss_fn, inputs, targets, "hessian")


def dense_ggn_factory(model, loss_fn, inputs, targets, oracle: str = "auto") -> DenseCurvature:
    """The dense Gauss-Newton matrix; also usable as a stand-in for ``hessinv.ChainGGN``."""
    return DenseCurvature.from_model(model, loss_fn, inputs, targets, "ggn")
