"""The forward-pass parts of ``Linear`` stages, many stages at once (docs/algorithm.md
sections 8, 13): pre-activations, activation derivatives, the inputs ``Zt = [Z, 1]`` and the
row-space bases ``Q`` of rank-deficient stages, from one batched SVD per shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.func import jvp

from hessinv.derivatives.base import quiet_forward_ad
from hessinv.derivatives.linear.kernels import ranks

__all__ = [
    "elementwise_derivatives",
    "LinearInput",
    "LinearForward",
    "linear_forwards",
    "compress_linear_stages",
]


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

    with quiet_forward_ad():
        (out, d1), (_, d2) = jvp(first, (pre,), (ones,))
    return out, d1, d2


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
    row-space basis ``Q`` ``(m, r)`` of ``Zt`` with ``Zr = Zt Q`` (``Q = None``: ``Q = I``);
    ``compressed``: whether the rank of ``Zt`` was checked (without, ``Q = I``)."""

    W: torch.Tensor
    Zt: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    Q: torch.Tensor | None
    Zr: torch.Tensor
    weight_selected: bool
    bias_selected: bool
    compressed: bool = True


def _activation_key(acts) -> tuple:
    # elementwise modules with the same type and settings compute the same function
    return tuple(repr(m) for m in acts)


def linear_forwards(items: Sequence[LinearInput], compress: bool = True) -> list[LinearForward]:
    """:class:`LinearForward` of many stages at once (docs/algorithm.md section 8).

    Stages of one shape share batched products and one batched SVD whose ranks are read in
    one host transfer, and that SVD's right singular vectors give the basis ``Q`` of the
    stages whose ``Zt`` is rank deficient (stacked per shape and rank: no SVD per stage).
    Stages with the same activations share one call of :func:`elementwise_derivatives` on
    their concatenated pre-activations. ``compress=False`` leaves the ranks unchecked
    (``Q = I``); :func:`compress_linear_stages` checks them later, for the routes that use
    the bases (the Gauss-Newton matrix's output space does not).
    """
    for it in items:
        if not (it.weight_selected or it.bias_selected):
            raise ValueError("a Linear stage needs its weight or its bias as parameters")
    shape_groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        key = (
            tuple(it.weight.shape),
            it.bias is None,
            tuple(it.z.shape),
            it.weight_selected,
            it.bias_selected,
        )
        shape_groups.setdefault(key, []).append(i)
    pre: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    Zt: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    Q: list[torch.Tensor | None] = [None] * len(items)
    Zr: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    for idx in shape_groups.values():
        group = [items[i] for i in idx]
        z = torch.stack([it.z for it in group])  # (ng, B, h_in)
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
    return [
        LinearForward(
            it.weight,
            Zt[i],
            s1[i],
            s2[i],
            Q[i],
            Zr[i],
            it.weight_selected,
            it.bias_selected,
            compress,
        )
        for i, it in enumerate(items)
    ]


def _row_space_bases(zt: torch.Tensor, idx: list[int], Q: list, Zr: list) -> None:
    """The bases ``Q`` ``(m, r)`` and ``Zr = Zt Q`` of the rank-deficient matrices of a stack
    ``zt`` ``(ng, B, m)`` (stages ``idx``), written into ``Q`` and ``Zr``: one batched SVD, its
    ranks read in one transfer, and one batched product per rank."""
    _, sv, Vh = torch.linalg.svd(zt, full_matrices=False)
    m = zt.shape[2]
    by_rank: dict[int, list[int]] = {}
    for j, r in enumerate(ranks(sv, tuple(zt.shape[1:])).tolist()):
        if r < m:
            by_rank.setdefault(r, []).append(j)
    for r, js in by_rank.items():
        pick = torch.tensor(js, device=zt.device)
        q = Vh[pick, :r].transpose(1, 2).contiguous()  # (G_r, m, r)
        zr = torch.bmm(zt[pick], q)
        for k, j in enumerate(js):
            Q[idx[j]], Zr[idx[j]] = q[k], zr[k]


def compress_linear_stages(stages) -> None:
    """Check the ranks of the ``Zt`` of the stages that were built without (``compressed``
    False) and give the rank-deficient ones their basis ``Q``, ``Zr`` and complement: one
    batched SVD per shape, as :func:`linear_forwards` does (docs/algorithm.md sections 8, 13).
    A stage already compressed is left as it is."""
    from hessinv.derivatives.linear.complement import linear_complements

    todo = [d for d in stages if not d.compressed]
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(todo):
        groups.setdefault(tuple(d.Zt.shape), []).append(i)
    Q: list = [None] * len(todo)
    Zr: list = [d.Zt for d in todo]
    for idx in groups.values():
        _row_space_bases(torch.stack([todo[i].Zt for i in idx]), idx, Q, Zr)
    for d, q, zr in zip(todo, Q, Zr, strict=True):
        d.set_basis(q, zr)
    linear_complements([d for d in todo if d.Q is not None])
