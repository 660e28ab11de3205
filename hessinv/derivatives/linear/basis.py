"""The parts of a ``Linear`` stage's front that do not depend on the state, in the basis
``Y = I (x) Q`` (docs/algorithm.md sections 5, 8, 13), for many stages of one shape at once.

They are derivative quantities (``Y^T Dxx Y``, ``Y^T Dzx``, ``Dzz``), so they live with the
derivatives; the Riccati factorization takes them through its hooks
(:mod:`hessinv.linalg.linear_terms`).
"""

from __future__ import annotations

import torch

from hessinv.derivatives.base import FrontTerms
from hessinv.derivatives.linear.kernels import shape_groups, stack

__all__ = ["linear_front_terms"]


def _front_key(d) -> tuple:
    return (d.out_size, d.m, d.r, d.weight_selected, d.batch, d.in_size, d.Q is not None)


def linear_front_terms(stages) -> list[FrontTerms]:
    """Batched over the stages of one shape, with ``g`` indexing them:
    ``Y^T Dxx Y = blockdiag_o(Zr^T diag(beta[:, o]) Zr)``,
    ``(Y^T Dzx)[(o, r), (b, i)] = beta[b, o] W[o, i] Zr[b, r] + gamma[b, o] Q[i, r]``
    (the second term for a selected weight) and ``Dzz_b = W^T diag(beta[b]) W``."""
    out: list = [None] * len(stages)
    for idx in shape_groups(stages, [_front_key(d) for d in stages]):
        group = [stages[i] for i in idx]
        d0 = group[0]
        ng, B, h_out, r, h_in = len(idx), d0.batch, d0.out_size, d0.r, d0.in_size
        N = h_out * r
        Zr, beta = stack([d.Zr for d in group]), stack([d.beta for d in group])
        blocks = torch.einsum("gbr,gbo,gbs->gors", Zr, beta, Zr)
        Dxx = blocks.new_zeros(ng, h_out, r, h_out, r)
        torch.diagonal(Dxx, dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        Dxx = Dxx.view(ng, N, N)
        Dzx = Dzz = [None] * ng
        if d0.has_input:
            W = stack([d.W for d in group])
            Dzx = torch.einsum("gbo,goi,gbr->gorbi", beta, W, Zr)
            if d0.weight_selected:
                Qh = (
                    stack([d.Q for d in group])[:, :h_in]
                    if d0.Q is not None
                    else torch.eye(d0.m, dtype=d0.dtype, device=d0.device)[:h_in].expand(
                        ng, h_in, d0.m
                    )
                )
                gamma = stack([d.gamma for d in group])
                Dzx = Dzx + torch.einsum("gbo,gir->gorbi", gamma, Qh)
            Dzx = Dzx.reshape(ng, N, B * h_in)
            Dzz = torch.einsum("goi,gbo,goj->gbij", W, beta, W)
        for j, i in enumerate(idx):
            out[i] = FrontTerms(Dxx[j], Dzx[j], Dzz[j])
    return out
