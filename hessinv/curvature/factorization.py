"""Factorizations of ``C + damping I`` (``C = H`` or ``G``) and their accuracy contract
(docs/algorithm.md sections 11, 14, 15).

A :class:`Factorization` is the contract; the arithmetic is a
:class:`~hessinv.curvature.solvers.Solver`, one class per route
(:mod:`hessinv.curvature.solvers`):

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

import warnings
from typing import TYPE_CHECKING, Any

import torch

from hessinv.curvature.products import hessian_vector_product
from hessinv.curvature.solvers import (
    DenseSolver,
    OutputSpaceSolver,
    RiccatiSolver,
    Solver,
    TridiagonalSolver,
    flat,
    matrix_name,
)
from hessinv.errors import AccuracyWarning
from hessinv.linalg.riccati import RiccatiFactors
from hessinv.settings import (
    BACKWARD_ERROR_FLOAT32,
    BACKWARD_ERROR_FLOAT64,
    MAX_REFINEMENT,
    REFINEMENT_GAIN,
)

if TYPE_CHECKING:
    from hessinv.curvature.operator import CurvatureOperator
    from hessinv.vectors import ParameterVector

__all__ = [
    "Factorization",
    "RiccatiFactorization",
    "TridiagonalFactorization",
    "OutputSpaceFactorization",
    "DenseFactorization",
    "accuracy_bound",
]


def accuracy_bound(dtype: torch.dtype) -> float:
    """The backward-error bound of the contract: ``1e-12`` in float64, ``1e-6`` in float32.

    The float64 bound is the contract's; in float32 (unit roundoff 6e-8) refinement with
    float32 residuals reaches about ten times the roundoff, so ``1e-6``: a looser bound let
    unrefined float32 solves through with forward errors 100x those of a dense float32 LU.
    """
    return BACKWARD_ERROR_FLOAT64 if dtype == torch.float64 else BACKWARD_ERROR_FLOAT32


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

    def __init__(self, curvature: CurvatureOperator, damping: float, solver: Solver):
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

    def _residual(
        self, g: list[torch.Tensor], x: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], float]:
        """``(r, berr)``: the residual blocks and an upper bound on the backward error.

        ``||C + eps I||`` enters through a lower bound, so ``berr`` is never reported low:
        first the free one, ``||(C + eps I) x_j|| / ||x_j|| = ||g_j - r_j|| / ||x_j||``, then the
        route's own (:meth:`Solver.norm_lower_bound`); only when those do not already prove
        ``berr <= bound`` the Lanczos estimate (cached per operator).
        """
        product = hessian_vector_product(self._stages, self._S, x)
        hx = flat(self._curvature._sum_over_ranks(product, "product"))  # (one process: itself)
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

        berr = worst(free)
        if berr > accuracy_bound(R.dtype):
            known = self._solver.norm_lower_bound()  # free for some routes
            if known is not None:
                free = max(free, known)
                berr = worst(free)
        if berr > accuracy_bound(R.dtype):
            berr = worst(max(free, self._norm()))
        return r, berr

    def _refined(
        self, g: list[torch.Tensor], refine: str | int
    ) -> tuple[list[torch.Tensor], int, float]:
        auto = refine == "auto"
        limit = MAX_REFINEMENT if isinstance(refine, str) else refine
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

    def solve(self, g: ParameterVector, refine: str | int = "auto") -> Any:
        """``(C + eps I)^-1 g``; ``g`` flat ``(n,)``/``(n, k)``, a dict or a list (same kind back).

        ``(n, k)`` blocks are solved in one pass (matrix products, not ``k`` sweeps).
        ``refine="auto"`` (default): iterative refinement ``x <- x + (C + eps I)^-1 r`` with
        the exact residual ``r = g - (C + eps I) x`` until the backward error is below
        :func:`accuracy_bound` (see the module docstring); an ``int`` does exactly that many
        steps. After the call ``backward_error`` and ``refinement_steps`` describe it.
        """
        if refine != "auto" and (
            isinstance(refine, bool) or not isinstance(refine, int) or refine < 0
        ):
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
                AccuracyWarning,
                stacklevel=2,
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
                    AccuracyWarning,
                    stacklevel=3,
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


class RiccatiFactorization(Factorization):
    """The stage-wise factorization (docs/algorithm.md sections 5, 8, 10) under the contract."""

    def __init__(self, curvature: CurvatureOperator, damping: float, progress: bool | None = None):
        super().__init__(curvature, damping, RiccatiSolver(curvature, damping, progress))

    @property
    def _factors(self) -> RiccatiFactors:
        solver = self._solver
        assert isinstance(solver, RiccatiSolver)  # hardening keeps a Riccati solver
        return solver.factors

    @property
    def n_delayed(self) -> int:
        """How many pivots were delayed to a later front (0 on the fast path)."""
        return self._factors.n_delayed


class TridiagonalFactorization(Factorization):
    """The paper's augmented block-tridiagonal system, pivoted band LU (docs/algorithm.md section
    4).

    Blocks are dense in parameter space (size ``p_l + 2 a_l``): narrow stages only.
    Gives solves and ``logdet``; the LU does not give the inertia.
    """

    def __init__(self, curvature: CurvatureOperator, damping: float):
        super().__init__(curvature, damping, TridiagonalSolver(curvature, damping))


class OutputSpaceFactorization(Factorization):
    """The Gauss-Newton matrix through its output space (docs/algorithm.md section 14)."""

    def __init__(self, curvature: CurvatureOperator, damping: float):
        space = curvature.output_space_or_none()
        if space is None:
            raise ValueError(
                f"{matrix_name(curvature, damping)} has no output space (the Hessian, or a loss "
                "with indefinite Hessian blocks); use method='riccati' or 'dense'"
            )
        super().__init__(curvature, damping, OutputSpaceSolver(curvature, damping, space))


class DenseFactorization(Factorization):
    """The dense route (docs/algorithm.md section 15) under the contract."""

    def __init__(self, curvature: CurvatureOperator, damping: float):
        super().__init__(curvature, damping, DenseSolver(curvature, damping))
