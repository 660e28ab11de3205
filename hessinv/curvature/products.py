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

__all__ = ["hessian_vector_product", "HVP_HOOKS"]

#: the product's hooks per derivative class (docs/algorithm.md section 13)
HVP_HOOKS = Hooks({StageDerivatives: HvpHooks, LinearDerivatives: LinearHvp})


def _prepare(cls):
    return HVP_HOOKS(cls).prepare


def _finish(cls):
    return HVP_HOOKS(cls).finish


def hessian_vector_product(
    stages: Sequence[StageDerivatives], S: torch.Tensor, v: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` for per-stage blocks ``v[l]`` ``(p_l, k)`` and loss blocks ``S`` ``(B, K, K)``.

    The parts that do not depend on the two recursions are made before and after them, in
    batched calls per derivative class and stage shape (the hooks' ``prepare`` and
    ``finish``).
    """
    hooks = [HVP_HOOKS(type(d)) for d in stages]
    prepared = by_class(stages, _prepare, list(v))
    tangents: list[torch.Tensor | None] = [None]  # tangents[l] = t_{l-1}
    caches = []
    for d, hk, vl in zip(stages, hooks, prepared, strict=True):
        t, cache = hk.tangent(d, vl, tangents[-1])
        tangents.append(t)
        caches.append(cache)
    u = torch.bmm(S, tangents[-1])
    partial: list = [None] * len(stages)
    for l in range(len(stages) - 1, -1, -1):
        partial[l], u = hooks[l].adjoint(stages[l], prepared[l], tangents[l], u, caches[l])
    return by_class(stages, _finish, prepared, tangents[:-1], partial)
