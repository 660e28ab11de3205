"""Loss heads: the loss as a sum of per-sample terms of the model outputs (docs/algorithm.md section 2).

The loss ``L(o)`` of the model outputs ``o`` (``(B, K)`` flattened per sample) must be a
sum of per-sample terms, so its Hessian in ``o`` is block-diagonal: ``K x K`` blocks
``S_i``. A :class:`LossHead` holds ``L``, ``dL/do`` (``(B, K)``, the adjoint that starts
the backward pass) and the blocks ``S`` (``(B, K, K)``, the curvature that starts the
stage-wise recursions: ``V_L = R_L = blockdiag(S_i)``).

Closed forms exist for ``CrossEntropyLoss`` (class-index targets, with ``weight``,
``ignore_index`` and ``label_smoothing``) and ``MSELoss``; any other loss goes through
``torch.func`` with ``K`` Hessian-vector products and a numerical check that it really
is separable over samples.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import grad, vjp, vmap

__all__ = ["LossHead", "loss_head"]


class LossHead(NamedTuple):
    """``value`` (0-d), ``grad`` ``(B, K)`` and per-sample Hessian blocks ``hess`` ``(B, K, K)``."""

    value: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor


def _cross_entropy(loss_fn: nn.CrossEntropyLoss, o: torch.Tensor, targets) -> LossHead | None:
    """``-sum_i w_i log softmax(o_i)[y_i]`` (mean: divided by ``sum_i w_i``), closed form.

    With label smoothing ``s`` the target distribution is ``q_i = (1-s) e_{y_i} + s/K``;
    the gradient is ``w_i (p_i - q_i) / W`` and the block ``w_i (diag p_i - p_i p_i^T) / W``
    (``q_i`` sums to one).
    """
    smoothing = float(loss_fn.label_smoothing)
    weight = loss_fn.weight
    if not (
        loss_fn.reduction in ("mean", "sum")
        and o.dim() == 2
        and isinstance(targets, torch.Tensor)
        and targets.dtype == torch.long
        and targets.shape == o.shape[:1]
        and (weight is None or smoothing == 0.0)
    ):
        return None
    B, K = o.shape
    keep = targets != loss_fn.ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    if bool(((safe < 0) | (safe >= K)).any()):
        return None  # let torch report the bad class index
    w = keep.to(o.dtype)
    if weight is not None:
        w = w * weight.to(o.dtype)[safe]
    total = w.sum() if loss_fn.reduction == "mean" else o.new_ones(())
    scale = w / total  # per-sample factor; NaN when every target is ignored (as torch does)
    logp = torch.log_softmax(o, dim=1)
    p = logp.exp()
    q = torch.nn.functional.one_hot(safe, K).to(o.dtype)
    if smoothing:
        q = (1 - smoothing) * q + smoothing / K
    value = -(scale[:, None] * q * logp).sum()
    g = scale[:, None] * (p - q)
    S = scale[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    return LossHead(value, g, S)


def _mse(loss_fn: nn.MSELoss, o: torch.Tensor, targets) -> LossHead | None:
    if not (
        loss_fn.reduction in ("mean", "sum")
        and isinstance(targets, torch.Tensor)
        and targets.shape == o.shape
        and targets.dtype == o.dtype
    ):
        return None
    B = o.shape[0]
    scale = 1.0 / o.numel() if loss_fn.reduction == "mean" else 1.0
    r = (o - targets).reshape(B, -1)
    K = r.shape[1]
    eye = torch.eye(K, dtype=o.dtype, device=o.device)
    return LossHead((r * r).sum() * scale, 2 * scale * r, (2 * scale * eye).expand(B, K, K).clone())


def _analytic(loss_fn, outputs, targets) -> LossHead | None:
    if type(loss_fn) is nn.CrossEntropyLoss:
        return _cross_entropy(loss_fn, outputs, targets)
    if type(loss_fn) is nn.MSELoss:
        return _mse(loss_fn, outputs, targets)
    return None


def _probe_rng(device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(20260123)
    return gen


def _generic(loss_fn, outputs: torch.Tensor, targets) -> LossHead:
    """Gradient and Hessian blocks of any loss that is separable over samples, by ``torch.func``.

    The blocks come from ``K`` Hessian-vector products with the probes ``1_B (x) e_j``:
    for a block-diagonal Hessian the product with that probe is column ``j`` of every
    block at once. A product with a random ``r`` then checks block-diagonality. The
    tolerance of that check is relative to the rounding the product itself suffers,
    measured by its linearity defect ``|Hr + Hr' - H(r + r')|`` (zero in exact arithmetic),
    so that tiny curvature (a confident classifier) is not mistaken for coupling.
    """
    B = outputs.shape[0]
    shape = outputs.shape

    def f(o_flat):
        value = loss_fn(o_flat.reshape(shape), targets)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(
                "loss_fn(outputs, targets) must return a scalar tensor, got "
                f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}; "
                "use reduction='mean' or 'sum'"
            )
        return value.reshape(())

    o = outputs.detach().reshape(B, -1)
    K = o.shape[1]
    value = f(o)
    g, hvp = vjp(grad(f), o)  # the Hessian is symmetric: its vjp is the product with it
    probes = torch.eye(K, dtype=o.dtype, device=o.device)[:, None, :].expand(K, B, K)
    (cols,) = vmap(hvp)(probes)  # (K_j, B, K)
    S = cols.permute(1, 2, 0).contiguous()  # S[i, :, j] = cols[j, i, :]
    gen = _probe_rng(o.device)
    r1 = torch.randn(B, K, dtype=o.dtype, device=o.device, generator=gen)
    r2 = torch.randn(B, K, dtype=o.dtype, device=o.device, generator=gen)
    (h1,), (h2,), (h12,) = hvp(r1), hvp(r2), hvp(r1 + r2)
    blockwise = torch.einsum("bkl,bl->bk", S, r1)
    noise = (h1 + h2 - h12).abs().max()
    u = torch.finfo(o.dtype).eps
    tol = 1e3 * u * (h1.abs().max() + blockwise.abs().max() + g.abs().max()) + 1e2 * noise
    if (h1 - blockwise).abs().max() > tol:
        raise ValueError(
            "the loss couples the samples of the batch (its Hessian in the outputs is not "
            "block-diagonal over samples); hessinv needs a loss that is a sum of per-sample "
            "terms, such as a mean or sum reduction"
        )
    return LossHead(value.detach(), g, S)


def loss_head(loss_fn, outputs: torch.Tensor, targets, oracle: str = "auto") -> LossHead:
    """Value, gradient ``(B, K)`` and Hessian blocks ``(B, K, K)`` of ``loss_fn`` at ``outputs``.

    ``oracle``: ``"auto"`` (closed form where it exists), ``"analytic"`` (closed form or
    an error) or ``"generic"`` (``torch.func``). Raises ``ValueError`` when the loss is not
    a scalar, couples samples, or is not finite.

    >>> import torch
    >>> from torch import nn
    >>> o, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    >>> a = loss_head(nn.CrossEntropyLoss(label_smoothing=0.1), o, y)
    >>> b = loss_head(nn.CrossEntropyLoss(label_smoothing=0.1), o, y, oracle="generic")
    >>> all(torch.allclose(s, t, atol=1e-14) for s, t in zip(a, b))
    True
    """
    if oracle not in ("auto", "generic", "analytic"):
        raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
    outputs = outputs.detach()
    head = None if oracle == "generic" else _analytic(loss_fn, outputs, targets)
    if head is None:
        if oracle == "analytic":
            raise ValueError(
                f"no closed form for loss {type(loss_fn).__name__} with these targets; closed "
                "forms cover CrossEntropyLoss (class-index targets; weight or label smoothing) "
                "and MSELoss (same-shape targets), reduction 'mean' or 'sum'; use oracle='auto'"
            )
        head = _generic(loss_fn, outputs, targets)
    if not bool(torch.isfinite(head.value)):
        raise ValueError(
            f"the loss is {float(head.value)} (NaN or Inf) at these parameters and data "
            "(for example every target equal to ignore_index, or the log of a negative "
            "output); its Hessian is not defined"
        )
    if not (bool(torch.isfinite(head.grad).all()) and bool(torch.isfinite(head.hess).all())):
        raise ValueError("the gradient or Hessian of the loss in the outputs contains NaN or Inf")
    return head
