"""Stage-wise (Riccati) factorization of ``H + eps I`` (docs/algorithm.md sections 5, 8, 10).

Minimising ``1/2 x^T (H + eps I) x - g^T x`` is a linear-quadratic control problem with
state ``t_{l-1}`` (the tangent entering stage ``l``) and control ``v_l``. Backward, with
``V_{L+1} = blockdiag(S)`` (the loss Hessian blocks)::

    G_l = Dxx_l + eps I + Dx_l^T V_{l+1} Dx_l            (control block)
    F_l = Dzx_l + Dx_l^T V_{l+1} Dz_l                    (control-state coupling)
    V_l = Dzz_l + Dz_l^T V_{l+1} Dz_l - F_l^T G_l^-1 F_l

Each stage works in its basis ``Y_l`` (section 8): ``G_l`` and ``F_l`` are formed as
``Y^T G Y`` and ``Y^T F`` (``N_l`` rows instead of ``p_l``). The directions outside
``span(Y_l)`` have ``G = eps I``; they couple to the state only through ``E`` (the
stage's :class:`~hessinv.derivatives.Complement`) and are eliminated in closed form,

    V_l -= E^T (I - Y Y^T) E / eps,     v_comp = (I - Y Y^T)(g_l - E t_{l-1}) / eps,

when ``|eps| >= tau ||(I - Y Y^T) E||``. Otherwise (tiny ``eps``) the coupled ones join
the front as extra controls and only the exact null directions of ``H`` are eliminated in
closed form. One :class:`~hessinv.linalg.complement.Elimination` per stage does either.

Each front is eliminated by :func:`hessinv.fronts.factor_front` with threshold pivoting;
directions that fail the test are *delayed* into the next stage's front as extra state
(section 10). A solve for ``g`` then runs backward for the linear term ``s`` and forward
for the controls, with the kept factors; its cost is a few products per stage.

The inertia of ``H + eps I`` is the sum of the inertias of the eliminated pivots and of
``(number of closed-form complement directions) x sign(eps)``; ``log|det|`` likewise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hessinv.derivatives import (
    FrontTerms,
    Hooks,
    LinearDerivatives,
    StageDerivatives,
    block_diagonal,
    by_class,
)
from hessinv.derivatives.linear import compress_linear_stages
from hessinv.errors import SingularMatrixError
from hessinv.linalg.complement import Elimination, eliminations
from hessinv.linalg.fronts import CholeskyFront, Front, cholesky_front, factor_front, sign_logabsdet
from hessinv.linalg.linear_terms import LinearTerms
from hessinv.linalg.stage_terms import StageTerms
from hessinv.progress import progress_bar
from hessinv.settings import DEFAULT_TAU, TERMS_BYTES, TERMS_BYTES_CPU, TERMS_STAGES

__all__ = [
    "StageFactor",
    "RiccatiFactors",
    "riccati_factorize",
    "riccati_sweep",
    "riccati_solve",
    "SolveSweep",
]


@dataclass
class StageFactor:
    """What one stage keeps for solves: ``front`` (the eliminated front), ``complement``
    (its :class:`~hessinv.linalg.complement.Elimination`), ``n_alpha`` (``N``, the basis
    coordinates) and ``n_delayed_in`` (delayed variables received from the next stage)."""

    front: Front
    complement: Elimination
    n_alpha: int
    n_delayed_in: int


@dataclass
class RiccatiFactors:
    """All stage factors, first stage first, with the totals."""

    factors: list[StageFactor]
    damping: float
    inertia: tuple[int, int, int]
    sign: torch.Tensor
    logabsdet: torch.Tensor
    n_delayed: int  #: total number of delayed pivots (0 when no front needed them)


def _front(
    d: StageDerivatives,
    terms: FrontTerms,
    V: torch.Tensor,
    n_delay: int,
    damping: float,
    elim: Elimination,
):
    """The front of stage ``d`` (its :class:`FrontTerms` ``terms``, its complement's
    elimination ``elim``): control block ``G``, coupling ``F``, state block ``Q``."""
    B, h_out, N = d.batch, d.out_size, d.basis_size
    n_t = B * h_out
    V_tt, V_td, V_dd = V[:n_t, :n_t], V[:n_t, n_t:], V[n_t:, n_t:]
    n_w = elim.n_front
    X, Z = d.right_DxY_Dz(V_tt)  # (n_t, N) = V_tt Dx Y and (n_t, a_in) = V_tt Dz
    G_aa = terms.Y_T_Dxx_Y + d.DxY_T(X.reshape(B, h_out, N))
    G_aa.diagonal().add_(damping)
    G_ad = d.DxY_T(V_td.reshape(B, h_out, n_delay))  # (N, n_delay)
    n = N + n_w + n_delay
    if n == N:
        G = G_aa
    else:
        G = V.new_zeros(n, n)
        G[:N, :N] = G_aa
        G[:N, N + n_w :] = G_ad
        G[N + n_w :, :N] = G_ad.T
        G[N + n_w :, N + n_w :] = V_dd
        if n_w:
            G[N : N + n_w, N : N + n_w].diagonal().add_(damping)
    if not d.has_input:
        return G, V.new_zeros(n, 0), V.new_zeros(0, 0)
    h_in = d.in_size
    a_in = B * h_in
    FZ, QZ = d.DxY_T_Dz_T(Z.reshape(B, h_out, a_in))
    F_a = terms.Y_T_Dzx + FZ
    F_d = d.Dz_T(V_td.reshape(B, h_out, n_delay)).reshape(a_in, n_delay).T
    parts = [F_a] + ([elim.front_block()] if n_w else []) + ([F_d] if n_delay else [])
    F = torch.cat(parts, dim=0) if len(parts) > 1 else F_a
    Q = QZ.reshape(a_in, a_in)  # Dz^T V Dz, a new tensor: updated in place
    # + Dzz on the diagonal blocks (a view of them, (h_in, h_in, B))
    torch.diagonal(Q.view(B, h_in, B, h_in), dim1=0, dim2=2).add_(terms.Dzz.permute(1, 2, 0))
    elim.update_state(Q)
    # G: only its lower triangle is read (Cholesky, LDL^T and eigh all take that one); Q is
    # symmetrised with the update, in the front's next_state
    return G, F, Q


def _singular_null_space(d: StageDerivatives, l: int, count: int) -> SingularMatrixError:
    return SingularMatrixError(
        f"H + 0 I is singular: the inputs of stage {l + 1} (with its bias column, "
        f"{d.batch} samples) span only {d.basis_size // max(d.out_size, 1)} of "
        f"{d.num_params // max(d.out_size, 1)} dimensions, so H has a null space of "
        f"dimension at least {count} there (docs/algorithm.md section 8); use a "
        "damping that is not an eigenvalue of -H, e.g. damping > 0",
        0.0,
        nullity=count,
    )


#: the factorization's and solves' hooks per derivative class (docs/algorithm.md section 13)
TERMS_HOOKS = Hooks({StageDerivatives: StageTerms, LinearDerivatives: LinearTerms})


def _front_terms(cls):
    return TERMS_HOOKS(cls).front_terms


def _rhs_terms(cls):
    return TERMS_HOOKS(cls).rhs_terms


def _controls(cls):
    return TERMS_HOOKS(cls).controls


def terms_budget(device: torch.device) -> int:
    """Bytes of :class:`FrontTerms` held ahead of the sweep on ``device``."""
    return TERMS_BYTES_CPU if device.type == "cpu" else TERMS_BYTES


class _TermsAhead:
    """The stages' :class:`FrontTerms`, made in batched calls for up to :data:`TERMS_STAGES`
    stages ahead of the backward sweep (within :data:`TERMS_BYTES`, or
    :data:`TERMS_BYTES_CPU` on a CPU; a bigger stage alone), each dropped once its front is
    kept (docs/algorithm.md section 13)."""

    def __init__(self, stages: Sequence[StageDerivatives]):
        self.stages, self.made = stages, {}
        self.budget = terms_budget(stages[0].device) if stages else TERMS_BYTES

    def __getitem__(self, l: int) -> FrontTerms:
        if l not in self.made:
            chunk, size = [l], FrontTerms.stored_bytes(self.stages[l])
            while len(chunk) < TERMS_STAGES and chunk[-1] > 0:
                more = FrontTerms.stored_bytes(self.stages[chunk[-1] - 1])
                if size + more > self.budget:
                    break
                chunk.append(chunk[-1] - 1)
                size += more
            self.made.update(
                zip(chunk, by_class([self.stages[i] for i in chunk], _front_terms), strict=True)
            )
        return self.made[l]

    def drop(self, l: int) -> None:
        self.made.pop(l, None)


def _optimistic_chunk(stages, terms, elims, V, chunk, damping, tau):
    """Cholesky fronts for the stages ``chunk`` (all with a state, no delayed variables),
    their tests read from the device once at the end: ``(fronts, V)`` after the chunk, or
    ``None`` when one of them failed (then the chunk is redone stage by stage)."""
    fronts, oks = [], []
    for l in chunk:
        G, F, Q = _front(stages[l], terms[l], V, 0, damping, elims[l])
        front, ok = cholesky_front(G, F, Q, tau)
        fronts.append(front)
        oks.append(ok)
        V = front.next_state(F, Q)
    if not bool(torch.stack(oks).all()):
        return None
    return fronts, V


def riccati_factorize(
    stages: Sequence[StageDerivatives],
    S: torch.Tensor,
    damping: float,
    *,
    tau: float = DEFAULT_TAU,
    force_eigen: bool = False,
    check_every: int = 1,
    speculative: bool = False,
    progress: bool | None = None,
) -> RiccatiFactors:
    """Backward sweep over the stages (last first); see the module docstring.

    Args:
        stages: the stages' derivatives (first to last).
        S: the loss Hessian blocks ``(B, K, K)``.
        damping: ``eps``.
        tau: threshold of the pivot test (multipliers up to ``1/tau`` accepted).
        force_eigen: use the eigen-decomposed, threshold-pivoted front at every stage.
        check_every: how many stages share one host read of the pivot tests (section 13).
            ``1``: every front is tested as it is made (one or two reads per Cholesky front).
            ``k > 1``: runs of ``k`` stages are factored with Cholesky, tested on the
            device and read once; a run with a failed test is redone stage by stage (and
            the sweep stays stage by stage until ``k`` fronts in a row were Cholesky).
            Same factors either way. Worth it on a GPU (a read waits for the queue) when
            most fronts are positive definite; a redone run costs its factorization twice.
        speculative: stage by stage, make each Cholesky front in full before reading its
            two tests at once (one read instead of two; work wasted on indefinite fronts).
            Same factors either way; see :func:`~hessinv.fronts.factor_front`.

    Raises:
        SingularMatrixError: ``H + eps I`` is singular to working precision, or has an
            exact null space (``eps = 0`` on a wide layer: section 8).
    """
    factors, _, _ = riccati_sweep(
        stages,
        block_diagonal(S),
        0,
        damping,
        tau=tau,
        force_eigen=force_eigen,
        check_every=check_every,
        speculative=speculative,
        progress=progress,
    )
    return _totals(factors, damping, S)


def riccati_sweep(
    stages: Sequence[StageDerivatives],
    V: torch.Tensor,
    n_delay: int,
    damping: float,
    *,
    root: bool = True,
    tau: float = DEFAULT_TAU,
    force_eigen: bool = False,
    check_every: int = 1,
    speculative: bool = False,
    progress: bool | None = None,
) -> tuple[list[StageFactor], torch.Tensor | None, int]:
    """The backward sweep of :func:`riccati_factorize` over a run of consecutive stages, from
    the state ``V`` (with ``n_delay`` delayed variables last) at the last one's output:
    ``(factors, V_in, n_delay_in)``, the state at the first one's input when it is not the
    chain's first (``root=False``: a rank's stages in a stage pipeline, docs/algorithm.md
    section 17), else ``(factors, None, 0)``."""
    L = len(stages)
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    compress_linear_stages([d for d in stages if isinstance(d, LinearDerivatives)])
    elims = eliminations(stages, damping, tau)
    if damping == 0:
        for l in range(L - 1, -1, -1):  # the stage the backward sweep meets first
            if elims[l].count:
                raise _singular_null_space(stages[l], l, elims[l].count)
    factors: list[StageFactor] = [None] * L  # type: ignore[list-item]

    terms = _TermsAhead(stages)

    def record(l, front, n_delay):
        terms.drop(l)
        factors[l] = StageFactor(front, elims[l], stages[l].basis_size, n_delay)

    floor = 0 if root else -1  # the chain's first stage has no state: never in a run
    runs = check_every > 1 and not force_eigen
    optimistic, cholesky_run = runs, 0
    bar = progress_bar(L, "factorization", progress)
    l = L - 1
    while l >= 0:
        if optimistic and n_delay == 0 and l > floor:
            chunk = range(l, max(l - check_every, floor), -1)
            done = _optimistic_chunk(stages, terms, elims, V, chunk, damping, tau)
            if done is not None:
                fronts, V = done
                for k, front in zip(chunk, fronts, strict=True):
                    record(k, front, 0)
                l -= len(chunk)
                bar.update(len(chunk))
                continue
            optimistic, cholesky_run = False, 0
        G, F, Q = _front(stages[l], terms[l], V, n_delay, damping, elims[l])
        front = factor_front(
            G,
            F,
            Q,
            tau,
            root=root and l == 0,
            stage=l,
            damping=damping,
            force_eigen=force_eigen,
            speculative=speculative,
        )
        record(l, front, n_delay)
        if runs:
            cholesky_run = cholesky_run + 1 if isinstance(front, CholeskyFront) else 0
            optimistic = cholesky_run >= check_every
        if l > floor:
            V = front.next_state(F, Q)
            n_delay = front.n_rejected
        l -= 1
        bar.update()
    bar.close()
    return factors, (None if root else V), (0 if root else n_delay)


def _totals(factors: list[StageFactor], damping: float, S: torch.Tensor) -> RiccatiFactors:
    """Inertia, sign and ``log|det|`` of ``H + eps I``: the fronts' (Haynsworth) and the
    complements' closed-form pivots. Sign and logdet stay on the device; the inertias the
    fronts keep there are summed there and read once."""
    n_pos = n_neg = n_delayed = 0
    sign, logabsdet = sign_logabsdet([f.front for f in factors], S)
    on_device = []
    for f in factors:
        if isinstance(f.front.inertia, torch.Tensor):
            on_device.append(f.front.inertia)
        else:
            n_pos += f.front.inertia[0]
            n_neg += f.front.inertia[1]
        n_delayed += f.front.n_rejected
        pos, neg = f.complement.inertia()
        n_pos, n_neg = n_pos + pos, n_neg + neg
        c_sign, c_log = f.complement.sign_logabsdet()
        if c_log or c_sign != 1.0:
            sign, logabsdet = sign * c_sign, logabsdet + c_log
    if on_device:
        pos, neg = torch.stack(on_device).sum(0).tolist()
        n_pos, n_neg = n_pos + pos, n_neg + neg
    return RiccatiFactors(factors, damping, (n_pos, n_neg, 0), sign, logabsdet, n_delayed)


def riccati_solve(
    stages: Sequence[StageDerivatives], rf: RiccatiFactors, g: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``(H + eps I)^-1 g`` for per-stage blocks ``g[l]`` ``(p_l, k)`` (sections 5, 13).

    The terms of ``g`` that do not depend on the recursion (``Y^T g_l`` and the closed-form
    complement's projections) are made for all stages first, and the parameter blocks
    ``v_l`` from the basis coordinates at the end, both in batched calls per stage shape
    (:meth:`~hessinv.derivatives.StageDerivatives.rhs_terms`, ``controls``). In between
    only the recursions run stage by stage. Backward, each front keeps
    ``h_l = L^-1 P^T k_l`` (its right-hand side half solved) and passes
    ``s_l = Dz^T s_{l+1} - W^T D^-1 h_l`` on; forward, the controls are
    ``-G^-1 (k_l + F t_{l-1}) = -P L^-T D^-1 (h_l + W t_{l-1})``: one triangular solve each
    way per front. The sweeps carry ``-k_l`` and ``-h_l``, so that every sum with a product
    is one ``addmm`` and no negation is left over.
    """
    sweep = SolveSweep(stages, rf.factors, rf.damping, g)
    sweep.backward()
    out, _, _ = sweep.forward()
    return out


