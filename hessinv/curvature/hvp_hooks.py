"""What a derivative class contributes to a Hessian-vector product (docs/algorithm.md sections 3,
13).

A product runs in four steps: ``prepare`` (all stages of a class, before the sweeps),
``tangent`` (forward, stage by stage), ``adjoint`` (backward, stage by stage) and ``finish``
(all stages of a class, after). Only the middle two are sequential; a class may batch the
others over its stages of one shape. :class:`HvpHooks` is the default, stage by stage with
the eight products of the :class:`~hessinv.derivatives.StageDerivatives` interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hessinv.derivatives import StageDerivatives

__all__ = ["HvpHooks"]


class HvpHooks:
    """The default hooks (any :class:`~hessinv.derivatives.StageDerivatives`)."""

    @staticmethod
    def prepare(stages: Sequence[StageDerivatives], v: Sequence[torch.Tensor]) -> list:
        """What each stage's :meth:`tangent` and :meth:`adjoint` take from its block ``v[i]``
        ``(p_i, k)`` (here the block itself)."""
        return list(v)

    @staticmethod
    def tangent(d: StageDerivatives, v, t_prev: torch.Tensor | None):
        """``(t, cache)`` with ``t = Dx v + Dz t_prev`` (``t_prev`` is ``None`` for a first
        stage); ``cache`` is whatever :meth:`adjoint` can reuse."""
        t = d.Dx(v)
        return (t if t_prev is None else t + d.Dz(t_prev)), None

    @staticmethod
    def adjoint(d: StageDerivatives, v, t_prev, u, cache):
        """``(partial, u_prev)``: ``u_prev = Dz^T u + Dzx^T v + Dzz t_prev`` and what
        :meth:`finish` turns into ``Hv_l = Dxx v + Dzx t_prev + Dx^T u`` (here ``Hv_l``)."""
        hv = d.Dxx(v) + d.Dx_T(u)
        if t_prev is None:
            return hv, None
        return hv + d.Dzx(t_prev), d.Dz_T(u) + d.Dzx_T(v) + d.Dzz(t_prev)

    @staticmethod
    def finish(
        stages: Sequence[StageDerivatives], v: Sequence, t_prev: Sequence, partial: Sequence
    ) -> list[torch.Tensor]:
        """The blocks ``Hv_i`` ``(p_i, k)`` from what :meth:`adjoint` returned (here: them)."""
        return list(partial)
