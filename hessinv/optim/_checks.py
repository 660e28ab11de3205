"""Argument checks shared by the optimizers: clear errors naming the bad argument."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["real", "positive", "nonnegative", "positive_int", "check_model", "check_loss_fn"]


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


def within(value: float, name: str, lower: float, upper: float, bounds: str) -> float:
    """``value`` if ``lower <= value <= upper``, else a ``ValueError`` naming ``bounds``."""
    if not lower <= value <= upper:
        raise ValueError(f"{name} {value} must lie in [{bounds}] = [{lower}, {upper}]")
    return value
