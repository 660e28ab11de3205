"""Factorizations of ``H + eps I`` and their accuracy contract (docs/algorithm.md section 11).

Two strategies, two classes over one base:

* :class:`RiccatiFactorization` -- the stage-wise factorization with threshold pivoting
  and delayed pivots (sections 5, 8, 10): solves, ``logdet``, inertia.
* :class:`TridiagonalFactorization` -- the paper's augmented block-tridiagonal system with
  a pivoted band LU (section 4): solves and ``logdet``, for comparison.

The contract (:class:`Factorization`):

* every :meth:`~Factorization.solve` measures its backward error
  ``max_j ||(H + eps I) x_j - g_j|| / (||H + eps I|| ||x_j|| + ||g_j||)`` a posteriori
  (one Hessian-vector product; ``||H + eps I||`` through a lower bound -- the free
  ``||(H + eps I) x|| / ||x||``, or a Lanczos estimate when that is not enough -- so the
  reported error can only be high), refines iteratively until it is below
  :func:`accuracy_bound` (``1e-12`` in float64), re-factorizes with delayed pivots at
  every stage if refinement stalls, and warns (:class:`~hessinv.errors.AccuracyWarning`)
  if the bound is still not met. ``F.backward_error``, ``F.refinement_steps`` and
  ``F.method`` say what happened.
* ``logdet()`` and ``inertia()`` are certified by the backward error of the unrefined
  factorization on a random right-hand side: when it is below the bound, they are the
  exact values of ``H + eps I + E`` with ``||E|| <= bound ||H + eps I||``, hence exact
  for every ``H + eps I`` whose smallest ``|eigenvalue|`` exceeds that; otherwise the
  factorization is hardened once and then a warning names the measured error.
"""

from __future__ import annotations

import warnings

import torch

from .augmented import AugmentedSolver
from .errors import AccuracyWarning, SingularMatrixError
from .hvp import hessian_vector_product
from .riccati import riccati_factorize, riccati_solve

__all__ = [
    "Factorization",
    "RiccatiFactorization",
    "TridiagonalFactorization",
    "accuracy_bound",
]

#: iterative refinement steps at most, in ``refine="auto"`` mode
MAX_REFINEMENT = 10


def accuracy_bound(dtype: torch.dtype) -> float:
    """The backward-error bound of the contract: ``1e-12`` in float64, ``1e-6`` in float32.

    The float64 bound is the contract's; in float32 (unit roundoff 6e-8) refinement with
    float32 residuals reaches about ten times the roundoff, so ``1e-6``: a looser bound let
    unrefined float32 solves through with forward errors 100x those of a dense float32 LU.
    """
    return 1e-12 if dtype == torch.float64 else 1e-6


