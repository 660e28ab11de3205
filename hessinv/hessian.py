"""The user API: :class:`ChainHessian` and its :class:`HessianFactorization`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .augmented import AugmentedSolver
from .chain import build_chain
from .derivatives import StageDerivatives
from .diagonal import diagonal_blocks, hessian_diagonal
from .hvp import hessian_vector_product
from .riccati import SingularStageError, riccati_factorize, riccati_solve
from .sweep import ChainDerivatives, compute_derivatives
from .vectors import ParameterLayout

__all__ = ["ChainHessian", "HessianFactorization"]

_METHODS = ("riccati", "tridiagonal")


def _check_damping(damping) -> float:
    if isinstance(damping, torch.Tensor) and damping.numel() == 1:
        damping = float(damping)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    if not math.isfinite(damping):
        raise ValueError(f"damping must be finite, got {damping}")
    return float(damping)


class HessianFactorization:
    """An exact factorization of ``H + eps I``, reusable for many right-hand sides.

    Made by :meth:`ChainHessian.factorize`. With the Riccati method (ALGORITHM.md
    section 5) it also gives the exact log-determinant and inertia of ``H + eps I``
    from those of the stage Schur complements ``G_l``.

    Attributes:
        damping: ``eps``.
        method: ``"riccati"`` or ``"tridiagonal"`` (the latter also after a fallback).
    """

    def __init__(
        self, hessian: ChainHessian, damping: float, method: str = "riccati", fallback: bool = True
    ):
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.damping = _check_damping(damping)
        self._hessian = hessian
        self._layout = hessian.layout
        stages = hessian.stage_derivatives()
        self._stages = stages
        self._factors = None
        self._augmented = None
        self.fallback_reason: str | None = None
        if method == "riccati":
            try:
                self._factors = riccati_factorize(stages, self.damping)
            except SingularStageError as err:
                if not fallback:
                    raise
                self.fallback_reason = str(err)
                warnings.warn(
                    f"{err}; falling back to the pivoted block-tridiagonal solve (ALGORITHM.md "
                    "section 4); inertia() is not available from it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                method = "tridiagonal"
        if method == "tridiagonal":
            self._augmented = AugmentedSolver(stages, self.damping)
        self.method = method

    def _solve_blocks(self, blocks):
        if self._factors is not None:
            return riccati_solve(self._stages, self._factors, blocks)
        return self._augmented.solve(blocks)

    def solve(self, g, refine: int = 1):
        """``(H + eps I)^-1 g``; ``g`` flat ``(n,)``/``(n, k)``, a dict or a list (same kind back).

        ``refine`` steps of iterative refinement follow the direct solve:
        ``x <- x + (H + eps I)^-1 (g - (H + eps I) x)``, with the exact Hessian-vector
        product for the residual. Each costs one product and one more solve with the
        kept factorization (no new factorization), and removes most of the error the
        Riccati recursion adds when a ``G_l`` is ill-conditioned (e.g. the null
        directions of a softmax layer at small ``eps``).
        """
        if not isinstance(refine, int) or refine < 0:
            raise ValueError(f"refine must be a non-negative int, got {refine!r}")
        blocks, kind = self._layout.to_blocks(g, "g")
        x = self._solve_blocks(blocks)
        for _ in range(refine):
            hx = hessian_vector_product(self._stages, x)
            r = [gl - hl - self.damping * xl for gl, hl, xl in zip(blocks, hx, x, strict=True)]
            x = [xl + dl for xl, dl in zip(x, self._solve_blocks(r), strict=True)]
        return self._layout.from_blocks(x, kind)

    def _need_riccati(self, what: str):
        if self._factors is None:
            reason = self.fallback_reason or "this factorization was made with method='tridiagonal'"
            raise RuntimeError(f"{what} needs the Riccati factorization: {reason}")
        return self._factors

    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det(H + eps I)|)`` as 0-d tensors.

        Riccati: the sum over the stage Schur complements ``G_l``. Tridiagonal: the
        determinant of the augmented system, which equals ``det(H + eps I)`` because
        eliminating the tangents and adjoints has unit determinant (section 4).
        """
        if self._factors is None:
            return self._augmented.lu.slogdet()
        sign = torch.stack([f.sign for f in self._factors]).prod()
        return sign, torch.stack([f.logabsdet for f in self._factors]).sum()

    def inertia(self) -> tuple[int, int, int]:
        """``(n_positive, n_negative, n_zero)`` eigenvalue counts of ``H + eps I``."""
        factors = self._need_riccati("inertia()")
        counts = [sum(f.inertia[i] for f in factors) for i in range(3)]
        return counts[0], counts[1], counts[2]

    @property
    def is_positive_definite(self) -> bool:
        """True when every ``G_l`` had a Cholesky factor, i.e. ``H + eps I`` is positive definite."""
        factors = self._need_riccati("is_positive_definite")
        return all(f.kind == "cholesky" for f in factors)

    def __repr__(self) -> str:
        return f"HessianFactorization(damping={self.damping}, method={self.method!r})"


