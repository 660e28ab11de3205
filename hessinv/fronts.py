"""Eliminating one stage's *front*: threshold pivoting with delayed pivots (docs/algorithm.md section 10).

At stage ``l`` the stage-wise factorization (section 5) holds a symmetric *front*

    [ G   F ]     G: the control block (n x n), F: its coupling to the state (n x a),
    [ F^T Q ]     Q: the state block (a x a)

and eliminates the control block: ``V = Q - F^T G^-1 F``. That is one step of a block
``LDL^T`` factorization of ``H + eps I`` in a fixed order, and like unpivoted Gaussian
elimination it is unstable when ``G`` has an eigenvalue that is small compared with the
coupling of its eigenvector to the state (the multipliers ``G^-1 F`` are large). The
remedy used by multifrontal sparse ``LDL^T`` solvers is threshold pivoting with
*delayed pivots*: eliminate only the directions that pass a threshold test and hand
the others to the next front, where they meet the variables they are coupled to.

Two strategies, two classes:

* :class:`DirectFront` -- Cholesky (or Bunch-Kaufman ``LDL^T`` when ``G`` is indefinite)
  of the whole control block. Accepted when the element growth of the update is bounded,
  ``max |F^T G^-1 F| <= max(|Q|, |F|, |G|) / tau`` (always at the root, where there is no
  state).
* :class:`EigenFront` -- ``G = U diag(lambda) U^T``; direction ``q`` is eliminated when
  ``|lambda_q| > tol`` and ``max_j |(U^T F)_qj| / |lambda_q| <= 1/tau``; the others are
  *delayed*: they become extra state variables with ``V`` block ``diag(lambda_r)`` and
  coupling ``U_r^T F``.

Both give the inertia and ``log|det|`` of the eliminated block exactly (Sylvester's law:
the congruence by ``U`` or by the triangular factor keeps the inertia), so the sum over
fronts is the inertia of ``H + eps I`` (Haynsworth).
"""

from __future__ import annotations

import torch

from .errors import SingularMatrixError

__all__ = ["DirectFront", "EigenFront", "factor_front", "DEFAULT_TAU"]

#: threshold of the pivot tests: growth (direct fronts) or multipliers (eigen fronts) up to ``1/tau``.
DEFAULT_TAU = 1e-2


