"""Forward pass and backward derivative sweep over a chain (ALGORITHM.md sections 1-2).

The forward pass stores every stage input ``z_{l-1}``. The backward sweep starts
at the loss stage (``b_L = 1``) and walks to the first, computing each stage's
:class:`~hessinv.derivatives.StageDerivatives` with the current adjoint ``b_l``
and then ``b_{l-1} = Dz_l^T b_l``. The gradient falls out on the way:
``g_l = Dx_l^T b_l``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .chain import Chain
from .derivatives import (
    StageDerivatives,
    check_per_sample,
    loss_head,
    loss_stage_derivatives,
    stage_derivatives,
)

__all__ = ["ChainDerivatives", "compute_derivatives"]


class ChainDerivatives(NamedTuple):
    """Everything one backward sweep yields.

    ``loss``: the scalar loss; ``stages``: one :class:`StageDerivatives` per stage;
    ``gradient``: one ``(p_l,)`` tensor per stage.
    """

    loss: torch.Tensor
    stages: tuple[StageDerivatives, ...]
    gradient: tuple[torch.Tensor, ...]


def compute_derivatives(
    chain: Chain,
    params: list[torch.Tensor],
    inputs: torch.Tensor,
    loss_fn,
    targets,
    oracle: str = "auto",
    check: bool = True,
) -> ChainDerivatives:
    """Run the forward pass and the backward derivative sweep.

    Args:
        chain: the stages.
        params: flat ``(p_l,)`` parameters of each stage.
        inputs: the input batch ``(B, ...)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        oracle: ``"auto"``, ``"analytic"`` or ``"generic"`` (see ``hessinv.derivatives``).
        check: verify that every hidden stage acts on each sample independently.
    """
    L = len(chain.stages)
    with torch.no_grad():
        zs = [chain.apply_prefix(inputs)]
        for stage, x in zip(chain.stages[:-1], params[:-1], strict=True):
            out = stage.apply(x, zs[-1])
            if check:
                check_per_sample(stage, x, zs[-1], out)
            zs.append(out)
        last = chain.stages[-1]
        outputs = last.apply(params[-1], zs[-1])
        if check:
            check_per_sample(last, params[-1], zs[-1], outputs)
    B = inputs.shape[0]
    for l, z in enumerate(zs):
        if z.dim() == 0 or z.shape[0] != B:
            raise ValueError(
                f"the input of stage {l} has shape {tuple(z.shape)}; every stage must keep the "
                f"batch dimension ({B}) first"
            )
    head = loss_head(loss_fn, outputs, targets, oracle=oracle)
    derivs: list[StageDerivatives] = [None] * L  # type: ignore[list-item]
    grads: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    d = loss_stage_derivatives(
        last, zs[-1], head, need_input=L > 1, x=params[-1], oracle=oracle
    )
    derivs[-1] = d
    grads[-1] = d.Dx[0, 0]
    b = d.Dz[:, 0, :] if L > 1 else None
    for l in range(L - 2, -1, -1):
        stage = chain.stages[l]
        d = stage_derivatives(stage, zs[l], b, need_input=l > 0, x=params[l], oracle=oracle)
        derivs[l] = d
        grads[l] = torch.einsum("bo,bop->p", b, d.Dx)
        if l > 0:
            b = torch.einsum("bo,boi->bi", b, d.Dz)
    return ChainDerivatives(head.value, tuple(derivs), tuple(grads))
