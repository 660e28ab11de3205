"""Splitting a model into the stages of a chain (docs/algorithm.md section 1).

A network is a chain of ``L`` stages ``z_l = f_l(z_{l-1}; x_l)``. Every child module
that owns a *selected* parameter starts a new stage; the other children (activations,
``Flatten``, modules whose parameters are all held fixed) join the stage before them,
and those in front of the first stage are a fixed *prefix* applied to the input batch.

The selected parameters are the ones with ``requires_grad=True``, or exactly those given
as ``params=`` (tensors or names from ``named_parameters()``); unselected parameters are
constants, also inside a stage (a frozen bias beside a selected weight).

Each stage keeps its own deep copy of its modules, made when the chain is built: later
changes to the model (an optimizer step, a frozen weight edited in place) do not leak
into a Hessian already made. In the copies, activations built with ``inplace=True`` run
out of place (``torch.func`` cannot differentiate in-place updates of its inputs).

The children after a stage's first, from the first one that owns (unselected) parameters
on, are the stage's frozen *tail* (:attr:`Stage.tail_start`): it is differentiated only
through its input, never in the parameters (docs/algorithm.md section 2).

A child that appears twice in an ``nn.Sequential`` is applied twice (``named_children()``
would list it once); a module with selected parameters appearing twice, or a parameter
shared by two stages, is weight tying across stages, which is refused.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from hessinv.network.checks import parameter_named

__all__ = ["Stage", "Chain", "build_chain"]

# Modules whose output for one sample depends on other samples of the batch,
# or that are random, when they are in training mode.
_TRAINING_MODE_UNSUPPORTED = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Floating dtypes hessinv refuses: torch.linalg has no half-precision factorizations.
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Modules that couple samples whatever their mode.
_ALWAYS_UNSUPPORTED = (nn.MultiheadAttention,)


@dataclass(frozen=True)
class Stage:
    """One stage ``z_l = f_l(z_{l-1}; x_l)`` of a chain.

    Attributes:
        index: position of the stage, 0-based.
        modules: copies of the first module (the one with selected parameters) and of the
            modules that follow it.
        param_names: full names (as in the model's ``named_parameters()``) of the stage's
            selected parameters, in order.
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
        """``p_l``: the number of selected parameters of the stage."""
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

    @property
    def has_hooks(self) -> bool:
        """Whether a module of the stage has forward hooks (they may change what it computes,
        so the stage is applied through its modules and differentiated generically)."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def selected_params(self) -> list[torch.Tensor]:
        """The stage's selected parameter tensors (detached), in order."""
        named = dict(self.modules[0].named_parameters())
        return [named[n].detach() for n in self.local_names]

    def flat_params(self) -> torch.Tensor:
        """The stage's selected parameters as one flat ``(p_l,)`` tensor (detached)."""
        return torch.cat([t.reshape(-1) for t in self.selected_params()])

    @functools.cached_property
    def tail_start(self) -> int:
        """Where the stage's frozen *tail* starts: the position of the first module after the
        first that owns parameters (all of them unselected: a module owning a selected one
        starts a new stage), or ``len(modules)`` when there is none. The tail is
        differentiated only through its input (docs/algorithm.md section 2)."""
        for i, module in enumerate(self.modules[1:], start=1):
            if next(module.parameters(), None) is not None:
                return i
        return len(self.modules)

    @property
    def has_tail(self) -> bool:
        """Whether the stage has a frozen tail (see :attr:`tail_start`)."""
        return self.tail_start < len(self.modules)

    def apply_head(self, x: torch.Tensor, z) -> torch.Tensor:
        """``g(z; x)``: the first module and the parameter-free modules before the tail."""
        first = self.modules[0]
        if type(first) is nn.Linear and not self.has_hooks:  # directly: cheaper than
            # functional_call, which would also run the module's hooks
            p = self.split_params(x)
            out = nn.functional.linear(z, p.get("weight", first.weight), p.get("bias", first.bias))
        else:
            out = functional_call(first, self.split_params(x), (z,))
        for module in self.modules[1 : self.tail_start]:
            out = module(out)
        return out

    def apply_tail(self, u) -> torch.Tensor:
        """``F(u)``: the frozen tail (the identity when there is none)."""
        for module in self.modules[self.tail_start :]:
            u = module(u)
        return u

    def apply(self, x: torch.Tensor, z) -> torch.Tensor:
        """``f_l(z; x) = F(g(z; x))`` for a batch ``z`` (batch first) and flat selected
        parameters ``x``."""
        return self.apply_tail(self.apply_head(x, z))


@dataclass(frozen=True)
class Chain:
    """A model split into a fixed input ``prefix`` and a tuple of ``stages``."""

    prefix: tuple[nn.Module, ...]
    stages: tuple[Stage, ...]

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for s in self.stages for n in s.param_names)

    def flat_params(self) -> torch.Tensor:
        """All stages' :meth:`Stage.flat_params` one after the other, ``(n,)``, made in one copy
        (a deep chain has thousands of small tensors). Raises ``TypeError``
        naming the parameter when a selected parameter is not floating point, is half
        precision (float16, bfloat16), or differs in dtype or device from the first (the copy
        would convert it silently)."""
        tensors = [s.selected_params() for s in self.stages]
        first = tensors[0][0]
        for stage, ts in zip(self.stages, tensors, strict=True):
            for name, t in zip(stage.param_names, ts, strict=True):
                if not t.dtype.is_floating_point:
                    raise TypeError(f"parameter {name} has non-floating dtype {t.dtype}")
                if t.dtype in _HALF_DTYPES:
                    raise TypeError(
                        f"parameter {name} is {t.dtype}: hessinv needs float32 or float64 (its "
                        "factorizations and accuracy contract have no half precision); convert "
                        "the model and the data, e.g. model.float() and inputs.float() (or "
                        ".double())"
                    )
                if t.dtype != first.dtype or t.device != first.device:
                    raise TypeError(
                        f"parameter {name} (stage {stage.index}, parameters {stage.param_names}) "
                        f"is {t.dtype} on {t.device} but the first is {first.dtype} on "
                        f"{first.device}; all selected parameters must share dtype and device"
                    )
        return torch.cat([t.reshape(-1) for ts in tensors for t in ts])

    def apply_prefix(self, inputs):
        """``z_0``: the input batch after the parameter-free modules in front."""
        z = inputs
        for module in self.prefix:
            z = module(z)
        return z


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _backpack_hooks(module: nn.Module) -> bool:
    """Whether ``backpack.extend`` left its hooks on ``module`` (BackPACK marks an extended
    module with ``_backpack_extend = True`` and registers hooks defined in its own package;
    the hooks are what breaks ``torch.func``, and a model whose hooks were removed works)."""
    for attr in _HOOK_DICTS:
        for hook in getattr(module, attr, {}).values():
            origin = getattr(getattr(hook, "func", hook), "__module__", None) or ""
            if origin == "backpack" or origin.startswith("backpack."):
                return True
    return False


