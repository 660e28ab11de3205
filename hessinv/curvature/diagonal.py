"""Exact diagonal blocks and diagonal of the Hessian (docs/algorithm.md section 6).

The curvature of the loss in the output of stage ``l`` obeys ``R_L = S`` (the loss
Hessian blocks) and ``R_{l-1} = Dzz_l + Dz_l^T R_l Dz_l``; it is block-diagonal over
samples, kept as ``(B, h, h)``. The diagonal block of ``H`` for stage ``l`` is
``H_ll = Dxx_l + Dx_l^T R_l Dx_l``. Linear in ``L``; ``H`` is never formed. A stage's
derivative class computes its diagonal without forming its block (for a ``Linear``
stage: ``O(B h_out m)``), and forms the ``p_l x p_l`` block only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hessinv.derivatives import StageDerivatives

__all__ = ["output_curvatures", "diagonal_blocks", "hessian_diagonal"]


def output_curvatures(stages: Sequence[StageDerivatives], S: torch.Tensor) -> list[torch.Tensor]:
    """``R_l`` ``(B, h_l, h_l)`` for every stage output, ``R_L = S`` (for a run of stages
    that ends a chain's: ``S`` is the curvature at the last one's output; the curvature at
    the first one's input is then ``stages[0].propagate_curvature(R[0])``, section 17)."""
    R = [None] * len(stages)
    R[-1] = S
    for l in range(len(stages) - 1, 0, -1):
        R[l - 1] = stages[l].propagate_curvature(R[l])
    return R


def diagonal_blocks(
    stages: Sequence[StageDerivatives], S: torch.Tensor, which: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """The dense diagonal blocks ``H_ll`` ``(p_l, p_l)`` of the stages in ``which`` (default:
    all)."""
    R = output_curvatures(stages, S)
    which = range(len(stages)) if which is None else which
    return [stages[l].diagonal_block(R[l]) for l in which]


def hessian_diagonal(stages: Sequence[StageDerivatives], S: torch.Tensor) -> list[torch.Tensor]:
    """The diagonal of ``H``, one ``(p_l,)`` tensor per stage, without forming any block."""
    R = output_curvatures(stages, S)
    return [d.diagonal(r) for d, r in zip(stages, R, strict=True)]
