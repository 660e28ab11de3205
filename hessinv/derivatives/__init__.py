"""Per-stage derivatives, one class per layer family, behind one interface (docs/algorithm.md section 2).

* :class:`StageDerivatives` (``base.py``): the interface -- products with ``Dx``, ``Dz``,
  ``Dxx``, ``Dzx``, ``Dzz`` and their transposes, the section-6 curvature recursion and
  the basis ``Y`` of the stage-wise factorization;
* :class:`LinearDerivatives` (``linear.py``): ``nn.Linear`` + elementwise activations in
  Kronecker form, never dense in parameter space (section 8);
* :class:`GenericDerivatives` (``generic.py``): any per-sample stage, through ``torch.func``;
* :func:`loss_head` (``loss.py``): the loss as per-sample gradient and Hessian blocks.

:func:`stage_derivatives` picks the class for a stage of a :class:`~hessinv.chain.Chain`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..chain import Stage
from .base import (
    Complement,
    DenseStage,
    FrontTerms,
    RhsTerms,
    StageDerivatives,
    block_diagonal,
    per_class,
)
from .generic import GenericDerivatives
from .linear import (
    LinearComplement,
    LinearDerivatives,
    LinearForward,
    LinearInput,
    elementwise_derivatives,
    linear_complements,
    linear_forwards,
)
from .loss import FoldedLoss, LossHead, fold_output_activation, loss_head

__all__ = [
    "StageDerivatives",
    "DenseStage",
    "Complement",
    "LinearDerivatives",
    "LinearComplement",
    "GenericDerivatives",
    "LossHead",
    "loss_head",
    "fold_output_activation",
    "FoldedLoss",
    "stage_derivatives",
    "structured_forwards",
    "LinearForward",
    "linear_forwards",
    "linear_complements",
    "ELEMENTWISE_ACTIVATIONS",
    "block_diagonal",
    "per_class",
    "RhsTerms",
    "FrontTerms",
    "elementwise_derivatives",
]

#: activation modules the structured ``Linear`` path treats as elementwise.
ELEMENTWISE_ACTIVATIONS = (
    nn.Identity,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
)


def _is_linear_stage(stage: Stage, z) -> bool:
    return (
        type(stage.modules[0]) is nn.Linear
        and set(stage.local_names) <= {"weight", "bias"}
        and all(type(m) in ELEMENTWISE_ACTIVATIONS for m in stage.modules[1:])
        and isinstance(z, torch.Tensor)
        and z.dim() == 2
        and not stage.has_hooks  # a hook may change the function: torch.func sees it
    )


def _linear_input(stage: Stage, x: torch.Tensor, z: torch.Tensor) -> LinearInput:
    lin = stage.modules[0]
    params = stage.split_params(x)
    weight = params.get("weight", lin.weight.detach())
    bias = params.get("bias", None if lin.bias is None else lin.bias.detach())
    return LinearInput(weight, bias, tuple(stage.modules[1:]), z, "weight" in params,
                       "bias" in params)


def structured_forwards(stages, params, zs, oracle: str = "auto") -> dict[int, LinearForward]:
    """The forward-pass parts of every structured stage ``l`` (input ``zs[l]``), computed in
    batched calls (:func:`~hessinv.derivatives.linear.linear_forwards`); pass them to
    :func:`stage_derivatives` as ``forward``."""
    if oracle == "generic":
        return {}
    items = {l: _linear_input(stage, x, zs[l])
             for l, (stage, x) in enumerate(zip(stages, params, strict=True))
             if _is_linear_stage(stage, zs[l])}
    return dict(zip(items, linear_forwards(list(items.values())), strict=True))


def stage_derivatives(
    stage: Stage,
    x: torch.Tensor,
    z,
    b: torch.Tensor,
    *,
    has_input: bool,
    second_order: bool = True,
    oracle: str = "auto",
    forward: LinearForward | None = None,
) -> StageDerivatives:
    """The derivatives of ``stage`` at parameters ``x`` ``(p,)``, input ``z`` and adjoint ``b``.

    ``oracle``: ``"auto"`` (the structured class where it applies, else ``torch.func``),
    ``"analytic"`` (structured or an error) or ``"generic"`` (always ``torch.func``).
    ``forward``: the stage's parts from :func:`structured_forwards`, if already computed.
    """
    b = b.reshape(b.shape[0], -1)
    structured = oracle != "generic" and _is_linear_stage(stage, z)
    if oracle == "analytic" and not structured:
        raise ValueError(
            f"stage {stage.index} ({', '.join(stage.param_names)}) is not nn.Linear followed by "
            "elementwise activations on (B, features) input; use oracle='auto' or 'generic'"
        )
    if structured:
        if forward is None:
            forward = linear_forwards([_linear_input(stage, x, z)])[0]
        return LinearDerivatives.from_forward(forward, b, has_input=has_input,
                                              second_order=second_order)
    return GenericDerivatives(stage.apply, x, z, b, has_input=has_input, second_order=second_order)
