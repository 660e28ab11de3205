"""The routes of a factorization of ``C + damping I`` (``C = H`` or ``G``): one
:class:`Solver` class per route, the arithmetic under the contract of
:mod:`hessinv.curvature.factorization` (docs/algorithm.md sections 4, 5, 8, 10, 14, 15).

* :class:`RiccatiSolver` -- the stage-wise factorization with threshold pivoting and
  delayed pivots: solves, ``logdet``, inertia;
* :class:`OutputSpaceSolver` -- the Gauss-Newton matrix through its ``B r x B r`` Gram
  matrix and Woodbury: solves, ``logdet``, inertia, inverse diagonal;
* :class:`DenseSolver` -- the dense matrix and its eigendecomposition, for small ``n``;
* :class:`TridiagonalSolver` -- the paper's augmented block-tridiagonal system with a
  pivoted band LU: solves and ``logdet``, for comparison.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from hessinv.curvature.output_space import OutputSpace
from hessinv.errors import AccuracyWarning, SingularMatrixError
from hessinv.linalg.augmented import AugmentedSolver
from hessinv.linalg.riccati import riccati_factorize, riccati_solve
from hessinv.settings import (
    HARD_TAU,
    INVERSE_DIAGONAL_WARN_FLOAT32,
    INVERSE_DIAGONAL_WARN_FLOAT64,
    LOGDET_ROUNDING,
    RUN_LENGTH,
)

__all__ = [
    "Solver",
    "RiccatiSolver",
    "TridiagonalSolver",
    "OutputSpaceSolver",
    "DenseSolver",
    "matrix_name",
    "woodbury_diagonal_error",
    "flat",
]


def matrix_name(curvature, damping: float) -> str:
    """``"H + 0.01 I"`` or ``"G + 0.01 I"``: the matrix a message is about."""
    return f"{curvature.symbol} + {damping:g} I"


def flat(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-stage blocks ``(p_l, k)`` as one ``(n, k)`` tensor: a view when they lie one
    after the other in one storage (as :meth:`ParameterLayout.to_blocks` and the solvers
    make them), else one copy. At millions of parameters every new vector costs its page
    faults."""
    first = blocks[0]
    offset, step = first.storage_offset(), first.stride()
    ptr = first.untyped_storage().data_ptr()
    k = first.shape[1]
    for b in blocks:
        if (
            b.untyped_storage().data_ptr() != ptr
            or b.storage_offset() != offset
            or b.shape[1] != k
            or (b.shape[0] > 1 and b.stride() != step)
            or (b.shape[0] == 1 and k > 1 and b.stride(1) != step[1])
        ):
            return torch.cat(list(blocks))
        offset += b.shape[0] * step[0]
    n = sum(b.shape[0] for b in blocks)
    return first.as_strided((n, k), step)


