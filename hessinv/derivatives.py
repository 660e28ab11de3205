"""Per-stage derivatives: the oracle of ALGORITHM.md section 2.

For stage ``l`` with flat parameters ``x_l`` (``p_l`` numbers), per-sample input
``z_{l-1}[i]`` (``h_{l-1}`` numbers) and per-sample output ``z_l[i]`` (``h_l``
numbers), and backprop adjoint ``b_l = dz_L/dz_l`` of shape ``(B, h_l)``:

=========  ==============================================  =====================
name       meaning                                         stored shape
=========  ==============================================  =====================
``Dx``     ``dz_l[i]/dx_l``                                ``(B, h_l, p_l)``
``Dz``     ``dz_l[i]/dz_{l-1}[i]`` (block-diagonal)        ``(B, h_l, h_{l-1})``
``A``      ``sum_i b_l[i] . d2 z_l[i]/dx_l^2``             ``(p_l, p_l)``
``C``      ``b_l[i] . d2 z_l[i]/(dx_l dz_{l-1}[i])``       ``(B, p_l, h_{l-1})``
``Q``      ``b_l[i] . d2 z_l[i]/dz_{l-1}[i]^2``            ``(B, h_{l-1}, h_{l-1})``
=========  ==============================================  =====================

The dense ``a_l x a_{l-1}`` matrices of ALGORITHM.md are block-diagonal over
samples (``Dz``, ``Q``) or stacks of per-sample pieces (``Dx``, ``C``); only the
pieces are stored. The first stage has no ``Dz``, ``C``, ``Q`` (``z_0`` is fixed):
they are ``None``.

The last stage is fused with the loss: its output is the scalar loss, so its
``Dx`` is the gradient row ``(1, 1, p_L)`` and its ``Dz`` the gradient row
``1 x a_{L-1}`` stored per sample as ``(B, 1, h_{L-1})``; ``b_L = 1``.

Two oracles compute these:

* a generic one from ``torch.func`` (``jacrev``, ``jacfwd``, ``vmap``) for any
  stage acting on each sample independently, and any loss that is a sum of
  per-sample terms (checked numerically);
* an analytic fast path for ``nn.Linear`` followed by elementwise activations,
  and for ``CrossEntropyLoss`` / ``MSELoss`` (mean or sum).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

from .chain import Stage

__all__ = [
    "StageDerivatives",
    "LossHead",
    "loss_head",
    "stage_derivatives",
    "loss_stage_derivatives",
    "ELEMENTWISE_ACTIVATIONS",
]

#: activation modules the analytic ``Linear`` path treats as elementwise.
ELEMENTWISE_ACTIVATIONS = (
    nn.Identity,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
)


class StageDerivatives(NamedTuple):
    """The five per-stage derivatives of ALGORITHM.md section 2 (shapes in the module doc).

    >>> import torch
    >>> from torch import nn
    >>> from hessinv.chain import build_chain
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> stage = build_chain(nn.Sequential(nn.Linear(3, 2), nn.Tanh())).stages[0]
    >>> z, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> stage.modules[0].double()  # doctest: +ELLIPSIS
    Linear(...)
    >>> d = stage_derivatives(stage, z, b, need_input=True)
    >>> tuple(d.Dx.shape), tuple(d.Dz.shape), tuple(d.A.shape), tuple(d.C.shape), tuple(d.Q.shape)
    ((5, 2, 8), (5, 2, 3), (8, 8), (5, 8, 3), (5, 3, 3))
    >>> g = stage_derivatives(stage, z, b, need_input=True, oracle="generic")
    >>> all(torch.allclose(u, v, atol=1e-12) for u, v in zip(d, g))
    True
    """

    Dx: torch.Tensor
    Dz: torch.Tensor | None
    A: torch.Tensor
    C: torch.Tensor | None
    Q: torch.Tensor | None


class LossHead(NamedTuple):
    """A loss seen as a sum of per-sample terms of the flattened outputs ``o`` (``(B, K)``).

    ``value`` is the scalar loss, ``grad`` its gradient ``(B, K)`` and ``hess`` the
    per-sample Hessian blocks ``(B, K, K)`` (the Hessian in ``o`` is block-diagonal).
    """

    value: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor


# --------------------------------------------------------------------------- losses


def _analytic_loss_head(loss_fn, outputs: torch.Tensor, targets) -> LossHead | None:
    """Closed forms for plain ``CrossEntropyLoss`` and ``MSELoss``; ``None`` otherwise."""
    if type(loss_fn) is nn.CrossEntropyLoss:
        ok = (
            loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0
            and loss_fn.reduction in ("mean", "sum")
            and outputs.dim() == 2
            and isinstance(targets, torch.Tensor)
            and targets.dtype == torch.long
            and targets.shape == outputs.shape[:1]
            and not bool((targets == loss_fn.ignore_index).any())
        )
        if not ok:
            return None
        B = outputs.shape[0]
        scale = 1.0 / B if loss_fn.reduction == "mean" else 1.0
        logp = torch.log_softmax(outputs, dim=1)
        p = logp.exp()
        onehot = torch.nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
        value = -(logp * onehot).sum() * scale
        g = (p - onehot) * scale
        S = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) * scale
        return LossHead(value, g, S)
    if type(loss_fn) is nn.MSELoss:
        ok = (
            loss_fn.reduction in ("mean", "sum")
            and isinstance(targets, torch.Tensor)
            and targets.shape == outputs.shape
            and targets.dtype == outputs.dtype
        )
        if not ok:
            return None
        B = outputs.shape[0]
        scale = 1.0 / outputs.numel() if loss_fn.reduction == "mean" else 1.0
        r = (outputs - targets).reshape(B, -1)
        K = r.shape[1]
        value = (r * r).sum() * scale
        eye = torch.eye(K, dtype=outputs.dtype, device=outputs.device)
        return LossHead(value, 2 * scale * r, (2 * scale * eye).expand(B, K, K).clone())
    return None


def _generic_loss_head(loss_fn, outputs: torch.Tensor, targets) -> LossHead:
    """Gradient and per-sample Hessian blocks of any per-sample-separable loss.

    The blocks come from ``K`` Hessian-vector products with the probes
    ``1_B (x) e_j`` (one per output coordinate ``j``): for a block-diagonal Hessian
    the product with that probe is column ``j`` of every block at once. A product with
    a random vector then checks that the Hessian really is block-diagonal.
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
    r = torch.randn(B, K, dtype=o.dtype, device=o.device, generator=_probe_rng(o.device))
    (full,) = hvp(r)
    blockwise = torch.einsum("bkl,bl->bk", S, r)
    tol = 1e3 * torch.finfo(o.dtype).eps * (full.abs().max() + blockwise.abs().max() + 1e-300)
    if (full - blockwise).abs().max() > tol:
        raise ValueError(
            "the loss couples the samples of the batch (its Hessian in the outputs is not "
            "block-diagonal over samples); hessinv needs a loss that is a sum of per-sample terms, "
            "such as a mean or sum reduction"
        )
    return LossHead(value.detach(), g, S)


