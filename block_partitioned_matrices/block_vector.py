"""Block vectors: a vector (or a stack of ``k`` columns) cut into pieces.

``BlockVector([v_1, ..., v_n])`` holds tensors of shape ``(m_i,)`` (one
right-hand side) or ``(m_i, k)`` (``k`` right-hand sides); it stands for the
concatenation ``[v_1; ...; v_n]`` of shape ``(N,)`` or ``(N, k)``,
``N = sum m_i``.

>>> import torch
>>> x = torch.arange(5.0)
>>> v = BlockVector.from_dense(x, [2, 3])
>>> v.sizes
(2, 3)
>>> torch.equal((2 * v - v).to_dense(), x)
True
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .blocks import _same_device

__all__ = ["BlockVector"]


class BlockVector:
    """A list of tensors ``(m_i,)`` or ``(m_i, k)`` read as their concatenation.

    All pieces must share dtype, device and dimensionality (and ``k``).

    >>> import torch
    >>> v = BlockVector([torch.ones(2, 3), torch.zeros(1, 3)])
    >>> v.sizes, v.ncols, v.to_dense().shape
    ((2, 1), 3, torch.Size([3, 3]))
    """

    __slots__ = ("_blocks",)

    def __init__(self, blocks: Sequence[torch.Tensor]):
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("BlockVector needs at least one block")
        first = blocks[0]
        for i, b in enumerate(blocks):
            if not isinstance(b, torch.Tensor):
                raise TypeError(
                    f"BlockVector block {i} must be a torch.Tensor, got {type(b).__name__}"
                )
            if b.dim() not in (1, 2):
                raise ValueError(
                    f"BlockVector block {i} has shape {tuple(b.shape)}; expected (m,) or (m, k)"
                )
            if b.dim() != first.dim() or (b.dim() == 2 and b.shape[1] != first.shape[1]):
                raise ValueError(
                    f"BlockVector block {i} has shape {tuple(b.shape)} but block 0 has "
                    f"{tuple(first.shape)}; all blocks must be (m_i,) or all (m_i, k) with one k"
                )
            if b.dtype != first.dtype:
                raise TypeError(
                    f"mixed dtypes in BlockVector: {first.dtype} (block 0) and {b.dtype} (block "
                    f"{i})"
                )
            if not _same_device(b.device, first.device):
                raise TypeError(
                    f"mixed devices in BlockVector: {first.device} and {b.device} (block {i})"
                )
        self._blocks = blocks

    @classmethod
    def from_dense(cls, x: torch.Tensor, sizes: Sequence[int]) -> BlockVector:
        """Cut a dense ``(N,)`` or ``(N, k)`` tensor into pieces of ``sizes`` (views)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            raise TypeError(
                f"x must be a (N,) or (N, k) tensor, got {getattr(x, 'shape', type(x).__name__)}"
            )
        sizes = [int(s) for s in sizes]
        if any(s < 0 for s in sizes) or sum(sizes) != x.shape[0]:
            raise ValueError(
                f"sizes {sizes} (sum {sum(sizes)}) do not partition a vector of length {x.shape[0]}"
            )
        return cls(torch.split(x, sizes, dim=0))

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        return self._blocks

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(b.shape[0]) for b in self._blocks)

    @property
    def ncols(self) -> int | None:
        """``k`` for ``(m_i, k)`` blocks, ``None`` for ``(m_i,)`` blocks."""
        b = self._blocks[0]
        return int(b.shape[1]) if b.dim() == 2 else None

    @property
    def dtype(self) -> torch.dtype:
        return self._blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self._blocks[0].device

    def to_dense(self) -> torch.Tensor:
        """The concatenation, shape ``(N,)`` or ``(N, k)``."""
        return torch.cat(self._blocks, dim=0)

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, i):
        return self._blocks[i]

    def __iter__(self):
        return iter(self._blocks)

    def _check_same(self, other) -> None:
        if not isinstance(other, BlockVector):
            raise TypeError(f"expected a BlockVector, got {type(other).__name__}")
        if other.sizes != self.sizes or other.ncols != self.ncols:
            raise ValueError(
                f"BlockVector sizes/ncols differ: {self.sizes}/{self.ncols} vs "
                f"{other.sizes}/{other.ncols}"
            )

    def __add__(self, other: BlockVector) -> BlockVector:
        self._check_same(other)
        return BlockVector([a + b for a, b in zip(self._blocks, other._blocks, strict=True)])

    def __sub__(self, other: BlockVector) -> BlockVector:
        self._check_same(other)
        return BlockVector([a - b for a, b in zip(self._blocks, other._blocks, strict=True)])

    def __mul__(self, s) -> BlockVector:
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            return NotImplemented
        return BlockVector([b * s for b in self._blocks])

    __rmul__ = __mul__

    def __neg__(self) -> BlockVector:
        return self * -1

    def __repr__(self) -> str:
        return f"BlockVector(sizes={self.sizes}, ncols={self.ncols}, dtype={self.dtype})"


def _split_rhs(rhs, sizes, dtype, device, what: str = "rhs"):
    """Cut ``rhs`` (dense (N,)/(N,k) or BlockVector) into 2-D blocks of ``sizes``.

    Returns ``(blocks, pack)``; ``pack(out_blocks)`` rebuilds a result of the
    same kind as ``rhs`` (dense or BlockVector, 1-D or 2-D) from 2-D blocks.
    """
    sizes = tuple(int(s) for s in sizes)
    n_total = sum(sizes)
    if isinstance(rhs, BlockVector):
        if rhs.sizes != sizes:
            raise ValueError(f"{what} BlockVector has block sizes {rhs.sizes}; expected {sizes}")
        one_d = rhs.ncols is None
        blocks = [b.unsqueeze(1) if one_d else b for b in rhs.blocks]
        ref = rhs.blocks[0]

        def pack(out):
            return BlockVector([o.squeeze(1) if one_d else o for o in out])

    elif isinstance(rhs, torch.Tensor):
        if rhs.dim() not in (1, 2) or rhs.shape[0] != n_total:
            raise ValueError(
                f"{what} has shape {tuple(rhs.shape)}; expected ({n_total},) or ({n_total}, k)"
            )
        one_d = rhs.dim() == 1
        r2 = rhs.unsqueeze(1) if one_d else rhs
        blocks = list(torch.split(r2, list(sizes), dim=0))
        ref = rhs

        def pack(out):
            d = torch.cat(out, dim=0)
            return d.squeeze(1) if one_d else d

    else:
        raise TypeError(
            f"{what} must be a torch.Tensor of shape (N,) or (N, k) or a BlockVector, got "
            f"{type(rhs).__name__}"
        )
    if dtype is not None and ref.dtype != dtype:
        raise TypeError(f"{what} has dtype {ref.dtype} but the matrix has dtype {dtype}")
    if device is not None and not _same_device(ref.device, device):
        raise TypeError(f"{what} is on {ref.device} but the matrix is on {device}")
    return blocks, pack
