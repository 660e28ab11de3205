"""The directions of a ``Linear`` stage outside its basis ``Y = I (x) Q`` (docs/algorithm.md
section 8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hessinv.derivatives.base import Complement
from hessinv.derivatives.linear.kernels import left, ranks, stack
from hessinv.derivatives.linear.operators import LinearDerivatives

__all__ = ["LinearComplement", "linear_complements"]


class LinearComplement(Complement):
    """The directions of a :class:`LinearDerivatives` stage outside ``Y = I (x) Q`` (section 8).

    ``E = Gamma^T (x) Pi`` with ``Gamma = gamma`` (``B x h_out``) and ``Pi`` the input
    columns of the ``m`` columns, so ``E^T (I - Y Y^T) E = Gamma Gamma^T (x) (I - Qh Qh^T)``
    (``Qh`` the input rows of ``Q``). The coupled directions are ``U_Gamma (x) P_c`` with
    ``U_Gamma`` an orthonormal basis of ``range(Gamma^T)`` and ``P_c`` one of
    ``range((I - Q Q^T) Pi)``; the rest are null vectors of ``H``.
    """

    def __init__(self, stage: LinearDerivatives, gamma_svd, projector):
        """``gamma_svd``: ``(sv, Vh, rank)`` of ``stage.gamma``; ``projector``: ``(P, Pc,
        mu_max)`` of ``A = (I - Q Q^T) Pi`` (both from :func:`linear_complements`)."""
        self.stage = stage
        Q, h_out, m, r = stage.Q, stage.out_size, stage.m, stage.r
        self.dim = h_out * (m - r)
        if stage.n_weight_cols and stage.has_input and stage.second_order:
            sg, vgh, rho = gamma_svd
            self.U_gamma = vgh[:rho].T.contiguous()  # (h_out, rho)
            self._sigma_max = sg[0] if rho else sg.new_zeros(())  # read when first needed
            self.P, self.Pc, self._mu_max = projector
        else:  # no weight columns, no stage input, or the Gauss-Newton matrix: E = 0
            self.U_gamma = Q.new_zeros(h_out, 0)
            self.P = None
            self.Pc = Q.new_zeros(m, 0)
            self._sigma_max = self._mu_max = Q.new_zeros(())
        self.coupled_dim = self.U_gamma.shape[1] * self.Pc.shape[1]

    def project(self, v):
        s = self.stage
        M = s.to_matrix(v)
        return s.from_matrix(self._project_matrix(M))

    def _project_matrix(self, M):
        Q = self.stage.Q
        return M - left(Q, left(Q.T, M))

    def coupling(self, t):
        s = self.stage
        if self.coupled_dim == 0:
            return t.new_zeros(s.num_params, t.shape[-1])
        return s.from_matrix(self._project_matrix(s.E(t)))

    def coupling_T(self, v):
        s = self.stage
        if self.coupled_dim == 0:
            return v.new_zeros(s.batch, s.in_size, v.shape[-1])
        return s.E_T(self._project_matrix(s.to_matrix(v)))

    def coupling_T_of_projected(self, pv):
        s = self.stage
        if self.coupled_dim == 0:
            return pv.new_zeros(s.batch, s.in_size, pv.shape[-1])
        return s.E_T(s.to_matrix(pv))

    def gram(self):
        s = self.stage
        a_in = s.batch * s.in_size
        if self.coupled_dim == 0:
            return s.Zt.new_zeros(a_in, a_in)
        ng = torch.einsum("bo,co,ij->bicj", s.gamma, s.gamma, self.P)
        return ng.reshape(a_in, a_in)

    def subtract_gram_(self, Q, scale):
        """``E^T (I - Y Y^T) E = (gamma gamma^T) (x) P``: subtracted in one pass over ``Q``,
        without forming it."""
        s = self.stage
        if self.coupled_dim == 0:
            return Q
        B, h = s.batch, s.in_size
        GG = s.gamma @ s.gamma.T  # (B, B)
        Q.view(B, h, B, h).addcmul_(GG[:, None, :, None], self.P[None, :, None, :], value=-scale)
        return Q

    def coupling_norm(self):
        return self._sigma_max * self._mu_max.sqrt()

    def coupled_T(self, v):
        M = self.stage.to_matrix(v)
        return torch.einsum("oa,omk,mc->ack", self.U_gamma, M, self.Pc).reshape(
            self.coupled_dim, v.shape[-1]
        )

    def coupled(self, w):
        W = w.reshape(self.U_gamma.shape[1], self.Pc.shape[1], w.shape[-1])
        return self.stage.from_matrix(torch.einsum("oa,ack,mc->omk", self.U_gamma, W, self.Pc))

    def coupled_F(self):
        s = self.stage
        GU = s.gamma @ self.U_gamma  # (B, rho)
        F = torch.einsum("ba,ic->acbi", GU, self.Pc[: s.n_weight_cols])
        return F.reshape(self.coupled_dim, s.batch * s.in_size)


def linear_complements(stages: Sequence[LinearDerivatives]) -> list[LinearComplement]:
    """Build (and attach) the complements of compressed stages (``Q`` set), many at once: one
    batched SVD of the stacked ``gamma`` per shape, whose ranks are read in one transfer."""
    svds: list = [None] * len(stages)
    projectors: list = [None] * len(stages)
    groups: dict[tuple, list[int]] = {}
    bases: dict[tuple, list[int]] = {}
    for i, s in enumerate(stages):
        if s.Q is None:
            raise ValueError("only a compressed stage (rank Zt < m) has a complement")
        if s.n_weight_cols and s.has_input and s.second_order:  # else gamma = 0: E = 0
            groups.setdefault(tuple(s.gamma.shape), []).append(i)
            bases.setdefault((s.m, s.r, s.n_weight_cols), []).append(i)
    for shape, idx in groups.items():
        _, sv, Vh = torch.linalg.svd(
            torch.stack([stages[i].gamma for i in idx]), full_matrices=False
        )
        rank = ranks(sv, shape).tolist() if sv.shape[1] else [0] * len(idx)
        for j, i in enumerate(idx):
            svds[i] = (sv[j], Vh[j], rank[j])
    for idx in bases.values():
        nw = stages[idx[0]].n_weight_cols
        for i, projector in zip(
            idx, _complement_projectors([stages[i].Q for i in idx], nw), strict=True
        ):
            projectors[i] = projector
    for s, svd, projector in zip(stages, svds, projectors, strict=True):
        s._complement = LinearComplement(s, svd, projector)
    return [s._complement for s in stages]


def _complement_projectors(Qs: list[torch.Tensor], nw: int) -> list[tuple]:
    """``(P, Pc, mu_max)`` for bases ``Q`` ``(m, r)`` of one shape, in batched calls.

    ``A = (I - Q Q^T) Pi`` ``(m, nw)`` (``Pi`` the first ``nw`` columns of ``I``) and
    ``P = A^T A = I - Qh Qh^T``. ``range(A)`` has dimension exactly ``m - r``: without a bias
    ``Pi = I`` and ``A`` is the projector onto the complement of ``span(Q)``; with one, every
    row of ``Zt`` ends in 1, so ``span(Q) + span(Pi) = R^m``. ``Pc`` is ``A``'s leading
    ``m - r`` left singular vectors (no rank tolerance involved), ``mu_max = ||A||^2``."""
    Q = stack(Qs)  # (ng, m, r)
    m, r = Q.shape[1:]
    Pi = torch.eye(m, nw, dtype=Q.dtype, device=Q.device)
    A = Pi - torch.bmm(Q, Q[:, :nw].transpose(1, 2))
    P = torch.bmm(A.transpose(1, 2), A)
    U, sv, _ = torch.linalg.svd(A, full_matrices=False)
    Pc = U[:, :, : m - r]
    mu_max = sv[:, 0] ** 2 if sv.shape[1] else sv.new_zeros(len(Qs))
    return [(P[j], Pc[j], mu_max[j]) for j in range(len(Qs))]
