"""Exact Hessian-vector products in matrix form (ALGORITHM.md section 3).

For ``v = (v_1..v_L)`` (each ``(p_l, k)``: ``k`` vectors at once)::

    forward tangent : t_0 = 0,  t_l = Dx_l v_l + Dz_l t_{l-1}
    backward        : u_L = 0,  u_{l-1} = Dz_l^T u_l + C_l^T v_l + Q_l t_{l-1}
    result          : (Hv)_l = A_l v_l + C_l t_{l-1} + Dx_l^T u_l

Tangents and adjoints are kept per sample, ``(B, h_l, k)``; the cost is linear in
``L`` and in the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .derivatives import StageDerivatives

__all__ = ["hessian_vector_product"]


def hessian_vector_product(
    stages: Sequence[StageDerivatives], v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` for per-stage blocks ``v[l]`` of shape ``(p_l, k)``; returns the same layout."""
    L = len(stages)
    tangents: list[torch.Tensor | None] = [None]  # tangents[l] = t_l (t_0 = 0)
    for l in range(L - 1):
        d = stages[l]
        t = (d.Dx.reshape(-1, v[l].shape[0]) @ v[l]).reshape(*d.Dx.shape[:2], -1)
        if tangents[-1] is not None:
            t = t + torch.bmm(d.Dz, tangents[-1])
        tangents.append(t)
    out: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    u = None  # u_L = 0
    for l in range(L - 1, -1, -1):
        d = stages[l]
        t_prev = tangents[l]
        r = d.A @ v[l]
        if t_prev is not None:
            r = r + torch.bmm(d.C, t_prev).sum(0)
        if u is not None:
            r = r + d.Dx.reshape(-1, r.shape[0]).T @ u.reshape(-1, u.shape[2])
        out[l] = r
        if l > 0:  # here t_prev = t_{l-1} exists
            u_prev = torch.matmul(d.C.transpose(1, 2), v[l]) + torch.bmm(d.Q, t_prev)
            if u is not None:
                u_prev = u_prev + torch.bmm(d.Dz.transpose(1, 2), u)
            u = u_prev
    return out