def _singular_tol(lam_abs_max: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """A pivot at or below ``u max|pivot|`` is zero to working precision.

    Not ``n u``: that bound on the rounding of the eigenvalues is pessimistic, and in float32
    it called fronts of size 512 with a relative gap of 2e-6 singular although they factor
    with a backward error of 1e-6 and the exact inertia. Accuracy is judged a posteriori
    (docs/algorithm.md section 11)."""
    del n
    return torch.finfo(dtype).eps * lam_abs_max


def _ldl_inertia(LD: torch.Tensor, pivots: torch.Tensor):
    """``(n_pos, n_neg, sign, logabsdet, min |pivot|)`` from a Bunch-Kaufman factor."""
    d = torch.diagonal(LD)
    two = pivots < 0  # members of 2x2 pivot blocks (LAPACK convention)
    starts = torch.nonzero(two).flatten()[0::2]
    # a Bunch-Kaufman 2x2 pivot has a negative determinant: one + and one - eigenvalue
    det2 = d[starts] * d[starts + 1] - LD[starts + 1, starts] ** 2
    one = d[~two]
    n2 = int(starts.numel())
    n_pos = int((one > 0).sum()) + n2
    n_neg = int((one < 0).sum()) + n2
    sign = torch.prod(torch.sign(one)) * (-1.0) ** n2
    logabsdet = torch.log(one.abs()).sum() + torch.log(det2.abs()).sum()
    smallest = torch.cat([one.abs(), det2.abs().sqrt()]).min() if d.numel() else d.new_ones(())
    return n_pos, n_neg, sign, logabsdet, smallest


class DirectFront:
    """All of ``G`` eliminated by Cholesky or Bunch-Kaufman ``LDL^T``.

    Cholesky ``G = L L^T`` keeps ``W = L^-1 F``: the update is ``F^T G^-1 F = W^T W`` (one
    triangular solve instead of two). For an indefinite ``G`` the ``LDL^T`` factor gives the
    inertia and ``log|det|`` and an ``LU`` factor of the same ``G`` gives ``K = G^-1 F`` and
    the solves (LAPACK's ``sytrs`` works column by column and is several times slower than
    ``getrs`` for the ``a`` right-hand sides of ``K``).

    Attributes: ``n`` (size of ``G``), ``n_accepted = n``, ``n_rejected = 0``, ``update``
    (``F^T G^-1 F``, ``(a, a)``, until :meth:`next_state` consumes it), ``inertia``
    ``(n_pos, n_neg)``, ``sign``, ``logabsdet`` (0-d tensors), ``kind`` (``"cholesky"`` or
    ``"ldl"``).
    """

    def __init__(self, kind, factor, pivots, F, inertia, sign, logabsdet):
        self.kind, self.factor, self.pivots = kind, factor, pivots
        self.n = factor.shape[0]
        self.n_accepted, self.n_rejected = self.n, 0
        self.inertia, self.sign, self.logabsdet = inertia, sign, logabsdet
        if kind == "cholesky":
            self._W = torch.linalg.solve_triangular(factor, F, upper=False)
            self.update = self._W.T @ self._W
        else:
            self._K = torch.linalg.lu_solve(factor, pivots, F)
            self.update = F.T @ self._K

    def pivot_solve(self, k: torch.Tensor) -> torch.Tensor:
        """``G^-1 k`` for ``k`` ``(n, r)``."""
        if self.kind == "cholesky":
            return torch.cholesky_solve(k, self.factor)
        return torch.linalg.lu_solve(self.factor, self.pivots, k)

    def gain(self, t: torch.Tensor) -> torch.Tensor:
        """``G^-1 F t``."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.factor.T, self._W @ t, upper=True)
        return self._K @ t

    def gain_T(self, k: torch.Tensor) -> torch.Tensor:
        """``F^T G^-1 k`` for ``k`` ``(n, r)``."""
        if self.kind == "cholesky":
            return self._W.T @ torch.linalg.solve_triangular(self.factor, k, upper=False)
        return self._K.T @ k

    def accepted(self, kc):
        return kc

    def rejected(self, kc):
        return kc[:0]

    def combine(self, beta, delayed):
        return beta

    def next_state(self, F, Q):
        """``V = Q - F^T G^-1 F`` over the state (no delayed variables)."""
        V = Q - self.update
        self.update = None
        return 0.5 * (V + V.T)


class EigenFront:
    """``G = U diag(lambda) U^T`` with threshold pivoting: accepted directions eliminated, others delayed."""

    def __init__(self, lam, U, F, accept):
        self.n = lam.shape[0]
        self.U_a, self.U_r = U[:, accept], U[:, ~accept]
        self.lam_a, self.lam_r = lam[accept], lam[~accept]
        self.n_accepted, self.n_rejected = self.U_a.shape[1], self.U_r.shape[1]
        self.kind = "eigen"
        UF_a = self.U_a.T @ F
        self._K = UF_a / self.lam_a[:, None]  # G_a^-1 F_a in eigen coordinates
        self._UF_r = self.U_r.T @ F
        self._UF_a = UF_a
        self.inertia = (int((self.lam_a > 0).sum()), int((self.lam_a < 0).sum()))
        self.sign = torch.prod(torch.sign(self.lam_a))
        self.logabsdet = torch.log(self.lam_a.abs()).sum()

    def pivot_solve(self, k_a):
        return k_a / self.lam_a[:, None]

    def gain(self, t):
        """``G_a^-1 F_a t`` in eigen coordinates."""
        return self._K @ t

    def gain_T(self, k_a):
        """``F_a^T G_a^-1 k_a``."""
        return self._UF_a.T @ (k_a / self.lam_a[:, None])

    def accepted(self, kc):
        return self.U_a.T @ kc

    def rejected(self, kc):
        return self.U_r.T @ kc

    def combine(self, beta, delayed):
        return self.U_a @ beta + self.U_r @ delayed

    def next_state(self, F, Q):
        """The next front's state block over ``(state, delayed)``:
        ``[[Q - F_a^T G_a^-1 F_a, F_r^T], [F_r, diag(lambda_r)]]``."""
        top = Q - self._UF_a.T @ self._K
        top = 0.5 * (top + top.T)
        return torch.cat(
            [torch.cat([top, self._UF_r.T], 1),
             torch.cat([self._UF_r, torch.diag(self.lam_r)], 1)], 0)


def _singular(stage: int, damping: float, detail: str) -> SingularMatrixError:
    return SingularMatrixError(
        f"H + {damping:g} I is singular to working precision ({detail}, met while "
        f"eliminating stage {stage + 1}); use a damping that is not an eigenvalue of -H, "
        "e.g. damping > 0 for a positive semi-definite H",
        damping,
    )


def factor_front(G, F, Q, tau: float, root: bool, stage: int, damping: float, force_eigen=False):
    """Factor the control block ``G`` (``(n, n)``) of a front with coupling ``F`` (``(n, a)``).

    Tries :class:`DirectFront` and keeps it when its element growth is bounded,
    ``max |F^T G^-1 F| <= max(|Q|, |F|, |G|)_max / tau`` (always at the root, where ``a = 0``);
    otherwise, or with ``force_eigen``, returns an :class:`EigenFront`. Raises
    :class:`SingularMatrixError` when a pivot at the root is zero to working precision.
    """
    n = G.shape[0]
    if n == 0:
        empty = G.new_zeros(0, 0)
        return DirectFront("cholesky", empty, None, F, (0, 0), G.new_ones(()), G.new_zeros(()))
    scale = G.abs().max()
    if not force_eigen:
        chol, info = torch.linalg.cholesky_ex(G)
        front = None
        if int(info) == 0:
            diag = torch.diagonal(chol)
            if bool(diag.min() ** 2 > _singular_tol(scale, n, G.dtype)):
                front = DirectFront("cholesky", chol, None, F, (n, 0), G.new_ones(()),
                                    2 * torch.log(diag).sum())
        else:
            LD, pivots, info = torch.linalg.ldl_factor_ex(G)
            if int(info) == 0 and bool(torch.isfinite(LD).all()):
                n_pos, n_neg, sign, logabsdet, smallest = _ldl_inertia(LD, pivots)
                if bool(smallest > _singular_tol(scale, n, G.dtype)):
                    LU, lu_pivots = torch.linalg.lu_factor(G)
                    front = DirectFront("ldl", LU, lu_pivots, F, (n_pos, n_neg), sign, logabsdet)
        if front is not None and (root or F.shape[1] == 0):
            return front
        if front is not None:
            size = torch.stack([Q.abs().max(), F.abs().max(), scale])
            if bool(front.update.abs().max() <= size.max() / tau):
                return front
    lam, U = torch.linalg.eigh(G)
    tol = _singular_tol(lam.abs().max(), n, G.dtype)
    if root:
        if bool((lam.abs() <= tol).any()):
            raise _singular(stage, damping, f"a pivot {float(lam.abs().min()):.1e} at or below "
                            f"{float(tol):.1e} in the last front")
        return EigenFront(lam, U, F, torch.ones_like(lam, dtype=torch.bool))
    coupling = (U.T @ F).abs().amax(1) if F.shape[1] else lam.new_zeros(n)
    accept = (lam.abs() > tol) & (coupling <= lam.abs() / tau)
    return EigenFront(lam, U, F, accept)
