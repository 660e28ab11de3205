"""Loss heads: the loss as a sum of per-sample terms of the model outputs (docs/algorithm.md
section 2).

The loss ``L(o)`` of the model outputs ``o`` (``(B, K)`` flattened per sample) must be a
sum of per-sample terms, so its Hessian in ``o`` is block-diagonal: ``K x K`` blocks
``S_i``. A :class:`LossHead` holds ``L``, ``dL/do`` (``(B, K)``, the adjoint that starts
the backward pass), the blocks ``S`` (``(B, K, K)``, the curvature that starts the
stage-wise recursions: ``V_L = R_L = blockdiag(S_i)``) and, where ``S_i`` is positive
semi-definite, a factor ``F_i`` (``(B, r, K)``, ``F_i^T F_i = S_i``) for the output-space
route of the Gauss-Newton matrix (section 14).

Closed forms (section 2.1), computed from the log-probabilities so that a confident
prediction (``p_y = 1 - 1e-15``) loses nothing to cancellation: ``1 - p_k`` is
``-expm1(log p_k)``, never ``1 - exp(log p_k)``:

* ``CrossEntropyLoss``: class-index or probability targets, ``weight``, ``ignore_index``,
  ``label_smoothing``, reduction ``mean``/``sum``;
* ``NLLLoss`` (log-probabilities in, the loss linear in them: ``S = 0``);
* ``BCEWithLogitsLoss`` (``weight``, ``pos_weight``);
* ``MSELoss``.

A trailing ``LogSoftmax`` before ``NLLLoss`` and a trailing ``Sigmoid`` before ``BCELoss``
are folded into the loss by :func:`fold_output_activation` (the same function, computed
without the cancellation of their derivatives). Any other loss goes through ``torch.func``
with ``K`` Hessian-vector products and a numerical check that it really is separable over
samples.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import grad, vjp, vmap

__all__ = ["LossHead", "loss_head", "fold_output_activation", "FoldedLoss"]


class LossHead(NamedTuple):
    """``value`` (0-d), ``grad`` ``(B, K)``, per-sample Hessian blocks ``hess`` ``(B, K, K)``
    and a factor ``factor`` ``(B, r, K)`` with ``factor[i]^T factor[i] = hess[i]`` (``None``
    when some block is indefinite). ``factor_exact``: the factor is a closed form, so
    ``F^T F = S`` to rounding (a generic loss's factor clamps eigenvalues at rounding level
    of zero: ``F^T F`` may differ from ``S`` by ``sqrt(u) max|S|``)."""

    value: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor
    factor: torch.Tensor | None = None
    factor_exact: bool = False


def _softmax_head(logp: torch.Tensor, a: torch.Tensor, total: torch.Tensor) -> LossHead:
    """The head of ``sum_i -a_i . log softmax(o_i) / total`` from ``logp = log softmax(o)``
    ``(B, K)`` and nonnegative coefficients ``a`` ``(B, K)`` (docs/algorithm.md section 2.1).

    With ``A_i = sum_k a_ik``: gradient ``(A_i p_i - a_i) / total``, block
    ``A_i (diag p_i - p_i p_i^T) / total`` (rank ``K - 1``), and a factor with ``K - 1`` rows:
    ``diag(sqrt p) - sqrt(p) p^T`` (rows ``sqrt(p_k) (e_k - p)``, whose Gram matrix is
    ``diag p - p p^T`` because ``sum_k p_k = 1``) has ``sqrt(p)`` as a left null vector, and
    the Householder reflection taking it to ``-e_k*`` zeroes row ``k*``; the other rows are
    ``sqrt(p_k) (e_k - p / (1 + s))`` with entry ``k*`` equal to ``-sqrt(p_k) s``,
    ``s = sqrt(p_k*)``, all times ``sqrt(A_i / total)``. No entry is formed by cancellation:
    ``p_k (1 - p_k)`` is ``p_k * -expm1(log p_k)``, and for the most probable class ``k*``
    the gradient is ``A expm1(log p_k*) + sum_{j != k*} a_j`` (``A p_k* - a_k*`` would
    cancel).
    """
    B, K = logp.shape
    p = logp.exp()
    A = a.sum(1)
    scale = A / total  # per-sample factor of the curvature
    one_minus_p = -torch.expm1(logp)  # 1 - p_k, exact for p_k near 1
    g = A[:, None] * p - a
    top = logp.argmax(1, keepdim=True)
    others = torch.ones_like(a, dtype=torch.bool).scatter_(1, top, False)
    rest = (a * others).sum(1, keepdim=True)  # sum of the other coefficients, not A - a_k*
    g.scatter_(1, top, A[:, None] * torch.expm1(logp.gather(1, top)) + rest)
    g = g / total
    S = -p[:, :, None] * p[:, None, :]
    S.diagonal(dim1=1, dim2=2).copy_(p * one_minus_p)
    S = scale[:, None, None] * S
    # the factor with K - 1 rows: sqrt(p) is a left null vector of diag(sqrt p) - sqrt(p) p^T,
    # so the Householder reflection taking it to -e_k* zeroes row k* (k* the most probable
    # class, where 1 + sqrt(p_k*) >= 1 + 1/sqrt(K) has no cancellation); the other rows are
    # sqrt(p_k) (e_k - p / (1 + s)) with column k* replaced by -sqrt(p_k) s, s = sqrt(p_k*)
    sq = (0.5 * logp).exp()
    s_top = sq.gather(1, top)  # (B, 1)
    F = (-sq / (1 + s_top))[:, :, None] * p[:, None, :]
    F.diagonal(dim1=1, dim2=2).add_(sq)
    F.scatter_(2, top[:, None, :].expand(B, K, 1), (-sq * s_top)[:, :, None])
    F = F[others].reshape(B, K - 1, K)
    F = scale.clamp_min(0).sqrt()[:, None, None] * F
    value = -(a * logp).sum() / total
    return LossHead(value, g, S, F if bool((A >= 0).all()) else None, True)


def log_softmax(o: torch.Tensor) -> torch.Tensor:
    """``log softmax(o)`` over the last dimension, accurate also for the most probable class.

    With ``m = max_k o_k`` and ``s = sum_{k != k*} exp(o_k - m)``, ``log p_k = (o_k - m) -
    log1p(s)``. torch's ``log_softmax`` forms ``log(1 + s)``, which rounds to 0 once ``s`` is
    below the unit roundoff: ``log p_k* = -8.5e-17`` (representable) comes out as 0 and with it
    ``1 - p_k* = 0``, the curvature of a confident prediction (docs/algorithm.md section 2.1).
    """
    m, top = o.max(dim=-1, keepdim=True)
    d = o - m
    e = d.exp().scatter(-1, top, 0.0)
    return d - torch.log1p(e.sum(-1, keepdim=True))


def _class_targets(targets, o: torch.Tensor) -> bool:
    return (
        isinstance(targets, torch.Tensor)
        and targets.dtype == torch.long
        and targets.shape == o.shape[:1]
    )


def _cross_entropy(loss_fn: nn.CrossEntropyLoss, o: torch.Tensor, targets) -> LossHead | None:
    """``-sum_i a_i . log softmax(o_i)`` over the reduction's total (torch's definition).

    Class-index targets ``y_i``: ``a_i = w_{y_i} (1 - s) e_{y_i} + s/K w`` (``w`` the class
    weights, ones by default; ``s`` the label smoothing), zero for an ignored target; the
    mean divides by ``sum_i w_{y_i}`` over the kept samples. Probability targets ``q_i``:
    ``a_i = w * ((1 - s) q_i + s/K)``, the mean divides by ``B``.
    """
    if loss_fn.reduction not in ("mean", "sum") or o.dim() != 2:
        return None
    B, K = o.shape
    s = float(loss_fn.label_smoothing)
    w = None if loss_fn.weight is None else loss_fn.weight.to(o.dtype)
    logp = log_softmax(o)
    if _class_targets(targets, o):
        keep = targets != loss_fn.ignore_index
        safe = torch.where(keep, targets, torch.zeros_like(targets))
        if bool(((safe < 0) | (safe >= K)).any()):
            return None  # let torch report the bad class index
        onehot = torch.nn.functional.one_hot(safe, K).to(o.dtype)
        wy = keep.to(o.dtype) if w is None else keep.to(o.dtype) * w[safe]
        a = (1 - s) * wy[:, None] * onehot
        if s:
            smooth = o.new_full((K,), s / K) if w is None else (s / K) * w
            a = a + keep.to(o.dtype)[:, None] * smooth
        total = wy.sum() if loss_fn.reduction == "mean" else o.new_ones(())
        # NaN when every target is ignored, as torch gives
    elif (
        isinstance(targets, torch.Tensor) and targets.shape == o.shape and targets.dtype == o.dtype
    ):
        q = (1 - s) * targets + s / K if s else targets
        a = q if w is None else q * w
        total = o.new_full((), float(B)) if loss_fn.reduction == "mean" else o.new_ones(())
    else:
        return None
    return _softmax_head(logp, a, total)


def _nll(loss_fn: nn.NLLLoss, o: torch.Tensor, targets) -> LossHead | None:
    """``-sum_i w_{y_i} o_i[y_i]`` over the reduction's total: linear in the
    log-probabilities ``o``, so ``S = 0`` (factor with no rows)."""
    if loss_fn.reduction not in ("mean", "sum") or o.dim() != 2 or not _class_targets(targets, o):
        return None
    B, K = o.shape
    keep = targets != loss_fn.ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    if bool(((safe < 0) | (safe >= K)).any()):
        return None
    wy = keep.to(o.dtype)
    if loss_fn.weight is not None:
        wy = wy * loss_fn.weight.to(o.dtype)[safe]
    total = wy.sum() if loss_fn.reduction == "mean" else o.new_ones(())
    a = wy[:, None] * torch.nn.functional.one_hot(safe, K).to(o.dtype)
    value = -(a * o).sum() / total
    return LossHead(value, -a / total, o.new_zeros(B, K, K), o.new_zeros(B, 0, K), True)


def _bce_with_logits(loss_fn: nn.BCEWithLogitsLoss, o: torch.Tensor, targets) -> LossHead | None:
    """``sum_e w_e (pw_e y_e softplus(-o_e) + (1 - y_e) softplus(o_e))`` over the reduction's
    total (``numel`` for the mean): gradient ``w (-pw y sigmoid(-o) + (1 - y) sigmoid(o))``,
    diagonal blocks ``w (pw y + 1 - y) sigmoid(o) sigmoid(-o)``; ``sigmoid(-o)`` is ``1 -
    sigmoid(o)`` without the cancellation."""
    if not (
        loss_fn.reduction in ("mean", "sum")
        and isinstance(targets, torch.Tensor)
        and targets.shape == o.shape
        and targets.dtype == o.dtype
        and o.dim() >= 1
    ):
        return None
    B = o.shape[0]
    w = o.new_ones(()) if loss_fn.weight is None else loss_fn.weight.to(o.dtype)
    pw = o.new_ones(()) if loss_fn.pos_weight is None else loss_fn.pos_weight.to(o.dtype)
    w, pw = torch.broadcast_to(w, o.shape), torch.broadcast_to(pw, o.shape)
    total = float(o.numel()) if loss_fn.reduction == "mean" else 1.0
    y = targets
    sp, sn = torch.sigmoid(o), torch.sigmoid(-o)
    value = (w * (pw * y * nn.functional.softplus(-o) + (1 - y) * nn.functional.softplus(o))).sum()
    g = w * (-pw * y * sn + (1 - y) * sp) / total
    d = (w * (pw * y + 1 - y) * sp * sn / total).reshape(B, -1)
    factor = torch.diag_embed(d.clamp_min(0).sqrt()) if bool((d >= 0).all()) else None
    return LossHead(value / total, g.reshape(B, -1), torch.diag_embed(d), factor, True)


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
    eye = torch.eye(K, dtype=o.dtype, device=o.device).expand(B, K, K)
    return LossHead(
        (r * r).sum() * scale,
        2 * scale * r,
        (2 * scale) * eye.clone(),
        (2 * scale) ** 0.5 * eye.clone(),
        True,
    )


_CLOSED_FORMS = {
    nn.CrossEntropyLoss: _cross_entropy,
    nn.NLLLoss: _nll,
    nn.BCEWithLogitsLoss: _bce_with_logits,
    nn.MSELoss: _mse,
}


def _analytic(loss_fn, outputs, targets) -> LossHead | None:
    form = _CLOSED_FORMS.get(type(loss_fn))
    return None if form is None else form(loss_fn, outputs, targets)


def fold_output_activation(modules: tuple[nn.Module, ...], loss_fn) -> tuple[int, Any]:
    """``(k, loss)``: fold the last ``k`` of ``modules`` (the last stage's) into the loss.

    ``LogSoftmax(dim=1)`` followed by ``NLLLoss`` is ``CrossEntropyLoss`` on the logits, and
    ``Sigmoid`` followed by ``BCELoss`` is ``BCEWithLogitsLoss`` (same weight and reduction;
    BCELoss clamps the log at -100, so the two differ for logits beyond about 100 in
    magnitude, where BCELoss's derivatives are those of the clamp). The closed forms of
    the folded loss avoid the cancellation of ``p (1 - p)`` in the activation's derivatives
    (docs/algorithm.md section 2.1). ``(0, loss_fn)`` when nothing folds. For the
    Gauss-Newton matrix the folded activation belongs to the loss: ``G`` is then the
    cross-entropy (logistic) one, not ``J^T 0 J`` of a loss linear in log-probabilities.
    """
    if not modules:
        return 0, loss_fn
    last = modules[-1]
    if type(loss_fn) is nn.NLLLoss and type(last) is nn.LogSoftmax and last.dim in (1, -1):
        same = nn.CrossEntropyLoss(
            weight=loss_fn.weight, ignore_index=loss_fn.ignore_index, reduction=loss_fn.reduction
        )
        return 1, FoldedLoss(last, loss_fn, same)
    if type(loss_fn) is nn.BCELoss and type(last) is nn.Sigmoid:
        same = nn.BCEWithLogitsLoss(weight=loss_fn.weight, reduction=loss_fn.reduction)
        return 1, FoldedLoss(last, loss_fn, same)
    return 0, loss_fn


class FoldedLoss(nn.Module):
    """``loss(activation(outputs), targets)``, with ``equivalent(outputs, targets)`` the same
    function on the logits where its closed form applies (2-D outputs)."""

    def __init__(self, activation: nn.Module, loss: nn.Module, equivalent: nn.Module):
        super().__init__()
        self.activation, self.loss, self.equivalent = activation, loss, equivalent

    def forward(self, outputs, targets):
        return self.loss(self.activation(outputs), targets)


def _probe_rng(device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(20260123)
    return gen


def _psd_factor(S: torch.Tensor) -> torch.Tensor | None:
    """``F`` ``(B, K, K)`` with ``F_i^T F_i = S_i`` from the eigendecomposition of each block,
    eigenvalues above ``-sqrt(u) max|S|`` taken as rounding of zero (clamped); ``None`` when
    one is below (an indefinite loss Hessian).

    The clamp changes ``F^T F`` by at most ``sqrt(u) max|S|``; that is safe because the
    contract measures every solve with exact products (made from ``S``, not ``F``) and
    refines, and certifies logdet and inertia by the same measurement (section 11): a
    factor that is off shows as a backward error and the factorization hardens."""
    e, V = torch.linalg.eigh(S)
    tol = torch.finfo(S.dtype).eps ** 0.5 * float(S.abs().amax())
    if bool((e < -tol).any()):
        return None
    return e.clamp_min(0).sqrt()[:, :, None] * V.transpose(1, 2)


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
    S = 0.5 * (S + S.transpose(1, 2))
    finite = bool(torch.isfinite(S).all())  # else refused by loss_head
    return LossHead(value.detach(), g, S, _psd_factor(S) if finite else None)


def loss_head(loss_fn, outputs: torch.Tensor, targets, oracle: str = "auto") -> LossHead:
    """Value, gradient ``(B, K)``, Hessian blocks ``(B, K, K)`` and their factor of ``loss_fn``.

    ``oracle``: ``"auto"`` (closed form where it exists), ``"analytic"`` (closed form or
    an error) or ``"generic"`` (``torch.func``). Raises ``ValueError`` when the loss is not
    a scalar, couples samples, or is not finite.

    >>> import torch
    >>> from torch import nn
    >>> o, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    >>> a = loss_head(nn.CrossEntropyLoss(label_smoothing=0.1), o, y)
    >>> b = loss_head(nn.CrossEntropyLoss(label_smoothing=0.1), o, y, oracle="generic")
    >>> all(torch.allclose(s, t, rtol=1e-13, atol=1e-15) for s, t in zip(a[:3], b[:3]))
    True
    >>> torch.allclose(a.factor.mT @ a.factor, a.hess, atol=1e-15)
    True
    """
    if oracle not in ("auto", "generic", "analytic"):
        raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
    outputs = outputs.detach()
    head = None
    if oracle != "generic":
        closed = loss_fn
        if isinstance(loss_fn, FoldedLoss):  # the logits' closed form, for (B, classes)
            closed = loss_fn.equivalent if outputs.dim() == 2 else None
        head = None if closed is None else _analytic(closed, outputs, targets)
    if head is None:
        if oracle == "analytic":
            raise ValueError(
                f"no closed form for loss {type(loss_fn).__name__} with these targets; closed "
                "forms cover CrossEntropyLoss (class-index or probability targets), NLLLoss, "
                "BCEWithLogitsLoss and MSELoss (same-shape targets), reduction 'mean' or "
                "'sum'; use oracle='auto'"
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
