"""Block lower- and upper-bidiagonal matrices.

``LowerBidiagonal(diagonal=[D_1..D_n], lower=[L_1..L_{n-1}])`` has ``D_i`` at
block ``(i, i)`` and ``L_i`` at block ``(i+1, i)``;
``UpperBidiagonal(diagonal, upper=[U_1..U_{n-1}])`` has ``U_i`` at ``(i, i+1)``.
Blocks may be rectangular (``D_i`` is ``r_i x c_i``), dense, :class:`Zero` or
:class:`Identity`. ``diagonal=None`` means an implicit unit diagonal
(identity blocks, stored nowhere), as in the paper's ``M`` with identity on the
diagonal and ``-Dz_l`` below it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .banded import BlockBanded
from .block_vector import _split_rhs
from .blocks import Identity, is_leaf, matmul, shape_of, transpose
from .diagonal import _solve_leaf

__all__ = ["LowerBidiagonal", "UpperBidiagonal"]


class _Bidiagonal(BlockBanded):
    _is_lower: bool = True

    def __init__(
        self, diagonal: Sequence | None, off: Sequence, *, sizes: Sequence[int] | None = None
    ):
        name = type(self).__name__
        offname = "lower" if self._is_lower else "upper"
        if isinstance(off, torch.Tensor) or not isinstance(off, Sequence):
            raise TypeError(
                f"{name}: {offname} must be a sequence of blocks, got {type(off).__name__}"
            )
        off = tuple(off)
        for i, b in enumerate(off):
            if not is_leaf(b):
                raise TypeError(
                    f"{name}: {offname}[{i}] must be a 2-D tensor, Zero or Identity, got "
                    f"{type(b).__name__}"
                )
        offshapes = [shape_of(b) for b in off]
        if diagonal is None:
            self._unit = True
            if off:
                if self._is_lower:  # off[i] is (m_{i+1}, m_i)
                    m = [offshapes[0][1]] + [s[0] for s in offshapes]
                else:  # off[i] is (m_i, m_{i+1})
                    m = [s[0] for s in offshapes] + [offshapes[-1][1]]
                if sizes is not None and tuple(int(s) for s in sizes) != tuple(m):
                    raise ValueError(
                        f"{name}: sizes {tuple(sizes)} disagree with the {offname} blocks "
                        f"({tuple(m)})"
                    )
            else:
                if sizes is None or len(sizes) != 1:
                    raise ValueError(
                        f"{name}: with diagonal=None and no {offname} blocks pass sizes=[m]"
                    )
                m = [int(sizes[0])]
            rows = cols = tuple(m)
            self._diag = None
        else:
            if sizes is not None:
                raise ValueError(f"{name}: sizes is only used with diagonal=None")
            if isinstance(diagonal, torch.Tensor) or not isinstance(diagonal, Sequence):
                raise TypeError(
                    f"{name}: diagonal must be a sequence of blocks or None, got "
                    f"{type(diagonal).__name__}"
                )
            diagonal = tuple(diagonal)
            if not diagonal:
                raise ValueError(f"{name} needs at least one diagonal block")
            for i, b in enumerate(diagonal):
                if not is_leaf(b):
                    raise TypeError(
                        f"{name}: diagonal[{i}] must be a 2-D tensor, Zero or Identity, got "
                        f"{type(b).__name__}"
                    )
            self._unit = False
            self._diag = diagonal
            dshapes = [shape_of(b) for b in diagonal]
            rows = tuple(s[0] for s in dshapes)
            cols = tuple(s[1] for s in dshapes)
        n = len(rows)
        if len(off) != n - 1:
            raise ValueError(
                f"{name}: {n} diagonal blocks need {n - 1} {offname} blocks, got {len(off)}"
            )
        for i, s in enumerate(offshapes):
            want = (rows[i + 1], cols[i]) if self._is_lower else (rows[i], cols[i + 1])
            if s != want:
                pos = f"({i + 1}, {i})" if self._is_lower else f"({i}, {i + 1})"
                raise ValueError(
                    f"{name}: {offname}[{i}] (block {pos}) has shape {s}; expected {want}"
                )
        self._off = off
        self._row_sizes, self._col_sizes = rows, cols
        self._init_meta(off + (self._diag or ()))

    @property
    def unit_diagonal(self) -> bool:
        """True when the diagonal is the implicit identity."""
        return self._unit

    @property
    def diagonal(self) -> tuple:
        """Diagonal blocks (``Identity`` blocks when :attr:`unit_diagonal`)."""
        if self._unit:
            return tuple(Identity(m, 1.0, self._dtype, self._device) for m in self._row_sizes)
        return self._diag

    def block(self, i: int, j: int):
        self._check_index(i, j)
        if i == j:
            return self.diagonal[i]
        if self._is_lower and i == j + 1:
            return self._off[j]
        if not self._is_lower and j == i + 1:
            return self._off[i]
        return self._zero(i, j)

    def _map_blocks(self, fn):
        diag = [fn(b) for b in self.diagonal]
        return type(self)(diag, [fn(b) for b in self._off])

    def solve(self, rhs):
        """``A^{-1} rhs`` by block forward (lower) or back (upper) substitution.

        Needs square diagonal blocks; rhs dense ``(N,)``/``(N, k)`` or BlockVector,
        returns the same kind. Each diagonal block is solved with LU with
        partial pivoting; raises :class:`SingularMatrixError` for an exactly
        singular diagonal block.
        """
        if self._row_sizes != self._col_sizes:
            raise ValueError(
                "solve needs square diagonal blocks, got shapes "
                f"{list(zip(self._row_sizes, self._col_sizes, strict=True))}"
            )
        bs, pack = _split_rhs(rhs, self._row_sizes, self._dtype, self._device)
        n = len(bs)
        xs = [None] * n
        order = range(n) if self._is_lower else range(n - 1, -1, -1)
        name = type(self).__name__
        for i in order:
            b = bs[i]
            if self._is_lower and i > 0:
                b = b - matmul(self._off[i - 1], xs[i - 1])
            elif not self._is_lower and i < n - 1:
                b = b - matmul(self._off[i], xs[i + 1])
            xs[i] = b if self._unit else _solve_leaf(self._diag[i], b, f"{name} block row {i}")
        return pack(xs)


class LowerBidiagonal(_Bidiagonal):
    """Block lower-bidiagonal matrix: ``D_i`` at ``(i, i)``, ``L_i`` at ``(i+1, i)``.

    ``(A x)_i = D_i x_i + L_{i-1} x_{i-1}``. ``diagonal=None`` gives identity
    diagonal blocks (then ``sizes`` is needed only if there are no ``lower``
    blocks). ``A.T`` is an :class:`UpperBidiagonal`.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> Dz = [torch.randn(3, 2, generator=g, dtype=torch.float64),
    ...       torch.randn(4, 3, generator=g, dtype=torch.float64)]
    >>> M = LowerBidiagonal(None, [-d for d in Dz])   # identity diagonal, sizes (2, 3, 4)
    >>> M.row_sizes
    (2, 3, 4)
    >>> b = torch.randn(9, generator=g, dtype=torch.float64)
    >>> torch.allclose(M.solve(b), torch.linalg.solve(M.to_dense(), b))
    True
    >>> torch.allclose(M.T.solve(b), torch.linalg.solve(M.to_dense().T, b))
    True
    """

    _is_lower = True
    offsets = (-1, 0)

    def __init__(
        self, diagonal: Sequence | None, lower: Sequence, *, sizes: Sequence[int] | None = None
    ):
        super().__init__(diagonal, lower, sizes=sizes)

    @property
    def lower(self) -> tuple:
        """Sub-diagonal blocks ``L_i`` (block ``(i+1, i)``)."""
        return self._off

    @property
    def T(self) -> UpperBidiagonal:
        diag = None if self._unit else [transpose(b) for b in self._diag]
        return UpperBidiagonal(
            diag, [transpose(b) for b in self._off], sizes=self._row_sizes if self._unit else None
        )


class UpperBidiagonal(_Bidiagonal):
    """Block upper-bidiagonal matrix: ``D_i`` at ``(i, i)``, ``U_i`` at ``(i, i+1)``.

    ``(A x)_i = D_i x_i + U_i x_{i+1}``. ``A.T`` is a :class:`LowerBidiagonal`.

    >>> import torch
    >>> g = torch.Generator().manual_seed(1)
    >>> D = [torch.randn(2, 2, generator=g) + 4 * torch.eye(2) for _ in range(3)]
    >>> U = [torch.randn(2, 2, generator=g) for _ in range(2)]
    >>> A = UpperBidiagonal(D, U)
    >>> b = torch.randn(6, 3, generator=g)
    >>> torch.allclose(A.solve(b), torch.linalg.solve(A.to_dense(), b), atol=1e-5)
    True
    """

    _is_lower = False
    offsets = (0, 1)

    def __init__(
        self, diagonal: Sequence | None, upper: Sequence, *, sizes: Sequence[int] | None = None
    ):
        super().__init__(diagonal, upper, sizes=sizes)

    @property
    def upper(self) -> tuple:
        """Super-diagonal blocks ``U_i`` (block ``(i, i+1)``)."""
        return self._off

    @property
    def T(self) -> LowerBidiagonal:
        diag = None if self._unit else [transpose(b) for b in self._diag]
        return LowerBidiagonal(
            diag, [transpose(b) for b in self._off], sizes=self._row_sizes if self._unit else None
        )
