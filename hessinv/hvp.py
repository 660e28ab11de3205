"""Exact Hessian-vector products in matrix form (docs/algorithm.md section 3).

For ``v = (v_1..v_L)`` (each ``(p_l, k)``: ``k`` vectors at once), with the loss Hessian
blocks ``S`` at the model output::

    forward tangent : t_0 = 0,  t_l = Dx_l v_l + Dz_l t_{l-1}
    backward        : u_L = S t_L,  u_{l-1} = Dz_l^T u_l + Dzx_l^T v_l + Dzz_l t_{l-1}
    result          : (Hv)_l = Dxx_l v_l + Dzx_l t_{l-1} + Dx_l^T u_l

Tangents and adjoints are kept per sample, ``(B, h_l, k)``; each stage costs what its
derivative class's products cost (``O(B h_out m k)`` for a ``Linear`` stage: Pearlmutter's
cost), so the whole product is linear in depth and batch. For the Gauss-Newton matrix the
second-order terms are zero and this is ``J^T S J v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .derivatives import StageDerivatives

__all__ = ["hessian_vector_product"]


def hessian_vector_product(
    stages: Sequence[StageDerivatives], S: torch.Tensor, v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` for per-stage blocks ``v[l]`` ``(p_l, k)`` and loss blocks ``S`` ``(B, K, K)``."""
    tangents: list[torch.Tensor] = []
    t = None
    for d, vl in zip(stages, v, strict=True):
        t = d.Dx(vl) if t is None else d.Dx(vl) + d.Dz(t)
        tangents.append(t)
    u = torch.bmm(S, tangents[-1])
    out: list[torch.Tensor] = [None] * len(stages)  # type: ignore[list-item]
    for l in range(len(stages) - 1, -1, -1):
        d = stages[l]
        r = d.Dxx(v[l]) + d.Dx_T(u)
        if l > 0:
            t_prev = tangents[l - 1]
            r = r + d.Dzx(t_prev)
            u = d.Dz_T(u) + d.Dzx_T(v[l]) + d.Dzz(t_prev)
        out[l] = r
    return out