def _check_supported(name: str, module: nn.Module) -> None:
    for sub_name, sub in module.named_modules():
        full = f"{name}.{sub_name}" if sub_name else name
        if _backpack_hooks(sub):
            raise ValueError(
                f"module {full!r} ({type(sub).__name__}) is extended by BackPACK "
                "(backpack.extend): its hooks run autograd functions that torch.func, which "
                "hessinv differentiates stages with, cannot run; pass the model without the "
                "extension (a copy made before backpack.extend, e.g. copy.deepcopy(model) "
                "first, with the same parameters)"
            )
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


def _snapshot(module: nn.Module) -> nn.Module:
    """A deep copy in which every ``inplace=True`` submodule runs out of place and no
    parameter requires grad (the selected ones enter as explicit tensors; the frozen ones
    are constants, and autograd would otherwise record every product made with them)."""
    out = _plain_copy(module)
    if out is None:
        out = copy.deepcopy(module)
    out.requires_grad_(False)
    for sub in out.modules():
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False
    return out


_ATOMS = (bool, int, float, str, type(None), torch.dtype, torch.device)
#: methods through which a class may customise its copies
_COPY_HOOKS = (
    "__deepcopy__",
    "__copy__",
    "__getstate__",
    "__setstate__",
    "__reduce_ex__",
    "__reduce__",
)


def _is_atomic(value) -> bool:
    if isinstance(value, tuple):
        return all(_is_atomic(v) for v in value)
    return isinstance(value, _ATOMS)


def _plain_copy(module: nn.Module) -> nn.Module | None:
    """What ``copy.deepcopy`` gives, made directly, for a module without children whose state
    is its parameters and buffers, dicts (of hooks), sets of names and immutable settings
    (``nn.Linear``, the activations): a new object with its own dicts and cloned tensors,
    several times faster than the generic deep copy (two modules per stage of a deep chain).
    ``None`` for any other module, or one that customises how it is copied (it is
    deep-copied)."""
    cls = type(module)
    if module._modules or any(
        getattr(cls, name, None) is not getattr(nn.Module, name, None) for name in _COPY_HOOKS
    ):
        return None
    state = {}
    for key, value in vars(module).items():
        if key in ("_parameters", "_buffers"):
            if any(
                t is not None and type(t) not in (torch.Tensor, nn.Parameter)
                for t in value.values()
            ):
                return None
            state[key] = type(value)(
                (
                    name,
                    None
                    if t is None
                    else nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter)
                    else t.detach().clone(),
                )
                for name, t in value.items()
            )
        elif isinstance(value, dict):
            if not all(callable(v) or _is_atomic(v) for v in value.values()):
                return None
            state[key] = type(value)(value)
        elif isinstance(value, (set, frozenset)):
            state[key] = type(value)(value)
        elif _is_atomic(value):
            state[key] = value
        else:
            return None
    out = type(module).__new__(type(module))
    out.__dict__.update(state)
    return out


