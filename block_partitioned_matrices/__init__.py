"""Block-partitioned matrices: structured block matrices and stable solves.

Knows nothing about networks. Leaves (:mod:`.blocks`) are dense tensors,
:class:`Zero` and :class:`Identity`; structured matrices are
:class:`Diagonal`, :class:`LowerBidiagonal`, :class:`UpperBidiagonal`,
:class:`Tridiagonal` (pivoted :meth:`Tridiagonal.factorize`) and
:class:`BlockGrid` (a grid of any of these, with the blockwise transpose that
turns a grid of block-banded matrices into one :class:`Tridiagonal`).
"""

from .banded import BlockBanded
from .bidiagonal import LowerBidiagonal, UpperBidiagonal
from .block_vector import BlockVector
from .blocks import (
    Identity,
    Zero,
    add,
    common_dtype_device,
    is_leaf,
    matmul,
    scale,
    shape_of,
    sub,
    to_dense,
    transpose,
)
from .diagonal import Diagonal
from .errors import SingularMatrixError
from .grid import (
    BlockGrid,
    BlockGridLU,
    blockwise_transpose,
    blockwise_transpose_vector,
    inverse_blockwise_transpose_vector,
)
from .tridiagonal import Tridiagonal, TridiagonalLU

__all__ = [
    "BlockBanded",
    "BlockGrid",
    "BlockGridLU",
    "BlockVector",
    "Diagonal",
    "Identity",
    "LowerBidiagonal",
    "SingularMatrixError",
    "Tridiagonal",
    "TridiagonalLU",
    "UpperBidiagonal",
    "Zero",
    "add",
    "blockwise_transpose",
    "blockwise_transpose_vector",
    "common_dtype_device",
    "inverse_blockwise_transpose_vector",
    "is_leaf",
    "matmul",
    "scale",
    "shape_of",
    "sub",
    "to_dense",
    "transpose",
]
