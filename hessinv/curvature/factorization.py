"""Factorizations of ``C + damping I`` (``C = H`` or ``G``) and their accuracy contract
(docs/algorithm.md sections 11, 14, 15).

A :class:`Factorization` is the contract; the arithmetic is a :class:`Solver`, one class per
route:

* :class:`RiccatiSolver` -- the stage-wise factorization with threshold pivoting and
  delayed pivots (sections 5, 8, 10): solves, ``logdet``, inertia;
* :class:`OutputSpaceSolver` -- the Gauss-Newton matrix through its ``B r x B r`` Gram
  matrix and Woodbury (section 14): solves, ``logdet``, inertia, inverse diagonal;
* :class:`DenseSolver` -- the dense matrix and its eigendecomposition (section 15), for
  small ``n``: everything;
* :class:`TridiagonalSolver` -- the paper's augmented block-tridiagonal system with a
  pivoted band LU (section 4): solves and ``logdet``, for comparison.

The contract (:class:`Factorization`):

* every :meth:`~Factorization.solve` measures its backward error
  ``max_j ||(C + eps I) x_j - g_j|| / (||C + eps I|| ||x_j|| + ||g_j||)`` a posteriori
  (one exact product; ``||C + eps I||`` through a lower bound -- the free
  ``||(C + eps I) x|| / ||x||``, or a Lanczos estimate when that is not enough -- so the
  reported error can only be high), refines iteratively until it is below
  :func:`accuracy_bound` (``1e-12`` in float64), hardens the solver if refinement stalls
  (delayed pivots at every stage for the Riccati route; the Riccati route instead of
  Woodbury for the output space), and warns (:class:`~hessinv.errors.AccuracyWarning`) if
  the bound is still not met. ``F.backward_error``, ``F.refinement_steps`` and
  ``F.method`` say what happened.
* ``logdet()`` and ``inertia()`` are certified by the backward error of the unrefined
  factorization on a random right-hand side: when it is below the bound, they are the
  exact values of ``C + eps I + E`` with ``||E|| <= bound ||C + eps I||``, hence exact
  for every ``C + eps I`` whose smallest ``|eigenvalue|`` exceeds that; otherwise the
  factorization is hardened once and then a warning names the measured error.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from hessinv.curvature.output_space import OutputSpace
from hessinv.curvature.products import hessian_vector_product
from hessinv.errors import AccuracyWarning, SingularMatrixError
from hessinv.linalg.augmented import AugmentedSolver
from hessinv.linalg.riccati import riccati_factorize, riccati_solve
from hessinv.settings import (
    BACKWARD_ERROR_FLOAT32,
    BACKWARD_ERROR_FLOAT64,
    HARD_TAU,
    INVERSE_DIAGONAL_WARN_FLOAT32,
    INVERSE_DIAGONAL_WARN_FLOAT64,
    MAX_REFINEMENT,
    REFINEMENT_GAIN,
    RUN_LENGTH,
)

__all__ = [
    "Factorization",
    "RiccatiFactorization",
    "TridiagonalFactorization",
    "OutputSpaceFactorization",
    "DenseFactorization",
    "Solver",
    "accuracy_bound",
]



def accuracy_bound(dtype: torch.dtype) -> float:
    """The backward-error bound of the contract: ``1e-12`` in float64, ``1e-6`` in float32.

    The float64 bound is the contract's; in float32 (unit roundoff 6e-8) refinement with
    float32 residuals reaches about ten times the roundoff, so ``1e-6``: a looser bound let
    unrefined float32 solves through with forward errors 100x those of a dense float32 LU.
    """
    return BACKWARD_ERROR_FLOAT64 if dtype == torch.float64 else BACKWARD_ERROR_FLOAT32


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
        if (b.untyped_storage().data_ptr() != ptr or b.storage_offset() != offset
                or b.shape[1] != k or (b.shape[0] > 1 and b.stride() != step)
                or (b.shape[0] == 1 and k > 1 and b.stride(1) != step[1])):
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
            f"the {self.method} route gives no inertia; use method='riccati' or 'dense'")

    def inverse_diagonal(self) -> list[torch.Tensor]:
        """``diag((C + eps I)^-1)`` per stage, ``(p_l,)``."""
        raise NotImplementedError(
            f"the {self.method} route gives no inverse diagonal (its factors are not the "
            "inverse's); use method='output' (Gauss-Newton matrix) or 'dense' (small n)")

    def harden(self) -> Solver | None:
        return None

    def certified_error(self) -> float | None:
        """A bound ``beta`` such that ``logdet`` and ``inertia`` are those of ``C + eps I + E``
        with ``||E|| <= beta ||C + eps I||``, when the route knows one without measuring;
        ``None``: the contract measures it (one solve and one product)."""
        return None


class Factorization:
    """An exact factorization of ``C + eps I``, reusable for many right-hand sides.

    Made by :meth:`ChainHessian.factorize <hessinv.ChainHessian.factorize>` and
    :meth:`ChainGGN.factorize <hessinv.ChainGGN.factorize>`.

    Attributes:
        damping: ``eps``.
        method: the route of the solver in use (``"output space"``, ``"riccati"``,
            ``"riccati, 3 delayed pivots"``, ``"dense"``, ``"tridiagonal"``).
        backward_error: of the last :meth:`solve` (``None`` before the first).
        refinement_steps: iterative refinement steps the last :meth:`solve` took.
    """

    def __init__(self, curvature, damping: float, solver: Solver):
        self.damping = damping
        self._curvature = curvature
        self._layout = curvature.layout
        self._stages = curvature.stage_derivatives()
        self._S = curvature.loss_hessian_blocks()
        self._solver = solver
        self._replaced: list[Solver] = []  # solvers hardening replaced, newest last
        self.backward_error: float | None = None
        self.refinement_steps: int | None = None
        self._certificate: float | None = None

    @property
    def method(self) -> str:
        return self._solver.method

    @property
    def name(self) -> str:
        """The matrix factored, as messages write it (``"G + 0.001 I"``)."""
        return matrix_name(self._curvature, self.damping)

    def _harden(self) -> bool:
        """Replace the solver by a more stable one; False when there is none."""
        harder = self._solver.harden()
        if harder is None:
            return False
        self._replaced.append(self._solver)
        self._solver = harder
        self._certificate = None
        return True

    def _direct(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._solver.solve(blocks)

    # ------------------------------------------------------------------ contract
    def _norm(self) -> float:
        lo, hi = self._curvature.spectrum_estimate()
        return max(abs(hi + self.damping), abs(lo + self.damping))

    def _residual(self, g, x):
        """``(r, beta)``: the residual blocks and an upper bound on the backward error.

        ``||C + eps I||`` enters through a lower bound, so ``beta`` is never reported low:
        first the free one, ``||(C + eps I) x_j|| / ||x_j|| = ||g_j - r_j|| / ||x_j||``; only when
        that does not already prove ``beta <= bound`` the Lanczos estimate (cached per operator).
        """
        hx = flat(hessian_vector_product(self._stages, self._S, x))
        X, Gm = flat(x), flat(g)
        R = torch.sub(Gm, hx).sub_(X, alpha=self.damping)  # flat, one new vector
        r = list(R.split([gl.shape[0] for gl in g]))
        num = torch.linalg.vector_norm(R, dim=0)
        xn, gn = torch.linalg.vector_norm(X, dim=0), torch.linalg.vector_norm(Gm, dim=0)
        tiny = torch.finfo(R.dtype).tiny
        image = hx.add_(X, alpha=self.damping)  # (C + eps I) x = g - r, in place
        free = float((torch.linalg.vector_norm(image, dim=0) / xn.clamp_min(tiny)).max())

        def worst(norm: float) -> float:
            den = norm * xn + gn
            ratio = torch.where(den > 0, num / den.clamp_min(tiny), 0.0)
            return float(ratio.max()) if ratio.numel() else 0.0

        beta = worst(free)
        if beta > accuracy_bound(R.dtype):
            beta = worst(max(free, self._norm()))
        return r, beta

    def _refined(self, g, refine):
        auto = refine == "auto"
        limit = MAX_REFINEMENT if auto else refine
        bound = accuracy_bound(g[0].dtype)
        x = self._direct(g)
        r, err = self._residual(g, x)
        steps = 0
        while steps < limit and not (auto and err <= bound):
            dx = self._direct(r)
            x = list(torch.add(flat(x), flat(dx)).split([xl.shape[0] for xl in x]))
            steps += 1
            r, new = self._residual(g, x)
            stalled = auto and new > REFINEMENT_GAIN * err
            err = new
            if stalled:
                break
        return x, steps, err

    def solve(self, g, refine="auto"):
        """``(C + eps I)^-1 g``; ``g`` flat ``(n,)``/``(n, k)``, a dict or a list (same kind back).

        ``(n, k)`` blocks are solved in one pass (matrix products, not ``k`` sweeps).
        ``refine="auto"`` (default): iterative refinement ``x <- x + (C + eps I)^-1 r`` with
        the exact residual ``r = g - (C + eps I) x`` until the backward error is below
        :func:`accuracy_bound` (see the module docstring); an ``int`` does exactly that many
        steps. After the call ``backward_error`` and ``refinement_steps`` describe it.
        """
        if refine != "auto" and (isinstance(refine, bool) or not isinstance(refine, int)
                                 or refine < 0):
            raise ValueError(f"refine must be 'auto' or a non-negative int, got {refine!r}")
        blocks, kind = self._layout.to_blocks(g, "g")
        x, steps, err = self._refined(blocks, refine)
        bound = accuracy_bound(blocks[0].dtype)
        if refine == "auto" and err > bound and self._harden():
            x, more, err = self._refined(blocks, refine)
            steps += more
        if refine == "auto" and err > bound:
            warnings.warn(
                f"the solve with {self.name} reached a backward error of {err:.1e}, "
                f"above the bound {bound:.0e}, after {steps} refinement steps ({self.method}); "
                f"{self._curvature.symbol} + eps I is probably too ill-conditioned for this "
                "precision",
                AccuracyWarning, stacklevel=2,
            )
        self.backward_error, self.refinement_steps = err, steps
        return self._layout.from_blocks(x, kind)

    @property
    def certificate(self) -> float:
        """Backward error of the unrefined factorization on a random right-hand side.

        ``logdet()`` and ``inertia()`` are exact for every ``C + eps I`` whose smallest
        ``|eigenvalue|`` exceeds ``certificate * ||C + eps I||``. Measured once (one solve
        and one product), hardening the factorization once if it is above the bound.
        """
        if self._certificate is None:
            known = self._solver.certified_error()
            if known is not None:
                self._certificate = known
                return known
            bound = accuracy_bound(self._S.dtype)
            self._certificate = self._probe()
            if self._certificate > bound and self._harden():
                self._certificate = self._probe()
            if self._certificate > bound:
                warnings.warn(
                    f"logdet/inertia of {self.name} are not certified: the "
                    f"factorization's backward error is {self._certificate:.1e} (bound "
                    f"{bound:.0e}), so eigenvalues within {self._certificate:.1e} * "
                    f"||{self._curvature.symbol} + eps I|| of zero may be miscounted",
                    AccuracyWarning, stacklevel=3,
                )
        return self._certificate

    def _probe(self) -> float:
        n, k = self._layout.numel, 2
        gen = torch.Generator(device=self._S.device).manual_seed(20261126)
        g = torch.randn(n, k, dtype=self._S.dtype, device=self._S.device, generator=gen)
        blocks = list(g.split(list(self._layout.stage_sizes)))
        return self._residual(blocks, self._direct(blocks))[1]

    @property
    def reused_factors(self) -> bool:
        """Whether this factorization reused factors made before (the output space's kept
        eigendecomposition serves every damping, docs/algorithm.md section 14): it then
        cost no factorization of its own."""
        return bool(getattr(self._solver, "reused_factors", False))

    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det(C + eps I)|)`` as 0-d tensors (certified, see :attr:`certificate`)."""
        self.certificate  # noqa: B018  (measures, hardens, warns)
        return self._solver.logdet()

    def inertia(self) -> tuple[int, int, int]:
        """Exact ``(n_positive, n_negative, n_zero)`` eigenvalue counts of ``C + eps I``
        (certified, see :attr:`certificate`). ``n_zero`` is always 0: a singular ``C + eps I``
        raises :class:`~hessinv.errors.SingularMatrixError` when factorized. Raises
        ``NotImplementedError`` on the tridiagonal route, whose LU gives no inertia."""
        self.certificate  # noqa: B018
        return self._solver.inertia()

    @property
    def is_positive_definite(self) -> bool:
        """Whether ``C + eps I`` is positive definite (from the exact inertia)."""
        return self.inertia()[1] == 0

    def inverse_diagonal(self) -> dict[str, torch.Tensor]:
        """``diag((C + eps I)^-1)`` as ``{name: tensor shaped like the parameter}`` (the
        posterior variances of a Laplace approximation with prior precision ``eps``).

        The output-space route (section 14) and the dense route give it; the Riccati and
        tridiagonal routes raise ``NotImplementedError``. Warns
        (:class:`~hessinv.errors.AccuracyWarning`) when its error bound exceeds ``1e-8``
        relative (float64; ``1e-3`` in float32).
        """
        for solver in (self._solver, *reversed(self._replaced)):
            try:  # a hardened route may not give it; the one it replaced may (and warns)
                diag = torch.cat(solver.inverse_diagonal())
                break
            except NotImplementedError:
                if solver is (self._replaced or [self._solver])[0]:
                    raise
        return self._layout.from_blocks([diag[:, None]], ("dict",))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(damping={self.damping}, method={self.method!r})"


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

    def __init__(self, curvature, damping: float, progress: bool = False, hard: bool = False):
        self._curvature, self.damping, self._progress = curvature, damping, progress
        self._stages = curvature.stage_derivatives()
        self.hard = hard
        S = curvature.loss_hessian_blocks()
        if hard:
            self.factors = riccati_factorize(self._stages, S, damping, tau=HARD_TAU,
                                             force_eigen=True, progress=progress)
        else:
            self.factors = riccati_factorize(self._stages, S, damping,
                                             check_every=_run_length(curvature, damping),
                                             speculative=curvature.device.type == "cuda",
                                             progress=progress)
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


