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

from block_partitioned_matrices import Tridiagonal

from .derivatives import StageDerivatives
from .riccati import _block_diagonal

__all__ = ["augmented_tridiagonal", "AugmentedSolver"]


def _dense_C(d: StageDerivatives) -> torch.Tensor:
    """``C_l`` as a dense ``(p_l, a_{l-1})`` matrix."""
    B, p, h_in = d.C.shape
    return d.C.permute(1, 0, 2).reshape(p, B * h_in)


def augmented_tridiagonal(stages: Sequence[StageDerivatives], damping: float) -> Tridiagonal:
    """The blockwise-transposed augmented system as a :class:`Tridiagonal` over stages."""
    L = len(stages)
    ref = stages[0].A
    kw = {"dtype": ref.dtype, "device": ref.device}
    p = [d.A.shape[0] for d in stages]
    a = [d.Dx.shape[0] * d.Dx.shape[1] for d in stages[:-1]]
    size = [p[l] + 2 * a[l] for l in range(L - 1)] + [p[-1]]
    diagonal, lower, upper = [], [], []
    for l in range(L):
        d = stages[l]
        D = torch.zeros(size[l], size[l], **kw)
        D[: p[l], : p[l]] = d.A + damping * torch.eye(p[l], **kw)
        if l < L - 1:
            Dx = d.Dx.reshape(a[l], p[l])
            v, t, u = slice(0, p[l]), slice(p[l], p[l] + a[l]), slice(p[l] + a[l], size[l])
            D[v, u] = Dx.T
            D[t, v] = -Dx
            D[t, t] = torch.eye(a[l], **kw)
            D[u, t] = -_block_diagonal(stages[l + 1].Q)
            D[u, u] = torch.eye(a[l], **kw)
        diagonal.append(D)
        if l > 0:  # block (l, l-1): couples to t_{l-1}
            Lo = torch.zeros(size[l], size[l - 1], **kw)
            t_prev = slice(p[l - 1], p[l - 1] + a[l - 1])
            Lo[: p[l], t_prev] = _dense_C(d)
            if l < L - 1:
                Lo[p[l] : p[l] + a[l], t_prev] = -_block_diagonal(d.Dz)
            lower.append(Lo)
        if l < L - 1:  # block (l, l+1): the u_l rows couple to v_{l+1} and u_{l+1}
            nxt = stages[l + 1]
            Up = torch.zeros(size[l], size[l + 1], **kw)
            u_rows = slice(p[l] + a[l], size[l])
            Up[u_rows, : p[l + 1]] = -_dense_C(nxt).T
            if l + 1 < L - 1:
                Up[u_rows, p[l + 1] + a[l + 1] :] = -_block_diagonal(nxt.Dz).transpose(0, 1)
            upper.append(Up)
    return Tridiagonal(diagonal=diagonal, lower=lower, upper=upper)


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
