"""Exact Hessian-vector products in matrix form (docs/algorithm.md section 3).

For ``v = (v_1..v_L)`` (each ``(p_l, k)``: ``k`` vectors at once), with the loss Hessian
blocks ``S`` at the model output::

    forward tangent : t_0 = 0,  t_l = Dx_l v_l + Dz_l t_{l-1}
    backward        : u_L = S t_L,  u_{l-1} = Dz_l^T u_l + Dzx_l^T v_l + Dzz_l t_{l-1}
    result          : (Hv)_l = Dxx_l v_l + Dzx_l t_{l-1} + Dx_l^T u_l

Tangents and adjoints are kept per sample, ``(B, h_l, k)``. Each derivative class does its
part in four steps that share subexpressions (its :class:`~hessinv.curvature.hvp_hooks.HvpHooks`):
``prepare`` (all stages, before), ``tangent`` (forward), ``adjoint`` (backward),
``finish`` (all stages, after); the first and last are batched over the stages of one
shape (section 13). A ``Linear``
stage costs four ``O(B h_out m k)`` products (Pearlmutter's cost), so the whole product
is linear in depth and batch. For the Gauss-Newton matrix the
second-order terms are zero and this is ``J^T S J v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hessinv.curvature.hvp_hooks import HvpHooks
from hessinv.curvature.linear_hvp import LinearHvp
from hessinv.derivatives import Hooks, LinearDerivatives, StageDerivatives, by_class

__all__ = ["hessian_vector_product", "ProductSweep", "HVP_HOOKS"]

#: the product's hooks per derivative class (docs/algorithm.md section 13)
HVP_HOOKS = Hooks({StageDerivatives: HvpHooks, LinearDerivatives: LinearHvp})


def _prepare(cls):
    return HVP_HOOKS(cls).prepare


def _finish(cls):
    return HVP_HOOKS(cls).finish


class ProductSweep:
    """One product ``C v`` over a run of consecutive stages (all of a chain's, or one rank's
    in a stage pipeline, docs/algorithm.md section 17): :meth:`forward` from the tangent
    ``t_in`` entering the first (``None`` for the chain's first stage) returns the tangent
    leaving the last; :meth:`backward` from the adjoint ``u`` of the last one's output returns
    ``((C v)_l per stage, the adjoint of the first one's input)``."""

    def __init__(self, stages: Sequence[StageDerivatives], v: Sequence[torch.Tensor]):
        self.stages = stages
        self.hooks = [HVP_HOOKS(type(d)) for d in stages]
        self.prepared = by_class(stages, _prepare, list(v))
        self.tangents: list[torch.Tensor | None] = []  # tangents[l] = t_{l-1}
        self.caches: list = []

    def forward(self, t_in: torch.Tensor | None = None) -> torch.Tensor:
        self.tangents, self.caches = [t_in], []
        for d, hk, vl in zip(self.stages, self.hooks, self.prepared, strict=True):
            t, cache = hk.tangent(d, vl, self.tangents[-1])
            self.tangents.append(t)
            self.caches.append(cache)
        return self.tangents[-1]  # type: ignore[return-value]

    def backward(self, u: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        stages = self.stages
        partial: list = [None] * len(stages)
        for l in range(len(stages) - 1, -1, -1):
            partial[l], u = self.hooks[l].adjoint(
                stages[l], self.prepared[l], self.tangents[l], u, self.caches[l]
            )
        out = by_class(stages, _finish, self.prepared, self.tangents[:-1], partial)
        return out, u


def hessian_vector_product(
    stages: Sequence[StageDerivatives], S: torch.Tensor, v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` for per-stage blocks ``v[l]`` ``(p_l, k)`` and loss blocks ``S`` ``(B, K, K)``.

    The parts that do not depend on the two recursions are made before and after them, in
    batched calls per derivative class and stage shape (the hooks' ``prepare`` and
    ``finish``).
    """
    sweep = ProductSweep(stages, v)
    out, _ = sweep.backward(torch.bmm(S, sweep.forward()))
    return out
