"""Common base of the block-banded matrices (Diagonal, bidiagonal, Tridiagonal).

A block-banded matrix has ``n`` block rows and ``n`` block columns with row
sizes ``r_1..r_n`` and column sizes ``c_1..c_n``; block ``(i, j)`` is
``r_i x c_j`` and is structurally zero unless ``j - i`` is in :attr:`offsets`.
Subclasses implement :meth:`block`; this base supplies ``shape``,
``to_dense``, ``@`` (dense ``(N,)``/``(N, k)`` or :class:`BlockVector`) and
scalar ``*``.
"""

from __future__ import annotations

import torch

from .block_vector import BlockVector, _split_rhs
from .blocks import Zero, _check_scalar, common_dtype_device, matmul

__all__ = ["BlockBanded"]


class BlockBanded:
    """Abstract block-banded matrix (see module docstring).

    >>> from block_partitioned_matrices import Diagonal, Identity
    >>> A = Diagonal([Identity(2), Identity(1, 3.0)])
    >>> isinstance(A, BlockBanded), A.offsets, A.block(1, 0)
    (True, (0,), Zero(1, 2))
    """

    offsets: tuple[int, ...] = ()

    # set by subclasses
    _row_sizes: tuple[int, ...]
    _col_sizes: tuple[int, ...]
    _dtype: torch.dtype | None
    _device: torch.device | None

    def _init_meta(self, leaves, dtype=None, device=None) -> None:
        self._dtype, self._device = common_dtype_device(
            leaves, dtype, device, what=type(self).__name__ + " blocks"
        )

    # -- structure -----------------------------------------------------------
    @property
    def num_block_rows(self) -> int:
        return len(self._row_sizes)

    @property
    def row_sizes(self) -> tuple[int, ...]:
        return self._row_sizes

    @property
    def col_sizes(self) -> tuple[int, ...]:
        return self._col_sizes

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self._row_sizes), sum(self._col_sizes))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self._dtype is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def block(self, i: int, j: int):
        """Leaf block ``(i, j)`` (0-based); :class:`Zero` outside the band."""
        raise NotImplementedError

    def _check_index(self, i: int, j: int) -> None:
        n = self.num_block_rows
        if not (0 <= i < n and 0 <= j < n):
            raise IndexError(f"block index ({i}, {j}) out of range for {n} block rows")

    def _zero(self, i: int, j: int) -> Zero:
        return Zero(self._row_sizes[i], self._col_sizes[j], self._dtype, self._device)

    # -- dense / products ----------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Dense ``(sum r_i, sum c_j)`` tensor."""
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        r_off = [0]
        for s in self._row_sizes:
            r_off.append(r_off[-1] + s)
        c_off = [0]
        for s in self._col_sizes:
            c_off.append(c_off[-1] + s)
        n = self.num_block_rows
        for i in range(n):
            for d in self.offsets:
                j = i + d
                if 0 <= j < n:
                    b = self.block(i, j)
                    if isinstance(b, Zero):
                        continue
                    dense = (
                        b.to_dense(self.dtype, self.device)
                        if not isinstance(b, torch.Tensor)
                        else b
                    )
                    out[r_off[i] : r_off[i + 1], c_off[j] : c_off[j + 1]] = dense
        return out

    def _matmul_blocks(self, xs):
        n = self.num_block_rows
        ys = []
        for i in range(n):
            acc = None
            for d in self.offsets:
                j = i + d
                if 0 <= j < n:
                    b = self.block(i, j)
                    if isinstance(b, Zero):
                        continue
                    t = matmul(b, xs[j])
                    acc = t if acc is None else acc + t
            if acc is None:
                acc = torch.zeros(
                    (self._row_sizes[i],) + tuple(xs[0].shape[1:]),
                    dtype=xs[0].dtype,
                    device=xs[0].device,
                )
            ys.append(acc)
        return ys

    def __matmul__(self, x):
        """``A @ x`` for dense ``(N,)``/``(N, k)`` (returns dense) or BlockVector (returns
        BlockVector)."""
        if not isinstance(x, (torch.Tensor, BlockVector)):
            return NotImplemented
        xs, pack = _split_rhs(x, self._col_sizes, self._dtype, self._device, what="right operand")
        return pack(self._matmul_blocks(xs))

    def _map_blocks(self, fn):
        raise NotImplementedError

    def __mul__(self, s):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            return NotImplemented
        _check_scalar(s)
        return self._map_blocks(lambda b: b * s)

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_block_rows={self.num_block_rows}, "
            f"row_sizes={self._row_sizes}, col_sizes={self._col_sizes}, dtype={self.dtype})"
        )
