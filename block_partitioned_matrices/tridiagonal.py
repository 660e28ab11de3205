"""Block-tridiagonal matrices and their pivoted (banded GEPP) LU factorization.

``Tridiagonal(diagonal=[D_1..D_n], lower=[L_1..L_{n-1}], upper=[U_1..U_{n-1}])``
has ``D_i`` (``m_i x m_i``) at block ``(i, i)``, ``L_i`` (``m_{i+1} x m_i``) at
``(i+1, i)`` and ``U_i`` (``m_i x m_{i+1}``) at ``(i, i+1)``:

    (A x)_i = L_{i-1} x_{i-1} + D_i x_i + U_i x_{i+1}.

:meth:`Tridiagonal.factorize` is Gaussian elimination with partial pivoting
(GEPP) restricted to the band, the block analogue of LAPACK ``gbtrf``: at step
``k`` the tall panel ``[D_k'; L_k]`` is LU-factored with row pivoting,
``P_k [D_k'; L_k] = [L1_k; L2_k] Ubar_k``, and the same row operations are
applied to the columns to its right, ``[[U_k', 0], [D_{k+1}, U_{k+1}]]``::

    [V_k, W_k]                = L1_k^{-1} (P_k R_k)_top
    [D_{k+1}', U_{k+1}']      = (P_k R_k)_bot - L2_k [V_k, W_k]

``V_k`` is the new block ``(k, k+1)`` of ``U`` and ``W_k`` the fill-in block
``(k, k+2)`` (pivoting widens the upper band by one block, as in ``gbtrf``).
The pivot choices are exactly those dense GEPP makes on the assembled matrix,
so the result is as stable as ``torch.linalg.solve`` even when the diagonal
blocks are singular or ill-conditioned. Cost ``O(sum m^3)`` time and
``O(sum m^2)`` memory; a factorization is reused for any number of right-hand
sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .banded import BlockBanded
from .block_vector import _split_rhs
from .blocks import add, is_leaf, shape_of, to_dense, transpose
from .errors import SingularMatrixError

__all__ = ["Tridiagonal", "TridiagonalLU"]


def _leaf_tuple(blocks, name: str) -> tuple:
    if isinstance(blocks, torch.Tensor) or not isinstance(blocks, Sequence):
        raise TypeError(
            f"Tridiagonal: {name} must be a sequence of blocks, got {type(blocks).__name__}"
        )
    blocks = tuple(blocks)
    for i, b in enumerate(blocks):
        if not is_leaf(b):
            raise TypeError(
                f"Tridiagonal: {name}[{i}] must be a 2-D tensor, Zero or Identity, got "
                f"{type(b).__name__}"
            )
    return blocks


class Tridiagonal(BlockBanded):
    """Square block-tridiagonal matrix with ragged block sizes ``m_1..m_n``.

    ``lower[i]`` is block ``(i+1, i)``, ``upper[i]`` is block ``(i, i+1)``.
    Blocks may be dense tensors, :class:`Zero` or :class:`Identity`.
    ``solve(rhs)`` equals ``factorize().solve(rhs)`` (pivoted, see module doc).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> m = [2, 3, 1, 2]
    >>> r = lambda a, b: torch.randn(a, b, generator=g, dtype=torch.float64)
    >>> T = Tridiagonal([r(k, k) for k in m],
    ...                 [r(m[i + 1], m[i]) for i in range(3)],
    ...                 [r(m[i], m[i + 1]) for i in range(3)])
    >>> T.shape, T.block_sizes
    ((8, 8), (2, 3, 1, 2))
    >>> b = torch.randn(8, 3, generator=g, dtype=torch.float64)
    >>> torch.allclose(T.solve(b), torch.linalg.solve(T.to_dense(), b))
    True
    >>> torch.allclose(T @ b, T.to_dense() @ b)
    True
    """

    offsets = (-1, 0, 1)

    def __init__(self, diagonal: Sequence, lower: Sequence, upper: Sequence):
        diagonal = _leaf_tuple(diagonal, "diagonal")
        lower = _leaf_tuple(lower, "lower")
        upper = _leaf_tuple(upper, "upper")
        n = len(diagonal)
        if n == 0:
            raise ValueError("Tridiagonal needs at least one diagonal block")
        if len(lower) != n - 1 or len(upper) != n - 1:
            raise ValueError(
                f"Tridiagonal with {n} diagonal blocks needs {n - 1} lower and {n - 1} upper "
                "blocks, "
                f"got {len(lower)} and {len(upper)}"
            )
        m = []
        for i, b in enumerate(diagonal):
            r, c = shape_of(b)
            if r != c or r == 0:
                raise ValueError(
                    f"Tridiagonal: diagonal[{i}] has shape {(r, c)}; expected square m x m with m "
                    ">= 1"
                )
            m.append(r)
        for i in range(n - 1):
            s, want = shape_of(lower[i]), (m[i + 1], m[i])
            if s != want:
                raise ValueError(
                    f"Tridiagonal: lower[{i}] (block ({i + 1}, {i})) has shape {s}; expected {want}"
                )
            s, want = shape_of(upper[i]), (m[i], m[i + 1])
            if s != want:
                raise ValueError(
                    f"Tridiagonal: upper[{i}] (block ({i}, {i + 1})) has shape {s}; expected {want}"
                )
        self._diag, self._lower, self._upper = diagonal, lower, upper
        self._row_sizes = self._col_sizes = tuple(m)
        self._init_meta(diagonal + lower + upper)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """``(m_1, ..., m_n)``."""
        return self._row_sizes

    @property
    def diagonal(self) -> tuple:
        return self._diag

    @property
    def lower(self) -> tuple:
        return self._lower

    @property
    def upper(self) -> tuple:
        return self._upper

    def block(self, i: int, j: int):
        self._check_index(i, j)
        if i == j:
            return self._diag[i]
        if i == j + 1:
            return self._lower[j]
        if j == i + 1:
            return self._upper[i]
        return self._zero(i, j)

    def _map_blocks(self, fn) -> Tridiagonal:
        return Tridiagonal(
            [fn(b) for b in self._diag], [fn(b) for b in self._lower], [fn(b) for b in self._upper]
        )

    @property
    def T(self) -> Tridiagonal:
        return Tridiagonal(
            [transpose(b) for b in self._diag],
            [transpose(b) for b in self._upper],
            [transpose(b) for b in self._lower],
        )

    @classmethod
    def from_banded(cls, A: BlockBanded) -> Tridiagonal:
        """View any square block-banded matrix (Diagonal, bidiagonal) as a Tridiagonal."""
        if not isinstance(A, BlockBanded):
            raise TypeError(
                f"from_banded needs a Diagonal/bidiagonal/Tridiagonal, got {type(A).__name__}"
            )
        if A.row_sizes != A.col_sizes:
            raise ValueError(
                f"from_banded needs square diagonal blocks, got rows {A.row_sizes}, cols "
                f"{A.col_sizes}"
            )
        n = A.num_block_rows
        return cls(
            [A.block(i, i) for i in range(n)],
            [A.block(i + 1, i) for i in range(n - 1)],
            [A.block(i, i + 1) for i in range(n - 1)],
        )

    def _combine(self, other, sign: int) -> Tridiagonal:
        if not isinstance(other, BlockBanded):
            return NotImplemented
        if other.row_sizes != self.block_sizes or other.col_sizes != self.block_sizes:
            raise ValueError(
                f"cannot combine Tridiagonal with block sizes {self.block_sizes} and "
                f"{type(other).__name__} with row sizes {other.row_sizes}, col sizes "
                f"{other.col_sizes}"
            )
        o = Tridiagonal.from_banded(other)
        if sign < 0:
            o = -o
        return Tridiagonal(
            [add(a, b) for a, b in zip(self._diag, o._diag, strict=True)],
            [add(a, b) for a, b in zip(self._lower, o._lower, strict=True)],
            [add(a, b) for a, b in zip(self._upper, o._upper, strict=True)],
        )

    def __add__(self, other) -> Tridiagonal:
        return self._combine(other, 1)

    def __sub__(self, other) -> Tridiagonal:
        return self._combine(other, -1)

    def factorize(self) -> TridiagonalLU:
        """Pivoted block LU (banded GEPP); raises :class:`SingularMatrixError` on an exact zero
        pivot."""
        return TridiagonalLU._factorize(self)

    def solve(self, rhs):
        """``A^{-1} rhs``; rhs dense ``(N,)``/``(N, k)`` or BlockVector, returns the same kind."""
        return self.factorize().solve(rhs)


def _perm_from_pivots(lu: torch.Tensor, piv: torch.Tensor) -> torch.Tensor:
    """Row gather index ``perm`` with ``(P^T A) = A[perm]`` for ``A = P L U``."""
    P, _, _ = torch.lu_unpack(lu, piv, unpack_data=False)
    return P.argmax(dim=0)


class TridiagonalLU:
    """Immutable pivoted LU factorization of a :class:`Tridiagonal` (from
    :meth:`Tridiagonal.factorize`).

    Per block row ``k`` it stores the packed panel LU (``(m_k + m_{k+1}) x m_k``:
    unit-lower ``L1_k`` and upper ``Ubar_k`` on top, ``L2_k`` below), the row
    gather index of the panel pivoting, and the blocks ``V_k`` (``(k, k+1)``) and
    ``W_k`` (``(k, k+2)``) of the upper factor. Solve: forward sweep
    ``v = P_k [c_k; b_{k+1}]``, ``y_k = L1_k^{-1} v_top``, ``c_{k+1} = v_bot - L2_k y_k``;
    backward sweep ``x_k = Ubar_k^{-1} (y_k - V_k x_{k+1} - W_k x_{k+2})``.

    >>> import torch
    >>> T = Tridiagonal([torch.zeros(2, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)],
    ...                 [torch.eye(2, dtype=torch.float64)], [torch.eye(2, dtype=torch.float64)])
    >>> F = T.factorize()          # D_1 = 0: unpivoted block LU would divide by zero
    >>> b = torch.arange(4.0, dtype=torch.float64)
    >>> torch.allclose(F.solve(b), torch.linalg.solve(T.to_dense(), b))
    True
    >>> sign, logabsdet = F.slogdet()
    >>> bool(torch.allclose(sign * logabsdet.exp(), torch.linalg.det(T.to_dense())))
    True
    """

    __slots__ = (
        "_sizes",
        "_lu",
        "_piv",
        "_perm",
        "_upper1",
        "_upper2",
        "_dtype",
        "_device",
        "_frozen",
    )

    def __init__(self, *args, **kwargs):
        raise TypeError("TridiagonalLU is created by Tridiagonal.factorize()")

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError("TridiagonalLU is immutable")
        object.__setattr__(self, name, value)

    @classmethod
    def _factorize(cls, A: Tridiagonal) -> TridiagonalLU:
        dt, dv = A.dtype, A.device
        if not dt.is_floating_point and not dt.is_complex:
            raise TypeError(f"factorize needs a floating-point dtype, got {dt}")
        m = A.block_sizes
        n = len(m)
        la = torch.linalg

        def dense(b):
            return to_dense(b, dt, dv)

        lus, pivs, perms, v_blocks, w_blocks, infos = [], [], [], [], [], []
        Dk = dense(A.diagonal[0])
        Uk = dense(A.upper[0]) if n > 1 else None
        for k in range(n - 1):
            mk, m1 = m[k], m[k + 1]
            m2 = m[k + 2] if k + 2 < n else 0
            panel = torch.cat([Dk, dense(A.lower[k])], dim=0)
            lu, piv, info = la.lu_factor_ex(panel)
            perm = _perm_from_pivots(lu, piv)
            if m2:
                top = torch.cat([Uk, torch.zeros(mk, m2, dtype=dt, device=dv)], dim=1)
                bot = torch.cat([dense(A.diagonal[k + 1]), dense(A.upper[k + 1])], dim=1)
            else:
                top, bot = Uk, dense(A.diagonal[k + 1])
            R = torch.cat([top, bot], dim=0)[perm]
            Rtop = la.solve_triangular(lu[:mk], R[:mk], upper=False, unitriangular=True)
            Rbot = R[mk:] - lu[mk:] @ Rtop
            lus.append(lu)
            pivs.append(piv)
            perms.append(perm)
            infos.append(info)
            v_blocks.append(Rtop[:, :m1])
            w_blocks.append(Rtop[:, m1:])
            Dk, Uk = Rbot[:, :m1], Rbot[:, m1:]
        lu, piv, info = la.lu_factor_ex(Dk)
        lus.append(lu)
        pivs.append(piv)
        perms.append(_perm_from_pivots(lu, piv))
        infos.append(info)
        bad = torch.nonzero(torch.stack(infos) > 0)
        if bad.numel():
            k = int(bad[0, 0])
            raise SingularMatrixError(
                f"Tridiagonal is singular: exact zero pivot in block row {k} "
                f"(row {int(infos[k]) - 1} of that block, size {m[k]})"
            )
        self = object.__new__(cls)
        self._sizes = tuple(m)
        self._lu = tuple(lus)
        self._piv = tuple(pivs)
        self._perm = tuple(perms)
        self._upper1 = tuple(v_blocks)
        self._upper2 = tuple(w_blocks)
        self._dtype, self._device = dt, dv
        self._frozen = True
        return self

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def shape(self) -> tuple[int, int]:
        N = sum(self._sizes)
        return (N, N)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored factor tensors."""
        ts = self._lu + self._piv + self._perm + self._upper1 + self._upper2
        return sum(t.numel() * t.element_size() for t in ts)

    def solve(self, rhs):
        """``A^{-1} rhs``; rhs dense ``(N,)``/``(N, k)`` or BlockVector (sizes ``block_sizes``),
        same kind back."""
        bs, pack = _split_rhs(rhs, self._sizes, self._dtype, self._device)
        m, n = self._sizes, len(self._sizes)
        st = torch.linalg.solve_triangular
        ys = []
        c = bs[0]
        for k in range(n - 1):
            mk, lu = m[k], self._lu[k]
            v = torch.cat([c, bs[k + 1]], dim=0)[self._perm[k]]
            y = st(lu[:mk], v[:mk], upper=False, unitriangular=True)
            c = v[mk:] - lu[mk:] @ y
            ys.append(y)
        ys.append(st(self._lu[-1], c[self._perm[-1]], upper=False, unitriangular=True))
        xs = [None] * n
        for k in range(n - 1, -1, -1):
            r = ys[k]
            if k + 1 < n:
                r = r - self._upper1[k] @ xs[k + 1]
            if k + 2 < n:
                r = r - self._upper2[k] @ xs[k + 2]
            xs[k] = st(self._lu[k][: m[k]], r, upper=True)
        return pack(xs)

    def slogdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det A|)`` as 0-d tensors, like :func:`torch.linalg.slogdet`."""
        logabs = torch.zeros((), dtype=self._dtype, device=self._device)
        sign = torch.ones((), dtype=self._dtype, device=self._device)
        for k, (lu, piv) in enumerate(zip(self._lu, self._piv, strict=True)):
            d = torch.diagonal(lu[: self._sizes[k]])
            logabs = logabs + torch.log(d.abs()).sum()
            swaps = (
                piv != torch.arange(1, piv.numel() + 1, device=piv.device, dtype=piv.dtype)
            ).sum()
            sign = sign * torch.sign(d).prod() * (1 - 2 * (swaps % 2))
        return sign, logabs

    def __repr__(self) -> str:
        return f"TridiagonalLU(block_sizes={self._sizes}, dtype={self._dtype})"
