"""The paper's solve: the augmented block-tridiagonal system (ALGORITHM.md section 4).

With forward tangents ``t_l`` and second-order adjoints ``u_l`` as extra unknowns,
``(H + eps I) v = g`` is equivalent to the sparse system (0-based stages, ``a_l``
the output size of stage ``l``)::

    (A_l + eps I) v_l + C_l t_{l-1} + Dx_l^T u_l                 = g_l
    -Dx_l v_l + t_l - Dz_l t_{l-1}                                = 0   (l < L-1)
    -C_{l+1}^T v_{l+1} - Q_{l+1} t_l + u_l - Dz_{l+1}^T u_{l+1}   = 0   (l < L-1)

This is the paper's 3x3 block matrix of block-banded blocks. Ordering the
unknowns stage by stage, ``(v_1, t_1, u_1, ..., v_L)`` -- the blockwise transpose
of ``(v_1..v_L, t_1..t_L, u_1..u_L)`` -- makes it block-tridiagonal with blocks of
size ``p_l + 2 a_l`` (``p_L`` for the loss stage, whose ``t_L``, ``u_L`` drop out).
It is solved by the pivoted block LU of
:class:`block_partitioned_matrices.Tridiagonal`. Time and memory are linear in
``L`` but cubic/quadratic in ``p + 2a``: section 5 (:mod:`hessinv.riccati`) is the
faster route to the same answer.

Since the elimination of ``(t, u)`` has unit determinant, the determinant of the
augmented matrix equals ``det(H + eps I)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from block_partitioned_matrices import (
    BlockGrid,
    Diagonal,
    LowerBidiagonal,
    Tridiagonal,
    UpperBidiagonal,
    Zero,
    blockwise_transpose,
)

from .derivatives import StageDerivatives
from .riccati import _block_diagonal

__all__ = ["augmented_grid", "augmented_tridiagonal", "AugmentedSolver"]


def _dense_C(d: StageDerivatives) -> torch.Tensor:
    """``C_l`` as a dense ``(p_l, a_{l-1})`` matrix."""
    B, p, h_in = d.C.shape
    return d.C.permute(1, 0, 2).reshape(p, B * h_in)


def augmented_grid(stages: Sequence[StageDerivatives], damping: float) -> BlockGrid:
    """The paper's 3x3 block system over unknowns ``(v_1..v_L; t_1..t_L; u_1..u_L)``.

    Each entry is block-diagonal or block-bidiagonal over the ``L`` stages::

        [ diag(A_l + eps I)    lower(C_l)               diag(Dx_l^T)     ]
        [ diag(-Dx_l)          M = unit lower(-Dz_l)    0                ]
        [ upper(-C_{l+1}^T)    diag(-Q_{l+1})           M^T              ]

    The loss stage's ``t_L``, ``u_L`` have size 0 (they do not enter ``H``).
    """
    L = len(stages)
    kw = {"dtype": stages[0].A.dtype, "device": stages[0].A.device}
    p = [d.A.shape[0] for d in stages]
    a = [d.Dx.shape[0] * d.Dx.shape[1] for d in stages[:-1]] + [0]
    Dx = [d.Dx.reshape(-1, p[l]) for l, d in enumerate(stages[:-1])]
    Dx.append(torch.zeros(0, p[-1], **kw))
    # Dz_l and Q_l of stage l act on the output of stage l-1; the loss stage's t_L is empty.
    Dz = [_block_diagonal(d.Dz)[: a[l]] for l, d in enumerate(stages) if l > 0]
    C = [_dense_C(d) for d in stages[1:]]
    Q = [-_block_diagonal(d.Q) for d in stages[1:]] + [torch.zeros(0, 0, **kw)]
    eye = [torch.eye(n, **kw) for n in p]
    return BlockGrid(
        [
            [
                Diagonal([d.A + damping * e for d, e in zip(stages, eye, strict=True)]),
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


def augmented_tridiagonal(stages: Sequence[StageDerivatives], damping: float) -> Tridiagonal:
    """The blockwise transpose of :func:`augmented_grid`: a :class:`Tridiagonal` over stages."""
    return blockwise_transpose(augmented_grid(stages, damping))


class AugmentedSolver:
    """Factorized augmented system: :meth:`solve` maps per-stage ``g`` blocks to ``v`` blocks."""

    def __init__(self, stages: Sequence[StageDerivatives], damping: float):
        self.system = augmented_tridiagonal(stages, damping)
        self.lu = self.system.factorize()
        self._p = [d.A.shape[0] for d in stages]
        self._sizes = list(self.system.block_sizes)

    def solve(self, g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(H + eps I)^-1 g`` for per-stage blocks ``g[l]`` ``(p_l, k)``."""
        k = g[0].shape[1]
        rhs = []
        for gl, p, m in zip(g, self._p, self._sizes, strict=True):
            rhs.append(gl)
            if m > p:
                rhs.append(gl.new_zeros(m - p, k))
        sol = self.lu.solve(torch.cat(rhs))
        out, offset = [], 0
        for p, m in zip(self._p, self._sizes, strict=True):
            out.append(sol[offset : offset + p])
            offset += m
        return out
