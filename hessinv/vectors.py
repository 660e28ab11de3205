"""Parameter-space vectors: flat tensors, dicts shaped like the parameters, lists.

docs/algorithm.md section 7: a flat vector is the concatenation, in the model's
``named_parameters()`` order, of every parameter flattened row-major.

>>> import torch
>>> from torch import nn
>>> model = nn.Linear(3, 2)
>>> flat = flatten(dict(model.named_parameters()))
>>> flat.shape
torch.Size([8])
>>> back = unflatten(flat, model)
>>> [(k, tuple(v.shape)) for k, v in back.items()]
[('weight', (2, 3)), ('bias', (2,))]
>>> torch.equal(back["weight"], model.weight.detach())
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["flatten", "unflatten", "ParameterLayout", "ParameterVector", "LayoutMetadata"]

#: what the operators take and return in parameter space: a flat ``(n,)`` or ``(n, k)`` tensor,
#: a dict ``name -> tensor shaped like the parameter``, or a list of such tensors
ParameterVector = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def flatten(params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (a dict in its order, or a list) flattened row-major into ``(n,)``."""
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not tensors:
        raise ValueError("flatten needs at least one tensor")
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _named_like(like: Any) -> list[tuple[str | None, torch.Size]]:
    if isinstance(like, nn.Module):
        return [(n, p.shape) for n, p in like.named_parameters() if p.requires_grad]
    if isinstance(like, Mapping):
        return [(n, torch.as_tensor(t).shape) for n, t in like.items()]
    if isinstance(like, (list, tuple)):
        return [(None, torch.Size(t.shape if isinstance(t, torch.Tensor) else t)) for t in like]
    raise TypeError(
        "like must be an nn.Module, a dict name -> tensor or a list of tensors/shapes, got "
        f"{type(like).__name__}"
    )


def unflatten(vector: torch.Tensor, like: Any) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """Split a flat ``(n,)`` vector into tensors shaped like ``like``.

    ``like`` is an ``nn.Module`` (its trainable parameters) or a dict (returns a dict
    with the same keys), or a list of tensors or shapes (returns a list).
    """
    named = _named_like(like)
    sizes = [int(s.numel()) for _, s in named]
    if vector.dim() != 1 or vector.shape[0] != sum(sizes):
        raise ValueError(
            f"vector has shape {tuple(vector.shape)}, expected ({sum(sizes)},) to match "
            f"{len(named)} tensors"
        )
    pieces = [p.reshape(s) for p, (_, s) in zip(vector.split(sizes), named, strict=True)]
    if named and named[0][0] is None:
        return pieces
    return {str(n): p for (n, _), p in zip(named, pieces, strict=True)}


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and stage partition of the parameters ``H`` acts on."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    stage_sizes: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return sum(self.stage_sizes)

    def _check_tensor(self, t: Any, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {t.dtype}, but the Hessian is {self.dtype}")
        if t.device != self.device:
            raise ValueError(f"{what} is on {t.device}, but the Hessian is on {self.device}")
        return t

    def to_blocks(
        self, v: ParameterVector, what: str = "v"
    ) -> tuple[list[torch.Tensor], tuple[Any, ...]]:
        """Per-stage ``(p_l, k)`` blocks of ``v`` and a token for :meth:`from_blocks`.

        Accepts a flat ``(n,)`` or ``(n, k)`` tensor, a dict ``name -> tensor`` shaped like
        the parameters, or a list of such tensors in parameter order.
        """
        n = self.numel
        if isinstance(v, torch.Tensor):
            self._check_tensor(v, what)
            if v.dim() not in (1, 2) or v.shape[0] != n:
                raise ValueError(
                    f"{what} has shape {tuple(v.shape)}; expected ({n},) or ({n}, k), a dict "
                    "name -> tensor shaped like the parameters, or a list of such tensors"
                )
            kind: tuple[Any, ...] = ("flat", v.dim())
            mat = v if v.dim() == 2 else v[:, None]
        elif isinstance(v, Mapping):
            missing = [k for k in self.names if k not in v]
            extra = [k for k in v if k not in self.names]
            if missing or extra:
                raise ValueError(
                    f"{what} as a dict must have exactly the parameter names; missing {missing}, "
                    f"unexpected {extra}"
                )
            mat = self._stack([v[k] for k in self.names], what, self.names)[:, None]
            kind = ("dict",)
        elif isinstance(v, (list, tuple)):
            if len(v) != len(self.names):
                raise ValueError(
                    f"{what} as a list must hold {len(self.names)} tensors (one per parameter, "
                    f"in order {list(self.names)}), got {len(v)}"
                )
            mat = self._stack(list(v), what, self.names)[:, None]
            kind = ("list", type(v))
        else:
            raise TypeError(
                f"{what} must be a tensor of shape ({n},) or ({n}, k), a dict name -> tensor, "
                f"or a list of tensors; got {type(v).__name__}"
            )
        if not bool(torch.isfinite(mat.sum())):  # any NaN or Inf entry makes the sum so
            if not bool(torch.isfinite(mat).all()):
                raise ValueError(f"{what} contains NaN or Inf")
        return list(mat.split(list(self.stage_sizes))), kind

    def _stack(self, tensors: Sequence[Any], what: str, names: Sequence[str]) -> torch.Tensor:
        flat = []
        for t, name, shape in zip(tensors, names, self.shapes, strict=True):
            self._check_tensor(t, f"{what}[{name!r}]")
            if t.shape != shape:
                raise ValueError(
                    f"{what}[{name!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            flat.append(t.reshape(-1))
        return torch.cat(flat)

    def from_blocks(self, blocks: Sequence[torch.Tensor], kind: tuple[Any, ...]) -> Any:
        """Inverse of :meth:`to_blocks`: return the result in the caller's kind."""
        mat = torch.cat(list(blocks))
        if kind[0] == "flat":
            return mat if kind[1] == 2 else mat[:, 0]
        sizes = [int(s.numel()) for s in self.shapes]
        pieces = [p.reshape(s) for p, s in zip(mat[:, 0].split(sizes), self.shapes, strict=True)]
        if kind[0] == "dict":
            return dict(zip(self.names, pieces, strict=True))
        return kind[1](pieces)


class LayoutMetadata:
    """What an operator on the parameters of :attr:`layout` (a :class:`ParameterLayout`)
    says about them: one definition for the curvature operators of one process and of a
    stage pipeline."""

    layout: ParameterLayout

    @property
    def num_params(self) -> int:
        """``n``, the number of selected parameters."""
        return self.layout.numel

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in the model's ``named_parameters()`` order (the order of
        ``dense()``)."""
        return self.layout.names

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        """``(p_1, ..., p_L)``: selected parameters per stage."""
        return self.layout.stage_sizes

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device
