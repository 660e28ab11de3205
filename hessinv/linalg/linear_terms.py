"""The factorization and solve hooks of ``Linear`` stages (docs/algorithm.md sections 8, 13):
front terms, right-hand side terms and controls batched over the stages of one shape."""

from __future__ import annotations

import torch

from hessinv.derivatives.linear import linear_front_terms
from hessinv.derivatives.linear.kernels import shape_groups, stack
from hessinv.linalg.stage_terms import RhsTerms, StageTerms

__all__ = ["LinearTerms"]


def _key(d, closed: bool) -> tuple:
    coupled = closed and d.complement.coupled_dim > 0
    return (
        d.out_size,
        d.m,
        d.r,
        d.weight_selected,
        d.bias_selected,
        d.batch,
        d.in_size,
        d.Q is not None,
        closed,
        coupled,
    )


def _groups(stages, closed) -> list[list[int]]:
    return shape_groups(stages, [_key(d, c) for d, c in zip(stages, closed, strict=True)])


class LinearTerms(StageTerms):
    """The hooks for :class:`~hessinv.derivatives.LinearDerivatives`."""

    front_terms = staticmethod(linear_front_terms)

    @staticmethod
    def rhs_terms(stages, closed, g):
        """Batched over the stages of one shape: with ``M`` the stacked matrix forms of the
        ``g`` blocks and ``Q`` the stacked bases, ``Y^T g = Q^T M``, ``(I - Y Y^T) g = M - Q Q^T M``
        (kept in matrix form) and ``E^T (I - Y Y^T) g = gamma (M - Q Q^T M)_W`` (the weight
        columns): a few batched products per shape instead of a dozen small ones per stage."""
        out: list[RhsTerms] = [None] * len(stages)  # type: ignore[list-item]
        for idx in _groups(stages, closed):
            d = stages[idx[0]]
            M = d.to_matrix(stack([g[i] for i in idx]))  # (ng, h_out, m, k)
            ng, k = len(idx), M.shape[-1]
            P = coupling_T = None
            if d.Q is None:
                A = M
            else:
                Qs = stack([stages[i].Q for i in idx])  # (ng, m, r)
                A = torch.einsum("gmr,gomk->gork", Qs, M)
                if closed[idx[0]]:
                    P = M - torch.einsum("gmr,gork->gomk", Qs, A)
                    if d.complement.coupled_dim:
                        gammas = stack([stages[i].gamma for i in idx])  # (ng, B, h_out)
                        coupling_T = torch.einsum(
                            "gbo,gomk->gbmk", gammas, P[:, :, : d.n_weight_cols]
                        )
            Y_T_g = A.reshape(ng, d.basis_size, k)
            for j, i in enumerate(idx):
                out[i] = RhsTerms(
                    Y_T_g[j],
                    None if P is None else P[j],
                    None if coupling_T is None else coupling_T[j],
                )
        return out

    @staticmethod
    def controls(stages, closed, alpha, t_prev, terms, damping):
        """Batched over the stages of one shape, in matrix form: ``V = Q A`` with ``A`` the
        stacked ``alpha``; for a closed complement, with ``X = E t_prev`` and
        ``P = (I - Y Y^T) g``, ``V = Q (A + Q^T X / eps) + (P - X) / eps``, which is
        ``Q A + (P - (I - Q Q^T) X) / eps``."""
        out: list[torch.Tensor] = [None] * len(stages)  # type: ignore[list-item]
        for idx in _groups(stages, closed):
            d = stages[idx[0]]
            ng, k = len(idx), alpha[idx[0]].shape[-1]
            A = stack([alpha[i] for i in idx]).reshape(ng, d.out_size, d.r, k)
            if d.Q is None:
                V = A
            else:
                Qs = stack([stages[i].Q for i in idx])
                P = stack([terms[i].projected for i in idx]) if closed[idx[0]] else None
                if P is not None and d.complement.coupled_dim and d.has_input:
                    gammas = stack([stages[i].gamma for i in idx])
                    ts = stack([t_prev[i] for i in idx])  # (ng, B, h_in, k)
                    X = torch.einsum("gbo,gbik->goik", gammas, ts)
                    pad = d.m - d.n_weight_cols
                    if pad:
                        X = torch.cat([X, X.new_zeros(ng, d.out_size, pad, k)], dim=2)
                    A = A + torch.einsum("gmr,gomk->gork", Qs, X) / damping
                    P = P - X
                V = torch.einsum("gmr,gork->gomk", Qs, A)
                if P is not None:
                    V = V + P / damping
            v = d.from_matrix(V)
            for j, i in enumerate(idx):
                out[i] = v[j]
        return out