class Solver(ABC):
    """One route's factors of ``C + damping I`` (the arithmetic under the contract).

    ``solve`` works on per-stage blocks ``(p_l, k)``. ``inertia`` and
    ``inverse_diagonal`` raise ``NotImplementedError`` naming a route that gives them when
    this one does not. ``harden`` returns a more stable solver of the same matrix, or
    ``None`` when there is none.
    """

    method: str

    @abstractmethod
    def solve(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(C + eps I)^-1 g`` for per-stage blocks ``g[l]`` ``(p_l, k)``."""

    @abstractmethod
    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det(C + eps I)|)``, 0-d tensors."""

    def inertia(self) -> tuple[int, int, int]:
        """``(n_positive, n_negative, n_zero)`` of ``C + eps I``."""
        raise NotImplementedError(
            f"the {self.method} route gives no inertia; use method='riccati' or 'dense'"
        )

    def inverse_diagonal(self) -> list[torch.Tensor]:
        """``diag((C + eps I)^-1)`` per stage, ``(p_l,)``."""
        raise NotImplementedError(
            f"the {self.method} route gives no inverse diagonal (its factors are not the "
            "inverse's); use method='output' (Gauss-Newton matrix) or 'dense' (small n)"
        )

    def harden(self) -> Solver | None:
        return None

    def norm_lower_bound(self) -> float | None:
        """A lower bound on ``||C + damping I||`` that the route knows without work, or
        ``None`` (then the contract estimates it by Lanczos)."""
        return None

    def certified_error(self) -> float | None:
        """A bound ``beta`` such that ``logdet`` and ``inertia`` are those of ``C + eps I + E``
        with ``||E|| <= beta ||C + eps I||``, when the route knows one without measuring;
        ``None``: the contract measures it (one solve and one product)."""
        return None


# ---------------------------------------------------------------------- Riccati


def _run_length(curvature, damping: float) -> int:
    """``check_every`` of :func:`~hessinv.riccati.riccati_factorize` (docs/algorithm.md
    section 13): runs of :data:`RUN_LENGTH` stages per read on CUDA for the Gauss-Newton
    matrix with ``damping > 0`` (positive definite fronts for the convex built-in losses);
    stage by stage otherwise (on a CPU reads are free; an indefinite Hessian would redo runs)."""
    definite = not curvature.second_order and damping > 0
    return RUN_LENGTH if definite and curvature.device.type == "cuda" else 1


class RiccatiSolver(Solver):
    """The stage-wise factorization (docs/algorithm.md sections 5, 8, 10).

    Cost: time ``O(sum_l N_l^3 + N_l^2 a_l + N_l a_l^2 + a_l^2 h_l)`` and memory
    ``O(sum_l N_l^2 + N_l a_{l-1})`` with ``N_l`` the stage's basis size (``p_l``, or
    ``h_out r`` for a wide ``Linear`` stage) and ``a_l = B h_l``. Delayed pivots, when the
    threshold test asks for them, enlarge the next front by their number.
    """

    def __init__(self, curvature, damping: float, progress: bool | None = None, hard: bool = False):
        self._curvature, self.damping, self._progress = curvature, damping, progress
        self._stages = curvature.stage_derivatives()
        self.hard = hard
        S = curvature.loss_hessian_blocks()
        if hard:
            self.factors = riccati_factorize(
                self._stages, S, damping, tau=HARD_TAU, force_eigen=True, progress=progress
            )
        else:
            self.factors = riccati_factorize(
                self._stages,
                S,
                damping,
                check_every=_run_length(curvature, damping),
                speculative=curvature.device.type == "cuda",
                progress=progress,
            )
        delayed = self.factors.n_delayed
        self.method = "riccati" + (f", {delayed} delayed pivots" if delayed else "")

    def solve(self, blocks):
        return riccati_solve(self._stages, self.factors, blocks)

    def logdet(self):
        return self.factors.sign, self.factors.logabsdet

    def inertia(self):
        return self.factors.inertia

    def harden(self):
        if self.hard:
            return None
        return RiccatiSolver(self._curvature, self.damping, self._progress, hard=True)


# ---------------------------------------------------------------------- tridiagonal
class TridiagonalSolver(Solver):
    """The paper's augmented block-tridiagonal system, pivoted band LU (section 4)."""

    method = "tridiagonal"

    def __init__(self, curvature, damping: float):
        from block_partitioned_matrices import SingularMatrixError as BlockSingular

        stages, S = curvature.stage_derivatives(), curvature.loss_hessian_blocks()
        try:
            self._solver = AugmentedSolver(stages, S, damping)
        except BlockSingular as err:
            raise SingularMatrixError(
                f"{matrix_name(curvature, damping)} is singular to working precision (the "
                f"augmented block-tridiagonal system has a zero pivot: {err})",
                damping,
            ) from err

    def solve(self, blocks):
        return self._solver.solve(blocks)

    def logdet(self):
        return self._solver.slogdet()


# ---------------------------------------------------------------------- output space
def woodbury_diagonal_error(t: torch.Tensor, cond: float) -> tuple[float, float]:
    """``(estimate, limit)`` for a diagonal ``(1 - t_j) / lam`` computed through Woodbury:
    the relative error of entry ``j`` is about ``u cond(K) t_j / (1 - t_j)`` (the
    cancellation in ``1 - t_j``), ``estimate`` its largest value (at least ``u cond``), and
    ``limit`` the level above which it is warned (``1e-8`` in float64, ``1e-3`` in
    float32; section 14)."""
    dtype = t.dtype
    ratio = (
        float((t / (1 - t).clamp_min(torch.finfo(dtype).tiny)).abs().max()) if t.numel() else 0.0
    )
    estimate = torch.finfo(dtype).eps * cond * max(ratio, 1.0)
    limit = (
        INVERSE_DIAGONAL_WARN_FLOAT64 if dtype == torch.float64 else INVERSE_DIAGONAL_WARN_FLOAT32
    )
    return estimate, limit


def _check_nonsingular(shifted: torch.Tensor, tol: float, curvature, damping: float, where: str):
    """``SingularMatrixError`` when eigenvalues ``shifted`` of ``C + damping I`` lie within
    ``tol`` of zero; ``where`` says where, with ``{tol}`` for the tolerance."""
    close = shifted.abs() <= tol
    if bool(close.any()):
        raise SingularMatrixError(
            f"{matrix_name(curvature, damping)} is singular to working precision: "
            f"{int(close.sum())} eigenvalue(s) " + where.format(tol=f"{tol:.1e}"),
            damping,
            nullity=int(close.sum()),
        )


def _tolerance(e: torch.Tensor, size: int) -> float:
    """Absolute accuracy of computed eigenvalues ``e`` of a ``size x size`` symmetric matrix:
    ``size u max|e|`` (backward stable ``eigh``, Weyl)."""
    top = float(e.abs().max()) if e.numel() else 0.0
    return size * torch.finfo(e.dtype).eps * top


class OutputSpaceSolver(Solver):
    """``G + lam I`` through ``K = lam I + U U^T`` (docs/algorithm.md section 14).

    ``(G + lam I)^-1 = (I - U^T K^-1 U) / lam`` (Woodbury), ``log det(G + lam I) =
    (n - B r) log lam + log det K``. ``lam > 0``: Cholesky of ``K``; ``lam < 0``: the
    eigendecomposition ``U U^T = Q diag(e) Q^T`` (kept by the :class:`OutputSpace`), which
    gives the exact counts. Cost after the Gram matrix: ``(B r)^3 / 3`` once, then per
    solve one tangent and one adjoint sweep and ``O((B r)^2 k)``.
    Hardens into the Riccati route (Woodbury loses ``log10(||U U^T|| / lam)`` digits).
    """

    method = "output space"

    def __init__(self, curvature, damping: float, space: OutputSpace):
        self._curvature, self.damping, self.space = curvature, damping, space
        n, rows = space.num_params, space.rows
        if damping == 0:
            raise SingularMatrixError(
                f"{matrix_name(curvature, damping)} is singular: G = U^T U has rank at most "
                f"B r = {rows} < n = {n}"
                if rows < n
                else f"{matrix_name(curvature, damping)}: damping 0 needs the Riccati or dense "
                "route",
                damping,
                nullity=max(n - rows, 0) or None,
            )
        A = space.gram()
        self._chol = None
        #: True when the factors are the space's kept eigendecomposition (no new work)
        self.reused_factors = space.has_eigh
        if damping > 0 and not self.reused_factors:
            K = A.clone()
            K.diagonal().add_(damping)
            L, info = torch.linalg.cholesky_ex(K)
            if int(info) == 0:
                self._chol = L
        if self._chol is None:
            e, Q = space.eigh()
            tol = _tolerance(e, rows) + abs(damping) * rows * torch.finfo(e.dtype).eps
            _check_nonsingular(
                e + damping, tol, curvature, damping, f"of G within {{tol}} of {-damping:g}"
            )
            self._e, self._Q = e, Q

    # ---------------------------------------------------------------- K^-1
    def _K_solve(self, w: torch.Tensor) -> torch.Tensor:
        if self._chol is not None:
            return torch.cholesky_solve(w, self._chol)
        return self._Q @ ((self._Q.T @ w) / (self._e + self.damping)[:, None])

    def _K_inverse(self) -> torch.Tensor:
        if self._chol is not None:
            return torch.cholesky_inverse(self._chol)
        return (self._Q / (self._e + self.damping)) @ self._Q.T

    def solve(self, blocks):
        y = self._K_solve(self.space.apply(blocks))
        back = self.space.apply_T(y)
        n, k = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
        out = list(blocks[0].new_empty(n, k).split([b.shape[0] for b in blocks]))
        for x, g, b in zip(out, blocks, back, strict=True):
            torch.sub(g, b, out=x).div_(self.damping)
        return out

    def logdet(self):
        """``log det K + (n - B r) log |lam|``. The eigenvalues of ``U U^T`` that are zero in
        exact arithmetic (``B r - n`` of them when ``B r > n``, more when ``U`` is rank
        deficient) come out of any factorization at rounding level ``eps``, and each adds
        ``log(1 + eps / lam)`` ~ ``eps / lam``: ``1e-7`` for ``lam = 1e-8`` and ``B r = 18``.
        Where that could exceed ``1e-12`` in all, the logdet is taken from the
        eigendecomposition with the eigenvalues below its accuracy
        (``B r u max e``, Weyl) set to zero."""
        n, rows, lam = self.space.num_params, self.space.rows, self.damping
        like = self.space.factor
        A = self.space.gram()
        top = float(A.diagonal().sum()) if A.numel() else 0.0  # >= ||U U^T||
        phantom = rows * rows * torch.finfo(like.dtype).eps * top / abs(lam)
        if self._chol is not None and phantom <= LOGDET_ROUNDING:
            logdet_K = 2 * torch.log(self._chol.diagonal()).sum()
            sign = like.new_ones(())
        else:
            e = self._e if self._chol is None else self.space.eigh()[0]
            e = torch.where(e.abs() <= _tolerance(e, rows), torch.zeros_like(e), e)
            shifted = e + lam
            logdet_K = torch.log(shifted.abs()).sum()
            sign = torch.sign(shifted).prod()
        # eigenvalues lam of the (n - B r) directions outside the row space of U (B r > n:
        # K has B r - n eigenvalues lam too, so the same formula holds with n - B r < 0)
        extra = n - rows
        logabsdet = logdet_K + extra * math.log(abs(lam))
        if lam < 0 and extra % 2:
            sign = -sign
        return sign, logabsdet

    def inertia(self):
        n, rows, lam = self.space.num_params, self.space.rows, self.damping
        if lam > 0:
            return (n, 0, 0)
        shifted = self._e + lam
        pos = int((shifted > 0).sum())
        # the B r eigenvalues of K are those of G + lam I on the row space of U; the other
        # n - B r eigenvalues of G + lam I are lam (if B r > n, K has B r - n extra ones lam)
        neg = int((shifted < 0).sum()) + n - rows
        return (pos, neg, 0)

    def inverse_diagonal(self):
        """``(1 - diag(U^T K^-1 U)) / lam`` per stage. Relative error of entry ``j`` about
        ``u cond(K) q_j / (1 - q_j)`` with ``q_j = (U^T K^-1 U)_jj``: warned when above
        ``1e-8`` (float64)."""
        q = self.space.diag_quadratic(self._K_inverse())
        flat = torch.cat(q)
        A = self.space.gram()
        top = float(A.diagonal().sum()) if A.numel() else 0.0  # >= ||U U^T||
        cond = (top + abs(self.damping)) / abs(self.damping)
        estimate, limit = woodbury_diagonal_error(flat, cond)
        if estimate > limit:
            warnings.warn(
                f"inverse_diagonal of {matrix_name(self._curvature, self.damping)}: the "
                f"output-space formula may lose accuracy (relative error up to about "
                f"{estimate:.0e}: damping small against ||G|| ~ {top:.1e}); method='dense' is "
                "more accurate for small n",
                AccuracyWarning,
                stacklevel=3,
            )
        return [(1 - ql) / self.damping for ql in q]

    def norm_lower_bound(self):
        """``||G + lam I|| >= max(e_max + lam, |lam|)`` with ``e_max`` the largest eigenvalue of
        ``U U^T`` when it is kept, else its largest diagonal entry (``<= e_max``); ``|lam|``
        counts when ``G`` has a zero eigenvalue (``n > B r``). Free: no Lanczos."""
        lam = self.damping
        if self.space.has_eigh:
            top = float(self.space.eigh()[0][-1]) if self.space.rows else 0.0
        else:
            A = self.space.gram()
            top = float(A.diagonal().max()) if A.numel() else 0.0
        bound = abs(top + lam)
        if self.space.num_params > self.space.rows:
            bound = max(bound, abs(lam))
        return bound

    def certified_error(self):
        """With an exact loss factor, ``K`` is formed from the Gram matrix ``A`` with an
        error of about ``B r u ||A||`` and factored backward stably, so ``logdet`` and the
        counts are those of ``G + lam I + E``, ``||E|| <= B r u ||G||``, whatever Woodbury's
        solves lose (docs/algorithm.md section 14); a generic loss's clamped factor is
        measured instead."""
        if not self.space.exact:
            return None
        return max(self.space.rows, 1) * torch.finfo(self.space.factor.dtype).eps

    def harden(self):
        est = self._curvature.memory_estimate()
        from hessinv.curvature.memory import available_memory

        if est["riccati"] > available_memory(self._curvature.device):
            return None
        return RiccatiSolver(self._curvature, self.damping)


# ---------------------------------------------------------------------- dense
class DenseSolver(Solver):
    """``C + eps I`` formed densely (``n`` products) and eigendecomposed
    (docs/algorithm.md section 15): for small ``n``, where ``n^3`` beats a sweep.

    Exact counts: an eigenvalue within ``n u ||C + eps I||`` of zero raises
    :class:`~hessinv.errors.SingularMatrixError`."""

    method = "dense"

    def __init__(self, curvature, damping: float):
        self._curvature, self.damping = curvature, damping
        self._sizes = list(curvature.stage_sizes)
        M = curvature.dense()
        M = 0.5 * (M + M.T)
        M.diagonal().add_(damping)
        e, V = torch.linalg.eigh(M)
        _check_nonsingular(e, _tolerance(e, M.shape[0]), curvature, damping, "within {tol} of zero")
        self._e, self._V = e, V

    def solve(self, blocks):
        g = torch.cat(list(blocks))
        x = self._V @ ((self._V.T @ g) / self._e[:, None])
        return list(x.split(self._sizes))

    def logdet(self):
        return torch.sign(self._e).prod(), torch.log(self._e.abs()).sum()

    def inertia(self):
        pos = int((self._e > 0).sum())
        return (pos, self._e.numel() - pos, 0)

    def inverse_diagonal(self):
        diag = ((self._V * self._V) / self._e).sum(1)
        return list(diag.split(self._sizes))
