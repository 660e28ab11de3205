"""Stage-wise (Riccati) factorization of ``H + eps I`` (ALGORITHM.md section 5).

Minimising ``1/2 x^T (H + eps I) x - g^T x`` is a linear-quadratic control problem
with state ``t_{l-1}`` and control ``v_l``. Backward, with ``V_{L+1} = 0``::

    G_l = A_l + eps I + Dx_l^T V_{l+1} Dx_l              (p_l x p_l)
    F_l = C_l + Dx_l^T V_{l+1} Dz_l                      (p_l x a_{l-1})
    V_l = Q_l + Dz_l^T V_{l+1} Dz_l - F_l^T G_l^-1 F_l   (a_{l-1} x a_{l-1})

The ``G_l`` and the gains ``K_l = G_l^-1 F_l`` do not depend on the right-hand
side and are kept. A solve for ``g`` then runs, with ``s_{L+1} = 0``::

    k_l = Dx_l^T s_{l+1} - g_l,   s_l = Dz_l^T s_{l+1} - K_l^T k_l      (backward)
    v_l = -(G_l^-1 k_l + K_l t_{l-1}),   t_l = Dz_l t_{l-1} + Dx_l v_l   (forward)

and ``x = v``. The ``G_l`` are the successive Schur complements of ``H + eps I``,
so ``det(H + eps I) = prod det G_l`` and (Haynsworth) the inertia of ``H + eps I``
is the sum of the inertias of the ``G_l``. Each ``G_l`` is factored by Cholesky
when it is positive definite and by a Bunch-Kaufman ``LDL^T`` otherwise; a
singular ``G_l`` raises :class:`SingularStageError` so the caller can fall back
to the pivoted block-tridiagonal solve (section 4).

``V_l`` couples samples (it is a dense ``a x a`` matrix with ``a = B h``), but only
one is alive at a time; ``Dz`` stays block-diagonal throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .derivatives import StageDerivatives

__all__ = ["StageFactor", "SingularStageError", "riccati_factorize", "riccati_solve"]


class SingularStageError(ValueError):
    """A Schur complement ``G_l`` is singular (to working precision) at stage ``stage``."""

    def __init__(self, stage: int, message: str):
        super().__init__(message)
        self.stage = stage


class StageFactor(NamedTuple):
    """The kept factorization of one stage.

    ``kind`` is ``"cholesky"`` (``factor`` is the lower Cholesky factor of ``G_l``) or
    ``"ldl"`` (``factor``/``pivots`` from ``torch.linalg.ldl_factor``). ``gain`` is
    ``K_l = G_l^-1 F_l`` ``(p_l, a_{l-1})`` (``None`` for the first stage).
    ``sign``/``logabsdet`` describe ``det G_l`` and ``inertia`` is
    ``(n_positive, n_negative, n_zero)`` of ``G_l``.
    """

    kind: str
    factor: torch.Tensor
    pivots: torch.Tensor | None
    gain: torch.Tensor | None
    sign: torch.Tensor
    logabsdet: torch.Tensor
    inertia: tuple[int, int, int]

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``G_l^-1 rhs`` for ``rhs`` of shape ``(p_l, k)``."""
        if self.kind == "cholesky":
            return torch.cholesky_solve(rhs, self.factor)
        return torch.linalg.ldl_solve(self.factor, self.pivots, rhs)


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """Dense ``(B h, B h')`` matrix from ``B`` blocks ``(B, h, h')``."""
    B, h, w = blocks.shape
    eye = torch.eye(B, dtype=blocks.dtype, device=blocks.device)
    return torch.einsum("bij,bc->bicj", blocks, eye).reshape(B * h, B * w)


