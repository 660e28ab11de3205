"""Exact diagonal blocks and diagonal of the Hessian (ALGORITHM.md section 6).

The curvature of the loss in the output of stage ``l`` obeys ``R_L = 0`` and
``R_{l-1} = Q_l + Dz_l^T R_l Dz_l``; it is block-diagonal over samples, kept as
``(B, h, h)``. The diagonal block of ``H`` for stage ``l`` is
``H_ll = A_l + Dx_l^T R_l Dx_l``. Linear in ``L``; ``H`` is never formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .derivatives import StageDerivatives

__all__ = ["diagonal_blocks", "hessian_diagonal"]


def _output_curvatures(stages: Sequence[StageDerivatives]) -> list[torch.Tensor | None]:
    """``R_l`` ``(B, h_l, h_l)`` for ``l = 1..L`` (``None`` for ``R_L = 0``)."""
    L = len(stages)
    R: list[torch.Tensor | None] = [None] * L
    for l in range(L - 1, 0, -1):
        d = stages[l]
        prev = d.Q
        if R[l] is not None:
            prev = prev + torch.einsum("boi,bop,bpj->bij", d.Dz, R[l], d.Dz)
        R[l - 1] = prev
    return R


def diagonal_blocks(stages: Sequence[StageDerivatives]) -> list[torch.Tensor]:
    """The dense diagonal blocks ``H_ll`` ``(p_l, p_l)`` of the Hessian, one per stage."""
    R = _output_curvatures(stages)
    out = []
    for d, r in zip(stages, R, strict=True):
        block = d.A
        if r is not None:
            block = block + torch.einsum("bop,boq,bqr->pr", d.Dx, r, d.Dx)
        out.append(block)
    return out


def hessian_diagonal(stages: Sequence[StageDerivatives]) -> list[torch.Tensor]:
    """The diagonal of ``H``, one ``(p_l,)`` tensor per stage, without forming any block."""
    R = _output_curvatures(stages)
    out = []
    for d, r in zip(stages, R, strict=True):
        diag = torch.diagonal(d.A).clone()
        if r is not None:
            diag = diag + torch.einsum("bop,boq,bqp->p", d.Dx, r, d.Dx)
        out.append(diag)
    return out
