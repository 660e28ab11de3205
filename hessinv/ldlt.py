"""Bunch-Kaufman ``G = P L D L^T P^T`` in explicit form, for level-3 solves.

LAPACK's ``sytrf`` (``torch.linalg.ldl_factor``, lower) returns ``L`` as a product of
interchanges and unit block columns, ``L = P_1 L_1 P_2 L_2 ...``, and its solve ``sytrs``
works pivot by pivot, several times slower than one triangular solve with many
right-hand sides. Moving every interchange to the left (LAPACK's ``syconv``) gives a
permutation ``P``, a unit lower triangular ``L`` and a block-diagonal ``D`` (1x1 and 2x2
blocks): ``L^-1 P^T F`` is then one ``solve_triangular``.

The interchange of step ``s`` (rows ``a, b``, both after the step's pivot) must be applied
to the multipliers of every earlier column; so column ``c`` of ``L`` is the stored column
with the interchanges of all later steps applied, in order. Walking the steps backwards
keeps that composition as one index vector ``q`` (exchange the values ``a`` and ``b``),
and one ``gather`` applies it to every column.

Every 2x2 block of Bunch-Kaufman has a negative determinant: one positive and one negative
eigenvalue. With the 1x1 pivots this gives the inertia of ``D``, hence of ``G`` (Sylvester).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BunchKaufman", "bunch_kaufman"]


class BunchKaufman:
    """``G = P L D L^T P^T``; ``perm`` gathers ``P^T B = B[perm]``.

    Attributes: ``L`` (unit lower triangular), ``perm``, ``d`` (diagonal of ``D``), ``e``
    (its subdiagonal, nonzero only in 2x2 blocks), ``inertia`` (``(n_pos, n_neg)`` as a
    ``(2,)`` tensor on the device), ``sign``, ``logabsdet``, ``smallest`` (smallest
    ``|pivot|``; ``sqrt|det|`` of a 2x2 block), all left on the device.
    """

    def __init__(self, L, perm, d, e, one, two):
        """``one``, ``two``: indices (on the device) of the 1x1 pivots and of the first rows
        of the 2x2 blocks, from the pivot layout; no boolean masks, so nothing here waits for
        the device (the inertia stays there, docs/algorithm.md section 13)."""
        self.L, self.perm, self.d, self.e = L, perm, d, e
        self.inverse_perm = torch.empty_like(perm)
        self.inverse_perm[perm] = torch.arange(perm.numel(), device=perm.device)
        n, n2 = d.numel(), two.numel()
        d1, a, c, b = d[one], d[two], d[two + 1], e[two]
        det2 = a * c - b * b
        self.inertia = torch.stack([(d1 > 0).sum(), (d1 < 0).sum()]) + n2
        self.sign = torch.prod(torch.sign(d1)) * (-1.0) ** n2
        self.logabsdet = torch.log(d1.abs()).sum() + torch.log(det2.abs()).sum()
        pivots = torch.cat([d1.abs(), det2.abs().sqrt()])
        self.smallest = pivots.min() if n else d.new_ones(())
        # D^-1 as a symmetric tridiagonal (1x1 blocks and closed-form 2x2 inverses)
        inv_d, inv_e = torch.zeros_like(d), torch.zeros_like(e)
        inv_d[one] = 1.0 / d1
        if n2:
            inv_d[two], inv_d[two + 1], inv_e[two] = c / det2, a / det2, -b / det2
        self._inv_d, self._inv_e = inv_d, inv_e

    def half_solve(self, B: torch.Tensor) -> torch.Tensor:
        """``L^-1 P^T B``."""
        return torch.linalg.solve_triangular(self.L, B[self.perm], upper=False, unitriangular=True)

    def half_solve_T(self, B: torch.Tensor) -> torch.Tensor:
        """``P L^-T B``."""
        X = torch.linalg.solve_triangular(self.L.T, B, upper=True, unitriangular=True)
        return X[self.inverse_perm]

    def d_solve(self, B: torch.Tensor) -> torch.Tensor:
        """``D^-1 B``."""
        out = self._inv_d[:, None] * B
        e = self._inv_e[:-1, None]
        out[:-1] += e * B[1:]
        out[1:] += e * B[:-1]
        return out

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``G^-1 B``."""
        return self.half_solve_T(self.d_solve(self.half_solve(B)))


def bunch_kaufman(G: torch.Tensor) -> BunchKaufman | None:
    """Factor symmetric ``G``; ``None`` when LAPACK meets an exactly zero pivot.

    Reads the device once: the pivot layout and the success flag in one transfer."""
    LD, pivots, info = torch.linalg.ldl_factor_ex(G)
    ok = (info == 0) & torch.isfinite(LD).all()
    *piv, flag = torch.cat([pivots, ok.to(pivots.dtype).reshape(1)]).tolist()
    if not flag:
        return None
    n = G.shape[0]
    # piv: 1-based, LAPACK convention
    steps = []  # (first column of the step, block size, row interchanged with ...)
    i = 0
    while i < n:
        if piv[i] > 0:
            steps.append((i, 1, i, piv[i] - 1))
            i += 1
        else:
            steps.append((i, 2, i + 1, -piv[i] - 1))
            i += 2
    raw = LD.tril_()  # LD is ours: its strict upper triangle is not part of the factor

    def on_device(values):  # host-made indices: copied without waiting for the queue
        return torch.tensor(values, dtype=torch.long).to(G.device, non_blocking=True)

    one = on_device([s[0] for s in steps if s[1] == 1])
    two = on_device([s[0] for s in steps if s[1] == 2])
    e = torch.zeros(n, dtype=G.dtype, device=G.device)
    if two.numel():
        e[two] = raw[two + 1, two]
        raw[two + 1, two] = 0.0
    d = torch.diagonal(raw).clone()
    # q: gather index of the interchanges of all later steps; value/position maps kept in
    # sync. Built on the host with numpy (a loop over the steps), one row per column of L.
    q = np.arange(n)
    where = np.arange(n)  # where[v] = position of value v in q
    index_T = np.empty((n, n), dtype=np.int64)
    for start, size, a, b in reversed(steps):
        index_T[start : start + size] = q
        if a != b:  # exchange the values a and b in q
            pa, pb = where[a], where[b]
            q[pa], q[pb] = b, a
            where[a], where[b] = pb, pa
    index = torch.from_numpy(index_T).to(G.device, non_blocking=True).T
    L = torch.gather(raw, 0, index).tril_(-1)
    L.diagonal().fill_(1.0)
    return BunchKaufman(L, torch.from_numpy(q).to(G.device, non_blocking=True), d, e, one, two)