class SolveSweep:
    """The two sweeps of :func:`riccati_solve` over a run of consecutive stages with their
    ``factors`` (all of a chain's, or a rank's in a stage pipeline, docs/algorithm.md section
    17).

    :meth:`backward` takes the linear term ``s`` entering from the stage after the last
    (``None`` at the chain's end) and returns the one leaving the first (``None`` at the
    root); :meth:`forward` takes the tangent ``t`` ``(B, h_in, k)`` and the delayed controls
    entering the first (``None`` at the root) and returns ``(blocks, t, delayed)``, the
    solution's blocks and what leaves the last.
    """

    def __init__(
        self,
        stages: Sequence[StageDerivatives],
        factors: Sequence[StageFactor],
        damping: float,
        g: Sequence[torch.Tensor],
    ):
        self.stages, self.factors, self.eps, self.g = stages, factors, damping, g
        self.k = g[0].shape[1]
        self.closed = [f.complement.closed for f in factors]
        self.terms = by_class(stages, _rhs_terms, self.closed, list(g))
        self.hn: list[torch.Tensor] = [None] * len(stages)  # type: ignore[list-item]

    def backward(self, s: torch.Tensor | None = None) -> torch.Tensor | None:
        """The linear term ``s`` over ``(t_l, delayed)``, last stage first."""
        stages, k, eps, g = self.stages, self.k, self.eps, self.g
        for l in range(len(stages) - 1, -1, -1):
            d, f, term = stages[l], self.factors[l], self.terms[l]
            B, h_out = d.batch, d.out_size
            n_t = B * h_out
            m = term.Y_T_g  # m = -k: the negated right-hand side of the front
            acc = None  # Dz^T s_t (+ the closed-form complement's coupling)
            if s is not None:
                s_t = s[:n_t].reshape(B, h_out, k)
                if d.has_input:
                    s_x, s_z = d.DxY_T_Dz_T(s_t)
                    acc = s_z.reshape(-1, k)
                else:  # the first stage has no Dz
                    s_x = d.DxY_T(s_t)
                m = m - s_x
            n_w = f.complement.n_front
            if n_w or f.n_delayed_in:
                parts = [m] + ([f.complement.front_rhs(g[l])] if n_w else [])
                m = torch.cat(parts + ([-s[n_t:]] if f.n_delayed_in else []), dim=0)
            self.hn[l] = f.front.half(m)  # -h
            if not d.has_input:
                return None
            if term.coupling_T is not None:
                coupling = term.coupling_T.reshape(-1, k) / eps
                acc = coupling if acc is None else acc + coupling
            if acc is None:
                acc = m.new_zeros(B * d.in_size, k)
            st = f.front.add_update_T(acc, self.hn[l])  # acc - F^T G^-1 k
            s = (
                st
                if f.front.n_rejected == 0
                else torch.cat([st, f.front.rejected(m).neg_()], dim=0)
            )
        return s

    def forward(
        self, t: torch.Tensor | None = None, delayed: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """The controls, first stage first (after :meth:`backward`)."""
        stages, k, hn = self.stages, self.k, self.hn
        L = len(stages)
        alpha: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        t_prev: list[torch.Tensor | None] = [None] * L
        split: dict[int, torch.Tensor] = {}  # coupled complement coordinates w (split mode)
        if delayed is None:
            delayed = self.g[0].new_zeros(0, k)
        for l in range(L):
            d, f = stages[l], self.factors[l]
            # -(h + W t) in one product; the controls -G^-1 (k + F t) = finish(-(h + W t))
            x = (
                hn[l]
                if t is None
                else torch.addmm(hn[l], f.front.F_half, t.reshape(-1, k), alpha=-1)
            )
            c = f.front.combine(f.front.finish(x), delayed)
            N, n_w = f.n_alpha, f.complement.n_front
            alpha[l], delayed = c[:N], c[N + n_w :]
            if n_w:
                split[l] = c[N : N + n_w]
            t_prev[l] = t
            t = d.DxY(alpha[l]) if t is None else d.DxY_Dz(alpha[l], t)
        out = by_class(stages, _controls, self.closed, alpha, t_prev, self.terms, self.eps)
        for l, w in split.items():  # tiny eps: coupled directions in the front, null ones closed
            out[l] = self.factors[l].complement.solution(out[l], w, self.g[l])
        return out, t, delayed
