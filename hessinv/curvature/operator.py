"""The shared base of the curvature operators (docs/algorithm.md sections 3, 6, 12).

:class:`CurvatureOperator` reads a model, a loss and a batch once
(:func:`~hessinv.network.snapshot.read_chain`) and offers the exact symmetric operator ``C``
(``H`` or ``G``) on the selected parameters: metadata, products, the dense matrix, the
diagonal and its blocks, spectrum tools, and the factorizations of ``C + damping I``
(through :mod:`hessinv.curvature.routes`). Subclasses set :attr:`second_order`,
:attr:`symbol` and :attr:`routes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.utils._pytree import tree_flatten

from hessinv.curvature import routes
from hessinv.curvature.diagonal import diagonal_blocks, hessian_diagonal
from hessinv.curvature.factorization import Factorization
from hessinv.curvature.memory import check_budget
from hessinv.curvature.output_space import OutputSpace
from hessinv.curvature.products import hessian_vector_product
from hessinv.curvature.spectrum import (
    EigenvalueBracket,
    eigenvalue_count,
    lanczos,
    smallest_eigenvalue,
)
from hessinv.derivatives import StageDerivatives, loss_head
from hessinv.errors import SingularMatrixError
from hessinv.network.checks import check_loss_fn, check_oracle, finite
from hessinv.network.data import resolve_batch
from hessinv.network.snapshot import read_chain
from hessinv.settings import DENSE_CHUNK
from hessinv.vectors import LayoutMetadata, ParameterVector

__all__ = ["CurvatureOperator"]


class CurvatureOperator(LayoutMetadata):
    """An exact symmetric curvature operator of a chain network (see :class:`ChainHessian`
    for the constructor's arguments)."""

    #: False for the Gauss-Newton matrix: the stages' second-order terms are dropped
    second_order: bool = True
    #: the matrix in messages (``"H + 0.01 I"``)
    symbol = "H"
    #: the routes ``method="auto"`` chooses from, in order of preference on a tie
    routes: tuple[str, ...] = ("riccati", "dense")

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., torch.Tensor],
        inputs: Any = None,
        targets: Any = None,
        *,
        data: Iterable[Any] | None = None,
        params: Sequence[str | torch.Tensor] | None = None,
        oracle: str = "auto",
        progress: bool | None = None,
    ) -> None:
        check_loss_fn(loss_fn)
        check_oracle(oracle)
        inputs, targets = resolve_batch(inputs, targets, data, progress)
        snap = read_chain(
            model,
            loss_fn,
            inputs,
            targets,
            params,
            second_order=self.second_order,
            oracle=oracle,
            progress=progress,
            head_fn=self._loss_head,
        )
        self.chain, self.inputs, self.targets = snap.chain, snap.inputs, snap.targets
        self.layout = snap.layout
        self._derivatives = snap.derivatives
        self.loss_fn, self.oracle, self.progress = loss_fn, oracle, progress
        self._spectrum: tuple[float, float] | None = None

    # ------------------------------------------------------------------ hooks
    #: ``(loss_fn, outputs, targets, oracle) -> LossHead`` of the sweep (a data-parallel
    #: curvature takes the head of the global batch, docs/algorithm.md section 17)
    _loss_head = staticmethod(loss_head)

    def _sum_over_ranks(self, blocks: list[torch.Tensor], what: str = "") -> list[torch.Tensor]:
        """Per-stage results summed over the processes that hold parts of the batch: here the
        one process's own (a data-parallel curvature sums them, section 17)."""
        return blocks

    def _union(self) -> CurvatureOperator:
        """The operator whose factorizations are those of ``C``: this one (a data-parallel
        curvature's is the operator on the union of the ranks' batches, section 17)."""
        return self

    # ------------------------------------------------------------------ derivatives
    def stage_derivatives(self) -> tuple[StageDerivatives, ...]:
        """Per-stage derivative objects (see :mod:`hessinv.derivatives`)."""
        return self._derivatives.stages

    def loss_hessian_blocks(self) -> torch.Tensor:
        """``S`` ``(B, K, K)``: the per-sample Hessian blocks of the loss in the model outputs."""
        return self._derivatives.head.hess

    @property
    def loss(self) -> torch.Tensor:
        """The loss at the stored parameters (0-d tensor)."""
        return self._derivatives.loss

    def gradient(self) -> torch.Tensor:
        """The gradient as a flat ``(n,)`` tensor in ``param_names`` order."""
        return torch.cat(self._sum_over_ranks(list(self._derivatives.gradient), "gradient"))

    # ------------------------------------------------------------------ products
    def matvec(self, v: ParameterVector) -> Any:
        """``H v`` (section 3); ``v`` flat ``(n,)``/``(n, k)``, a dict or a list (same kind
        back)."""
        blocks, kind = self.layout.to_blocks(v, "v")
        out = hessian_vector_product(self.stage_derivatives(), self.loss_hessian_blocks(), blocks)
        return self.layout.from_blocks(self._sum_over_ranks(out, "product"), kind)

    def __matmul__(self, v: ParameterVector) -> Any:
        return self.matvec(v)

    def flat_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for one flat ``(n,)`` vector (no checks: for iterations like Lanczos)."""
        blocks = list(v.reshape(-1, 1).split(list(self.stage_sizes)))
        out = hessian_vector_product(self.stage_derivatives(), self.loss_hessian_blocks(), blocks)
        return torch.cat(self._sum_over_ranks(out, "product"))[:, 0]

    def dense(self, chunk: int = DENSE_CHUNK) -> torch.Tensor:
        """The ``(n, n)`` matrix in ``param_names`` order, from products with identity columns.

        Raises :class:`~hessinv.errors.MemoryBudgetError` before allocating when the matrix
        (and one chunk of products) would not fit in the device's free memory."""
        n = self.num_params
        item = self.layout.dtype.itemsize
        check_budget(
            n * n * item + 2 * n * min(chunk, n) * item,
            self.device,
            None,
            f"dense() of the {n} x {n} matrix {self.symbol}",
        )
        cols = []
        for start in range(0, n, chunk):
            eye = torch.zeros(n, min(chunk, n - start), dtype=self.dtype, device=self.device)
            eye[start : start + eye.shape[1]].fill_diagonal_(1.0)
            cols.append(self.matvec(eye))
        return torch.cat(cols, dim=1)

    def to_scipy(self) -> LinearOperator:
        """A symmetric ``scipy.sparse.linalg.LinearOperator`` (for ``eigsh``, ``cg``,
        ``minres``)."""

        def apply(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype).to(self.device)
            out = self.matvec(t.reshape(self.num_params, -1))
            return out.detach().cpu().numpy().reshape(np.shape(x))

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply, dtype=np_dtype)

    # ------------------------------------------------------------------ diagonal
    def diagonal(self) -> dict[str, torch.Tensor]:
        """The exact diagonal as ``{name: tensor shaped like the parameter}`` (section 6).

        ``O(B h_out m)`` per ``Linear`` stage; no block is formed.
        """
        diag = hessian_diagonal(self.stage_derivatives(), self.loss_hessian_blocks())
        return self.layout.from_blocks(
            [torch.cat(self._sum_over_ranks(diag, "diagonal"))[:, None]], ("dict",)
        )

    def trace(self) -> torch.Tensor:
        """The exact trace (the sum of the diagonal), 0-d."""
        diag = hessian_diagonal(self.stage_derivatives(), self.loss_hessian_blocks())
        return torch.cat(self._sum_over_ranks(diag, "trace")).sum()

    def diagonal_blocks(
        self, stages: Iterable[int] | None = None, max_memory: int | None = None
    ) -> list[torch.Tensor]:
        """Dense diagonal blocks ``H_ll`` ``(p_l, p_l)`` of the stages ``stages`` (default: all).

        A block is ``p_l^2`` numbers: for a wide ``Linear`` stage (``p_l = h_out (h_in+1)``)
        that is ``O(h^4)`` memory and time; ask for the stages you need. The total is
        checked against the memory budget first (``max_memory`` or free memory).
        """
        which = range(len(self.stage_sizes)) if stages is None else list(stages)
        for l in which:
            if not (isinstance(l, int) and 0 <= l < len(self.stage_sizes)):
                raise ValueError(
                    f"stage indices must be in 0..{len(self.stage_sizes) - 1}, got {l!r}"
                )
        need = sum(self.stage_sizes[l] ** 2 for l in which) * self.layout.dtype.itemsize
        check_budget(need, self.device, max_memory, "diagonal_blocks()")
        blocks = diagonal_blocks(self.stage_derivatives(), self.loss_hessian_blocks(), which)
        return self._sum_over_ranks(blocks, "diagonal blocks")

    # ------------------------------------------------------------------ factorizations
    def output_space_or_none(self) -> OutputSpace | None:
        """The output space of a Gauss-Newton matrix (``None`` for the Hessian, or when the
        loss blocks are indefinite)."""
        return None

    def memory_estimate(self) -> dict[str, int]:
        """Estimated peak bytes per route (``riccati``, ``tridiagonal``, ``dense``, and
        ``output`` for the Gauss-Newton matrix) and ``derivatives`` (held now); checked
        against the budget before a factorization allocates anything."""
        union = self._union()
        routes.prepare_bases(union)
        return routes.memory_per_route(union)

    def cost_estimate(self) -> dict[str, float]:
        """Estimated floating-point operations per route, with each stage's operators
        counted as a fixed amount of work (their dispatch; docs/algorithm.md section 15):
        what ``method="auto"`` compares."""
        union = self._union()
        routes.prepare_bases(union)
        return routes.cost_per_route(union)

    def factorize(
        self,
        damping: float = 0.0,
        method: str = "auto",
        max_memory: int | None = None,
        progress: bool | None = None,
    ) -> Factorization:
        """Factor ``C + damping I`` once; see :mod:`hessinv.curvature.factorization` for the
        contract.

        ``method``: ``"auto"`` (default: the cheapest route that fits, by
        :meth:`cost_estimate` and :meth:`memory_estimate`), ``"output"`` (Gauss-Newton matrix
        only, section 14), ``"riccati"`` (sections 5, 8, 10), ``"dense"`` (section 15) or
        ``"tridiagonal"`` (the paper's, section 4). ``F.method`` names the route taken.
        ``damping`` may be any finite real: a negative value shifts the spectrum, so
        ``factorize(-sigma).inertia()[1]`` counts the eigenvalues below ``sigma``. The
        estimated memory is checked against ``max_memory`` bytes (default: the free memory
        of the device) before anything is allocated.

        Raises:
            SingularMatrixError: ``C + damping I`` is singular to working precision.
            MemoryBudgetError: the factorization would not fit (for ``"auto"``: no route
                fits; the message lists what each needs).
        """
        return routes.factorize(
            self._union(),
            damping,
            method,
            max_memory,
            self.progress if progress is None else progress,
        )

    def solve(
        self,
        g: ParameterVector,
        damping: float = 0.0,
        method: str = "auto",
        refine: str | int = "auto",
    ) -> Any:
        """``(C + damping I)^-1 g``, exactly; ``g`` of any kind :meth:`matvec` takes
        (``(n, k)`` blocks in one pass)."""
        return self.factorize(damping, method).solve(g, refine=refine)

    # ------------------------------------------------------------------ spectrum
    def spectrum_estimate(self, steps: int = 12) -> tuple[float, float]:
        """Lanczos estimates ``(theta_min, theta_max)`` (cached): inside ``[lambda_min,
        lambda_max]``."""
        if self._spectrum is None:
            theta, _ = lanczos(self.flat_matvec, self.num_params, steps, self.dtype, self.device)
            self._spectrum = (float(theta[0]), float(theta[-1]))
        return self._spectrum

    def eigenvalue_count(self, lower: float, upper: float) -> int:
        """Exact number of eigenvalues in ``[lower, upper)``, from two inertias (section 12).

        Raises :class:`~hessinv.errors.SingularMatrixError` when ``lower`` or ``upper`` is an
        eigenvalue of ``H`` (for instance ``0`` when a wide layer gives ``H`` a null space).
        """
        return eigenvalue_count(self, finite(lower, "lower"), finite(upper, "upper"))

    def smallest_eigenvalue(self, rel_tol: float = 1e-3) -> EigenvalueBracket:
        """A certified bracket ``lower <= lambda_min <= upper`` (Lanczos + inertias, section 12)."""
        rel_tol = finite(rel_tol, "rel_tol")
        if not 0 < rel_tol < 1:
            raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol}")
        return smallest_eigenvalue(self, rel_tol)

    def positive_definite_shift(self, damping: float = 0.0, rel_tol: float = 1e-3) -> float:
        """The smallest ``s >= 0`` with ``H + (damping + s) I`` positive semi-definite, from above.

        ``0`` when ``H + damping I`` is positive definite; otherwise ``-lower - damping`` for
        the certified bracket ``lower <= lambda_min`` of :meth:`smallest_eigenvalue`, so
        ``H + (damping + s) I`` is positive semi-definite and ``s`` exceeds the exact shift
        by at most ``rel_tol |lambda_min|``.
        """
        damping = finite(damping, "damping")
        try:
            if self.factorize(damping, progress=False).is_positive_definite:
                return 0.0
        except SingularMatrixError:
            pass  # singular: not positive definite
        bracket = self.smallest_eigenvalue(rel_tol)
        return max(0.0, -bracket.lower - damping)

    def __repr__(self) -> str:
        B = tree_flatten(self.inputs)[0][0].shape[0]
        return (
            f"{type(self).__name__}(n={self.num_params}, stages={len(self.stage_sizes)}, "
            f"batch={B}, dtype={self.dtype}, device={self.device})"
        )
