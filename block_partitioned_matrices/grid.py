"""Grids of blocks and the blockwise transpose.

``BlockGrid([[B_11, ..., B_1c], ..., [B_r1, ..., B_rc]])`` is the ``r x c``
block matrix whose entries are leaves (dense tensor, Zero, Identity) or any
structured matrix of this package, e.g. the paper's 3x3 system whose entries
are Diagonal / bidiagonal over ``n`` layers.

**Blockwise transpose.** If every entry ``B_gh`` is block-banded with ``n``
block rows (Diagonal, LowerBidiagonal, UpperBidiagonal, Tridiagonal, or a
Zero/Identity leaf), with row partition ``p^g_1..p^g_n`` for grid row ``g`` and
column partition ``q^h_1..q^h_n`` for grid column ``h``, then reordering the
unknowns from ``(x^1_1..x^1_n, ..., x^c_1..x^c_n)`` to
``(x^1_1..x^c_1, ..., x^1_n..x^c_n)`` (and the equations likewise) turns the
grid into a block-tridiagonal matrix over ``n`` block rows whose block
``(i, j)`` is the small ``r x c`` grid ``[B_gh(i, j)]`` densified:

    blockwise_transpose(G)[i, j] = [[B_11(i, j) ... B_1c(i, j)], ..., [B_r1(i, j) ... B_rc(i, j)]]

Its blocks are square when ``sum_g p^g_i = sum_h q^h_i`` for each ``i``.
:meth:`BlockGrid.solve` = blockwise transpose, pivoted Tridiagonal solve,
un-permute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .banded import BlockBanded
from .block_vector import BlockVector, _split_rhs
from .blocks import Identity, Zero, common_dtype_device, matmul, shape_of, to_dense, transpose
from .tridiagonal import Tridiagonal, TridiagonalLU

__all__ = [
    "BlockGrid",
    "BlockGridLU",
    "blockwise_transpose",
    "blockwise_transpose_vector",
    "inverse_blockwise_transpose_vector",
]


class BlockGrid:
    """An ``r x c`` grid of blocks (leaves or structured matrices).

    ``(G x)_g = sum_h B_gh x_h``; ``G.T = [[B_hg^T]]``.

    >>> import torch
    >>> from block_partitioned_matrices import Diagonal, LowerBidiagonal
    >>> g = torch.Generator().manual_seed(0)
    >>> r = lambda a, b: torch.randn(a, b, generator=g, dtype=torch.float64)
    >>> n, p, a = 3, 2, 2                     # layers, sizes of x_l and y_l
    >>> A = Diagonal([r(p, p) + 3 * torch.eye(p) for _ in range(n)])
    >>> Dx = Diagonal([r(a, p) for _ in range(n)])
    >>> M = LowerBidiagonal(None, [-r(a, a) for _ in range(n - 1)])
    >>> G = BlockGrid([[A, Dx.T], [-Dx, M]])
    >>> G.shape, G.grid_shape
    ((12, 12), (2, 2))
    >>> b = torch.randn(12, generator=g, dtype=torch.float64)
    >>> torch.allclose(G.solve(b), torch.linalg.solve(G.to_dense(), b))
    True
    >>> T = blockwise_transpose(G)            # 3 block rows of size p + a
    >>> T.block_sizes
    (4, 4, 4)
    """

    def __init__(self, blocks: Sequence[Sequence]):
        if isinstance(blocks, torch.Tensor) or not isinstance(blocks, Sequence) or not blocks:
            raise TypeError("BlockGrid takes a non-empty list of rows (lists of blocks)")
        rows = []
        for g, row in enumerate(blocks):
            if isinstance(row, torch.Tensor) or not isinstance(row, Sequence) or not row:
                raise TypeError(
                    f"BlockGrid row {g} must be a non-empty list of blocks, got "
                    f"{type(row).__name__}"
                )
            rows.append(tuple(row))
        c = len(rows[0])
        for g, row in enumerate(rows):
            if len(row) != c:
                raise ValueError(f"BlockGrid row {g} has {len(row)} blocks; row 0 has {c}")
        shapes = [[shape_of(b) for b in row] for row in rows]
        self._row_totals = tuple(s[0][0] for s in shapes)
        self._col_totals = tuple(shapes[0][h][1] for h in range(c))
        for g in range(len(rows)):
            for h in range(c):
                want = (self._row_totals[g], self._col_totals[h])
                if shapes[g][h] != want:
                    raise ValueError(
                        f"BlockGrid entry ({g}, {h}) has shape {shapes[g][h]}; expected {want} "
                        "(rows of its grid row, columns of its grid column)"
                    )
        self._blocks = tuple(rows)
        self._dtype, self._device = common_dtype_device(
            [b for row in rows for b in row], what="BlockGrid entries"
        )

    @property
    def blocks(self) -> tuple[tuple, ...]:
        return self._blocks

    def __getitem__(self, gh):
        g, h = gh
        return self._blocks[g][h]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (len(self._blocks), len(self._blocks[0]))

    @property
    def row_sizes(self) -> tuple[int, ...]:
        """Rows of each grid row."""
        return self._row_totals

    @property
    def col_sizes(self) -> tuple[int, ...]:
        """Columns of each grid column."""
        return self._col_totals

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self._row_totals), sum(self._col_totals))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype if self._dtype is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    @property
    def T(self) -> BlockGrid:
        r, c = self.grid_shape
        return BlockGrid([[transpose(self._blocks[g][h]) for g in range(r)] for h in range(c)])

    def to_dense(self) -> torch.Tensor:
        """Dense ``(sum rows, sum cols)`` tensor."""
        return torch.cat(
            [
                torch.cat([to_dense(b, self.dtype, self.device) for b in row], dim=1)
                for row in self._blocks
            ],
            dim=0,
        )

    def __matmul__(self, x):
        """``G @ x``: dense ``(N,)``/``(N, k)`` or a BlockVector with one block per grid column."""
        if not isinstance(x, (torch.Tensor, BlockVector)):
            return NotImplemented
        xs, pack = _split_rhs(x, self._col_totals, self._dtype, self._device, what="right operand")
        ys = []
        for g, row in enumerate(self._blocks):
            acc = None
            for h, b in enumerate(row):
                if isinstance(b, Zero):
                    continue
                t = matmul(b, xs[h])
                acc = t if acc is None else acc + t
            if acc is None:
                acc = xs[0].new_zeros((self._row_totals[g],) + tuple(xs[0].shape[1:]))
            ys.append(acc)
        return pack(ys)

    def factorize(self) -> BlockGridLU:
        """Blockwise transpose + pivoted :meth:`Tridiagonal.factorize` (entries must be
        block-banded)."""
        return BlockGridLU._from_grid(self)

    def solve(self, rhs):
        """``G^{-1} rhs`` (see :meth:`BlockGridLU.solve`)."""
        return self.factorize().solve(rhs)

    def __repr__(self) -> str:
        return f"BlockGrid(grid_shape={self.grid_shape}, shape={self.shape}, dtype={self.dtype})"


def _partitions(grid: BlockGrid):
    """``(n, row_parts, col_parts)``: per grid row/column the sizes of its ``n`` block rows/cols."""
    if not isinstance(grid, BlockGrid):
        raise TypeError(f"expected a BlockGrid, got {type(grid).__name__}")
    r, c = grid.grid_shape
    rp: list = [None] * r
    cp: list = [None] * c
    n = None
    for g in range(r):
        for h in range(c):
            b = grid[g, h]
            if isinstance(b, (Zero, Identity)):
                continue
            if not isinstance(b, BlockBanded):
                raise TypeError(
                    f"BlockGrid entry ({g}, {h}) is a {type(b).__name__}; the blockwise transpose "
                    "needs "
                    "block-banded entries (Diagonal, LowerBidiagonal, UpperBidiagonal, "
                    "Tridiagonal, Zero, Identity)"
                )
            if n is None:
                n = b.num_block_rows
            elif b.num_block_rows != n:
                raise ValueError(
                    f"BlockGrid entry ({g}, {h}) has {b.num_block_rows} block rows; others have {n}"
                )
            for parts, idx, sizes, what in (
                (rp, g, b.row_sizes, "row"),
                (cp, h, b.col_sizes, "column"),
            ):
                if parts[idx] is None:
                    parts[idx] = sizes
                elif parts[idx] != sizes:
                    raise ValueError(
                        f"BlockGrid entry ({g}, {h}) has {what} block sizes {sizes}; another entry "
                        "in grid "
                        f"{what} {idx} has {parts[idx]}"
                    )
    if n is None:
        raise ValueError(
            "the blockwise transpose needs at least one block-banded entry to fix the block sizes"
        )
    # Identity entries tie a row partition to a column partition
    changed = True
    while changed:
        changed = False
        for g in range(r):
            for h in range(c):
                if isinstance(grid[g, h], Identity):
                    if rp[g] is None and cp[h] is not None:
                        rp[g], changed = cp[h], True
                    elif cp[h] is None and rp[g] is not None:
                        cp[h], changed = rp[g], True
                    elif rp[g] is not None and rp[g] != cp[h]:
                        raise ValueError(
                            f"Identity entry ({g}, {h}) needs equal row and column block sizes, "
                            f"got {rp[g]} and {cp[h]}"
                        )
    for what, parts in (("row", rp), ("column", cp)):
        for idx, p in enumerate(parts):
            if p is None:
                raise ValueError(
                    f"cannot infer the block sizes of grid {what} {idx}: it has no block-banded "
                    "entry"
                )
    return n, tuple(rp), tuple(cp)


def _band_block(b, i: int, j: int, rsizes, csizes, dt, dv):
    if isinstance(b, Zero):
        return Zero(rsizes[i], csizes[j], dt, dv)
    if isinstance(b, Identity):
        return (
            Identity(rsizes[i], b.scale, dt, dv) if i == j else Zero(rsizes[i], csizes[j], dt, dv)
        )
    return b.block(i, j)


def blockwise_transpose(grid: BlockGrid) -> Tridiagonal:
    """Reorder a grid of block-banded matrices into one :class:`Tridiagonal` over ``n`` block rows.

    Block ``(i, j)`` of the result is the ``r x c`` grid ``[B_gh(i, j)]``
    densified (or :class:`Zero` when every piece is Zero). With
    ``P_row``/``P_col`` the permutations of :func:`blockwise_transpose_vector`,
    ``blockwise_transpose(G).to_dense() == P_row G.to_dense() P_col^T``.
    """
    n, rp, cp = _partitions(grid)
    r, c = grid.grid_shape
    rows = [sum(rp[g][i] for g in range(r)) for i in range(n)]
    cols = [sum(cp[h][i] for h in range(c)) for i in range(n)]
    if rows != cols:
        raise ValueError(
            f"the blockwise transpose gives non-square diagonal blocks: rows {rows}, columns "
            f"{cols}; "
            "need sum over grid rows of the row sizes == sum over grid columns of the column sizes "
            "per block"
        )
    dt, dv = grid._dtype, grid._device

    def merged(i, j):
        sub = [
            [_band_block(grid[g, h], i, j, rp[g], cp[h], dt, dv) for h in range(c)]
            for g in range(r)
        ]
        if all(isinstance(b, Zero) for row in sub for b in row):
            return Zero(rows[i], cols[j], dt, dv)
        return torch.cat(
            [torch.cat([to_dense(b, dt, dv) for b in row], dim=1) for row in sub], dim=0
        )

    return Tridiagonal(
        [merged(i, i) for i in range(n)],
        [merged(i + 1, i) for i in range(n - 1)],
        [merged(i, i + 1) for i in range(n - 1)],
    )


def blockwise_transpose_vector(v: BlockVector, r: int) -> BlockVector:
    """Reorder ``r*n`` blocks from grid order ``(x^1_1..x^1_n, ..., x^r_1..x^r_n)`` to
    ``(x^1_1..x^r_1, ..., x^1_n..x^r_n)``.

    Block ``g*n + i`` moves to position ``i*r + g``. The inverse is
    :func:`inverse_blockwise_transpose_vector` (equivalently this function
    with ``r`` replaced by ``n``).

    >>> import torch
    >>> v = BlockVector([torch.full((1,), float(k)) for k in range(6)])   # r=3 rows, n=2
    >>> [int(b) for b in blockwise_transpose_vector(v, 3)]
    [0, 2, 4, 1, 3, 5]
    >>> [int(b) for b in inverse_blockwise_transpose_vector(blockwise_transpose_vector(v, 3), 3)]
    [0, 1, 2, 3, 4, 5]
    """
    if not isinstance(v, BlockVector):
        raise TypeError(f"expected a BlockVector, got {type(v).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or len(v) % r:
        raise ValueError(f"r={r!r} must be a positive int dividing the number of blocks ({len(v)})")
    n = len(v) // r
    return BlockVector([v[g * n + i] for i in range(n) for g in range(r)])


def inverse_blockwise_transpose_vector(v: BlockVector, r: int) -> BlockVector:
    """Inverse of :func:`blockwise_transpose_vector`: position ``i*r + g`` goes back to ``g*n +
    i``."""
    if not isinstance(v, BlockVector):
        raise TypeError(f"expected a BlockVector, got {type(v).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or len(v) % r:
        raise ValueError(f"r={r!r} must be a positive int dividing the number of blocks ({len(v)})")
    return blockwise_transpose_vector(v, len(v) // r)


class BlockGridLU:
    """Factorization of a :class:`BlockGrid` of block-banded entries (from
    :meth:`BlockGrid.factorize`).

    Holds the pivoted :class:`TridiagonalLU` of :func:`blockwise_transpose`
    and the partitions needed to permute right-hand sides and solutions.

    >>> import torch
    >>> from block_partitioned_matrices import Diagonal
    >>> D = Diagonal([torch.eye(2, dtype=torch.float64)] * 3)
    >>> F = BlockGrid([[D, Identity(6)], [Identity(6), Zero(6, 6)]]).factorize()
    >>> b = torch.arange(12, dtype=torch.float64)
    >>> G = BlockGrid([[D, Identity(6)], [Identity(6), Zero(6, 6)]])
    >>> torch.allclose(F.solve(b), torch.linalg.solve(G.to_dense(), b))
    True
    """

    __slots__ = ("_lu", "_n", "_rp", "_cp", "_row_totals", "_col_totals", "_dtype", "_device")

    def __init__(self, *args, **kwargs):
        raise TypeError("BlockGridLU is created by BlockGrid.factorize()")

    @classmethod
    def _from_grid(cls, grid: BlockGrid) -> BlockGridLU:
        n, rp, cp = _partitions(grid)
        lu = blockwise_transpose(grid).factorize()
        self = object.__new__(cls)
        self._lu, self._n, self._rp, self._cp = lu, n, rp, cp
        self._row_totals, self._col_totals = grid.row_sizes, grid.col_sizes
        self._dtype, self._device = lu.dtype, lu.device
        return self

    @property
    def tridiagonal_lu(self) -> TridiagonalLU:
        return self._lu

    def solve(self, rhs):
        """``G^{-1} rhs``.

        ``rhs`` is dense ``(N,)``/``(N, k)`` (returns dense), a BlockVector with
        one block per grid row (returns one block per grid column), or a
        BlockVector with the ``r*n`` fine blocks in grid order (returns the
        ``c*n`` fine blocks of the solution in grid order).
        """
        n, rp, cp = self._n, self._rp, self._cp
        r, c = len(rp), len(cp)
        fine_rows = tuple(s for p in rp for s in p)
        mode = "dense"
        if isinstance(rhs, BlockVector):
            if rhs.sizes == fine_rows:
                mode = "fine"
            elif rhs.sizes == self._row_totals:
                mode = "coarse"
            else:
                raise ValueError(
                    f"rhs BlockVector has sizes {rhs.sizes}; expected {self._row_totals} (one "
                    "block per grid "
                    f"row) or {fine_rows} (r*n blocks in grid order)"
                )
            one_d = rhs.ncols is None
            rhs = rhs.to_dense()
        else:
            one_d = isinstance(rhs, torch.Tensor) and rhs.dim() == 1
        pieces, _ = _split_rhs(rhs, fine_rows, self._dtype, self._device)
        inter = blockwise_transpose_vector(BlockVector(pieces), r)
        tri_rhs = BlockVector(
            [torch.cat(inter.blocks[i * r : (i + 1) * r], dim=0) for i in range(n)]
        )
        sol = self._lu.solve(tri_rhs)
        out_inter = []
        for i in range(n):
            out_inter.extend(torch.split(sol[i], [cp[h][i] for h in range(c)], dim=0))
        fine = list(inverse_blockwise_transpose_vector(BlockVector(out_inter), c).blocks)
        if one_d:
            fine = [f.squeeze(1) for f in fine]
        if mode == "fine":
            return BlockVector(fine)
        if mode == "coarse":
            return BlockVector([torch.cat(fine[h * n : (h + 1) * n], dim=0) for h in range(c)])
        return torch.cat(fine, dim=0)
