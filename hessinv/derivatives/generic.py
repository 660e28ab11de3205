"""Any stage that acts on each sample independently, through ``torch.func`` (docs/algorithm.md
section 2).

Convolutions, residual blocks, normalisation layers in eval mode, PReLU, custom modules: the
five derivatives are formed densely per sample and stored as ``Dx (B, h_out, p)``,
``Dz (B, h_out, h_in)``, ``Dxx (p, p)``, ``Dzx (B, p, h_in)``, ``Dzz (B, h_in, h_in)``; the
basis is ``Y = I``. Memory is ``O(B h p)`` per stage, so this is the path for narrow stages;
wide ``nn.Linear`` stages have :class:`~hessinv.derivatives.linear.LinearDerivatives`.

Only ``Dx`` may be taken under a ``vmap`` over samples (reverse mode, ``h_out`` products,
where ``p > h_out``), and it is kept only if it agrees with a reverse-mode product of the
whole batch: there the parameters are shared by a batched input, and torch's per-sample rules
for such modules can be wrong (``nn.PReLU``, torch 2.13: an error, or without one a wrong
``Dx`` and ``Dz`` when the batch size equals the number of features). Otherwise ``Dx`` is
taken in forward mode over the whole batch (``p`` products). Everything else is taken of the
stage applied to the whole batch: ``Dxx`` and ``Dzx`` are the rows of the Jacobian of the
``x``-gradient (``p`` reverse-over-reverse products; the ``x``-gradient is a sum over
samples, so its derivative in ``z[i]`` is sample ``i``'s own), and the per-sample blocks of
``Dz`` and ``Dzz`` come from probes that move one coordinate of every sample at once (the
stage acts on each sample independently, checked by the sweep, so sample ``i`` of the
answer is block ``i``).

A stage with a frozen *tail* (``f = F(g(z; x))``, ``F`` the modules after the stage's
first that own only unselected parameters, :attr:`hessinv.network.chain.Stage.tail_start`)
is differentiated in two parts: ``g`` as above, and ``F`` only through its input ``u``, as
its per-sample Jacobian ``J = dF/du`` (``h_out`` products through ``F``) and, for the
Hessian, its curvature ``T = sum_k b_k d^2 F_k / du^2`` (``h_u`` products), composed by the
chain rule (docs/algorithm.md section 2)::

    Dx = J Dx_g,   Dz = J Dz_g,   g's derivatives taken at the adjoint c = J^T b,
    Dxx = Dxx_g + Dx_g^T T Dx_g,   Dzx = Dzx_g + Dx_g^T T Dz_g,   Dzz = Dzz_g + Dz_g^T T Dz_g.

That is ``O(h_u + h_out)`` passes through ``F`` instead of ``O(p + h_in)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from hessinv.derivatives.base import DenseStage, StageDerivatives, quiet_forward_ad

__all__ = ["GenericDerivatives", "per_sample_jacobian", "per_sample_hessian"]

#: how many reverse-mode products one forward-mode product costs torch.func, about (measured
#: on CPU: 3 to 5 through a tanh MLP)
_FORWARD_MODE_COST = 4
#: the forward-mode columns of ``Dx`` are taken in chunks whose basis and outputs stay below
#: this many bytes (one chunk for narrow stages)
_DX_CHUNK_BYTES = 1 << 26
#: the per-sample reverse-mode ``Dx`` is kept when a pseudo-random product with it agrees
#: with the whole batch's reverse-mode product to this many unit roundoffs
_DX_CHECK_ROUNDOFFS = 1e3


def _probes(like: torch.Tensor) -> torch.Tensor:
    """``E`` ``(h, *like.shape)`` with ``h = like[0].numel()``: ``E[j]`` is 1 at feature ``j``
    of every sample and 0 elsewhere (one input coordinate of all samples moved at once)."""
    B, shape = like.shape[0], like.shape[1:]
    h = like[0].numel()
    eye = torch.eye(h, dtype=like.dtype, device=like.device)
    return eye.reshape(h, 1, *shape).expand(h, B, *shape)


def _rows_by_probes(fn: Callable, z: torch.Tensor, h_out: int) -> torch.Tensor:
    """``(h_out, B, *z.shape[1:])``: row ``j`` of ``d fn(z)[i] / d z[i]`` for every sample
    ``i``, by ``h_out`` reverse-mode products with probes of the output."""
    B = z.shape[0]
    _, pull = vjp(fn, z)
    cot = torch.eye(h_out, dtype=z.dtype, device=z.device).reshape(h_out, 1, h_out)
    return vmap(lambda e: pull(e)[0])(cot.expand(h_out, B, h_out))


def per_sample_jacobian(fn: Callable, z: torch.Tensor, h_out: int) -> torch.Tensor:
    """``d fn(z)[i] / d z[i]`` ``(B, h_out, h_in)`` for ``fn`` acting on each sample of ``z``
    ``(B, ...)`` independently, with output ``(B, h_out)``: ``h_out`` reverse-mode products
    with probes of the output, or ``h_in`` forward-mode ones with probes of the input
    (:func:`_probes`) when that is cheaper (one costs torch.func about ``_FORWARD_MODE_COST``
    reverse ones)."""
    B, h_in = z.shape[0], z[0].numel()
    if h_out <= _FORWARD_MODE_COST * h_in:
        return _rows_by_probes(fn, z, h_out).reshape(h_out, B, h_in).transpose(0, 1)
    cols = vmap(lambda e: jvp(fn, (z,), (e,))[1])(_probes(z))  # (h_in, B, h_out)
    return cols.reshape(h_in, B, h_out).permute(1, 2, 0)


def per_sample_hessian(phi: Callable, z: torch.Tensor) -> torch.Tensor:
    """``d^2 phi / d z[i]^2`` ``(B, h_in, h_in)``, symmetrized, for a scalar ``phi`` that is a
    sum of per-sample terms (its Hessian is block-diagonal over samples): ``h_in``
    reverse-over-reverse products with probes."""
    B, h_in = z.shape[0], z[0].numel()
    g = grad(phi)
    _, pull = vjp(g, z)
    rows = vmap(lambda e: pull(e)[0])(_probes(z))  # (h_in, B, *z)
    H = rows.reshape(h_in, B, h_in).transpose(0, 1)
    return 0.5 * (H + H.transpose(1, 2))


def _forward_columns(fn: Callable, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``d fn(x) / dx`` ``(B, h_out, p)`` for ``fn(x)`` of shape ``(B, h_out)`` (``rows = B
    h_out``): forward mode, ``p`` products, in chunks of columns (never the ``p x p`` basis
    of ``jacfwd`` at once)."""
    p = x.shape[0]
    chunk = max(1, min(p, _DX_CHUNK_BYTES // (x.element_size() * max(p, rows))))
    if chunk == p:
        return jacfwd(fn)(x)
    parts = []
    for start in range(0, p, chunk):
        k = min(chunk, p - start)
        basis = x.new_zeros(k, p)
        basis[:, start : start + k].fill_diagonal_(1.0)
        cols = vmap(lambda v: jvp(fn, (x,), (v,))[1])(basis)  # (k, B, h_out)
        parts.append(cols.permute(1, 2, 0))
    return torch.cat(parts, dim=2)


def _per_sample_rows(apply, x: torch.Tensor, z) -> torch.Tensor | None:
    """``Dx`` ``(B, h_out, p)`` by reverse mode under a ``vmap`` over samples (``h_out``
    products), or ``None`` where torch cannot batch the stage that way."""

    def f(xx, zi):
        return apply(xx, tree_map(lambda t: t.unsqueeze(0), zi)).reshape(-1)

    try:
        return vmap(jacrev(f, argnums=0), in_dims=(None, 0))(x, z)
    except Exception:  # a batching rule torch lacks or gets wrong (nn.PReLU): forward mode
        return None


def _rows_agree(Dx: torch.Tensor, fn: Callable, x: torch.Tensor) -> bool:
    """Whether ``Dx`` ``(B, h_out, p)`` is the Jacobian of ``fn`` (``(B, h_out)``) in ``x``:
    ``sum_i Dx_i^T w_i`` for a fixed pseudo-random ``w`` against one reverse-mode product of
    the whole batch, to ``_DX_CHECK_ROUNDOFFS`` unit roundoffs of ``max |Dx| ||w||_1`` (a
    wrong ``Dx`` is off by far more; one host read)."""
    y, pull = vjp(fn, x)
    gen = torch.Generator(device=x.device).manual_seed(0)
    w = torch.randn(y.shape, generator=gen, dtype=x.dtype, device=x.device)
    err = (torch.einsum("bop,bo->p", Dx, w) - pull(w)[0]).abs().max()
    low, high = torch.aminmax(Dx)  # max |Dx| in one pass, without a copy
    scale = torch.maximum(high, -low) * w.abs().sum()
    return bool(err <= _DX_CHECK_ROUNDOFFS * torch.finfo(x.dtype).eps * scale)


def _jacobian_in_x(apply, x: torch.Tensor, z, B: int, h_out: int) -> torch.Tensor:
    """``Dx`` ``(B, h_out, p)`` of ``apply`` at ``(x, z)``: forward mode when ``p <= h_out``;
    otherwise the cheaper reverse mode per sample, kept only where it can be computed and
    agrees with the batch's own products (:func:`_rows_agree`: torch's per-sample rules for
    ``nn.PReLU`` raise, or when ``B`` equals the number of features silently give a wrong
    Jacobian), else forward mode."""

    def fn(xx):
        return apply(xx, z).reshape(B, -1)

    if x.shape[0] > h_out:
        Dx = _per_sample_rows(apply, x, z)
        if Dx is not None and Dx.shape == (B, h_out, x.shape[0]) and _rows_agree(Dx, fn, x):
            return Dx
    return _forward_columns(fn, x, B * h_out)


def _dense(apply, x, z, b, *, has_input: bool, second_order: bool):
    """``(Dx, Dz, Dxx, Dzx, Dzz)`` of ``apply`` at ``(x, z)`` with adjoint ``b`` (shapes in
    :class:`~hessinv.derivatives.base.DenseStage`; the last three ``None`` without input)."""
    B = b.shape[0]

    def out(xx, zz):
        return apply(xx, zz).reshape(B, -1)

    def phi(xx, zz):
        return (out(xx, zz) * b).sum()

    Dx = _jacobian_in_x(apply, x, z, B, b.shape[1])  # (B, h_out, p)
    p, h_out = x.shape[0], Dx.shape[1]
    Dz = Dzx = Dzz = None
    if has_input:
        Dz = per_sample_jacobian(lambda zz: out(x, zz), z, h_out)  # (B, h_out, h_in)
    if not second_order:
        Dxx = x.new_zeros(p, p)
        if has_input:
            h_in = Dz.shape[2]
            Dzx, Dzz = x.new_zeros(B, p, h_in), x.new_zeros(B, h_in, h_in)
        return Dx, Dz, Dxx, Dzx, Dzz
    if has_input:
        # the rows of the x-gradient's Jacobian: Dxx, and Dzx per sample (the x-gradient is
        # a sum over samples, so its derivative in z[i] is sample i's own term)
        Dxx, Dzx = jacrev(grad(phi, argnums=0), argnums=(0, 1))(x, z)
        Dzx = Dzx.reshape(p, B, -1).transpose(0, 1)  # (B, p, h_in)
        Dzz = per_sample_hessian(lambda zz: phi(x, zz), z)
    else:
        Dxx = jacrev(grad(lambda xx: phi(xx, z)))(x)
    return Dx, Dz, 0.5 * (Dxx + Dxx.T), Dzx, Dzz


def _compose(head, J: torch.Tensor, T: torch.Tensor):
    """The stage ``F(g(z; x))`` from ``g``'s derivatives ``head`` (taken with the adjoint
    ``J^T b``), ``F``'s per-sample Jacobian ``J`` ``(B, h_out, h_u)`` and curvature ``T``
    ``(B, h_u, h_u)``: the chain rule of the module docstring."""
    Dx_g, Dz_g, Dxx, Dzx, Dzz = head
    p = Dx_g.shape[2]
    Dx = torch.bmm(J, Dx_g)
    TDx = torch.bmm(T, Dx_g)  # (B, h_u, p)
    extra = Dx_g.reshape(-1, p).T @ TDx.reshape(-1, p)
    Dxx = Dxx + 0.5 * (extra + extra.T)
    if Dz_g is None:
        return Dx, None, Dxx, None, None
    extra_z = torch.bmm(Dz_g.transpose(1, 2), torch.bmm(T, Dz_g))
    Dzz = Dzz + 0.5 * (extra_z + extra_z.transpose(1, 2))
    return Dx, torch.bmm(J, Dz_g), Dxx, Dzx + torch.bmm(TDx.transpose(1, 2), Dz_g), Dzz


def _composed(head: Callable, tail: Callable, x, z, b, *, has_input: bool, second_order: bool):
    """The five derivatives of ``tail(head(x, z))`` at adjoint ``b`` ``(B, h_out)``, the tail
    differentiated only through its input ``u = head(x, z)`` (the module docstring)."""
    B = b.shape[0]
    with torch.no_grad():
        u = head(x, z)
    if not isinstance(u, torch.Tensor) or u.dim() == 0 or u.shape[0] != B:
        raise ValueError(
            f"the head of a stage with a frozen tail returned {tuple(getattr(u, 'shape', ()))}; "
            f"it must keep the batch dimension ({B}) first"
        )

    def tail_out(uu):
        return tail(uu).reshape(B, -1)

    def head_out(xx, zz):
        return head(xx, zz).reshape(B, -1)

    J = per_sample_jacobian(tail_out, u, b.shape[1])  # (B, h_out, h_u)
    c = torch.bmm(J.transpose(1, 2), b[:, :, None])[:, :, 0]  # the head's adjoint J^T b
    parts = _dense(head_out, x, z, c, has_input=has_input, second_order=second_order)
    if not second_order:  # the second-order terms stay zero
        Dx_g, Dz_g, Dxx, Dzx, Dzz = parts
        return torch.bmm(J, Dx_g), None if Dz_g is None else torch.bmm(J, Dz_g), Dxx, Dzx, Dzz
    T = per_sample_hessian(lambda uu: (tail_out(uu) * b).sum(), u)  # (B, h_u, h_u)
    return _compose(parts, J, T)


class GenericDerivatives(StageDerivatives):
    """Dense per-sample derivatives of a stage's function at ``(x, z)``.

    Args:
        apply: ``apply(x, z) -> z_out`` for flat parameters ``x`` and a batch ``z``
            (a tensor, or for a first stage any pytree of tensors with the batch first);
            with ``tail``, the stage's head ``g`` (``z_out = tail(apply(x, z))``).
        x: flat parameters ``(p,)``.
        z: the stage input.
        b: the adjoint ``(B, h_out)``.
        has_input: False for the first stage (no ``Dz``, ``Dzx``, ``Dzz``).
        second_order: False for the Gauss-Newton matrix (second-order terms zero).
        tail: ``None``, or a parameter-free function ``F`` acting on each sample of the
            head's output (a tensor ``(B, ...)``) independently: differentiated only through
            its input and composed (module docstring).
    """

    def __init__(
        self,
        apply,
        x,
        z,
        b,
        *,
        has_input: bool,
        second_order: bool = True,
        tail: Callable | None = None,
    ):
        B = b.shape[0]
        with quiet_forward_ad():  # forward mode (jacfwd, jvp) for Dx, Dz or the tail's J
            if tail is None:
                parts = _dense(apply, x, z, b, has_input=has_input, second_order=second_order)
            else:
                parts = _composed(
                    apply, tail, x, z, b, has_input=has_input, second_order=second_order
                )
        Dx, Dz, Dxx, Dzx, Dzz = parts
        self._Dx, self._Dxx = Dx, Dxx
        self._Dz, self._Dzx, self._Dzz = (Dz, Dzx, Dzz) if has_input else (None, None, None)
        self.batch, self.out_size, self.num_params = B, Dx.shape[1], x.shape[0]
        self.in_size = Dz.shape[2] if has_input else 0
        self.has_input = has_input
        self.dtype, self.device = x.dtype, x.device

    # ------------------------------------------------------------ products
    def Dx(self, v):
        return torch.einsum("bop,pk->bok", self._Dx, v)

    def Dx_T(self, w):
        return torch.einsum("bop,bok->pk", self._Dx, w)

    def Dz(self, t):
        return torch.bmm(self._Dz, t)

    def Dz_T(self, w):
        return torch.bmm(self._Dz.transpose(1, 2), w)

    def Dxx(self, v):
        return self._Dxx @ v

    def Dzx(self, t):
        return torch.einsum("bpi,bik->pk", self._Dzx, t)

    def Dzx_T(self, v):
        return torch.einsum("bpi,pk->bik", self._Dzx, v)

    def Dzz(self, t):
        return torch.bmm(self._Dzz, t)

    # ------------------------------------------------------------ dense and curvature
    def dense(self):
        return DenseStage(self._Dx, self._Dz, self._Dxx, self._Dzx, self._Dzz)

    def propagate_curvature(self, R):
        return self._Dzz + torch.einsum("boi,bop,bpj->bij", self._Dz, R, self._Dz)

    def diagonal(self, R):
        return torch.diagonal(self._Dxx) + torch.einsum("bop,boq,bqp->p", self._Dx, R, self._Dx)

    def diagonal_block(self, R):
        return self._Dxx + torch.einsum("bop,boq,bqr->pr", self._Dx, R, self._Dx)

    def Y_T_Dxx_Y(self):
        return self._Dxx

    def Y_T_Dzx(self):
        return self._Dzx.permute(1, 0, 2).reshape(self.num_params, -1)

    def Dzz_blocks(self):
        return self._Dzz
