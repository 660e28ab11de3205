"""``nn.Linear`` followed by elementwise activations, in Kronecker form (docs/algorithm.md section 8).

For ``z_out[i] = act(W z_in[i] + c)`` write the selected parameters of the stage as one
``(h_out, m)`` matrix ``Theta`` whose columns are the weight's (when it is selected) and
then the bias (when it is selected), and stack the matching inputs as
``Zt = [Z_in, 1]`` (``(B, m)``). With ``s' = act'(u)``, ``s'' = act''(u)`` at the
pre-activation ``u`` (``(B, h_out)``), the adjoint ``b`` and ``beta = b s''``,
``gamma = b s'``:

* ``Dx v = s' * (Zt V^T)`` per sample, ``V`` the ``(h_out, m)`` matrix of ``v``;
* ``Dz t = s' * (W t)``;
* ``Dxx = sum_o e_o e_o^T (x) Zt^T diag(beta[:, o]) Zt``;
* ``Dzx[(o, m), (i, k)] = beta[i, o] W[o, k] Zt[i, m] + gamma[i, o] [m is input column k]``;
* ``Dzz_i = W^T diag(beta_i) W``.

Nothing of size ``p x p`` or ``B h_out x p`` is stored: only ``Zt``, ``s'``, ``beta``,
``gamma`` and ``W``, so a product costs ``O(B h_out m)`` per vector (Pearlmutter's cost).

The basis of the stage-wise factorization is ``Y = I_{h_out} (x) Q`` with ``Q`` (``m x r``)
an orthonormal basis of the row space of ``Zt``: ``range(Dxx)`` and ``range(Dx^T)`` lie in
``span(Y)``, so the factorization works with ``N = h_out r`` numbers per stage instead of
``p = h_out m`` (``r <= min(B, m)``). The rest, :class:`LinearComplement`, couples to the
stage input only through the ``gamma`` term of ``Dzx`` and is handled in closed form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.func import jvp

from .base import Complement, FrontTerms, RhsTerms, StageDerivatives

__all__ = ["LinearDerivatives", "LinearComplement", "LinearInput", "LinearForward",
           "linear_forwards", "linear_complements", "elementwise_derivatives"]


def elementwise_derivatives(acts, pre: torch.Tensor):
    """``(sigma(u), sigma'(u), sigma''(u))`` for the composition ``sigma`` of elementwise ``acts``.

    Exact (forward-mode AD of the activation modules themselves, no finite differences).
    """

    def sigma(u):
        for m in acts:
            u = m(u)
        return u

    ones = torch.ones_like(pre)

    def first(u):
        return jvp(sigma, (u,), (ones,))

    (out, d1), (_, d2) = jvp(first, (pre,), (ones,))
    return out, d1, d2


def _ranks(S: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Ranks of a stack of matrices of ``shape`` from their singular values ``S`` ``(G, k)``
    (descending); a zero matrix has tolerance 0 and rank 0. Stays on the device."""
    tol = max(shape) * torch.finfo(S.dtype).eps * S[:, :1]
    return (S > tol).sum(1)


def _apply_rows(Z: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``out[b, o, k] = sum_m Z[b, m] M[o, m, k]`` as one matrix product."""
    o, m, k = M.shape
    if k == 1:  # one vector: a plain product, no reshaping copies
        return (Z @ M[:, :, 0].T)[:, :, None]
    return (Z @ M.transpose(0, 1).reshape(m, o * k)).reshape(Z.shape[0], o, k)


def _left(W: torch.Tensor, t: torch.Tensor, W_T: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, o, k] = sum_i W[o, i] t[b, i, k]``; ``W_T``: ``W.T`` if the caller keeps it
    (a transposed view costs two operators to make, per call).

    With many columns (``k >= i``) one broadcast product (it copies ``W`` once per sample,
    little next to ``t``); with few, one product over the samples stacked side by side.
    """
    B, i, k = t.shape
    if k == 1:
        return (t[:, :, 0] @ (W.T if W_T is None else W_T))[:, :, None]
    if k >= i:
        return torch.matmul(W, t)
    return (W @ t.transpose(0, 1).reshape(i, B * k)).reshape(W.shape[0], B, k).transpose(0, 1)


def _left_add(acc: torch.Tensor, W: torch.Tensor, t: torch.Tensor,
              W_T: torch.Tensor | None = None) -> torch.Tensor:
    """``acc + _left(W, t)``; for one vector one ``addmm`` over the samples (``acc`` may be a
    broadcast view)."""
    if t.shape[2] == 1:
        return torch.addmm(acc[:, :, 0], t[:, :, 0], W.T if W_T is None else W_T)[:, :, None]
    return acc + _left(W, t)


def _gather_rows(Z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``out[o, m, k] = sum_b Z[b, m] R[b, o, k]``: a broadcast product when ``k >= m``
    (contiguous result, ``Z`` copied once per ``o``), else one product over the stacked ``R``."""
    B, o, k = R.shape
    if k == 1:
        return (R[:, :, 0].T @ Z)[:, :, None]
    if k >= Z.shape[1]:
        return torch.matmul(Z.T, R.transpose(0, 1))
    return (Z.T @ R.reshape(B, o * k)).reshape(Z.shape[1], o, k).transpose(0, 1)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``(G, ...)``: the tensors of one group of stages stacked; a view, not a copy, when they
    lie one after the other in one storage (blocks of consecutive stages split from one flat
    vector, parts of an earlier stack): on wide layers a copy costs as much as the products."""
    first = tensors[0]
    if len(tensors) == 1:
        return first[None]
    step = first.numel()
    if first.is_contiguous() and all(
            t.is_contiguous() and t.shape == first.shape
            and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and t.storage_offset() == first.storage_offset() + j * step
            for j, t in enumerate(tensors)):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))
    return torch.stack(tensors)


#: stages with more parameters than this are not batched with others in the sweeps' batched
#: steps: their products already keep a device busy, and on a CPU a stack of them falls out
#: of the cache (width 256: 3x slower products than one stage at a time)
BATCH_PARAMS = 1 << 14


def _shape_groups(stages, keys) -> list[list[int]]:
    """Indices of the stages grouped by ``keys`` (their shapes), a stage above
    :data:`BATCH_PARAMS` parameters in a group of its own."""
    groups: dict[tuple, list[int]] = {}
    for i, (d, key) in enumerate(zip(stages, keys, strict=True)):
        groups.setdefault(key if d.num_params <= BATCH_PARAMS else ("alone", i), []).append(i)
    return list(groups.values())


def _bmm(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``A @ X`` for stacks ``(G, I, C)``, ``(G, C, J)`` (either may be a transposed view);
    a plain product for a stack of one (faster than a batched one on transposed views)."""
    return (A[0] @ X[0])[None] if A.shape[0] == 1 else torch.bmm(A, X)


def _bmm_k(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``out[g, i, j, k] = sum_c A[g, i, c] X[g, c, j, k]`` for a stack of matrices ``A``
    ``(G, I, C)`` and of ``k`` matrices ``X`` ``(G, C, J, k)`` (either may be a transposed
    view): one batched product for one vector, no copies; an ``einsum`` for several."""
    if X.shape[-1] == 1:
        return _bmm(A, X[..., 0])[..., None]
    return torch.einsum("gic,gcjk->gijk", A, X)


class LinearInput(NamedTuple):
    """One ``Linear`` stage as the forward pass sees it: ``act(z W^T + bias)``, with the
    selected parameters named by the two flags (``bias`` is ``None`` when the module has none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    acts: tuple
    z: torch.Tensor
    weight_selected: bool
    bias_selected: bool


class LinearForward(NamedTuple):
    """What a ``Linear`` stage's derivatives take from the forward pass (the adjoint not yet):
    ``W``, ``Zt`` ``(B, m)``, ``s1 = act'(u)``, ``s2 = act''(u)`` ``(B, h_out)``, and the
    row-space basis ``Q`` ``(m, r)`` of ``Zt`` with ``Zr = Zt Q`` (``Q = None``: ``Q = I``)."""

    W: torch.Tensor
    Zt: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    Q: torch.Tensor | None
    Zr: torch.Tensor
    weight_selected: bool
    bias_selected: bool


def _activation_key(acts) -> tuple:
    # elementwise modules with the same type and settings compute the same function
    return tuple(repr(m) for m in acts)


def linear_forwards(items: Sequence[LinearInput], compress: bool = True) -> list[LinearForward]:
    """:class:`LinearForward` of many stages at once (docs/algorithm.md section 8).

    Stages of one shape share batched products and one batched SVD whose ranks are read in
    one host transfer, and that SVD's right singular vectors give the basis ``Q`` of the
    stages whose ``Zt`` is rank deficient (stacked per shape and rank: no SVD per stage).
    Stages with the same activations share one call of :func:`elementwise_derivatives` on
    their concatenated pre-activations.
    """
    for it in items:
        if not (it.weight_selected or it.bias_selected):
            raise ValueError("a Linear stage needs its weight or its bias as parameters")
    shape_groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        key = (tuple(it.weight.shape), it.bias is None, tuple(it.z.shape), it.weight_selected,
               it.bias_selected)
        shape_groups.setdefault(key, []).append(i)
    pre: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    Zt: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    Q: list[torch.Tensor | None] = [None] * len(items)
    Zr: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    for idx in shape_groups.values():
        group = [items[i] for i in idx]
        z = torch.stack([it.z for it in group])  # (G, B, h_in)
        u = z @ torch.stack([it.weight for it in group]).transpose(1, 2)
        if group[0].bias is not None:
            u = u + torch.stack([it.bias for it in group])[:, None, :]
        first = group[0]
        ones = z.new_ones(z.shape[0], z.shape[1], 1)
        cols = ([z] if first.weight_selected else []) + ([ones] if first.bias_selected else [])
        zt = torch.cat(cols, dim=2)
        for j, i in enumerate(idx):
            pre[i], Zt[i], Zr[i] = u[j], zt[j], zt[j]
        if compress:
            _row_space_bases(zt, idx, Q, Zr)
    s1: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    s2: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    act_groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        act_groups.setdefault(_activation_key(it.acts), []).append(i)
    for idx in act_groups.values():
        flat = torch.cat([pre[i].reshape(-1) for i in idx])
        _, d1, d2 = elementwise_derivatives(items[idx[0]].acts, flat)
        sizes = [pre[i].numel() for i in idx]
        for i, a, b in zip(idx, d1.split(sizes), d2.split(sizes), strict=True):
            s1[i], s2[i] = a.reshape(pre[i].shape), b.reshape(pre[i].shape)
    return [LinearForward(it.weight, Zt[i], s1[i], s2[i], Q[i], Zr[i], it.weight_selected,
                          it.bias_selected) for i, it in enumerate(items)]


def _row_space_bases(zt: torch.Tensor, idx: list[int], Q: list, Zr: list) -> None:
    """The bases ``Q`` ``(m, r)`` and ``Zr = Zt Q`` of the rank-deficient matrices of a stack
    ``zt`` ``(G, B, m)`` (stages ``idx``), written into ``Q`` and ``Zr``: one batched SVD, its
    ranks read in one transfer, and one batched product per rank."""
    _, S, Vh = torch.linalg.svd(zt, full_matrices=False)
    m = zt.shape[2]
    by_rank: dict[int, list[int]] = {}
    for j, r in enumerate(_ranks(S, tuple(zt.shape[1:])).tolist()):
        if r < m:
            by_rank.setdefault(r, []).append(j)
    for r, js in by_rank.items():
        pick = torch.tensor(js, device=zt.device)
        q = Vh[pick, :r].transpose(1, 2).contiguous()  # (G_r, m, r)
        zr = torch.bmm(zt[pick], q)
        for k, j in enumerate(js):
            Q[idx[j]], Zr[idx[j]] = q[k], zr[k]


class LinearDerivatives(StageDerivatives):
    """Derivatives of ``act(W z + c)`` in Kronecker form (see the module docstring).

    Args:
        weight, bias: the module's current weight ``(h_out, h_in)`` and bias (or ``None``).
        acts: the elementwise activation modules that follow, in order.
        z: the stage input ``(B, h_in)``.
        b: the adjoint ``dL/dz_out`` ``(B, h_out)``.
        weight_selected, bias_selected: which of the two are parameters of ``H`` (the others
            are constants).
        has_input: False for the first stage (its input is data).
        second_order: False for the Gauss-Newton matrix (``Dxx = Dzx = Dzz = 0``).
        compress: use the row-space basis ``Y`` when ``Zt`` has rank below ``m``.

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(3, 2).double()
    >>> z, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> d = LinearDerivatives(lin.weight.detach(), lin.bias.detach(), (nn.Tanh(),), z, b,
    ...                       weight_selected=True, bias_selected=True, has_input=True)
    >>> d.num_params, d.basis_size  # rank(Zt) = 4 = m: no compression
    (8, 8)
    >>> v = torch.randn(8, 1, dtype=torch.float64)
    >>> torch.allclose(d.Dx(v)[:, :, 0], d.dense().Dx @ v[:, 0])
    True
    """

    def __init__(self, weight, bias, acts, z, b, *, weight_selected: bool, bias_selected: bool,
                 has_input: bool, second_order: bool = True, compress: bool = True):
        item = LinearInput(weight, bias, tuple(acts), z, weight_selected, bias_selected)
        self._setup(linear_forwards([item], compress)[0], b, has_input, second_order)

    @classmethod
    def from_forward(cls, forward: LinearForward, b: torch.Tensor, *, has_input: bool,
                     second_order: bool = True) -> LinearDerivatives:
        """The stage from its :class:`LinearForward` (see :func:`linear_forwards`) and adjoint."""
        self = cls.__new__(cls)
        self._setup(forward, b, has_input, second_order)
        return self

    def _setup(self, fwd: LinearForward, b, has_input, second_order):
        B, m = fwd.Zt.shape
        h_out, h_in = fwd.W.shape
        self.W, self.Zt, self.s1 = fwd.W, fwd.Zt, fwd.s1
        self.second_order = second_order
        if second_order:
            self.beta, self.gamma = b * fwd.s2, b * fwd.s1
        else:
            self.beta, self.gamma = torch.zeros_like(fwd.s1), torch.zeros_like(fwd.s1)
        # views the sweeps use at every stage, made once (each costs an operator per use)
        self._WT, self._s1c, self._betac = self.W.T, self.s1[:, :, None], self.beta[:, :, None]
        self.batch, self.out_size = B, h_out
        self.in_size = h_in if has_input else 0
        self.has_input = has_input
        self.weight_selected, self.bias_selected = fwd.weight_selected, fwd.bias_selected
        self.n_weight_cols = h_in if fwd.weight_selected else 0
        self.m = m
        self.num_params = h_out * m
        self.dtype, self.device = fwd.Zt.dtype, fwd.Zt.device
        # the row-space basis Q of Zt (section 8); Q = None means Q = I
        self.Q, self.Zr = fwd.Q, fwd.Zr
        self.r = m if fwd.Q is None else fwd.Q.shape[1]
        self._complement = None  # built on first use, or for many stages by linear_complements


    # ------------------------------------------------------------ layout
    def to_matrix(self, v: torch.Tensor) -> torch.Tensor:
        """``(..., p, k)`` in parameter order (weight row-major, then bias) ->
        ``(..., h_out, m, k)`` (leading dimensions: stages stacked by the batched solve terms)."""
        h_out, k, lead = self.out_size, v.shape[-1], v.shape[:-2]
        nw = h_out * self.n_weight_cols
        parts = []
        if self.weight_selected:
            parts.append(v[..., :nw, :].reshape(*lead, h_out, self.n_weight_cols, k))
        if self.bias_selected:
            parts.append(v[..., nw:, :].reshape(*lead, h_out, 1, k))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def from_matrix(self, M: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`."""
        h_out, k, lead = M.shape[-3], M.shape[-1], M.shape[:-3]
        nw = self.n_weight_cols
        parts = []
        if self.weight_selected:
            parts.append(M[..., :nw, :].reshape(*lead, h_out * nw, k))
        if self.bias_selected:
            parts.append(M[..., nw:, :].reshape(*lead, h_out, k))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    # ------------------------------------------------------------ first order
    def Dx(self, v):
        return self._s1c * _apply_rows(self.Zt, self.to_matrix(v))

    def Dx_T(self, w):
        return self.from_matrix(_gather_rows(self.Zt, self._s1c * w))

    def Dz(self, t):
        return self._s1c * _left(self.W, t, self._WT)

    def Dz_T(self, w):
        return _left(self._WT, self._s1c * w, self.W)

    # ------------------------------------------------------------ second order
    def Dxx(self, v):
        T = _apply_rows(self.Zt, self.to_matrix(v))
        return self.from_matrix(_gather_rows(self.Zt, self._betac * T))

    def _E(self, t):
        """``E t`` in matrix form ``(h_out, m, k)``: the ``gamma`` term of ``Dzx``."""
        B, i, k = t.shape
        Et = (self.gamma.T @ t.reshape(B, i * k)).reshape(-1, i, k)
        pad = self.m - self.n_weight_cols
        if pad:
            Et = torch.cat([Et, Et.new_zeros(Et.shape[0], pad, Et.shape[2])], dim=1)
        return Et

    def _E_T(self, M):
        """``E^T`` of a matrix-form ``(h_out, m, k)``: ``(B, h_in, k)``."""
        o, nw, k = M.shape[0], self.n_weight_cols, M.shape[2]
        return (self.gamma @ M[:, :nw].reshape(o, nw * k)).reshape(-1, nw, k)

    def Dzx(self, t):
        out = _gather_rows(self.Zt, self._betac * _left(self.W, t, self._WT))
        if self.weight_selected:
            out = out + self._E(t)
        return self.from_matrix(out)

    def Dzx_T(self, v):
        M = self.to_matrix(v)
        out = _left(self._WT, self._betac * _apply_rows(self.Zt, M), self.W)
        if self.weight_selected:
            out = out + self._E_T(M)
        return out

    def Dzz(self, t):
        return _left(self._WT, self._betac * _left(self.W, t, self._WT), self.W)

    # ------------------------------------------------------------ H v (sections 3, 13)
    # With V_W, v_b the weight and bias parts of v: the pre-activation's tangent is
    # P = P0 + W t_prev with P0 = Z V_W^T + 1 v_b^T, the stage's tangent t = s' * P;
    # backward R = beta * P + s' * u, u_prev = W^T R + E^T V_W and
    # Hv = (Z^T R + E t_prev, sum_i R_i). P0, E^T V_W and Hv do not depend on the
    # recursions: batched over the stages of one shape.
    def _hvp_key(self) -> tuple:
        return (self.out_size, self.m, self.weight_selected, self.bias_selected, self.batch,
                self.in_size)

    @staticmethod
    def _hvp_groups(stages) -> list[list[int]]:
        return _shape_groups(stages, [d._hvp_key() for d in stages])

    @classmethod
    def hvp_prepare(cls, stages, v):
        """``(P0, E^T V_W)`` per stage (``None`` for the second without a stage input or
        weight columns): ``P0 = Z V_W^T + 1 v_b^T`` ``(B, h_out, k)`` and ``gamma V_W``
        ``(B, h_in, k)``, one batched product each per shape; the weight and bias parts of
        ``v`` are used as views."""
        out: list = [None] * len(stages)
        for idx in cls._hvp_groups(stages):
            d = stages[idx[0]]
            V = _stack([v[i] for i in idx])  # (G, p, k)
            G, k, h, nw = V.shape[0], V.shape[-1], d.out_size, d.n_weight_cols
            P0 = EV = None
            if d.weight_selected:
                VW = V[:, :h * nw].reshape(G, h, nw, k)
                Z = _stack([stages[i].Zt for i in idx])[:, :, :nw]
                P0 = _bmm_k(Z, VW.transpose(1, 2))  # (G, B, h_out, k)
                if d.has_input:
                    gammas = _stack([stages[i].gamma for i in idx])
                    EV = _bmm_k(gammas, VW)  # (G, B, h_in, k)
            if d.bias_selected:
                vb = V[:, h * nw:][:, None]  # (G, 1, h_out, k)
                P0 = vb.expand(G, d.batch, h, k) if P0 is None else P0 + vb
            for j, i in enumerate(idx):
                out[i] = (P0[j], None if EV is None else EV[j])
        return out

    def tangent(self, v, t_prev):
        P0, _ = v
        P = P0 if t_prev is None else _left_add(P0, self.W, t_prev, self._WT)
        return self._s1c * P, P

    def adjoint(self, v, t_prev, u, cache):
        """``R = beta * P + s' * u`` (the partial) and ``u_prev = W^T R + E^T V_W``."""
        R = torch.addcmul(self._betac * cache, self._s1c, u)
        if t_prev is None:
            return R, None
        return R, (_left(self._WT, R, self.W) if v[1] is None
                   else _left_add(v[1], self._WT, R, self.W))

    @classmethod
    def hvp_finish(cls, stages, v, t_prev, partial):
        """``Hv = (Z^T R + E t_prev, sum_i R_i)`` (weight and bias parts): batched per shape."""
        out: list[torch.Tensor] = [None] * len(stages)
        for idx in cls._hvp_groups(stages):
            d = stages[idx[0]]
            R = _stack([partial[i] for i in idx])  # (G, B, h_out, k)
            G, k, h, nw = R.shape[0], R.shape[-1], d.out_size, d.n_weight_cols
            parts = []
            if d.weight_selected:
                Z = _stack([stages[i].Zt for i in idx])[:, :, :nw]
                if k == 1:  # (G, h_out, nw, k): sum over the samples of R_i Z_i^T
                    HW = _bmm(R[..., 0].transpose(1, 2), Z)[..., None]
                else:
                    HW = torch.einsum("gbok,gbm->gomk", R, Z)
                if d.has_input:  # E t_prev: the gamma term of Dzx on the weight columns
                    gammas = _stack([stages[i].gamma for i in idx])
                    T = _stack([t_prev[i] for i in idx])  # (G, B, h_in, k)
                    HW = HW + _bmm_k(gammas.transpose(1, 2), T)
                parts.append(HW.reshape(G, h * nw, k))
            if d.bias_selected:
                parts.append(R.sum(1))
            hv = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            for j, i in enumerate(idx):
                out[i] = hv[j]
        return out

    # ------------------------------------------------------------ curvature (section 6)
    def propagate_curvature(self, R):
        inner = self.s1[:, :, None] * R * self.s1[:, None, :] + torch.diag_embed(self.beta)
        return torch.einsum("oi,bop,pj->bij", self.W, inner, self.W)

    def diagonal(self, R):
        weight = self.beta + self.s1**2 * torch.diagonal(R, dim1=1, dim2=2)
        diag = torch.einsum("bo,bm->om", weight, self.Zt**2)
        return self.from_matrix(diag[:, :, None])[:, 0]

    def diagonal_block(self, R):
        K = self.s1[:, :, None] * R * self.s1[:, None, :] + torch.diag_embed(self.beta)
        h_out, m = self.out_size, self.m
        block = torch.einsum("bop,bm,bn->ompn", K, self.Zt, self.Zt).reshape(h_out * m, h_out * m)
        perm = self.from_matrix(
            torch.arange(h_out * m, device=self.device).reshape(h_out, m, 1)
        )[:, 0]
        return block[perm][:, perm]

    # ------------------------------------------------------------ basis (section 8)
    @property
    def basis_size(self):
        return self.out_size * self.r

    @property
    def complement(self):
        if self._complement is None and self.Q is not None:
            self._complement = linear_complements([self])[0]
        return self._complement

    def Y_T(self, v):
        M = self.to_matrix(v)
        if self.Q is not None:
            M = _left(self.Q.T, M)
        return M.reshape(self.basis_size, v.shape[-1])

    def Y(self, alpha):
        A = alpha.reshape(self.out_size, self.r, alpha.shape[-1])
        if self.Q is not None:
            A = _left(self.Q, A)
        return self.from_matrix(A)

    def DxY(self, alpha):
        A = alpha.reshape(self.out_size, self.r, alpha.shape[-1])
        return self._s1c * _apply_rows(self.Zr, A)

    def DxY_Dz(self, alpha, t):
        """``s' * (Zr A^T + t W^T)`` per sample, the second product accumulated into the first
        (one ``addmm`` for one vector)."""
        A = alpha.reshape(self.out_size, self.r, alpha.shape[-1])
        return self._s1c * _left_add(_apply_rows(self.Zr, A), self.W, t, self._WT)

    def DxY_T(self, w):
        out = _gather_rows(self.Zr, self._s1c * w)
        return out.reshape(self.basis_size, w.shape[-1])

    def _right_scaled(self, M):
        """``M diag(s')`` as ``(c, B, h_out)``: what both products from the right start from."""
        return M.reshape(M.shape[0], self.batch, self.out_size) * self.s1

    def _right_DxY_of(self, R):
        return torch.matmul(R.transpose(1, 2), self.Zr).reshape(R.shape[0], self.basis_size)

    def _right_Dz_of(self, R):
        return (R @ self.W).reshape(R.shape[0], self.batch * self.W.shape[1])

    def right_DxY(self, M):
        return self._right_DxY_of(self._right_scaled(M))

    def right_Dz(self, M):
        return self._right_Dz_of(self._right_scaled(M))

    def right_DxY_Dz(self, M):
        """Both from one ``M diag(s')`` (one pass over ``M``)."""
        R = self._right_scaled(M)
        return self._right_DxY_of(R), (self._right_Dz_of(R) if self.has_input else None)

    def DxY_T_Dz_T(self, w):
        """Both from ``s' * w`` (one pass over ``w``)."""
        S = self._s1c * w
        return (_gather_rows(self.Zr, S).reshape(self.basis_size, w.shape[-1]),
                _left(self._WT, S, self.W))

    def Y_T_Dxx_Y(self):
        """From :meth:`front_terms` of this stage alone (one formula for both)."""
        return type(self).front_terms([self])[0].Y_T_Dxx_Y

    def Y_T_Dzx(self):
        """From :meth:`front_terms` of this stage alone (one formula for both)."""
        if not self.has_input:
            return self.Zr.new_zeros(self.basis_size, 0)
        return type(self).front_terms([self])[0].Y_T_Dzx

    # ------------------------------------------------------------ front terms (section 13)
    def _front_key(self) -> tuple:
        return (self.out_size, self.m, self.r, self.weight_selected, self.batch, self.in_size,
                self.Q is not None)

    @classmethod
    def front_terms(cls, stages):
        """Batched over the stages of one shape, with ``g`` indexing them:
        ``Y^T Dxx Y = blockdiag_o(Zr^T diag(beta[:, o]) Zr)``,
        ``(Y^T Dzx)[(o, r), (b, i)] = beta[b, o] W[o, i] Zr[b, r] + gamma[b, o] Q[i, r]``
        (the second term for a selected weight) and ``Dzz_b = W^T diag(beta[b]) W``."""
        out: list = [None] * len(stages)
        for idx in _shape_groups(stages, [d._front_key() for d in stages]):
            group = [stages[i] for i in idx]
            d0 = group[0]
            G, B, h_out, r, h_in = len(idx), d0.batch, d0.out_size, d0.r, d0.in_size
            N = h_out * r
            Zr, beta = _stack([d.Zr for d in group]), _stack([d.beta for d in group])
            blocks = torch.einsum("gbr,gbo,gbs->gors", Zr, beta, Zr)
            Dxx = blocks.new_zeros(G, h_out, r, h_out, r)
            torch.diagonal(Dxx, dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
            Dxx = Dxx.view(G, N, N)
            Dzx = Dzz = [None] * G
            if d0.has_input:
                W = _stack([d.W for d in group])
                Dzx = torch.einsum("gbo,goi,gbr->gorbi", beta, W, Zr)
                if d0.weight_selected:
                    Qh = (_stack([d.Q for d in group])[:, :h_in] if d0.Q is not None else
                          torch.eye(d0.m, dtype=d0.dtype, device=d0.device)[:h_in].expand(
                              G, h_in, d0.m))
                    gamma = _stack([d.gamma for d in group])
                    Dzx = Dzx + torch.einsum("gbo,gir->gorbi", gamma, Qh)
                Dzx = Dzx.reshape(G, N, B * h_in)
                Dzz = torch.einsum("goi,gbo,goj->gbij", W, beta, W)
            for j, i in enumerate(idx):
                out[i] = FrontTerms(Dxx[j], Dzx[j], Dzz[j])
        return out

    # ------------------------------------------------------------ solve terms (sections 8, 13)
    def _solve_key(self, closed: bool) -> tuple:
        coupled = closed and self.complement.coupled_dim > 0
        return (self.out_size, self.m, self.r, self.weight_selected, self.bias_selected,
                self.batch, self.in_size, self.Q is not None, closed, coupled)

    @staticmethod
    def _solve_groups(stages, closed) -> list[list[int]]:
        return _shape_groups(stages, [d._solve_key(c) for d, c in zip(stages, closed,
                                                                        strict=True)])

    @classmethod
    def rhs_terms(cls, stages, closed, g):
        """Batched over the stages of one shape: with ``M`` the stacked matrix forms of the
        ``g`` blocks and ``Q`` the stacked bases, ``Y^T g = Q^T M``, ``(I - Y Y^T) g = M - Q Q^T M``
        (kept in matrix form) and ``E^T (I - Y Y^T) g = gamma (M - Q Q^T M)_W`` (the weight
        columns): a few batched products per shape instead of a dozen small ones per stage."""
        out: list[RhsTerms] = [None] * len(stages)  # type: ignore[list-item]
        for idx in cls._solve_groups(stages, closed):
            d = stages[idx[0]]
            M = d.to_matrix(_stack([g[i] for i in idx]))  # (G, h_out, m, k)
            G, k = len(idx), M.shape[-1]
            P = coupling_T = None
            if d.Q is None:
                A = M
            else:
                Qs = _stack([stages[i].Q for i in idx])  # (G, m, r)
                A = torch.einsum("gmr,gomk->gork", Qs, M)
                if closed[idx[0]]:
                    P = M - torch.einsum("gmr,gork->gomk", Qs, A)
                    if d.complement.coupled_dim:
                        gammas = _stack([stages[i].gamma for i in idx])  # (G, B, h_out)
                        coupling_T = torch.einsum("gbo,gomk->gbmk", gammas,
                                                  P[:, :, :d.n_weight_cols])
            Y_T_g = A.reshape(G, d.basis_size, k)
            for j, i in enumerate(idx):
                out[i] = RhsTerms(Y_T_g[j], None if P is None else P[j],
                                  None if coupling_T is None else coupling_T[j])
        return out

    @classmethod
    def controls(cls, stages, closed, alpha, t_prev, terms, damping):
        """Batched over the stages of one shape, in matrix form: ``V = Q A`` with ``A`` the
        stacked ``alpha``; for a closed complement, with ``X = E t_prev`` and
        ``P = (I - Y Y^T) g``, ``V = Q (A + Q^T X / eps) + (P - X) / eps``, which is
        ``Q A + (P - (I - Q Q^T) X) / eps``."""
        out: list[torch.Tensor] = [None] * len(stages)  # type: ignore[list-item]
        for idx in cls._solve_groups(stages, closed):
            d = stages[idx[0]]
            G, k = len(idx), alpha[idx[0]].shape[-1]
            A = _stack([alpha[i] for i in idx]).reshape(G, d.out_size, d.r, k)
            if d.Q is None:
                V = A
            else:
                Qs = _stack([stages[i].Q for i in idx])
                P = _stack([terms[i].projected for i in idx]) if closed[idx[0]] else None
                if P is not None and d.complement.coupled_dim and d.has_input:
                    gammas = _stack([stages[i].gamma for i in idx])
                    ts = _stack([t_prev[i] for i in idx])  # (G, B, h_in, k)
                    X = torch.einsum("gbo,gbik->goik", gammas, ts)
                    pad = d.m - d.n_weight_cols
                    if pad:
                        X = torch.cat([X, X.new_zeros(G, d.out_size, pad, k)], dim=2)
                    A = A + torch.einsum("gmr,gomk->gork", Qs, X) / damping
                    P = P - X
                V = torch.einsum("gmr,gork->gomk", Qs, A)
                if P is not None:
                    V = V + P / damping
            v = d.from_matrix(V)
            for j, i in enumerate(idx):
                out[i] = v[j]
        return out


class LinearComplement(Complement):
    """The directions of a :class:`LinearDerivatives` stage outside ``Y = I (x) Q`` (section 8).

    ``E = Gamma^T (x) Pi`` with ``Gamma = gamma`` (``B x h_out``) and ``Pi`` the input
    columns of the ``m`` columns, so ``E^T (I - Y Y^T) E = Gamma Gamma^T (x) (I - Qh Qh^T)``
    (``Qh`` the input rows of ``Q``). The coupled directions are ``U_Gamma (x) P_c`` with
    ``U_Gamma`` an orthonormal basis of ``range(Gamma^T)`` and ``P_c`` one of
    ``range((I - Q Q^T) Pi)``; the rest are null vectors of ``H``.
    """

    def __init__(self, stage: LinearDerivatives, gamma_svd, projector):
        """``gamma_svd``: ``(S, Vh, rank)`` of ``stage.gamma``; ``projector``: ``(P, Pc,
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
        return M - _left(Q, _left(Q.T, M))

    def coupling(self, t):
        s = self.stage
        if self.coupled_dim == 0:
            return t.new_zeros(s.num_params, t.shape[-1])
        return s.from_matrix(self._project_matrix(s._E(t)))

    def coupling_T(self, v):
        s = self.stage
        if self.coupled_dim == 0:
            return v.new_zeros(s.batch, s.in_size, v.shape[-1])
        return s._E_T(self._project_matrix(s.to_matrix(v)))

    def coupling_T_of_projected(self, pv):
        s = self.stage
        if self.coupled_dim == 0:
            return pv.new_zeros(s.batch, s.in_size, pv.shape[-1])
        return s._E_T(s.to_matrix(pv))

    def gram(self):
        s = self.stage
        a_in = s.batch * s.in_size
        if self.coupled_dim == 0:
            return s.Zt.new_zeros(a_in, a_in)
        G = torch.einsum("bo,co,ij->bicj", s.gamma, s.gamma, self.P)
        return G.reshape(a_in, a_in)

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
            self.coupled_dim, v.shape[-1])

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
        _, S, Vh = torch.linalg.svd(torch.stack([stages[i].gamma for i in idx]),
                                    full_matrices=False)
        ranks = _ranks(S, shape).tolist() if S.shape[1] else [0] * len(idx)
        for j, i in enumerate(idx):
            svds[i] = (S[j], Vh[j], ranks[j])
    for idx in bases.values():
        nw = stages[idx[0]].n_weight_cols
        for i, projector in zip(idx, _complement_projectors([stages[i].Q for i in idx], nw),
                                strict=True):
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
    Q = _stack(Qs)  # (G, m, r)
    m, r = Q.shape[1:]
    Pi = torch.eye(m, nw, dtype=Q.dtype, device=Q.device)
    A = Pi - torch.bmm(Q, Q[:, :nw].transpose(1, 2))
    P = torch.bmm(A.transpose(1, 2), A)
    U, S, _ = torch.linalg.svd(A, full_matrices=False)
    Pc = U[:, :, : m - r]
    mu_max = S[:, 0] ** 2 if S.shape[1] else S.new_zeros(len(Qs))
    return [(P[j], Pc[j], mu_max[j]) for j in range(len(Qs))]
