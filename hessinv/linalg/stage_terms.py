"""What a derivative class contributes to the stage-wise factorization and its solves
beyond its products (docs/algorithm.md sections 5, 8, 13).

The parts of a front and of a right-hand side that do not depend on the recursions are
made for many stages of a class at once, outside the sweeps: ``front_terms`` (the
:class:`~hessinv.derivatives.FrontTerms`: ``Y^T Dxx Y``, ``Y^T Dzx``, ``Dzz``), ``rhs_terms``
(:class:`RhsTerms` of the right-hand side) and ``controls`` (the solution blocks from the
basis coordinates). :class:`StageTerms` is the default, stage by stage through the
:class:`~hessinv.derivatives.StageDerivatives` interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from hessinv.derivatives import FrontTerms, StageDerivatives

__all__ = ["RhsTerms", "StageTerms"]


class RhsTerms(NamedTuple):
    """The parts of a stage's right-hand side ``g`` that a solve needs and that do not depend
    on the recursion (docs/algorithm.md sections 8, 13): ``Y_T_g`` = ``Y^T g`` ``(N, k)``;
    for a stage whose complement is eliminated in closed form, ``projected`` (``(I - Y Y^T) g``
    in the class's own layout, handed back to ``controls``) and ``coupling_T``
    (``E^T (I - Y Y^T) g`` ``(B, h_in, k)``, ``None`` when ``E`` leaves no trace outside
    ``span(Y)``)."""

    Y_T_g: torch.Tensor
    projected: torch.Tensor | None
    coupling_T: torch.Tensor | None


class StageTerms:
    """The default hooks (any :class:`~hessinv.derivatives.StageDerivatives`), stage by stage."""

    @staticmethod
    def front_terms(stages: Sequence[StageDerivatives]) -> list[FrontTerms]:
        """:class:`~hessinv.derivatives.FrontTerms` of the stages."""
        return [
            FrontTerms(
                d.Y_T_Dxx_Y(),
                d.Y_T_Dzx() if d.has_input else None,
                d.Dzz_blocks() if d.has_input else None,
            )
            for d in stages
        ]

    @staticmethod
    def rhs_terms(
        stages: Sequence[StageDerivatives], closed: Sequence[bool], g: Sequence[torch.Tensor]
    ) -> list[RhsTerms]:
        """:class:`RhsTerms` of the stages for their blocks ``g[i]`` ``(p_i, k)``;
        ``closed[i]``: stage ``i``'s complement is eliminated in closed form."""
        out = []
        for d, c, gl in zip(stages, closed, g, strict=True):
            projected = coupling_T = None
            if c:
                comp = d.complement
                projected = comp.project(gl)
                if comp.coupled_dim:
                    coupling_T = comp.coupling_T_of_projected(projected)
            out.append(RhsTerms(d.Y_T(gl), projected, coupling_T))
        return out

    @staticmethod
    def controls(
        stages: Sequence[StageDerivatives],
        closed: Sequence[bool],
        alpha: Sequence[torch.Tensor],
        t_prev: Sequence[torch.Tensor | None],
        terms: Sequence[RhsTerms],
        damping: float,
    ) -> list[torch.Tensor]:
        """The solution blocks ``v_i = Y alpha_i`` ``(p_i, k)``, plus for a closed complement
        ``((I - Y Y^T) g_i - (I - Y Y^T) E t_{i-1}) / damping`` (section 8), from the basis
        coordinates ``alpha[i]`` ``(N_i, k)``, the stage inputs' tangents ``t_prev[i]``
        ``(B, h_in, k)`` (``None`` for a first stage) and the stages' :meth:`rhs_terms`."""
        out = []
        for d, c, a, t, term in zip(stages, closed, alpha, t_prev, terms, strict=True):
            v = d.Y(a)
            if c:
                rhs = term.projected
                if t is not None and d.complement.coupled_dim:
                    rhs = rhs - d.complement.coupling(t)
                v = v + rhs / damping
            out.append(v)
        return out
