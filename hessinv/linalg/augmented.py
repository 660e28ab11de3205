"""The paper's solve: the augmented block-tridiagonal system (docs/algorithm.md section 4).

With forward tangents ``t_l`` and second-order adjoints ``u_l`` as extra unknowns,
``(H + eps I) v = g`` is equivalent to the sparse system (0-based stages ``l < L``,
``a_l = B h_l`` the output size of stage ``l``, ``S`` the loss Hessian blocks)::

    (Dxx_l + eps I) v_l + Dzx_l t_{l-1} + Dx_l^T u_l                   = g_l
    -Dx_l v_l + t_l - Dz_l t_{l-1}                                      = 0
    -Dzx_{l+1}^T v_{l+1} - Dzz_{l+1} t_l + u_l - Dz_{l+1}^T u_{l+1}     = 0   (l < L-1)
    -S t_{L-1} + u_{L-1}                                                = 0

This is the paper's 3x3 block matrix of block-banded blocks. Ordering the unknowns
stage by stage, ``(v_1, t_1, u_1, ..., v_L, t_L, u_L)`` -- the blockwise transpose of
``(v_1..v_L, t_1..t_L, u_1..u_L)`` -- makes it block-tridiagonal with blocks of size
``p_l + 2 a_l``, solved by the pivoted block LU of
:class:`block_partitioned_matrices.Tridiagonal`. Eliminating ``(t, u)`` has unit
determinant, so the augmented determinant equals ``det(H + eps I)``. The blocks are
dense in parameter space: this path is for narrow stages and for comparison with
section 5 (:mod:`hessinv.riccati`), which is much faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from block_partitioned_matrices import (
    BlockGrid,
    BlockVector,
    Diagonal,
    LowerBidiagonal,
    Tridiagonal,
    UpperBidiagonal,
    Zero,
    blockwise_transpose,
)
from hessinv.derivatives import StageDerivatives, block_diagonal

__all__ = ["augmented_grid", "augmented_tridiagonal", "AugmentedSolver"]


def augmented_grid(
    stages: Sequence[StageDerivatives], S: torch.Tensor, damping: float
) -> BlockGrid:
    """The paper's 3x3 block system over unknowns ``(v_1..v_L; t_1..t_L; u_1..u_L)``.

    Each entry is block-diagonal or block-bidiagonal over the ``L`` stages::

        [ diag(Dxx_l + eps I)     lower(Dzx_l)              diag(Dx_l^T) ]
        [ diag(-Dx_l)             M = unit lower(-Dz_l)     0            ]
        [ upper(-Dzx_{l+1}^T)     diag(-Dzz_{l+1}; -S)      M^T          ]
    """
    L = len(stages)
    dense = [d.dense() for d in stages]
    p = [d.num_params for d in stages]
    a = [d.batch * d.out_size for d in stages]
    Dx = [dd.Dx.reshape(-1, pl) for dd, pl in zip(dense, p, strict=True)]
    Dz = [block_diagonal(dd.Dz) for dd in dense[1:]]
    C = [dd.Dzx.permute(1, 0, 2).reshape(pl, -1) for dd, pl in zip(dense[1:], p[1:], strict=True)]
    Q = [-block_diagonal(dd.Dzz) for dd in dense[1:]] + [-block_diagonal(S)]
    eye = [torch.eye(n, dtype=S.dtype, device=S.device) for n in p]
    return BlockGrid(
        [
            [
                Diagonal([dd.Dxx + damping * e for dd, e in zip(dense, eye, strict=True)]),
                LowerBidiagonal([Zero(p[l], a[l]) for l in range(L)], C),
                Diagonal([m.T for m in Dx]),
            ],
            [
                Diagonal([-m for m in Dx]),
                LowerBidiagonal(None, [-m for m in Dz], sizes=a),
                Zero(sum(a), sum(a)),
            ],
            [
                UpperBidiagonal([Zero(a[l], p[l]) for l in range(L)], [-c.T for c in C]),
                Diagonal(Q),
                UpperBidiagonal(None, [-m.T for m in Dz], sizes=a),
            ],
        ]
    )


def augmented_tridiagonal(
    stages: Sequence[StageDerivatives], S: torch.Tensor, damping: float
) -> Tridiagonal:
    """The blockwise transpose of :func:`augmented_grid`: a :class:`Tridiagonal` over stages."""
    return blockwise_transpose(augmented_grid(stages, S, damping))


class AugmentedSolver:
    """The factorized augmented system (the pivoted block LU of its blockwise transpose,
    :meth:`BlockGrid.factorize <block_partitioned_matrices.BlockGrid.factorize>`):
    :meth:`solve` maps per-stage ``g`` blocks to ``v`` blocks."""

    def __init__(self, stages: Sequence[StageDerivatives], S: torch.Tensor, damping: float):
        self.lu = augmented_grid(stages, S, damping).factorize()
        self._L = len(stages)
        self._a = [d.batch * d.out_size for d in stages]

    def slogdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det|)`` of the augmented system, equal to those of ``H + eps I``
        (eliminating ``(t, u)`` has unit determinant; the blockwise transpose is a symmetric
        permutation)."""
        return self.lu.tridiagonal_lu.slogdet()

    def solve(self, g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(H + eps I)^-1 g`` for per-stage blocks ``g[l]`` ``(p_l, k)``: the right-hand side
        ``(g; 0; 0)`` over ``(v; t; u)`` in grid order, the ``v`` blocks of the solution."""
        k = g[0].shape[1]
        zeros = [g[0].new_zeros(a, k) for a in self._a]
        sol = self.lu.solve(BlockVector(list(g) + zeros + zeros))
        return list(sol.blocks[: self._L])
