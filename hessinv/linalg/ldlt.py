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

    def __init__(self, L, perm, inverse_perm, d, e, one, two, two_next, slots):
        """``one``, ``two``, ``two_next``: indices (on the device) of the 1x1 pivots and of the
        first and second rows of the 2x2 blocks, from the pivot layout, and ``slots`` where the
        entries of ``D^-1``'s diagonal land (see :func:`bunch_kaufman`); no boolean masks, so
        nothing here waits for the device (the inertia stays there, docs/algorithm.md
        section 13).

        With ``d1`` the 1x1 pivots and ``det2 = a c - b^2 < 0`` the determinants of the 2x2
        blocks ``[[a, b], [b, c]]`` (one eigenvalue of each sign): ``n_pos = #(d1 > 0) + n2``,
        ``n_neg = n - n_pos``, ``sign = prod sign(d1, det2)``, ``log|det| = sum log|d1, det2|``,
        ``smallest = min(|d1|, sqrt|det2|)``."""
        self.L, self.perm, self.inverse_perm, self.d, self.e = L, perm, inverse_perm, d, e
        n, n1, n2 = d.numel(), one.numel(), two.numel()
        d1, a, c, b = d[one], d[two], d[two_next], e[two]
        det2 = torch.addcmul(a * c, b, b, value=-1.0)
        pivots = torch.cat([d1, det2])
        positive = (d1 > 0).sum()
        self.inertia = torch.stack([positive + n2, (n1 + n2) - positive])
        self.sign = torch.sign(pivots).prod()
        magnitude = pivots.abs()
        self.logabsdet = magnitude.log().sum()
        magnitude[n1:].sqrt_()
        self.smallest = magnitude.min() if n else d.new_ones(())
        # D^-1 as a symmetric tridiagonal (1x1 blocks and closed-form 2x2 inverses)
        inv2 = torch.stack([c, a, b.neg()]) / det2  # (3, n2): the 2x2 inverses' entries
        self._inv_d = torch.cat([d1.reciprocal(), inv2[0], inv2[1]])[slots]
        self._inv_e = torch.zeros_like(e).index_put_((two,), inv2[2])

    def half_solve(self, B: torch.Tensor) -> torch.Tensor:
        """``L^-1 P^T B``."""
        return torch.linalg.solve_triangular(self.L, B[self.perm], upper=False, unitriangular=True)

    def half_solve_T(self, B: torch.Tensor) -> torch.Tensor:
        """``P L^-T B``."""
        X = torch.linalg.solve_triangular(self.L.T, B, upper=True, unitriangular=True)
        return X[self.inverse_perm]

    def d_solve(self, B: torch.Tensor) -> torch.Tensor:
        """``D^-1 B``: the diagonal, then the two off-diagonals accumulated in place."""
        out = self._inv_d[:, None] * B
        e = self._inv_e[:-1, None]
        out[:-1].addcmul_(e, B[1:])
        out[1:].addcmul_(e, B[:-1])
        return out

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``G^-1 B``."""
        return self.half_solve_T(self.d_solve(self.half_solve(B)))


def bunch_kaufman(G: torch.Tensor) -> BunchKaufman | None:
    """Factor symmetric ``G`` (its lower triangle); ``None`` when LAPACK meets an exactly zero
    pivot or the factor is not finite.

    Reads the device once: the pivot layout and the success flag in one transfer. Everything
    derived from the layout (the 1x1 and 2x2 pivot positions, the permutation and its
    inverse, the gather index of ``L``) is made on the host and sent in one copy."""
    LD, pivots, info = torch.linalg.ldl_factor_ex(G)
    ok = (info == 0) & torch.isfinite(LD.sum())  # NaN or Inf anywhere reaches the sum
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
    one = np.array([st[0] for st in steps if st[1] == 1], dtype=np.int64)
    two = np.array([st[0] for st in steps if st[1] == 2], dtype=np.int64)
    # q: gather index of the interchanges of all later steps; value/position maps kept in
    # sync. Built with numpy (a loop over the steps), one row per column of L.
    q = np.arange(n)
    where = np.arange(n)  # where[v] = position of value v in q
    index_T = np.empty((n, n), dtype=np.int64)
    for start, size, a, b in reversed(steps):
        index_T[start : start + size] = q
        if a != b:  # exchange the values a and b in q
            pa, pb = where[a], where[b]
            q[pa], q[pb] = b, a
            where[a], where[b] = pb, pa
    inverse = np.empty(n, dtype=np.int64)
    inverse[q] = np.arange(n)
    slots = np.empty(n, dtype=np.int64)  # D^-1's diagonal from [1/d1, c/det2, a/det2]
    slots[one] = np.arange(one.size)
    slots[two] = one.size + np.arange(two.size)
    slots[two + 1] = one.size + two.size + np.arange(two.size)
    packed = torch.from_numpy(
        np.concatenate([one, two, two + 1, q, inverse, slots, index_T.ravel()])
    )
    packed = packed.to(G.device, non_blocking=True)  # one copy, without waiting for the queue
    one_d, two_d, next_d, q_d, inverse_d, slots_d, index_d = packed.split(
        [one.size, two.size, two.size, n, n, n, n * n]
    )
    raw = LD.tril_()  # LD is ours: its strict upper triangle is not part of the factor
    e = torch.zeros(n, dtype=G.dtype, device=G.device)
    if two.size:
        e[two_d] = raw[next_d, two_d]
        raw[next_d, two_d] = 0.0
    d = torch.diagonal(raw).clone()
    L = torch.gather(raw, 0, index_d.view(n, n).T).tril_(-1)
    L.diagonal().fill_(1.0)
    return BunchKaufman(L, q_d, inverse_d, d, e, one_d, two_d, next_d, slots_d)