class RiccatiFactorization(Factorization):
    """The stage-wise factorization (docs/algorithm.md sections 5, 8, 10) under the contract."""

    def __init__(self, curvature, damping: float, progress: bool = True):
        super().__init__(curvature, damping, RiccatiSolver(curvature, damping, progress))

    @property
    def _factors(self):
        return self._solver.factors

    @property
    def n_delayed(self) -> int:
        """How many pivots were delayed to a later front (0 on the fast path)."""
        return self._solver.factors.n_delayed


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
                f"augmented block-tridiagonal system has a zero pivot: {err})", damping) from err

    def solve(self, blocks):
        return self._solver.solve(blocks)

    def logdet(self):
        return self._solver.lu.slogdet()


class TridiagonalFactorization(Factorization):
    """The paper's augmented block-tridiagonal system, pivoted band LU (docs/algorithm.md section 4).

    Blocks are dense in parameter space (size ``p_l + 2 a_l``): narrow stages only.
    Gives solves and ``logdet``; the LU does not give the inertia.
    """

    def __init__(self, curvature, damping: float):
        super().__init__(curvature, damping, TridiagonalSolver(curvature, damping))


# ---------------------------------------------------------------------- output space
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
                f"B r = {rows} < n = {n}" if rows < n else
                f"{matrix_name(curvature, damping)}: damping 0 needs the Riccati or dense route",
                damping, nullity=max(n - rows, 0) or None)
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
            shifted = e + damping
            tol = _tolerance(e, rows) + abs(damping) * rows * torch.finfo(e.dtype).eps
            close = (shifted.abs() <= tol)
            if bool(close.any()):
                raise SingularMatrixError(
                    f"{matrix_name(curvature, damping)} is singular to working precision: "
                    f"{int(close.sum())} eigenvalue(s) of G within {tol:.1e} of {-damping:g}",
                    damping, nullity=int(close.sum()))
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
        n, rows, lam = self.space.num_params, self.space.rows, self.damping
        like = self.space.factor
        if self._chol is not None:
            logdet_K = 2 * torch.log(self._chol.diagonal()).sum()
            sign = like.new_ones(())
        else:
            shifted = self._e + lam
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
        dtype = flat.dtype
        A = self.space.gram()
        top = float(A.diagonal().sum()) if A.numel() else 0.0  # >= ||U U^T||
        cond = (top + abs(self.damping)) / abs(self.damping)
        ratio = float((flat / (1 - flat).clamp_min(torch.finfo(dtype).tiny)).abs().max()) \
            if flat.numel() else 0.0
        estimate = torch.finfo(dtype).eps * cond * max(ratio, 1.0)
        limit = (INVERSE_DIAGONAL_WARN_FLOAT64 if dtype == torch.float64
                 else INVERSE_DIAGONAL_WARN_FLOAT32)
        if estimate > limit:
            warnings.warn(
                f"inverse_diagonal of {matrix_name(self._curvature, self.damping)}: the "
                f"output-space formula may lose accuracy (relative error up to about "
                f"{estimate:.0e}: damping small against ||G|| ~ {top:.1e}); method='dense' is "
                "more accurate for small n", AccuracyWarning, stacklevel=3)
        return [(1 - ql) / self.damping for ql in q]

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


class OutputSpaceFactorization(Factorization):
    """The Gauss-Newton matrix through its output space (docs/algorithm.md section 14)."""

    def __init__(self, curvature, damping: float):
        space = curvature.output_space()
        super().__init__(curvature, damping, OutputSpaceSolver(curvature, damping, space))


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
        tol = _tolerance(e, M.shape[0])
        close = e.abs() <= tol
        if bool(close.any()):
            raise SingularMatrixError(
                f"{matrix_name(curvature, damping)} is singular to working precision: "
                f"{int(close.sum())} eigenvalue(s) within {tol:.1e} of zero",
                damping, nullity=int(close.sum()))
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


class DenseFactorization(Factorization):
    """The dense route (docs/algorithm.md section 15) under the contract."""

    def __init__(self, curvature, damping: float):
        super().__init__(curvature, damping, DenseSolver(curvature, damping))