def _probe_rng(device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(20260123)
    return gen


def loss_head(loss_fn, outputs: torch.Tensor, targets, oracle: str = "auto") -> LossHead:
    """Value, gradient ``(B, K)`` and Hessian blocks ``(B, K, K)`` of ``loss_fn`` at ``outputs``."""
    if oracle not in ("auto", "generic", "analytic"):
        raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
    if oracle != "generic":
        head = _analytic_loss_head(loss_fn, outputs.detach(), targets)
        if head is not None:
            return head
        if oracle == "analytic":
            raise ValueError(
                f"no analytic form for loss {type(loss_fn).__name__} with these targets; the "
                "analytic path covers CrossEntropyLoss (class-index targets, no weight/smoothing) "
                "and MSELoss (same-shape targets), reduction 'mean' or 'sum'; use oracle='auto'"
            )
    return _generic_loss_head(loss_fn, outputs, targets)


# --------------------------------------------------------------------------- stages


def _linear_activation_layout(stage: Stage):
    """``(linear, activations)`` when the stage is ``nn.Linear`` + elementwise activations."""
    first = stage.modules[0]
    if type(first) is not nn.Linear:
        return None
    if stage.local_names not in (("weight",), ("weight", "bias")):
        return None
    if not all(type(m) in ELEMENTWISE_ACTIVATIONS for m in stage.modules[1:]):
        return None
    return first, stage.modules[1:]


def _elementwise_derivatives(acts, pre: torch.Tensor):
    """``sigma(pre)``, ``sigma'(pre)``, ``sigma''(pre)`` for a composition of elementwise maps."""

    def sigma(u):
        for m in acts:
            u = m(u)
        return u

    ones = torch.ones_like(pre)

    def first(u):
        return jvp(sigma, (u,), (ones,))

    (y, d1), (_, d2) = jvp(first, (pre,), (ones,))
    return y, d1, d2


def _analytic_linear(stage: Stage, x: torch.Tensor, z: torch.Tensor, b: torch.Tensor, need_input):
    """Closed forms for ``y = sigma(W z + c)`` per sample, weighted by ``b`` ``(B, h_out)``.

    With ``s1 = sigma'``, ``s2 = sigma''`` at the pre-activation, ``beta = b * s2`` and
    ``gamma = b * s1``, parameters ordered ``(W row-major, c)``:

    * ``Dx[i] = diag(s1_i) [I (x) z_i^T, I]``, ``Dz[i] = diag(s1_i) W``
    * ``A[(k,j),(k,l)] = sum_i beta_ik z_ij z_il``, ``A[(k,j), c_k] = sum_i beta_ik z_ij``,
      ``A[c_k, c_k] = sum_i beta_ik``
    * ``C[i][(k,l), j] = beta_ik z_il W_kj + gamma_ik delta_lj``, ``C[i][c_k, j] = beta_ik W_kj``
    * ``Q[i] = W^T diag(beta_i) W``
    """
    linear, acts = _linear_activation_layout(stage)
    params = stage.split_params(x)
    W = params["weight"]
    has_bias = "bias" in params
    h_out, h_in = W.shape
    B = z.shape[0]
    pre = z @ W.T
    if has_bias:
        pre = pre + params["bias"]
    _, s1, s2 = _elementwise_derivatives(acts, pre)
    eye_out = torch.eye(h_out, dtype=z.dtype, device=z.device)
    beta = b * s2
    gamma = b * s1

    DxW = torch.einsum("bk,km,bj->bkmj", s1, eye_out, z).reshape(B, h_out, h_out * h_in)
    MW = torch.einsum("ik,ij,il->kjl", beta, z, z)
    AWW = torch.einsum("kjl,km->kjml", MW, eye_out).reshape(h_out * h_in, h_out * h_in)
    if has_bias:
        Dx = torch.cat([DxW, s1[:, :, None] * eye_out], dim=2)
        N = torch.einsum("ik,ij->kj", beta, z)
        AWb = torch.einsum("kj,km->kjm", N, eye_out).reshape(h_out * h_in, h_out)
        A = torch.cat(
            [torch.cat([AWW, AWb], 1), torch.cat([AWb.T, torch.diag(beta.sum(0))], 1)], 0
        )
    else:
        Dx, A = DxW, AWW
    if not need_input:
        return StageDerivatives(Dx, None, A, None, None)
    Dz = s1[:, :, None] * W
    eye_in = torch.eye(h_in, dtype=z.dtype, device=z.device)
    CW = torch.einsum("ik,il,kj->iklj", beta, z, W) + torch.einsum("ik,lj->iklj", gamma, eye_in)
    CW = CW.reshape(B, h_out * h_in, h_in)
    C = torch.cat([CW, beta[:, :, None] * W], dim=1) if has_bias else CW
    Q = torch.einsum("kj,ik,kl->ijl", W, beta, W)
    return StageDerivatives(Dx, Dz, A, C, Q)


def _generic_stage(stage: Stage, x: torch.Tensor, z: torch.Tensor, b: torch.Tensor, need_input):
    """Any per-sample stage, with ``torch.func`` applied to one sample at a time (``vmap``)."""
    B = z.shape[0]

    def f(xx, zi):
        return stage.apply(xx, zi.unsqueeze(0)).reshape(-1)

    def phi(xx, zi, bi):
        return (f(xx, zi) * bi).sum()

    Dx = vmap(jacrev(f, argnums=0), in_dims=(None, 0))(x, z)
    # A: Hessian in x of the b-weighted outputs of the whole batch.
    A = jacfwd(jacrev(lambda xx: (stage.apply(xx, z).reshape(B, -1) * b).sum()))(x)
    if not need_input:
        return StageDerivatives(Dx, None, A, None, None)
    Dz = vmap(jacrev(f, argnums=1), in_dims=(None, 0))(x, z).reshape(B, Dx.shape[1], -1)
    grad_z = jacrev(phi, argnums=1)
    C = vmap(jacfwd(grad_z, argnums=0), in_dims=(None, 0, 0))(x, z, b)  # (B, *in, p)
    Q = vmap(jacfwd(grad_z, argnums=1), in_dims=(None, 0, 0))(x, z, b)  # (B, *in, *in)
    h_in = Dz.shape[2]
    C = C.reshape(B, h_in, -1).transpose(1, 2)
    Q = Q.reshape(B, h_in, h_in)
    return StageDerivatives(Dx, Dz, A, C, Q)


def check_per_sample(stage: Stage, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> None:
    """Raise ``ValueError`` if the stage's batch output differs from its per-sample outputs."""
    single = vmap(lambda zi: stage.apply(x, zi.unsqueeze(0)).squeeze(0))(z)
    if single.shape != out.shape:
        raise ValueError(
            f"stage {stage.index} ({stage.param_names[0]}...) maps a batch to shape "
            f"{tuple(out.shape)} but one sample to {tuple(single.shape[1:])}; stages must keep "
            "the batch dimension first and act on each sample independently"
        )
    tol = 1e3 * torch.finfo(out.dtype).eps * (1.0 + out.abs().max())
    if (single - out).abs().max() > tol:
        raise ValueError(
            f"stage {stage.index} ({', '.join(stage.param_names)}) couples the samples of a batch "
            "(its output for one sample depends on the others); this is not supported"
        )


def stage_derivatives(
    stage: Stage,
    z: torch.Tensor,
    b: torch.Tensor,
    *,
    need_input: bool,
    x: torch.Tensor | None = None,
    oracle: str = "auto",
) -> StageDerivatives:
    """Derivatives of a hidden stage at input batch ``z`` ``(B, ...)`` with adjoint ``b`` ``(B, h_l)``.

    ``need_input=False`` (first stage) skips ``Dz``, ``C``, ``Q``. ``oracle`` is
    ``"auto"`` (analytic where it applies), ``"analytic"`` or ``"generic"``.
    """
    if x is None:
        x = stage.flat_params()
    b = b.reshape(z.shape[0], -1)
    layout = _linear_activation_layout(stage)
    use_analytic = layout is not None and z.dim() == 2 and oracle != "generic"
    if oracle == "analytic" and not use_analytic:
        raise ValueError(
            f"stage {stage.index} is not nn.Linear + elementwise activations on (B, features) "
            "input; use oracle='auto' or 'generic'"
        )
    if use_analytic:
        return _analytic_linear(stage, x, z, b, need_input)
    return _generic_stage(stage, x, z, b, need_input)


def loss_stage_derivatives(
    stage: Stage,
    z: torch.Tensor,
    head: LossHead,
    *,
    need_input: bool,
    x: torch.Tensor | None = None,
    oracle: str = "auto",
) -> StageDerivatives:
    """Derivatives of the last stage fused with the loss (Gauss-Newton part + curvature part).

    With the stage's per-sample output derivatives ``J_x = Dx``, ``J_z = Dz`` taken with
    weights ``b = head.grad`` and the loss Hessian blocks ``S = head.hess``:
    ``A = A_b + sum_i J_x[i]^T S_i J_x[i]``, ``C_i = C_b,i + J_x[i]^T S_i J_z[i]``,
    ``Q_i = Q_b,i + J_z[i]^T S_i J_z[i]``, ``Dx = sum_i g_i^T J_x[i]`` and
    ``Dz_i = g_i^T J_z[i]``.
    """
    g, S = head.grad, head.hess
    d = stage_derivatives(stage, z, g, need_input=need_input, x=x, oracle=oracle)
    SJx = torch.einsum("bkl,blp->bkp", S, d.Dx)
    A = d.A + torch.einsum("bkp,bkq->pq", d.Dx, SJx)
    Dx = torch.einsum("bk,bkp->p", g, d.Dx)[None, None, :]
    if not need_input:
        return StageDerivatives(Dx, None, A, None, None)
    C = d.C + torch.einsum("bkp,bkh->bph", SJx, d.Dz)
    Q = d.Q + torch.einsum("bkh,bkl,blm->bhm", d.Dz, S, d.Dz)
    Dz = torch.einsum("bk,bkh->bh", g, d.Dz)[:, None, :]
    return StageDerivatives(Dx, Dz, A, C, Q)
