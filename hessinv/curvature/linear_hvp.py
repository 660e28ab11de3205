"""The Hessian-vector product hooks of ``Linear`` stages (docs/algorithm.md sections 3, 8, 13).

With ``V_W``, ``v_b`` the weight and bias parts of ``v``: the pre-activation's tangent is
``P = P0 + W t_prev`` with ``P0 = Z V_W^T + 1 v_b^T``, the stage's tangent ``t = s' * P``;
backward ``R = beta * P + s' * u``, ``u_prev = W^T R + E^T V_W`` and
``Hv = (Z^T R + E t_prev, sum_i R_i)``. ``P0``, ``E^T V_W`` and ``Hv`` do not depend on the
recursions: batched over the stages of one shape (``prepare``, ``finish``); the sweeps keep
two products and a few elementwise operations per stage.
"""

from __future__ import annotations

import torch

from hessinv.curvature.hvp_hooks import HvpHooks
from hessinv.derivatives.linear.kernels import (
    apply_rows,
    bmm,
    bmm_k,
    gather_rows,
    left,
    left_add,
    shape_groups,
    stack,
)
from hessinv.settings import MANY_COLUMNS

__all__ = ["LinearHvp"]


def _groups(stages) -> list[list[int]]:
    return shape_groups(
        stages,
        [(d.out_size, d.m, d.weight_selected, d.bias_selected, d.batch, d.in_size) for d in stages],
    )


def _prepare_one(d, v: torch.Tensor):
    """:meth:`LinearHvp.prepare` for one stage, with plain matrix products (many columns)."""
    k, h, nw = v.shape[-1], d.out_size, d.n_weight_cols
    P0 = EV = None
    if d.weight_selected:
        VW = v[: h * nw].reshape(h, nw, k)
        P0 = apply_rows(d.Zt[:, :nw], VW)  # (B, h_out, k)
        if d.has_input:
            EV = (d.gamma @ VW.reshape(h, nw * k)).reshape(d.batch, nw, k)
    if d.bias_selected:
        vb = v[h * nw :]  # (h_out, k)
        P0 = vb.expand(d.batch, h, k) if P0 is None else P0 + vb
    return P0, EV


def _finish_one(d, t_prev: torch.Tensor | None, R: torch.Tensor) -> torch.Tensor:
    """:meth:`LinearHvp.finish` for one stage, with plain matrix products (many columns)."""
    k, h, nw = R.shape[-1], d.out_size, d.n_weight_cols
    parts = []
    if d.weight_selected:
        HW = gather_rows(d.Zt[:, :nw], R)  # (h_out, nw, k)
        if d.has_input:
            HW = HW + (d.gamma.T @ t_prev.reshape(d.batch, nw * k)).reshape(h, nw, k)
        parts.append(HW.reshape(h * nw, k))
    if d.bias_selected:
        parts.append(R.sum(0))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class LinearHvp(HvpHooks):
    """The hooks for :class:`~hessinv.derivatives.LinearDerivatives`."""

    @staticmethod
    def prepare(stages, v):
        """``(P0, E^T V_W)`` per stage (``None`` for the second without a stage input or
        weight columns): ``P0 = Z V_W^T + 1 v_b^T`` ``(B, h_out, k)`` and ``gamma V_W``
        ``(B, h_in, k)``, one batched product each per shape; the weight and bias parts of
        ``v`` are used as views."""
        if v and v[0].shape[-1] >= MANY_COLUMNS:  # the arithmetic dominates: stage by stage
            return [_prepare_one(d, vl) for d, vl in zip(stages, v, strict=True)]
        out: list = [None] * len(stages)
        for idx in _groups(stages):
            d = stages[idx[0]]
            V = stack([v[i] for i in idx])  # (ng, p, k)
            ng, k, h, nw = V.shape[0], V.shape[-1], d.out_size, d.n_weight_cols
            P0 = EV = None
            if d.weight_selected:
                VW = V[:, : h * nw].reshape(ng, h, nw, k)
                Z = stack([stages[i].Zt for i in idx])[:, :, :nw]
                P0 = bmm_k(Z, VW.transpose(1, 2))  # (ng, B, h_out, k)
                if d.has_input:
                    gammas = stack([stages[i].gamma for i in idx])
                    EV = bmm_k(gammas, VW)  # (ng, B, h_in, k)
            if d.bias_selected:
                vb = V[:, h * nw :][:, None]  # (ng, 1, h_out, k)
                P0 = vb.expand(ng, d.batch, h, k) if P0 is None else P0 + vb
            for j, i in enumerate(idx):
                out[i] = (P0[j], None if EV is None else EV[j])
        return out

    @staticmethod
    def tangent(d, v, t_prev):
        """``t = s' * P`` with ``P = P0 + W t_prev`` (one ``addmm``); ``P`` is the cache."""
        P0, _ = v
        P = P0 if t_prev is None else left_add(P0, d.W, t_prev, d.WT)
        return d.s1_col * P, P

    @staticmethod
    def adjoint(d, v, t_prev, u, cache):
        """``R = beta * P + s' * u`` (the partial) and ``u_prev = W^T R + E^T V_W``."""
        R = torch.addcmul(d.beta_col * cache, d.s1_col, u)
        if t_prev is None:
            return R, None
        return R, (left(d.WT, R, d.W) if v[1] is None else left_add(v[1], d.WT, R, d.W))

    @staticmethod
    def finish(stages, v, t_prev, partial):
        """``Hv = (Z^T R + E t_prev, sum_i R_i)`` (weight and bias parts): batched per shape."""
        if partial and partial[0].shape[-1] >= MANY_COLUMNS:
            return [_finish_one(d, t, R) for d, t, R in zip(stages, t_prev, partial, strict=True)]
        out: list[torch.Tensor] = [None] * len(stages)  # type: ignore[list-item]
        for idx in _groups(stages):
            d = stages[idx[0]]
            R = stack([partial[i] for i in idx])  # (ng, B, h_out, k)
            ng, k, h, nw = R.shape[0], R.shape[-1], d.out_size, d.n_weight_cols
            parts = []
            if d.weight_selected:
                Z = stack([stages[i].Zt for i in idx])[:, :, :nw]
                if k == 1:  # (ng, h_out, nw, k): sum over the samples of R_i Z_i^T
                    HW = bmm(R[..., 0].transpose(1, 2), Z)[..., None]
                else:
                    HW = torch.einsum("gbok,gbm->gomk", R, Z)
                if d.has_input:  # E t_prev: the gamma term of Dzx on the weight columns
                    gammas = stack([stages[i].gamma for i in idx])
                    T = stack([t_prev[i] for i in idx])  # (ng, B, h_in, k)
                    HW = HW + bmm_k(gammas.transpose(1, 2), T)
                parts.append(HW.reshape(ng, h * nw, k))
            if d.bias_selected:
                parts.append(R.sum(1))
            hv = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            for j, i in enumerate(idx):
                out[i] = hv[j]
        return out