def _factor_stage(G: torch.Tensor, stage: int) -> StageFactor:
    p = G.shape[0]
    chol, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        diag = torch.diagonal(chol)
        return StageFactor(
            "cholesky", chol, None, None, torch.ones((), dtype=G.dtype, device=G.device),
            2 * torch.log(diag).sum(), (p, 0, 0),
        )
    LD, pivots, info = torch.linalg.ldl_factor_ex(G)
    d = torch.diagonal(LD)
    two = pivots < 0  # members of 2x2 pivot blocks (Bunch-Kaufman, LAPACK convention)
    starts = torch.nonzero(two).flatten()[0::2]
    # Each Bunch-Kaufman 2x2 pivot has a negative determinant: one + and one - eigenvalue.
    det2 = d[starts] * d[starts + 1] - LD[starts + 1, starts] ** 2
    one = d[~two]
    scale = G.abs().max()
    tol = p * torch.finfo(G.dtype).eps * scale
    n_zero = int((one.abs() <= tol).sum())
    if int(info) != 0 or n_zero > 0 or not bool(torch.isfinite(LD).all()):
        raise SingularStageError(
            stage,
            f"the Schur complement G_{stage + 1} ({p}x{p}) of H + eps I is singular to working "
            f"precision (pivot below {float(tol):.2e})",
        )
    n_pos = int((one > 0).sum()) + len(starts)
    n_neg = int((one < 0).sum()) + len(starts)
    sign = torch.prod(torch.sign(one)) * (-1.0) ** len(starts)
    logabsdet = torch.log(one.abs()).sum() + torch.log(det2.abs()).sum()
    return StageFactor("ldl", LD, pivots, None, sign, logabsdet, (n_pos, n_neg, 0))


def riccati_factorize(
    stages: Sequence[StageDerivatives], damping: float
) -> list[StageFactor]:
    """Backward Riccati sweep: one :class:`StageFactor` per stage (first to last)."""
    L = len(stages)
    factors: list[StageFactor] = [None] * L  # type: ignore[list-item]
    V = None  # V_{l+1}, dense (a_l, a_l); None means 0
    for l in range(L - 1, -1, -1):
        d = stages[l]
        p = d.A.shape[0]
        eye = torch.eye(p, dtype=d.A.dtype, device=d.A.device)
        G = d.A + damping * eye
        if V is not None:
            Dx = d.Dx.reshape(-1, p)
            VDx = V @ Dx
            G = G + Dx.T @ VDx
        G = 0.5 * (G + G.T)
        factor = _factor_stage(G, l)
        if l > 0:
            B, _, h_in = d.C.shape
            F = d.C.permute(1, 0, 2)  # (p, B, h_in)
            Vin = _block_diagonal(d.Q)
            if V is not None:
                h = d.Dz.shape[1]
                F = F + torch.einsum("pbo,boi->pbi", VDx.T.reshape(p, B, h), d.Dz)
                V4 = V.reshape(B, h, B, h)
                VDz = torch.einsum("bocq,cqj->bocj", V4, d.Dz)
                Vin = Vin + torch.einsum("boi,bocj->bicj", d.Dz, VDz).reshape(B * h_in, B * h_in)
            F = F.reshape(p, B * h_in)
            K = factor.solve(F)
            Vin = Vin - F.T @ K
            V = 0.5 * (Vin + Vin.T)
            factor = factor._replace(gain=K)
        factors[l] = factor
    return factors


def riccati_solve(
    stages: Sequence[StageDerivatives], factors: Sequence[StageFactor], g: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``(H + eps I)^-1 g`` for per-stage blocks ``g[l]`` of shape ``(p_l, k)``."""
    L = len(stages)
    y: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    s = None  # s_{l+1}, (a_l, k)
    for l in range(L - 1, -1, -1):
        d, f = stages[l], factors[l]
        p = d.A.shape[0]
        kvec = -g[l]
        if s is not None:
            kvec = kvec + d.Dx.reshape(-1, p).T @ s
        y[l] = f.solve(kvec)
        if l > 0:
            s_new = -(f.gain.T @ kvec)
            if s is not None:
                B, h, h_in = d.Dz.shape
                s_new = s_new + torch.bmm(d.Dz.transpose(1, 2), s.reshape(B, h, -1)).reshape(
                    B * h_in, -1
                )
            s = s_new
    out: list[torch.Tensor] = []
    t = None  # t_{l-1}, (a_{l-1}, k)
    for l in range(L):
        d, f = stages[l], factors[l]
        v = -y[l]
        if t is not None:
            v = v - f.gain @ t
        out.append(v)
        if l < L - 1:
            p = d.A.shape[0]
            t_new = d.Dx.reshape(-1, p) @ v
            if t is not None:
                B, h, h_in = d.Dz.shape
                t_new = t_new + torch.bmm(d.Dz, t.reshape(B, h_in, -1)).reshape(B * h, -1)
            t = t_new
    return out
