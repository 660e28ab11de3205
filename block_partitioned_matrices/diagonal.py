"""Block-diagonal matrices ``diag(D_1, ..., D_n)``.

Blocks may have different (also rectangular) shapes ``r_i x c_i`` and may be
dense tensors, :class:`Zero` or :class:`Identity`; or all blocks have one
shape and are stored together as a single ``(n, r, c)`` tensor
(:meth:`Diagonal.from_batched`), which makes ``@`` and :meth:`Diagonal.solve`
one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .banded import BlockBanded
from .block_vector import _split_rhs
from .blocks import Identity, Zero, add, common_dtype_device, is_leaf, shape_of, transpose
from .errors import SingularMatrixError

__all__ = ["Diagonal"]


def _solve_leaf(D, b: torch.Tensor, where: str) -> torch.Tensor:
    """``D^{-1} b`` for a square leaf ``D`` and 2-D ``b``; raises on an exactly singular ``D``."""
    r, c = shape_of(D)
    if r != c:
        raise ValueError(f"{where}: diagonal block has shape {(r, c)}; solve needs square blocks")
    if isinstance(D, Zero):
        if r == 0:
            return b
        raise SingularMatrixError(
            f"{where}: diagonal block is Zero({r}, {c}), the matrix is singular"
        )
    if isinstance(D, Identity):
        if D.scale == 0 and r > 0:
            raise SingularMatrixError(
                f"{where}: diagonal block is 0 * Identity, the matrix is singular"
            )
        return b / D.scale
    x, info = torch.linalg.solve_ex(D, b)
    if int(info) > 0:
        raise SingularMatrixError(
            f"{where}: diagonal block is singular (zero pivot at row {int(info) - 1})"
        )
    return x


class Diagonal(BlockBanded):
    """Block-diagonal matrix ``diag(D_1..D_n)``, ``D_i`` of shape ``r_i x c_i``.

    ``(A x)_i = D_i x_i``; ``A.T = diag(D_i^T)``; ``A.solve(b)_i = D_i^{-1} b_i``.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A = Diagonal([torch.randn(2, 2, generator=g, dtype=torch.float64) + 3 * torch.eye(2),
    ...               Identity(3, 2.0)])
    >>> A.shape
    (5, 5)
    >>> b = torch.randn(5, 2, generator=g, dtype=torch.float64)
    >>> torch.allclose(A.solve(b), torch.linalg.solve(A.to_dense(), b))
    True
    >>> B = Diagonal.from_batched(torch.randn(4, 3, 3, generator=g, dtype=torch.float64))
    >>> torch.allclose(B @ b.new_ones(12), B.to_dense() @ b.new_ones(12))
    True
    """

    offsets = (0,)

    def __init__(self, blocks: Sequence | torch.Tensor):
        if isinstance(blocks, torch.Tensor):
            if blocks.dim() != 3 or blocks.shape[0] == 0:
                raise ValueError(
                    "a batched Diagonal needs an (n, r, c) tensor with n >= 1, got shape "
                    f"{tuple(blocks.shape)}"
                )
            n, r, c = (int(s) for s in blocks.shape)
            self._batched = blocks
            self._blocks = None
            self._row_sizes = (r,) * n
            self._col_sizes = (c,) * n
            self._init_meta([blocks])
            return
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
            raise TypeError(
                "Diagonal takes a sequence of blocks or an (n, r, c) tensor, got "
                f"{type(blocks).__name__}"
            )
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("Diagonal needs at least one block")
        for i, b in enumerate(blocks):
            if not is_leaf(b):
                raise TypeError(
                    f"Diagonal block {i} must be a 2-D tensor, Zero or Identity, got "
                    f"{type(b).__name__}"
                )
        shapes = [shape_of(b) for b in blocks]
        self._batched = None
        self._blocks = blocks
        self._row_sizes = tuple(s[0] for s in shapes)
        self._col_sizes = tuple(s[1] for s in shapes)
        self._init_meta(blocks)

    @classmethod
    def from_batched(cls, blocks: torch.Tensor) -> Diagonal:
        """Diagonal whose ``n`` equal-shape blocks are ``blocks[i]`` of an ``(n, r, c)`` tensor."""
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"from_batched needs an (n, r, c) tensor, got {type(blocks).__name__}")
        return cls(blocks)

    @property
    def blocks(self) -> tuple:
        """The diagonal blocks as a tuple of leaves."""
        if self._batched is not None:
            return tuple(self._batched.unbind(0))
        return self._blocks

    @property
    def batched(self) -> torch.Tensor | None:
        """The ``(n, r, c)`` storage of a batched Diagonal, else ``None``."""
        return self._batched

    def block(self, i: int, j: int):
        self._check_index(i, j)
        if i != j:
            return self._zero(i, j)
        return self._batched[i] if self._batched is not None else self._blocks[i]

    def _map_blocks(self, fn) -> Diagonal:
        if self._batched is not None:
            return Diagonal(fn(self._batched))
        return Diagonal([fn(b) for b in self._blocks])

    @property
    def T(self) -> Diagonal:
        if self._batched is not None:
            return Diagonal(self._batched.transpose(1, 2))
        return Diagonal([transpose(b) for b in self._blocks])

    def _stacked(self) -> torch.Tensor | None:
        """(n, r, c) tensor when batched or all blocks are dense of one shape."""
        if self._batched is not None:
            return self._batched
        if (
            all(isinstance(b, torch.Tensor) for b in self._blocks)
            and len(set((self._row_sizes[i], self._col_sizes[i]) for i in range(len(self._blocks))))
            == 1
        ):
            return torch.stack(self._blocks)
        return None

    def __add__(self, other) -> Diagonal:
        if not isinstance(other, Diagonal):
            return NotImplemented
        if other.row_sizes != self.row_sizes or other.col_sizes != self.col_sizes:
            raise ValueError(
                "cannot add Diagonal with block shapes "
                f"{list(zip(self.row_sizes, self.col_sizes, strict=True))} "
                f"and {list(zip(other.row_sizes, other.col_sizes, strict=True))}; block shapes "
                "must match"
            )
        if self._batched is not None and other._batched is not None:
            common_dtype_device([self, other], what="Diagonal + Diagonal")
            return Diagonal(self._batched + other._batched)
        return Diagonal([add(a, b) for a, b in zip(self.blocks, other.blocks, strict=True)])

    def __sub__(self, other) -> Diagonal:
        if not isinstance(other, Diagonal):
            return NotImplemented
        return self + (-other)

    def __matmul__(self, x):
        if self._batched is None:
            return super().__matmul__(x)
        xs, pack = _split_rhs(x, self._col_sizes, self._dtype, self._device, what="right operand")
        ys = torch.bmm(self._batched, torch.stack(xs))
        return pack(list(ys.unbind(0)))

    def to_dense(self) -> torch.Tensor:
        if self._batched is not None:
            return torch.block_diag(*self._batched.unbind(0))
        return super().to_dense()

    def solve(self, rhs):
        """``A^{-1} rhs`` blockwise (square blocks); rhs dense ``(N,)``/``(N, k)`` or BlockVector.

        Returns the same kind as ``rhs``. Equal-shape dense blocks are solved in
        one batched :func:`torch.linalg.solve_ex` call.
        """
        if self._row_sizes != self._col_sizes:
            raise ValueError(
                "solve needs square diagonal blocks, got shapes "
                f"{list(zip(self._row_sizes, self._col_sizes, strict=True))}"
            )
        bs, pack = _split_rhs(rhs, self._row_sizes, self._dtype, self._device)
        stacked = self._stacked()
        if stacked is not None:
            xs, info = torch.linalg.solve_ex(stacked, torch.stack(bs))
            bad = torch.nonzero(info > 0)
            if bad.numel():
                i = int(bad[0, 0])
                raise SingularMatrixError(
                    f"Diagonal block {i} is singular (zero pivot at row {int(info[i]) - 1})"
                )
            return pack(list(xs.unbind(0)))
        return pack(
            [
                _solve_leaf(D, b, f"Diagonal block {i}")
                for i, (D, b) in enumerate(zip(self._blocks, bs, strict=True))
            ]
        )
