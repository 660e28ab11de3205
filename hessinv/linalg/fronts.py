"""Eliminating one stage's *front*: threshold pivoting with delayed pivots (docs/algorithm.md
section 10).

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

The fronts share one interface (``half``, ``finish``, ``add_update_T``, ``F_half``,
``rejected``, ``combine``, ``next_state``, ``inertia``, ``sign``, ``logabsdet``):

* :class:`CholeskyFront` and :class:`LDLFront` (Bunch-Kaufman, when ``G`` is indefinite),
  both :class:`DirectFront`: the whole control block eliminated. Accepted when the element growth
  of the update is bounded,
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

from typing import Protocol

import torch

from hessinv.errors import SingularMatrixError
from hessinv.linalg.ldlt import bunch_kaufman

__all__ = [
    "Front",
    "DirectFront",
    "CholeskyFront",
    "LDLFront",
    "EigenFront",
    "factor_front",
    "cholesky_front",
    "symmetrize_",
    "symmetric_product",
    "sign_logabsdet",
]


def symmetrize_(M: torch.Tensor) -> torch.Tensor:
    """``M <- (M + M^T) / 2`` in place, exactly symmetric, for a square ``M`` the caller owns
    (the transpose copied contiguous first: a strided read of ``M^T`` inside the sum is
    several times slower on the CPU)."""
    return M.add_(M.T.clone(memory_format=torch.contiguous_format)).mul_(0.5)


def symmetric_product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^T B`` ``(a, a)`` for ``A``, ``B`` ``(n, a)`` when it is known to be symmetric
    (``B = A`` or ``B = D A`` with ``D`` symmetric): the blocks on and above the diagonal of a
    ``b x b`` block partition are multiplied, those below copied from them -- ``(b + 1) / 2b``
    of the work (the symmetric rank-k update ``syrk`` that torch does not expose). ``b`` grows
    with ``a``: small blocks multiply less efficiently (``b = 1`` below 384 columns)."""
    a = A.shape[1]
    b = 1 if a < 384 else 2 if a < 1024 else 4
    if b == 1:
        return A.T @ B
    edges = [round(i * a / b) for i in range(b + 1)]
    out = A.new_empty(a, a)
    for i in range(b):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, b):
            cols = slice(edges[j], edges[j + 1])
            block = A[:, rows].T @ B[:, cols]
            out[rows, cols] = block
            if j > i:
                out[cols, rows] = block.T
    return out


def _singular_tol(lam_abs_max: torch.Tensor, dtype) -> torch.Tensor:
    """A pivot at or below ``u max|pivot|`` is zero to working precision.

    Not ``n u``: that bound on the rounding of the eigenvalues is pessimistic, and in float32
    it called fronts of size 512 with a relative gap of 2e-6 singular although they factor
    with a backward error of 1e-6 and the exact inertia. Accuracy is judged a posteriori
    (docs/algorithm.md section 11)."""
    return torch.finfo(dtype).eps * lam_abs_max


class Front(Protocol):
    """What the Riccati sweeps use of an eliminated front (see the module docstring)."""

    n: int
    n_accepted: int
    n_rejected: int
    kind: str

    def half(self, kc: torch.Tensor) -> torch.Tensor: ...

    def finish(self, h: torch.Tensor) -> torch.Tensor: ...

    def add_update_T(self, acc: torch.Tensor, h: torch.Tensor) -> torch.Tensor: ...

    def rejected(self, kc: torch.Tensor) -> torch.Tensor: ...

    def combine(self, beta: torch.Tensor, delayed: torch.Tensor) -> torch.Tensor: ...

    def next_state(self, F: torch.Tensor, Q: torch.Tensor) -> torch.Tensor: ...

    @property
    def F_half(self) -> torch.Tensor: ...