class Factorization:
    """An exact factorization of ``H + eps I``, reusable for many right-hand sides.

    Made by :meth:`ChainHessian.factorize <hessinv.ChainHessian.factorize>`.

    Attributes:
        damping: ``eps``.
        method: how it was factorized (``"riccati"``, ``"riccati, delayed pivots"``,
            ``"tridiagonal"``).
        backward_error: of the last :meth:`solve` (``None`` before the first).
        refinement_steps: iterative refinement steps the last :meth:`solve` took.
    """

    method = "?"

    def __init__(self, curvature, damping: float):
        self.damping = damping
        self._curvature = curvature
        self._layout = curvature.layout
        self._stages = curvature.stage_derivatives()
        self._S = curvature.loss_hessian_blocks()
        self.backward_error: float | None = None
        self.refinement_steps: int | None = None
        self._certificate: float | None = None

    # ------------------------------------------------------------------ strategy hooks
    def _direct(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _harden(self) -> bool:
        """Re-factorize more stably; False when there is nothing more stable to do."""
        return False

    # ------------------------------------------------------------------ contract
    def _norm(self) -> float:
        lo, hi = self._curvature.spectrum_estimate()
        return max(abs(hi + self.damping), abs(lo + self.damping))

    def _residual(self, g, x):
        """``(r, beta)``: the residual blocks and an upper bound on the backward error.

        ``||H + eps I||`` enters through a lower bound, so ``beta`` is never reported low:
        first the free one, ``||(H + eps I) x_j|| / ||x_j|| = ||g_j - r_j|| / ||x_j||``; only when
        that does not already prove ``beta <= bound`` the Lanczos estimate (cached per operator).
        """
        hx = torch.cat(hessian_vector_product(self._stages, self._S, x))
        X, Gm = torch.cat(x), torch.cat(g)
        R = Gm - hx - self.damping * X  # flat: three operations, not three per stage
        r = list(R.split([gl.shape[0] for gl in g]))
        num = torch.linalg.vector_norm(R, dim=0)
        xn, gn = torch.linalg.vector_norm(X, dim=0), torch.linalg.vector_norm(Gm, dim=0)
        tiny = torch.finfo(R.dtype).tiny
        free = float((torch.linalg.vector_norm(Gm - R, dim=0) / xn.clamp_min(tiny)).max())

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
            x = [xl + dl for xl, dl in zip(x, dx, strict=True)]
            steps += 1
            r, new = self._residual(g, x)
            stalled = auto and new > 0.5 * err
            err = new
            if stalled:
                break
        return x, steps, err

    def solve(self, g, refine="auto"):
        """``(H + eps I)^-1 g``; ``g`` flat ``(n,)``/``(n, k)``, a dict or a list (same kind back).

        ``refine="auto"`` (default): iterative refinement ``x <- x + (H + eps I)^-1 r`` with
        the exact residual ``r = g - (H + eps I) x`` until the backward error is below
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
                f"the solve with H + {self.damping:g} I reached a backward error of {err:.1e}, "
                f"above the bound {bound:.0e}, after {steps} refinement steps ({self.method}); "
                "H + eps I is probably too ill-conditioned for this precision",
                AccuracyWarning, stacklevel=2,
            )
        self.backward_error, self.refinement_steps = err, steps
        return self._layout.from_blocks(x, kind)

    @property
    def certificate(self) -> float:
        """Backward error of the unrefined factorization on a random right-hand side.

        ``logdet()`` and ``inertia()`` are exact for every ``H + eps I`` whose smallest
        ``|eigenvalue|`` exceeds ``certificate * ||H + eps I||``. Measured once (one solve
        and one product), hardening the factorization once if it is above the bound.
        """
        if self._certificate is None:
            bound = accuracy_bound(self._S.dtype)
            self._certificate = self._probe()
            if self._certificate > bound and self._harden():
                self._certificate = self._probe()
            if self._certificate > bound:
                warnings.warn(
                    f"logdet/inertia of H + {self.damping:g} I are not certified: the "
                    f"factorization's backward error is {self._certificate:.1e} (bound "
                    f"{bound:.0e}), so eigenvalues within {self._certificate:.1e} * "
                    "||H + eps I|| of zero may be miscounted",
                    AccuracyWarning, stacklevel=3,
                )
        return self._certificate

    def _probe(self) -> float:
        n, k = self._layout.numel, 2
        gen = torch.Generator(device=self._S.device).manual_seed(20261126)
        g = torch.randn(n, k, dtype=self._S.dtype, device=self._S.device, generator=gen)
        blocks = list(g.split(list(self._layout.stage_sizes)))
        return self._residual(blocks, self._direct(blocks))[1]

    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det(H + eps I)|)`` as 0-d tensors (certified, see :attr:`certificate`)."""
        raise NotImplementedError

    def inertia(self) -> tuple[int, int, int]:
        """``(n_positive, n_negative, n_zero)`` eigenvalue counts of ``H + eps I``."""
        raise NotImplementedError(
            f"inertia() needs method='riccati'; this factorization is {self.method!r}")

    @property
    def is_positive_definite(self) -> bool:
        """Whether ``H + eps I`` is positive definite (from the exact inertia)."""
        return self.inertia()[1] == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(damping={self.damping}, method={self.method!r})"


#: stages per host read of the pivot tests on CUDA where the fronts are expected definite
RUN_LENGTH = 16


def _run_length(curvature, damping: float) -> int:
    """``check_every`` of :func:`~hessinv.riccati.riccati_factorize` (docs/algorithm.md
    section 13): runs of :data:`RUN_LENGTH` stages per read on CUDA for the Gauss-Newton
    matrix with ``damping > 0`` (positive definite fronts for the convex built-in losses);
    stage by stage otherwise (on a CPU reads are free; an indefinite Hessian would redo runs)."""
    definite = not curvature.second_order and damping > 0
    return RUN_LENGTH if definite and curvature.device.type == "cuda" else 1


class RiccatiFactorization(Factorization):
    """The stage-wise factorization (docs/algorithm.md sections 5, 8, 10).

    Cost: time ``O(sum_l N_l^3 + N_l^2 a_l + N_l a_l^2 + a_l^2 h_l)`` and memory
    ``O(sum_l N_l^2 + N_l a_{l-1})`` with ``N_l`` the stage's basis size (``p_l``, or
    ``h_out r`` for a wide ``Linear`` stage) and ``a_l = B h_l``. Delayed pivots, when the
    threshold test asks for them, enlarge the next front by their number.
    """

    def __init__(self, curvature, damping: float, progress: bool = True):
        super().__init__(curvature, damping)
        self._progress = progress
        self._hard = False
        self._factors = riccati_factorize(self._stages, self._S, damping,
                                          check_every=_run_length(curvature, damping),
                                          speculative=curvature.device.type == "cuda",
                                          progress=progress)
        self._set_method()

    def _set_method(self):
        delayed = self._factors.n_delayed
        self.method = "riccati" + (f", {delayed} delayed pivots" if delayed else "")

    def _harden(self) -> bool:
        if self._hard:
            return False
        self._hard = True
        self._factors = riccati_factorize(self._stages, self._S, self.damping, tau=0.1,
                                          force_eigen=True, progress=self._progress)
        self._set_method()
        self._certificate = None
        return True

    def _direct(self, blocks):
        return riccati_solve(self._stages, self._factors, blocks)

    @property
    def n_delayed(self) -> int:
        """How many pivots were delayed to a later front (0 on the fast path)."""
        return self._factors.n_delayed

    def logdet(self):
        """``(sign, log|det(H + eps I)|)``: sums over the eliminated pivots (certified)."""
        self.certificate  # noqa: B018  (measures, hardens, warns)
        return self._factors.sign, self._factors.logabsdet

    def inertia(self):
        """Exact ``(n_positive, n_negative, n_zero)`` of ``H + eps I`` (Sylvester, Haynsworth).

        ``n_zero`` is always 0: a singular ``H + eps I`` raises
        :class:`~hessinv.errors.SingularMatrixError` when factorized.
        """
        self.certificate  # noqa: B018
        return self._factors.inertia


class TridiagonalFactorization(Factorization):
    """The paper's augmented block-tridiagonal system, pivoted band LU (docs/algorithm.md section 4).

    Blocks are dense in parameter space (size ``p_l + 2 a_l``): narrow stages only.
    Gives solves and ``logdet``; the LU does not give the inertia.
    """

    method = "tridiagonal"

    def __init__(self, curvature, damping: float):
        super().__init__(curvature, damping)
        from block_partitioned_matrices import SingularMatrixError as BlockSingular

        try:
            self._solver = AugmentedSolver(self._stages, self._S, damping)
        except BlockSingular as err:
            raise SingularMatrixError(
                f"H + {damping:g} I is singular to working precision (the augmented "
                f"block-tridiagonal system has a zero pivot: {err})", damping) from err

    def _direct(self, blocks):
        return self._solver.solve(blocks)

    def logdet(self):
        """``(sign, log|det(H + eps I)|)`` from the pivoted LU of the augmented system."""
        self.certificate  # noqa: B018
        return self._solver.lu.slogdet()
