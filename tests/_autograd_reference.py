"""A dense float64 reference for the Hessian, built without hessinv and without torch.func.

Reverse-over-reverse autograd: one ``torch.autograd.grad(..., create_graph=True)`` for
the gradient, then one more ``torch.autograd.grad`` for all rows of the Hessian at once
(``is_grads_batched=True``) or row by row (``batched=False``). ``torch.func`` is avoided
on purpose: its forward-over-reverse rules are wrong for some modules (LayerNorm, and
SiLU/Mish in places), and the library itself uses ``torch.func`` for its generic oracle,
so the reference must not share that code path.

Parameter selection follows ``hessinv.ChainHessian``: without ``params`` the parameters
with ``requires_grad=True``; with ``params`` (tensors or names) exactly those. The order
is always ``model.named_parameters()`` order (a tied parameter appears once, under its
first name). Every other parameter is a constant at its current value.

The error bounds at the bottom are what the tests derive their tolerances from.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call  # reparametrization only (no transform)

__all__ = [
    "UNIT_ROUNDOFF",
    "DenseReference",
    "selected_parameters",
    "autograd_hessian",
    "DenseGGN",
    "autograd_ggn",
    "head_condition",
    "evaluation_error_bound",
    "gradient_error_bound",
    "loss_error_bound",
    "accumulation_length",
    "backward_error",
]

UNIT_ROUNDOFF = torch.finfo(torch.float64).eps / 2  # u = 2^-53


class DenseReference(NamedTuple):
    """What :func:`autograd_hessian` returns (all float64, detached).

    names: selected parameter names in ``named_parameters()`` order.
    loss: 0-d loss. gradient: ``(n,)``. hessian: ``(n, n)``, symmetrized.
    asymmetry: ``||H_raw - H_raw^T||_F / ||H_raw||_F`` of the unsymmetrized rows (a
        check on the reference's own rounding). outputs: the model's outputs.
    batch: the batch size.
    kappa_curvature, kappa_residual: ``(B,)`` per-sample rounding amplification of the
        loss head (:func:`head_condition`).
    loss_scale, gradient_scale, hessian_scale: the magnitudes that rounding errors are
        relative to (see :func:`evaluation_error_bound`).
    accumulation: ``K``, the accumulation length of :func:`evaluation_error_bound`.
    """

    names: tuple[str, ...]
    loss: torch.Tensor
    gradient: torch.Tensor
    hessian: torch.Tensor
    asymmetry: float
    outputs: torch.Tensor
    batch: int
    kappa_curvature: torch.Tensor
    kappa_residual: torch.Tensor
    loss_scale: float
    gradient_scale: float
    hessian_scale: float
    accumulation: int

    @property
    def kappa(self) -> float:
        """The largest amplification of any sample (for reports)."""
        return float(torch.maximum(self.kappa_curvature, self.kappa_residual).max())


def selected_parameters(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """``[(name, parameter)]`` of the selected parameters, in ``named_parameters()`` order."""
    named = list(model.named_parameters())  # deduplicated: a tied parameter once
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad]
    every_name = dict(model.named_parameters(remove_duplicate=False))
    wanted = set()
    for item in params:
        if isinstance(item, str):
            if item not in every_name:
                raise KeyError(f"no parameter named {item!r}")
            wanted.add(id(every_name[item]))
        elif isinstance(item, torch.Tensor):
            wanted.add(id(item))
        else:
            raise TypeError(f"params entries must be names or tensors, got {type(item).__name__}")
    selected = [(n, p) for n, p in named if id(p) in wanted]
    if len(selected) != len(wanted):
        raise ValueError("some params are not parameters of the model")
    return selected


def _rows(f, wrt, m, create_graph=False):
    """``d f_j / d wrt`` for all ``j``: ``(f.numel(), sum wrt sizes)``, one batched backward."""
    k = f.numel()
    if k == 0 or not f.requires_grad:
        return torch.zeros(k, sum(w.numel() for w in wrt), dtype=torch.float64)
    eye = torch.eye(k, dtype=f.dtype).reshape(k, *f.shape)
    rows = torch.autograd.grad(
        f,
        wrt,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,
        create_graph=create_graph,
        materialize_grads=True,
    )
    return torch.cat([r.reshape(k, -1) for r in rows], dim=1)


def autograd_hessian(
    model, loss_fn, inputs, targets, params=None, *, batched=True
) -> DenseReference:
    """Loss, gradient and dense Hessian in the selected parameters, by double backward.

    ``batched=False`` takes the rows one ``torch.autograd.grad`` at a time (to check the
    batched path). Besides ``H`` it computes, for the error bounds only, the per-sample
    pieces of ``H``: the Gauss-Newton part ``J_i^T A_i J_i`` and the rest.
    """
    if isinstance(model, (list, tuple)):
        model = nn.Sequential(*model)
    selected = selected_parameters(model, params)
    if not selected:
        raise ValueError("no parameters selected")
    chosen = {id(p) for _, p in selected}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in selected}
    constants = {n: p.detach() for n, p in model.named_parameters() if id(p) not in chosen}
    # Private copies: a module that writes into its input must not touch the caller's data.
    x = inputs.detach().clone()
    t = targets.detach().clone() if isinstance(targets, torch.Tensor) else targets
    order = list(leaves.values())
    with torch.enable_grad():
        # functional_call ties aliases (tie_weights=True): a parameter held by two
        # submodules is replaced at both places by the one leaf.
        out = functional_call(model, {**constants, **leaves}, (x,))
        loss = loss_fn(out, t)
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, order, create_graph=True, materialize_grads=True)
        g = torch.cat([gi.reshape(-1) for gi in grads])
        n = g.numel()
        if batched:
            raw = _rows(g, order, n)
        else:
            raw = torch.zeros(n, n, dtype=g.dtype)
            for i in range(n):
                if g.requires_grad:
                    row = torch.autograd.grad(
                        g[i], order, retain_graph=True, materialize_grads=True
                    )
                    raw[i] = torch.cat([r.reshape(-1) for r in row])
        raw = raw.detach()

        # ---- per-sample pieces, for the error bounds (the model acts on samples independently)
        B = out.shape[0]
        m = out[0].numel()
        dout = torch.autograd.grad(loss, out, create_graph=True)[0]  # r_i = dL/dout_i
        J = _rows(out, order, m).detach().reshape(B, m, n)  # J_i = d out_i / d theta
        A_full = _rows(dout, [out], m).detach()  # d^2 L / d out^2, block-diagonal
        per_sample_grad = torch.einsum("bmn,bm->bn", J, dout.detach().reshape(B, m))
        kappa_c, kappa_r = head_condition(loss_fn, out.detach(), t, dout.detach())
        pieces = torch.zeros(B, 2, dtype=torch.float64)  # ||GN_i||_F, ||H_i - GN_i||_F
        for i in range(B):
            # H_i: the Hessian of L with the other samples' outputs held fixed
            keep = torch.zeros(B, dtype=torch.bool)
            keep[i] = True
            keep = keep.reshape(B, *([1] * (out.dim() - 1)))
            loss_i = loss_fn(torch.where(keep, out, out.detach()), t)
            g_i = torch.cat(
                [
                    q.reshape(-1)
                    for q in torch.autograd.grad(
                        loss_i, order, create_graph=True, materialize_grads=True
                    )
                ]
            )
            H_i = _rows(g_i, order, n).detach()
            A_i = A_full[i * m : (i + 1) * m, i * m : (i + 1) * m]
            GN_i = J[i].T @ A_i @ J[i]
            pieces[i, 0] = torch.linalg.matrix_norm(GN_i)
            pieces[i, 1] = torch.linalg.matrix_norm(H_i - GN_i)
    norm_2 = float(torch.linalg.matrix_norm(raw, 2)) if n else 0.0
    norm_f = float(torch.linalg.matrix_norm(raw))
    asym = float(torch.linalg.matrix_norm(raw - raw.T)) / norm_f if norm_f > 0 else 0.0
    # Cross-entropy: log-sum-exp loses up to u absolutely per sample (of total weight 1 for
    # mean, B for sum), however small the loss of a confident sample is. Other losses: the
    # loss is a sum of the residual terms, amplified like them.
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        loss_scale = abs(float(loss.detach())) + (float(B) if loss_fn.reduction == "sum" else 1.0)
    else:
        loss_scale = abs(float(loss.detach())) * float(kappa_r.max())
    return DenseReference(
        names=tuple(leaves),
        loss=loss.detach(),
        gradient=g.detach(),
        hessian=0.5 * (raw + raw.T),
        asymmetry=asym,
        outputs=out.detach(),
        batch=B,
        kappa_curvature=kappa_c,
        kappa_residual=kappa_r,
        loss_scale=loss_scale,
        gradient_scale=float((kappa_r * torch.linalg.vector_norm(per_sample_grad, dim=1)).sum()),
        hessian_scale=max(norm_2, float((kappa_c * pieces[:, 0] + kappa_r * pieces[:, 1]).sum())),
        # every parameter (selected or not) and every sample can enter one accumulated sum;
        # each module evaluates a function and its derivative (<= 2 more roundings each)
        accumulation=sum(p.numel() for p in model.parameters())
        + B
        + 2 * len(list(model.modules())),
    )


class DenseGGN(NamedTuple):
    """What :func:`autograd_ggn` returns: ``names``, ``ggn`` ``(n, n)`` and the bound
    ``error`` on ``||G_computed - G||_2`` for any float64 evaluation (``K u ||J||^2 ||A||``,
    the same accumulation length ``K`` as :func:`evaluation_error_bound`)."""

    names: tuple[str, ...]
    ggn: torch.Tensor
    error: float


def autograd_ggn(model, loss_fn, inputs, targets, params=None) -> DenseGGN:
    """The dense Gauss-Newton matrix ``J^T A J`` in the selected parameters, by autograd.

    ``J`` (``B m x n``) the Jacobian of the model outputs (rows by batched backward) and ``A``
    the Hessian of the loss in the outputs (double backward); no torch.func, no hessinv.
    """
    if isinstance(model, (list, tuple)):
        model = nn.Sequential(*model)
    selected = selected_parameters(model, params)
    chosen = {id(p) for _, p in selected}
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in selected}
    constants = {n: p.detach() for n, p in model.named_parameters() if id(p) not in chosen}
    x = inputs.detach().clone()
    t = targets.detach().clone() if isinstance(targets, torch.Tensor) else targets
    order = list(leaves.values())
    with torch.enable_grad():
        out = functional_call(model, {**constants, **leaves}, (x,))
        J = _rows(out, order, out.numel()).detach()
        o = out.detach().clone().requires_grad_(True)
        loss = loss_fn(o, t)
        dout = torch.autograd.grad(loss, o, create_graph=True)[0]
        A = _rows(dout, [o], o.numel()).detach()
    A = 0.5 * (A + A.T)
    G = J.T @ A @ J
    K = sum(p.numel() for p in model.parameters()) + out.shape[0] + 2 * len(list(model.modules()))
    norm_J = float(torch.linalg.matrix_norm(J, 2)) if J.numel() else 0.0
    norm_A = float(torch.linalg.matrix_norm(A, 2)) if A.numel() else 0.0
    return DenseGGN(tuple(leaves), 0.5 * (G + G.T), K * UNIT_ROUNDOFF * norm_J**2 * norm_A)


# ----------------------------------------------------------------------------- bounds


def head_condition(loss_fn, outputs: torch.Tensor, targets, residual: torch.Tensor):
    """``(kappa_curvature, kappa_residual)``, each ``(B,)``: rounding amplification by the head.

    The Hessian of sample ``i`` is ``J_i^T A_i J_i + sum_k r_ik d^2 out_ik`` with the head's
    curvature ``A_i`` and residual ``r_i = dL/dout_i``. Any float64 evaluation of ``A_i``
    and ``r_i`` makes errors of a fixed absolute size, so their *relative* errors grow
    when they are small:

    * softmax cross-entropy: entries of ``diag(p) - p p^T`` and of ``p - y`` lie in
      ``[-1, 1]`` (times the reduction weight ``w``) and carry absolute errors ``~ u w``;
      a confident sample has ``||A_i|| ~ w (1 - p_max)``, so
      ``kappa_curvature = 1 / (1 - p_max)``; ``kappa_residual = w / ||r_i||_inf``
      (``1 / (1 - p_max)`` without label smoothing, ``~ 1 / smoothing`` with it);
    * MSE: ``A_i`` is exact; ``r_i ~ out_i - y_i`` is a difference with absolute error
      ``u max(|out_i|, |y_i|)``, so ``kappa_residual = max(|out|, |y|)_i / |out_i - y_i|_inf``;
    * any other loss: 1.

    Each is capped at ``1 / u``: a computed term is never off by more than itself.
    """
    B = outputs.shape[0]
    one = torch.ones(B, dtype=torch.float64)
    cap = 1.0 / UNIT_ROUNDOFF
    r = residual.reshape(B, -1).abs().amax(dim=1)
    if isinstance(loss_fn, nn.CrossEntropyLoss) and outputs.dim() >= 2:
        logits = outputs.movedim(1, -1).reshape(B, -1, outputs.shape[1])
        p = torch.softmax(logits, dim=-1)
        top = p.argmax(dim=-1, keepdim=True)
        rest = p.scatter(-1, top, 0.0).sum(-1)  # 1 - p_max without cancellation
        kappa_c = (1.0 / rest.clamp_min(1.0 / cap)).amax(dim=-1)
        w = 1.0 / B if loss_fn.reduction == "mean" else 1.0
        kappa_r = w / r.clamp_min(w / cap)
        return kappa_c.clamp(1.0, cap), kappa_r.clamp(1.0, cap)
    if isinstance(loss_fn, nn.MSELoss) and isinstance(targets, torch.Tensor):
        o, y = outputs.reshape(B, -1), targets.reshape(B, -1).to(outputs.dtype)
        size = torch.maximum(o.abs(), y.abs()).amax(dim=1)
        diff = (o - y).abs().amax(dim=1)
        kappa_r = size / diff.clamp_min(size / cap).clamp_min(1e-300)
        return one, kappa_r.clamp(1.0, cap)
    return one, one.clone()


def evaluation_error_bound(ref: DenseReference) -> float:
    """``delta_abs``: bound on ``||H_computed - H||_2`` for any float64 evaluation of ``H``.

    Every entry of ``H`` (in the reference or in the library) is a sum of products built
    through the whole network; take ``K`` = (all parameters of the model, selected or
    not) + ``B`` + 2 per module (a function and a derivative evaluated) as the length of
    the longest chain of roundings; the standard bound for such sums is
    ``gamma_K ~ K u`` relative to the magnitudes summed, and the
    loss head multiplies the relative error of sample ``i`` by ``kappa_i``
    (:func:`head_condition`). So ``delta_abs = K u * hessian_scale`` with
    ``hessian_scale = max(||H||, sum_i kappa_curvature_i ||GN_i||_F + kappa_residual_i
    ||H_i - GN_i||_F)`` over the per-sample Hessians ``H_i`` and their Gauss-Newton parts
    ``GN_i = J_i^T A_i J_i``. (A deterministic worst-case bound; typical errors are
    ``sqrt(K) u``.) The loss and the gradient: :func:`loss_error_bound`,
    :func:`gradient_error_bound`.
    """
    return accumulation_length(ref) * UNIT_ROUNDOFF * ref.hessian_scale


def gradient_error_bound(ref: DenseReference) -> float:
    """``K u sum_i kappa_residual_i ||g_i||``: the gradient is the sum of the ``g_i = J_i^T
    r_i``."""
    return accumulation_length(ref) * UNIT_ROUNDOFF * ref.gradient_scale


def loss_error_bound(ref: DenseReference) -> float:
    """``K u (|L| + W)``, ``W`` the cross-entropy sample weight (log-sum-exp's absolute error)."""
    return accumulation_length(ref) * UNIT_ROUNDOFF * ref.loss_scale


def accumulation_length(ref: DenseReference) -> int:
    """``K``: see :func:`evaluation_error_bound`."""
    return ref.accumulation


def backward_error(
    M: torch.Tensor, x: torch.Tensor, g: torch.Tensor, norm_M: float | None = None
) -> float:
    """``max_j ||M x_j - g_j|| / (||M||_2 ||x_j|| + ||g_j||)`` (2-norms), the contract's
    definition."""
    if x.dim() == 1:
        x, g = x[:, None], g[:, None]
    if norm_M is None:
        norm_M = float(torch.linalg.matrix_norm(M, ord=2))
    r = torch.linalg.vector_norm(M @ x - g, dim=0)
    den = norm_M * torch.linalg.vector_norm(x, dim=0) + torch.linalg.vector_norm(g, dim=0)
    ratios = torch.where(den > 0, r / den.clamp_min(1e-300), torch.zeros_like(r))
    out = float(ratios.max())
    return out if math.isfinite(out) else float("inf")