class DirectFront:
    """All of ``G`` eliminated at once, ``G = P L D L^T P^T`` (the shared part of
    :class:`CholeskyFront` and :class:`LDLFront`).

    Keeps ``F_half = L^-1 P^T F`` (``W`` in docs/algorithm.md section 10; a different letter
    here than the weight); the update is ``F^T G^-1 F = F_half^T D^-1 F_half`` (one triangular solve
    with the ``a`` columns of ``F`` and one product). A solve uses the same half-factored
    coordinates: backward ``h = half(k)`` and ``add_update_T(acc, h) = acc + F^T G^-1 k``,
    forward ``finish(h + F_half t) = G^-1 (k + F t)`` -- one triangular solve each way.
    :class:`EigenFront` offers the same operations with ``L P^T = U_a^T``.

    Attributes: ``n`` (size of ``G``), ``n_accepted = n``, ``n_rejected = 0``, ``update``
    (``F^T G^-1 F``, ``(a, a)``, until :meth:`next_state` consumes it), ``inertia``
    ``(n_pos, n_neg)``, ``sign``, ``logabsdet``, ``kind``.
    """

    kind = "direct"

    def __init__(self, F: torch.Tensor, W: torch.Tensor, update: torch.Tensor):
        self.n = F.shape[0]
        self.n_accepted, self.n_rejected = self.n, 0
        self._W, self._WT = W, W.T  # the view the solves use, made once
        self.update = update

    def d_solve(self, h: torch.Tensor) -> torch.Tensor:
        """``D^-1 h``."""
        raise NotImplementedError

    def half(self, kc: torch.Tensor) -> torch.Tensor:
        """``h = L^-1 P^T k`` for ``k`` ``(n, r)``: the right-hand side in the half-factored
        coordinates where ``G^-1 = P L^-T D^-1 L^-1 P^T`` and ``G^-1 F = P L^-T D^-1 F_half``."""
        raise NotImplementedError

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """``P L^-T D^-1 h``, so that ``finish(half(k) + F_half t) = G^-1 (k + F t)``."""
        raise NotImplementedError

    def add_update_T(self, acc: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``acc + F^T G^-1 k = acc + F_half^T D^-1 h`` for ``h = half(k)`` (one ``addmm``)."""
        return torch.addmm(acc, self._WT, self.d_solve(h))

    @property
    def F_half(self) -> torch.Tensor:
        """``L^-1 P^T F`` ``(n, a)``: the coupling in the half-factored coordinates."""
        return self._W

    def rejected(self, kc):
        return kc[:0]

    def combine(self, beta, delayed):
        return beta

    def next_state(self, F, Q):
        """``V = Q - F^T G^-1 F`` over the state (no delayed variables); made in ``Q``'s
        memory (the front's ``Q`` is not used again)."""
        V = Q.sub_(self.update)
        self.update = None
        return symmetrize_(V)


class CholeskyFront(DirectFront):
    """``G = L L^T`` (``P = I``, ``D = I``): the update is ``F_half^T F_half``; inertia ``(n, 0)``;
    ``log|det G| = 2 sum log L_ii``, made when asked (a sweep sums the diagonals of all its
    Cholesky fronts at once: :func:`sign_logabsdet`)."""

    kind = "cholesky"

    def __init__(self, F: torch.Tensor, L: torch.Tensor):
        W = torch.linalg.solve_triangular(L, F, upper=False)
        super().__init__(F, W, symmetric_product(W, W))
        self.L, self._LT = L, L.T
        self.inertia = (self.n, 0)

    @property
    def sign(self) -> torch.Tensor:
        return self._W.new_ones(())

    @property
    def logabsdet(self) -> torch.Tensor:
        return 2 * torch.log(torch.diagonal(self.L)).sum()

    def d_solve(self, h):
        return h

    def half(self, kc):
        return torch.linalg.solve_triangular(self.L, kc, upper=False)

    def finish(self, h):
        return torch.linalg.solve_triangular(self._LT, h, upper=True)


class LDLFront(DirectFront):
    """Bunch-Kaufman ``G = P L D L^T P^T`` in the explicit form of :mod:`hessinv.linalg.ldlt`;
    its inertia, sign and ``log|det|`` stay on the device (``(2,)`` and 0-d tensors, read once
    for all fronts, docs/algorithm.md section 13)."""

    kind = "ldl"

    def __init__(self, F: torch.Tensor, bk):
        W = bk.half_solve(F)
        super().__init__(F, W, symmetric_product(W, bk.d_solve(W)))
        self._bk = bk
        self.inertia, self.sign, self.logabsdet = bk.inertia, bk.sign, bk.logabsdet

    def d_solve(self, h):
        return self._bk.d_solve(h)

    def half(self, kc):
        return self._bk.half_solve(kc)

    def finish(self, h):
        return self._bk.half_solve_T(self._bk.d_solve(h))


class EigenFront:
    """``G = U diag(lambda) U^T`` with threshold pivoting: accepted directions eliminated, others
    delayed."""

    def __init__(self, lam, U, F, accept):
        self.n = lam.shape[0]
        self.U_a, self.U_r = U[:, accept], U[:, ~accept]
        self.lam_a, self.lam_r = lam[accept], lam[~accept]
        self.n_accepted, self.n_rejected = self.U_a.shape[1], self.U_r.shape[1]
        self.kind = "eigen"
        self._UF_a = self.U_a.T @ F
        self._UF_r = self.U_r.T @ F
        self.inertia = torch.stack([(self.lam_a > 0).sum(), (self.lam_a < 0).sum()])
        self.sign = torch.prod(torch.sign(self.lam_a))
        self.logabsdet = torch.log(self.lam_a.abs()).sum()

    def half(self, kc):
        """``U_a^T k``: the accepted eigen coordinates (``L = U_a``, ``D = diag(lambda_a)``)."""
        return self.U_a.T @ kc

    def finish(self, h):
        return h / self.lam_a[:, None]

    def add_update_T(self, acc, h):
        """``acc + F_a^T G_a^-1 k_a``."""
        return torch.addmm(acc, self._UF_a.T, h / self.lam_a[:, None])

    @property
    def F_half(self):
        """``U_a^T F`` ``(n_accepted, a)``."""
        return self._UF_a

    def rejected(self, kc):
        return self.U_r.T @ kc

    def combine(self, beta, delayed):
        return self.U_a @ beta + self.U_r @ delayed

    def next_state(self, F, Q):
        """The next front's state block over ``(state, delayed)``:
        ``[[Q - F_a^T G_a^-1 F_a, F_r^T], [F_r, diag(lambda_r)]]``."""
        top = Q - self._UF_a.T @ (self._UF_a / self.lam_a[:, None])
        top = symmetrize_(top)
        return torch.cat(
            [torch.cat([top, self._UF_r.T], 1), torch.cat([self._UF_r, torch.diag(self.lam_r)], 1)],
            0,
        )


def _singular(stage: int, damping: float, detail: str) -> SingularMatrixError:
    return SingularMatrixError(
        f"H + {damping:g} I is singular to working precision ({detail}, met while "
        f"eliminating stage {stage + 1}); use a damping that is not an eigenvalue of -H, "
        "e.g. damping > 0 for a positive semi-definite H",
        damping,
    )


def sign_logabsdet(fronts, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign, log|det|)`` of the product of the fronts' control blocks (0-d tensors of
    ``like``'s dtype and device), with the diagonals of all Cholesky factors in one ``log``
    and one sum and the other fronts' values stacked: a few operators for a whole sweep, not
    a few per front."""
    chol = [torch.diagonal(f.L) for f in fronts if isinstance(f, CholeskyFront) and f.n]
    other = [f for f in fronts if not isinstance(f, CholeskyFront)]
    sign, logabsdet = like.new_ones(()), like.new_zeros(())
    if chol:
        logabsdet = 2 * torch.log(torch.cat(chol)).sum()
    if other:
        sign = torch.stack([f.sign for f in other]).prod()
        logabsdet = logabsdet + torch.stack([f.logabsdet for f in other]).sum()
    return sign, logabsdet


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` (0-d) without an ``|x|`` temporary: two reductions over ``x`` (NaN
    propagates, so a failed factorization fails the tests it enters)."""
    return torch.maximum(x.amax(), x.amin().neg())


def _cholesky_passes(L, info, G) -> torch.Tensor:
    """The pivot test of a Cholesky factor of ``G`` (0-d bool on the device): it succeeded and
    its smallest pivot is above ``u max|G|``, where ``max|G| = max_i G_ii`` because a
    Cholesky that succeeded shows ``G`` positive definite (``|G_ij|^2 <= G_ii G_jj``). A
    failed Cholesky leaves NaN or a tiny pivot, so it fails this test too."""
    scale = torch.diagonal(G).amax()
    return (info == 0) & (torch.diagonal(L).min() ** 2 > _singular_tol(scale, L.dtype))


def _growth_bounded(front: DirectFront, F, Q, G, tau: float) -> torch.Tensor:
    """The growth test of a direct front (0-d bool on the device):
    ``max |F^T G^-1 F| <= max(|Q|, |F|, |G|)_max / tau``; the extremes of the three and of a
    Cholesky front's positive semi-definite update (whose largest entry is on its diagonal,
    ``|U_ij|^2 <= U_ii U_jj``, as for ``G``) in one stack."""
    if isinstance(front, CholeskyFront):
        G_max, growth = torch.diagonal(G).amax(), front.update.diagonal().amax()
        extremes = [Q.amax(), Q.amin(), F.amax(), F.amin(), G_max]
    else:
        growth = _abs_max(front.update)
        extremes = [Q.amax(), Q.amin(), F.amax(), F.amin(), G.amax(), G.amin()]
    return growth <= torch.stack(extremes).abs().amax() / tau


def _front_tests(front: DirectFront, pivot_ok, F, Q, G, tau: float, no_state: bool) -> list:
    """The tests a direct front must pass (0-d bools on the device): its pivot test, and the
    growth test when it has a state to pass on."""
    return [pivot_ok] if no_state else [pivot_ok, _growth_bounded(front, F, Q, G, tau)]


def _cholesky_in_full(G, F, Q, tau: float, no_state: bool):
    """The Cholesky front made before anything is read (meaningless, NaN, if the Cholesky
    failed), with its :func:`_front_tests`."""
    L, info = torch.linalg.cholesky_ex(G)
    front = CholeskyFront(F, L)
    return front, _front_tests(front, _cholesky_passes(L, info, G), F, Q, G, tau, no_state)


def cholesky_front(G, F, Q, tau: float) -> tuple[DirectFront, torch.Tensor]:
    """A Cholesky :class:`DirectFront` of a front with a state (``F`` has columns), with the
    tests :func:`factor_front` applies to it -- pivot ``> u max|G|`` and bounded growth --
    as one boolean 0-d tensor left on the device (docs/algorithm.md section 13).

    When the tests pass, the front is the one :func:`factor_front` returns, computed by the
    same operations. When they fail it is meaningless (NaN after a failed Cholesky)."""
    if G.shape[0] == 0:
        return CholeskyFront(F, G.new_zeros(0, 0)), torch.ones(
            (), dtype=torch.bool, device=G.device
        )
    front, (pivot_ok, growth_ok) = _cholesky_in_full(G, F, Q, tau, no_state=False)
    return front, pivot_ok & growth_ok


def factor_front(
    G,
    F,
    Q,
    tau: float,
    root: bool,
    stage: int,
    damping: float,
    force_eigen=False,
    speculative: bool = False,
):
    """Factor the control block ``G`` (``(n, n)``, symmetric: only its lower triangle is read)
    of a front with coupling ``F`` (``(n, a)``).

    Tries :class:`DirectFront` and keeps it when its element growth is bounded,
    ``max |F^T G^-1 F| <= max(|Q|, |F|, |G|)_max / tau`` (always at the root, where ``a = 0``);
    otherwise, or with ``force_eigen``, returns an :class:`EigenFront`. Raises
    :class:`SingularMatrixError` when a pivot at the root is zero to working precision.

    Host reads (docs/algorithm.md section 13): the Cholesky front's pivot test and then its
    growth test, one read each; with ``speculative`` the front is made in full first and
    both tests are read together (one read; wasted work when the Cholesky fails, so it is
    for devices where a read costs more than that). A Bunch-Kaufman front adds one read for
    its pivot layout and one for its pivot and growth tests together. Same fronts either way.
    """
    n = G.shape[0]
    if n == 0:
        return CholeskyFront(F, G.new_zeros(0, 0))
    no_state = root or F.shape[1] == 0
    if not force_eigen:
        if speculative:
            front, tests = _cholesky_in_full(G, F, Q, tau, no_state)
            passed = torch.stack(tests).tolist()  # one host read
        else:
            L, info = torch.linalg.cholesky_ex(G)
            passed = [bool(_cholesky_passes(L, info, G))]  # one host read
            if passed[0]:
                front = CholeskyFront(F, L)
                if not no_state:  # and one more
                    passed.append(bool(_growth_bounded(front, F, Q, G, tau)))
        if all(passed):
            return front
        if not passed[0]:  # indefinite (or nearly singular: Bunch-Kaufman then fails as well)
            bk = bunch_kaufman(G)  # one host read
            if bk is not None:
                front = LDLFront(F, bk)
                pivot_ok = bk.smallest > _singular_tol(_abs_max(G), G.dtype)
                tests = _front_tests(front, pivot_ok, F, Q, G, tau, no_state)
                if all(torch.stack(tests).tolist()):  # one host read
                    return front
    lam, U = torch.linalg.eigh(G)
    tol = _singular_tol(lam.abs().max(), G.dtype)
    if root:
        if bool((lam.abs() <= tol).any()):
            raise _singular(
                stage,
                damping,
                f"a pivot {float(lam.abs().min()):.1e} at or below "
                f"{float(tol):.1e} in the last front",
            )
        return EigenFront(lam, U, F, torch.ones_like(lam, dtype=torch.bool))
    coupling = (U.T @ F).abs().amax(1) if F.shape[1] else lam.new_zeros(n)
    accept = (lam.abs() > tol) & (coupling <= lam.abs() / tau)
    return EigenFront(lam, U, F, accept)