def _children(model) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        return list(model._modules.items())  # keeps a module that appears twice
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        return [(str(i), m) for i, m in enumerate(model)]
    raise TypeError(
        f"model must be a torch.nn.Sequential or a non-empty list of nn.Module stages, got "
        f"{type(model).__name__}; wrap a custom network as nn.Sequential(block_1, ..., block_L)"
    )


def _selected_ids(model, children, params) -> set[int]:
    """``id``s of the selected parameters (``params`` resolved, or ``requires_grad``)."""
    everything = {}
    names = {}
    for name, child in children:
        for local, p in child.named_parameters():
            everything.setdefault(id(p), p)
            names.setdefault(f"{name}.{local}", p)
    if params is None:
        return {i for i, p in everything.items() if p.requires_grad}
    if isinstance(params, (torch.Tensor, str)) or not isinstance(params, Sequence):
        raise TypeError("params must be a list of parameter tensors or of parameter names")
    if not params:
        raise ValueError("params is empty: there is no Hessian to take")
    chosen = set()
    for item in params:
        if isinstance(item, str):
            chosen.add(id(parameter_named(names, item)))
        elif isinstance(item, torch.Tensor):
            if id(item) not in everything:
                raise ValueError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model"
                )
            chosen.add(id(item))
        else:
            raise TypeError(f"params entries must be tensors or names, got {type(item).__name__}")
    return chosen


def build_chain(model: nn.Module | Sequence[nn.Module], params=None) -> Chain:
    """Split ``model`` into stages (docs/algorithm.md section 1).

    Args:
        model: an ``nn.Sequential`` or a list/tuple of modules (one child each).
        params: ``None`` (the parameters with ``requires_grad``) or a list of parameter
            tensors or names from ``model.named_parameters()``.

    Returns:
        a :class:`Chain` of copies of the modules. Parameter names follow
        ``model.named_parameters()``; for a list, the ``i``-th module's parameters are
        named ``"{i}.{name}"`` as ``nn.Sequential(*modules)`` would name them.

    >>> from torch import nn
    >>> chain = build_chain(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(),
    ...                                   nn.Linear(3, 2)))
    >>> [s.param_names for s in chain.stages]
    [('1.weight', '1.bias'), ('3.weight', '3.bias')]
    >>> len(chain.prefix), [len(s.modules) for s in chain.stages]
    (1, [2, 1])
    >>> [s.param_names for s in build_chain(nn.Sequential(nn.Linear(4, 3), nn.Tanh(),
    ...                                     nn.Linear(3, 2)), params=["0.weight", "2.bias"]).stages]
    [('0.weight',), ('2.bias',)]
    """
    children = _children(model)
    selected = _selected_ids(model, children, params)
    prefix: list[nn.Module] = []
    groups: list[list[tuple[str, nn.Module]]] = []
    owner: dict[int, str] = {}
    positions: dict[int, str] = {}
    for name, module in children:
        _check_supported(name, module)
        mine = [(local, p) for local, p in module.named_parameters() if id(p) in selected]
        if mine and id(module) in positions:
            raise ValueError(
                f"module {name!r} is the same object as module {positions[id(module)]!r} and owns "
                "selected parameters: that is weight tying across stages, which is not supported "
                "(use two modules, or hold the tied parameters fixed with params=...)"
            )
        positions.setdefault(id(module), name)
        for local, p in mine:
            if id(p) in owner:
                raise ValueError(
                    f"parameter {name}.{local} is shared with {owner[id(p)]} (tied weights across "
                    "stages); parameters shared between stages are not supported"
                )
            owner[id(p)] = f"{name}.{local}"
        if mine:
            groups.append([(name, module)])
        elif groups:
            groups[-1].append((name, module))
        else:
            prefix.append(module)
    if not groups:
        raise ValueError("the model has no selected (trainable) parameters: there is no Hessian")

    stages = []
    for index, group in enumerate(groups):
        name, first = group[0]
        mine = [(local, p) for local, p in first.named_parameters() if id(p) in selected]
        stages.append(
            Stage(
                index=index,
                modules=tuple(_snapshot(m) for _, m in group),
                param_names=tuple(f"{name}.{local}" for local, _ in mine),
                local_names=tuple(local for local, _ in mine),
                param_shapes=tuple(p.shape for _, p in mine),
            )
        )
    return Chain(prefix=tuple(_snapshot(m) for m in prefix), stages=tuple(stages))
