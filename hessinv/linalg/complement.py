"""How the stage-wise factorization treats the directions of a stage outside its basis
``Y`` (docs/algorithm.md section 8): one object per stage, made by the factorization.

On those directions ``Dx`` and ``Dxx`` vanish, so the stage's Schur complement is
``damping I`` there; they couple to the stage input only through ``E`` (the stage's
:class:`~hessinv.derivatives.Complement`). Three cases, three classes:

* :class:`NoComplement` -- ``Y = I``: nothing outside the basis;
* :class:`ClosedComplement` -- ``|damping| >= tau ||(I - Y Y^T) E||``: every direction is
  eliminated in closed form, with pivot ``damping``: ``V -= E^T (I - Y Y^T) E / damping``,
  ``v_comp = (I - Y Y^T)(g - E t_{l-1}) / damping``;
* :class:`SplitComplement` -- a tiny ``damping``: the coupled directions ``U_c`` join the
  front as extra controls, the exact null directions of ``H`` are eliminated in closed form.

Each updates the state, gives its part of the inertia and ``log|det|``, and handles the
right-hand side and the solution; the damping lives in this object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hessinv.derivatives import Complement, StageDerivatives

__all__ = ["Elimination", "NoComplement", "ClosedComplement", "SplitComplement", "eliminations"]


class Elimination:
    """The default: nothing outside the basis (see the module docstring for the others).

    Attributes: ``count`` (directions eliminated in closed form, pivot ``damping`` each),
    ``n_front`` (directions that join the front as controls), ``closed`` (the right-hand
    side's complement part is handled in closed form by the solve's ``controls``)."""

    count = 0
    n_front = 0
    closed = False

    def __init__(self, comp: Complement | None, damping: float):
        self.comp, self.damping = comp, damping

    # ---------------------------------------------------------------- factorization
    def update_state(self, Q: torch.Tensor) -> None:
        """Subtract the closed-form part of the Schur complement from the state block ``Q``."""

    def front_block(self) -> torch.Tensor | None:
        """``U_c^T E`` ``(n_front, B h_in)``: the coupling rows of the front's extra controls."""
        return None

    def inertia(self) -> tuple[int, int]:
        """``(n_pos, n_neg)`` of the closed-form pivots (``count`` of them, each ``damping``)."""
        if not self.count:
            return 0, 0
        return (self.count, 0) if self.damping > 0 else (0, self.count)

    def sign_logabsdet(self) -> tuple[float, float]:
        """``(sign, log|det|)`` of the closed-form pivots."""
        if not self.count:
            return 1.0, 0.0
        sign = 1.0 if self.damping > 0 or self.count % 2 == 0 else -1.0
        return sign, self.count * math.log(abs(self.damping))

    # ---------------------------------------------------------------- solve
    def front_rhs(self, g: torch.Tensor) -> torch.Tensor | None:
        """The extra controls' part of the front's right-hand side, ``U_c^T g``."""
        return None

    def solution(self, v: torch.Tensor, w: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
        """The stage's solution block ``v`` completed by the complement's part (``w``: the
        extra controls' values)."""
        return v


class NoComplement(Elimination):
    """``Y = I`` (or a stage whose complement is empty)."""


class ClosedComplement(Elimination):
    """Every complement direction eliminated in closed form (pivot ``damping``); the
    right-hand side's part is added by the solve's ``controls`` hooks."""

    closed = True

    def __init__(self, comp: Complement, damping: float):
        super().__init__(comp, damping)
        self.count = comp.dim

    def update_state(self, Q):
        if self.comp.coupled_dim:
            self.comp.subtract_gram_(Q, 1.0 / self.damping)


class SplitComplement(Elimination):
    """The coupled directions in the front (controls), the null directions in closed form."""

    def __init__(self, comp: Complement, damping: float):
        super().__init__(comp, damping)
        self.count = comp.dim - comp.coupled_dim
        self.n_front = comp.coupled_dim

    def front_block(self):
        return self.comp.coupled_F()

    def front_rhs(self, g):
        return self.comp.coupled_T(g)

    def solution(self, v, w, g):
        comp = self.comp
        v = v + comp.coupled(w)
        if self.count:
            v = v + (comp.project(g) - comp.coupled(comp.coupled_T(g))) / self.damping
        return v


def eliminations(
    stages: Sequence[StageDerivatives], damping: float, tau: float
) -> list[Elimination]:
    """The :class:`Elimination` of every stage; the coupling norms that decide between
    closed and split are read from the device in one transfer (docs/algorithm.md section 13)."""
    comps = [d.complement for d in stages]
    ask = [i for i, c in enumerate(comps) if c is not None and c.dim and c.coupled_dim]
    norms: dict[int, float] = {}
    if ask and damping != 0:
        values = torch.stack([comps[i].coupling_norm() for i in ask]).tolist()
        norms = dict(zip(ask, values, strict=True))
    out: list[Elimination] = []
    for i, comp in enumerate(comps):
        if comp is None or comp.dim == 0:
            out.append(NoComplement(comp, damping))
        elif comp.coupled_dim == 0 or (damping != 0 and abs(damping) >= tau * norms[i]):
            out.append(ClosedComplement(comp, damping))
        else:
            out.append(SplitComplement(comp, damping))
    return out
