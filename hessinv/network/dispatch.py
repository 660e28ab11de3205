"""Which derivative class a stage of a chain gets (docs/algorithm.md sections 2, 8).

``nn.Linear`` followed by elementwise activations on ``(B, features)`` input, without
hooks, gets the Kronecker-form :class:`~hessinv.derivatives.LinearDerivatives`; every other
stage the generic :class:`~hessinv.derivatives.GenericDerivatives` (``torch.func``), with
its frozen tail (:attr:`~hessinv.network.chain.Stage.tail_start`) differentiated only
through its input.
"""

from __future__ import annotations

import torch
from torch import nn

from hessinv.derivatives import (
    GenericDerivatives,
    LinearDerivatives,
    LinearForward,
    LinearInput,
    StageDerivatives,
    linear_forwards,
)
from hessinv.network.chain import Stage

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "is_linear_stage",
    "linear_stage_forwards",
    "stage_derivatives",
]

#: activation modules a ``Linear`` stage may end with (treated as elementwise).
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


def is_linear_stage(stage: Stage, z) -> bool:
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
    return LinearInput(
        weight, bias, tuple(stage.modules[1:]), z, "weight" in params, "bias" in params
    )


def linear_stage_forwards(
    stages, params, zs, oracle: str = "auto", compress: bool = True
) -> dict[int, LinearForward]:
    """The forward-pass parts of every ``Linear`` stage ``l`` (input ``zs[l]``), computed in
    batched calls (:func:`~hessinv.derivatives.linear.linear_forwards`); pass them to
    :func:`stage_derivatives` as ``forward``. ``compress=False`` leaves the ranks of the
    stage inputs unchecked until a route needs the bases."""
    if oracle == "generic":
        return {}
    items = {
        l: _linear_input(stage, x, zs[l])
        for l, (stage, x) in enumerate(zip(stages, params, strict=True))
        if is_linear_stage(stage, zs[l])
    }
    return dict(zip(items, linear_forwards(list(items.values()), compress), strict=True))


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

    ``oracle``: ``"auto"`` (the ``Linear`` class where it applies, else ``torch.func``),
    ``"analytic"`` (the ``Linear`` class or an error) or ``"generic"`` (always ``torch.func``).
    ``forward``: the stage's parts from :func:`linear_stage_forwards`, if already computed.
    """
    b = b.reshape(b.shape[0], -1)
    linear = oracle != "generic" and is_linear_stage(stage, z)
    if oracle == "analytic" and not linear:
        raise ValueError(
            f"stage {stage.index} ({', '.join(stage.param_names)}) is not nn.Linear followed by "
            "elementwise activations on (B, features) input; use oracle='auto' or 'generic'"
        )
    if linear:
        if forward is None:
            forward = linear_forwards([_linear_input(stage, x, z)])[0]
        return LinearDerivatives.from_forward(
            forward, b, has_input=has_input, second_order=second_order
        )
    # without a tail the head is the whole stage; a frozen tail is differentiated through its
    # input only (section 2)
    return GenericDerivatives(
        stage.apply_head,
        x,
        z,
        b,
        has_input=has_input,
        second_order=second_order,
        tail=stage.apply_tail if stage.has_tail else None,
    )