class ChainHessian:
    """The exact Hessian of ``loss_fn(model(inputs), targets)`` in the model's parameters.

    The model is split into stages (ALGORITHM.md section 1); each stage's
    derivatives are computed once, in one backward sweep, and every operation
    below costs time linear in the number of stages. ``H`` is never formed unless
    :meth:`dense` is called.

    Args:
        model: ``nn.Sequential`` or a list of modules; every child with trainable
            parameters starts a stage, parameter-free children join the stage before.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar that is a sum (or mean)
            of per-sample terms, e.g. ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``.
        inputs: the batch ``(B, ...)``.
        targets: whatever ``loss_fn`` takes.
        oracle: ``"auto"`` (analytic formulas for ``Linear`` + activation stages and for
            cross-entropy / MSE, ``torch.func`` otherwise), ``"generic"`` or ``"analytic"``.

    The parameters are read when the object is made; build a new one after an update.

    Example, checked against the dense Hessian of ``torch.func``:

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
    ...                       nn.Linear(5, 3)).double()
    >>> X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    >>> H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    >>> H.shape, H.stage_sizes
    ((73, 73), (25, 30, 18))
    >>> dense = hessinv.dense_hessian(model, nn.CrossEntropyLoss(), X, y)
    >>> v = torch.randn(73, dtype=torch.float64)
    >>> torch.allclose(H @ v, dense @ v, rtol=1e-12, atol=1e-14)
    True
    >>> x = H.solve(v, damping=0.1)
    >>> torch.allclose(x, torch.linalg.solve(dense + 0.1 * torch.eye(73, dtype=torch.float64), v))
    True
    """

    def __init__(self, model, loss_fn, inputs, targets, *, oracle: str = "auto"):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if oracle not in ("auto", "generic", "analytic"):
            raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
        self.chain = build_chain(model)
        self.model = model
        self.loss_fn = loss_fn
        self.oracle = oracle
        params = [p for s in self.chain.stages for p in _stage_tensors(s)]
        dtype, device = params[0].dtype, params[0].device
        for name, p in zip(self.chain.param_names, params, strict=True):
            if not p.dtype.is_floating_point:
                raise TypeError(f"parameter {name!r} has non-floating dtype {p.dtype}")
            if p.dtype != dtype or p.device != device:
                raise TypeError(
                    f"parameter {name!r} is {p.dtype} on {p.device} but the first parameter is "
                    f"{dtype} on {device}; all parameters must share dtype and device"
                )
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"parameter {name!r} contains NaN or Inf")
        _check_batch(inputs, "inputs", dtype, device)
        if isinstance(targets, torch.Tensor):
            if targets.device != device:
                raise ValueError(f"targets are on {targets.device} but the model is on {device}")
            if targets.dtype.is_floating_point and not bool(torch.isfinite(targets).all()):
                raise ValueError("targets contain NaN or Inf")
        self.inputs = inputs
        self.targets = targets
        self._params = [s.flat_params() for s in self.chain.stages]
        self.layout = ParameterLayout(
            names=self.chain.param_names,
            shapes=tuple(sh for s in self.chain.stages for sh in s.param_shapes),
            stage_sizes=tuple(s.num_params for s in self.chain.stages),
            dtype=dtype,
            device=device,
        )
        self._derivatives: ChainDerivatives | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def num_params(self) -> int:
        """``n``, the total number of trainable parameters."""
        return self.layout.numel

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in the model's ``named_parameters()`` order (the order of ``dense()``)."""
        return self.layout.names

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        """``(p_1, ..., p_L)``: parameters per stage."""
        return self.layout.stage_sizes

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    # ------------------------------------------------------------------ derivatives
    def _sweep(self) -> ChainDerivatives:
        if self._derivatives is None:
            self._derivatives = compute_derivatives(
                self.chain, self._params, self.inputs, self.loss_fn, self.targets, self.oracle
            )
        return self._derivatives

    def stage_derivatives(self) -> tuple[StageDerivatives, ...]:
        """Per-stage ``(Dx, Dz, A, C, Q)`` in per-sample block form (see ``hessinv.derivatives``)."""
        return self._sweep().stages

    @property
    def loss(self) -> torch.Tensor:
        """The loss at the stored parameters (0-d tensor)."""
        return self._sweep().loss

    def gradient(self):
        """The gradient as a flat ``(n,)`` tensor in ``param_names`` order."""
        return torch.cat(self._sweep().gradient)

    # ------------------------------------------------------------------ products
    def matvec(self, v):
        """``H v`` (ALGORITHM.md section 3); ``v`` flat ``(n,)``/``(n, k)``, dict or list."""
        blocks, kind = self.layout.to_blocks(v, "v")
        return self.layout.from_blocks(hessian_vector_product(self.stage_derivatives(), blocks), kind)

    def __matmul__(self, v):
        return self.matvec(v)

    def dense(self, chunk: int = 1024) -> torch.Tensor:
        """The ``(n, n)`` Hessian in ``param_names`` order, from products with identity columns."""
        n = self.num_params
        stages = self.stage_derivatives()
        cols = []
        for start in range(0, n, chunk):
            eye = torch.zeros(n, min(chunk, n - start), dtype=self.dtype, device=self.device)
            eye[start : start + eye.shape[1]].fill_diagonal_(1.0)
            blocks = list(eye.split(list(self.stage_sizes)))
            cols.append(torch.cat(hessian_vector_product(stages, blocks)))
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A symmetric ``scipy.sparse.linalg.LinearOperator`` (for ``eigsh``, ``cg``, ``minres``)."""
        from scipy.sparse.linalg import LinearOperator

        def apply(x):
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype).to(self.device)
            out = self.matvec(t.reshape(self.num_params, -1))
            return out.detach().cpu().numpy().reshape(np.shape(x))

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=apply, rmatvec=apply, matmat=apply, dtype=np_dtype
        )

    # ------------------------------------------------------------------ diagonal
    def diagonal(self) -> dict[str, torch.Tensor]:
        """The exact diagonal of ``H`` as ``{name: tensor shaped like the parameter}`` (section 6)."""
        diag = torch.cat(hessian_diagonal(self.stage_derivatives()))
        return self.layout.from_blocks([diag[:, None]], ("dict",))

    def diagonal_blocks(self) -> list[torch.Tensor]:
        """The dense diagonal blocks ``H_ll`` ``(p_l, p_l)``, one per stage (section 6)."""
        return diagonal_blocks(self.stage_derivatives())

    # ------------------------------------------------------------------ solves
    def factorize(
        self, damping: float = 0.0, method: str = "riccati", fallback: bool = True
    ) -> HessianFactorization:
        """Factor ``H + damping I`` once; see :class:`HessianFactorization`.

        ``damping`` may be any finite real: a negative value shifts the spectrum, so
        ``factorize(-sigma).inertia()[1]`` counts the eigenvalues of ``H`` below ``sigma``.
        When a stage Schur complement ``G_l`` is singular, the Riccati method falls back
        to the tridiagonal one with a ``RuntimeWarning``; with ``fallback=False`` it
        raises :class:`~hessinv.SingularStageError` instead (cheap, e.g. for a caller that
        only needs to know that ``H + damping I`` is not positive definite).
        """
        return HessianFactorization(self, damping, method, fallback)

    def positive_definite_shift(
        self, damping: float = 0.0, start: float = 1e-3, rel_tol: float = 0.01,
        max_doublings: int = 60,
    ) -> float:
        """The smallest ``s >= 0`` (to ``rel_tol``) with ``H + (damping + s) I`` positive definite.

        Bisection on ``s`` using only whether the Riccati factorization has a Cholesky
        factor at every stage (the exact inertia, ALGORITHM.md section 5): each probe is
        one linear-time factorization, no eigensolver. The bracket is found by doubling
        from ``start``. ``damping + s`` estimates ``-lambda_min(H)`` when ``s > 0``.
        """
        damping = _check_damping(damping)
        if not (start > 0 and 0 < rel_tol < 1):
            raise ValueError(f"need start > 0 and 0 < rel_tol < 1, got {start}, {rel_tol}")

        def positive_definite(shift: float) -> bool:
            try:
                return self.factorize(damping + shift, fallback=False).is_positive_definite
            except SingularStageError:
                return False

        if positive_definite(0.0):
            return 0.0
        lo, hi = 0.0, start
        for _ in range(max_doublings):
            if positive_definite(hi):
                break
            lo, hi = hi, 2 * hi
        else:
            raise RuntimeError(f"H + {damping + hi} I is still not positive definite")
        while hi - lo > rel_tol * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if positive_definite(mid) else (mid, hi)
        return hi

    def solve(self, g, damping: float = 0.0, method: str = "riccati", refine: int = 1):
        """``(H + damping I)^-1 g``, exactly; ``g`` of any kind :meth:`matvec` takes.

        ``method="riccati"`` (ALGORITHM.md section 5, default) or ``"tridiagonal"``
        (the paper's augmented block-tridiagonal system, section 4); ``refine`` steps
        of iterative refinement (see :meth:`HessianFactorization.solve`).
        """
        return self.factorize(damping, method).solve(g, refine=refine)

    def __repr__(self) -> str:
        return (
            f"ChainHessian(n={self.num_params}, stages={len(self.stage_sizes)}, "
            f"batch={self.inputs.shape[0]}, dtype={self.dtype}, device={self.device})"
        )


def _stage_tensors(stage) -> Sequence[torch.Tensor]:
    named = dict(stage.modules[0].named_parameters())
    return [named[n] for n in stage.local_names]


def _check_batch(inputs, what, dtype, device) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (B, ...), got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{what} must have a non-empty batch dimension, got shape {tuple(inputs.shape)}")
    if inputs.device != device:
        raise ValueError(f"{what} are on {inputs.device} but the model is on {device}")
    if inputs.dtype.is_floating_point:
        if inputs.dtype != dtype:
            raise TypeError(f"{what} have dtype {inputs.dtype} but the model is {dtype}")
        if not bool(torch.isfinite(inputs).all()):
            raise ValueError(f"{what} contain NaN or Inf")

