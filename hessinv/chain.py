"""Splitting a model into the stages of a chain (ALGORITHM.md section 1).

A network is a chain of ``L`` stages ``z_l = f_l(z_{l-1}; x_l)``. Every child
module that owns trainable parameters starts a new stage; parameter-free
children (activations, ``Flatten``, ...) join the stage before them, and those
in front of the first parameterised child are a fixed *prefix* applied to the
input batch. The last stage is later fused with the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["Stage", "Chain", "build_chain"]

# Modules whose output for one sample depends on other samples of the batch,
# or that are random, when they are in training mode.
_TRAINING_MODE_UNSUPPORTED = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Modules that couple samples whatever their mode.
_ALWAYS_UNSUPPORTED = (nn.MultiheadAttention,)


@dataclass(frozen=True)
class Stage:
    """One stage ``z_l = f_l(z_{l-1}; x_l)`` of a chain.

    Attributes:
        index: position of the stage, 0-based.
        modules: the parameterised module first, then the parameter-free modules
            that follow it.
        param_names: full names (as in the model's ``named_parameters()``) of the
            stage's trainable parameters, in order.
        local_names: the same names relative to ``modules[0]``.
        param_shapes: their shapes.
    """

    index: int
    modules: tuple[nn.Module, ...]
    param_names: tuple[str, ...]
    local_names: tuple[str, ...]
    param_shapes: tuple[torch.Size, ...]

    @property
    def num_params(self) -> int:
        """``p_l``: the number of trainable parameters of the stage."""
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes)

    def split_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unflatten a flat ``(p_l,)`` vector into ``{local_name: tensor}``."""
        out = {}
        offset = 0
        for name, shape in zip(self.local_names, self.param_shapes, strict=True):
            n = int(torch.Size(shape).numel())
            out[name] = x[offset : offset + n].reshape(shape)
            offset += n
        return out

    def flat_params(self) -> torch.Tensor:
        """The stage's current parameters as one flat ``(p_l,)`` tensor (detached)."""
        named = dict(self.modules[0].named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.local_names])

    def apply(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``f_l(z; x)`` for a batch ``z`` of shape ``(B, ...)`` and flat parameters ``x``."""
        out = functional_call(self.modules[0], self.split_params(x), (z,))
        for module in self.modules[1:]:
            out = module(out)
        return out


@dataclass(frozen=True)
class Chain:
    """A model split into a fixed input ``prefix`` and a tuple of ``stages``."""

    prefix: tuple[nn.Module, ...]
    stages: tuple[Stage, ...]

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for s in self.stages for n in s.param_names)

    def apply_prefix(self, inputs: torch.Tensor) -> torch.Tensor:
        """``z_0``: the input batch after the parameter-free modules in front."""
        z = inputs
        for module in self.prefix:
            z = module(z)
        return z


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _check_supported(name: str, module: nn.Module) -> None:
    for sub_name, sub in module.named_modules():
        full = f"{name}.{sub_name}" if sub_name else name
        if isinstance(sub, _ALWAYS_UNSUPPORTED):
            raise ValueError(
                f"module {full!r} ({type(sub).__name__}) couples the samples of a batch; "
                "hessinv needs stages that act on each sample independently"
            )
        if sub.training and isinstance(sub, _TRAINING_MODE_UNSUPPORTED):
            raise ValueError(
                f"module {full!r} ({type(sub).__name__}) is in training mode, where it couples "
                "samples or is random; call model.eval() first (BatchNorm then uses its running "
                "statistics and Dropout is off)"
            )


def build_chain(model: nn.Module | Sequence[nn.Module]) -> Chain:
    """Split ``model`` into stages (ALGORITHM.md section 1).

    Args:
        model: an ``nn.Sequential`` or a list/tuple of modules (one child each).

    Returns:
        a :class:`Chain`. Parameter names follow ``model.named_parameters()`` for an
        ``nn.Sequential``; for a list, the ``i``-th module's parameters are named
        ``"{i}.{name}"`` as ``nn.Sequential(*modules)`` would name them.

    >>> from torch import nn
    >>> chain = build_chain(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    >>> [s.param_names for s in chain.stages]
    [('1.weight', '1.bias'), ('3.weight', '3.bias')]
    >>> len(chain.prefix), [len(s.modules) for s in chain.stages]
    (1, [2, 1])
    """
    if isinstance(model, nn.Sequential):
        children = list(model.named_children())
    elif isinstance(model, (list, tuple)) and all(isinstance(m, nn.Module) for m in model):
        children = [(str(i), m) for i, m in enumerate(model)]
    else:
        raise TypeError(
            f"model must be a torch.nn.Sequential or a list of nn.Module stages, got "
            f"{type(model).__name__}; wrap a custom network as nn.Sequential(block_1, ..., block_L)"
        )
    prefix: list[nn.Module] = []
    groups: list[list[tuple[str, nn.Module]]] = []
    for name, module in children:
        _check_supported(name, module)
        if _trainable(module):
            groups.append([(name, module)])
        elif groups:
            groups[-1].append((name, module))
        else:
            prefix.append(module)
    if not groups:
        raise ValueError("the model has no trainable parameters: there is no Hessian to take")

    stages = []
    seen: dict[int, str] = {}
    for index, group in enumerate(groups):
        name, first = group[0]
        params = _trainable(first)
        for local, p in params:
            if id(p) in seen:
                raise ValueError(
                    f"parameter {name}.{local} is shared with {seen[id(p)]}; parameters shared "
                    "between stages are not supported"
                )
            seen[id(p)] = f"{name}.{local}"
        stages.append(
            Stage(
                index=index,
                modules=tuple(m for _, m in group),
                param_names=tuple(f"{name}.{local}" for local, _ in params),
                local_names=tuple(local for local, _ in params),
                param_shapes=tuple(p.shape for _, p in params),
            )
        )
    return Chain(prefix=tuple(prefix), stages=tuple(stages))
