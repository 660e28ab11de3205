"""Argument and input checks shared by the curvature operators and the optimizers: every
error names the argument at fault and what was expected."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "real",
    "finite",
    "positive",
    "nonnegative",
    "positive_int",
    "within",
    "check_model",
    "check_loss_fn",
    "check_oracle",
    "check_inputs",
    "check_targets",
    "check_bytes",
    "parameter_named",
    "ORACLES",
]

#: how derivatives are computed: closed forms where they apply, or always ``torch.func``
ORACLES = ("auto", "generic", "analytic")


def real(value, name: str) -> float:
    """``value`` as a float; ``TypeError`` if it is not a real number, ``ValueError`` if NaN."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def finite(value, name: str) -> float:
    """``value`` as a finite float (``TypeError`` or ``ValueError`` naming ``name``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def positive(value, name: str, allow_inf: bool = False) -> float:
    value = real(value, name)
    if not value > 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def nonnegative(value, name: str, allow_inf: bool = False) -> float:
    value = real(value, name)
    if value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")
    return value


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def within(value: float, name: str, lower: float, upper: float, bounds: str) -> float:
    """``value`` if ``lower <= value <= upper``, else a ``ValueError`` naming ``bounds``."""
    if not lower <= value <= upper:
        raise ValueError(f"{name} {value} must lie in [{bounds}] = [{lower}, {upper}]")
    return value


def check_bytes(value, name: str = "max_memory") -> int | None:
    """``None`` or a number of bytes ``>= 0`` (as an int)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise TypeError(f"{name} must be a number of bytes >= 0 (or None), got {value!r}")
    return int(value)


def check_model(model) -> nn.Sequential:
    """The model as an ``nn.Sequential`` (a list of modules is wrapped, sharing its parameters)."""
    if isinstance(model, nn.Sequential):
        return model
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        return nn.Sequential(*model)
    raise TypeError(
        "model must be a torch.nn.Sequential or a non-empty list of nn.Module stages, got "
        f"{type(model).__name__}"
    )


def check_loss_fn(loss_fn):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return loss_fn


def check_oracle(oracle: str) -> str:
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
    return oracle


def check_inputs(inputs, dtype: torch.dtype, device: torch.device) -> None:
    """A batch (a tensor, or a tuple/dict of them) with the batch dimension first, on the
    model's device, floating tensors of its dtype and finite."""
    leaves = [t for t in tree_flatten(inputs)[0]]
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(
            f"inputs must be a torch.Tensor of shape (B, ...) (or a tuple/dict of them), got "
            f"{type(inputs).__name__}"
        )
    for t in leaves:
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError(f"inputs must have a non-empty batch dimension, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"inputs are on {t.device} but the model is on {device}")
        if t.dtype.is_floating_point:
            if t.dtype != dtype:
                raise TypeError(f"inputs have dtype {t.dtype} but the model is {dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError("inputs contain NaN or Inf")


def check_targets(targets, device: torch.device) -> None:
    if isinstance(targets, torch.Tensor):
        if targets.device != device:
            raise ValueError(f"targets are on {targets.device} but the model is on {device}")
        if targets.dtype.is_floating_point and not bool(torch.isfinite(targets).all()):
            raise ValueError("targets contain NaN or Inf")


def parameter_named(named, name: str) -> torch.Tensor:
    """``named[name]`` for a mapping ``parameter name -> tensor``; ``ValueError`` listing the
    model's parameter names when there is none (for ``params=`` given by name)."""
    if name not in named:
        raise ValueError(
            f"params: no parameter named {name!r}; the model's parameters are {sorted(named)}"
        )
    return named[name]
