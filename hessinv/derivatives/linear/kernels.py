"""Batched matrix kernels of the ``Linear`` stages (docs/algorithm.md sections 8, 13).

Per-sample products in the ``(B, h, k)`` layout of the sweeps, written as one matrix product
each (no loop over samples), and stacks of the stages of one shape for batched calls.
"""

from __future__ import annotations

import torch

from hessinv.settings import BATCH_PARAMS

__all__ = [
    "ranks",
    "apply_rows",
    "left",
    "left_add",
    "gather_rows",
    "stack",
    "shape_groups",
    "bmm",
    "bmm_k",
]


def ranks(sv: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Ranks of a stack of matrices of ``shape`` from their singular values ``sv`` ``(ng, k)``
    (descending); a zero matrix has tolerance 0 and rank 0. Stays on the device."""
    tol = max(shape) * torch.finfo(sv.dtype).eps * sv[:, :1]
    return (sv > tol).sum(1)


def apply_rows(Z: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``out[b, o, k] = sum_m Z[b, m] M[o, m, k]`` as one matrix product."""
    o, m, k = M.shape
    if k == 1:  # one vector: a plain product, no reshaping copies
        return (Z @ M[:, :, 0].T)[:, :, None]
    return (Z @ M.transpose(0, 1).reshape(m, o * k)).reshape(Z.shape[0], o, k)


def left(W: torch.Tensor, t: torch.Tensor, W_T: torch.Tensor | None = None) -> torch.Tensor:
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


def left_add(
    acc: torch.Tensor, W: torch.Tensor, t: torch.Tensor, W_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``acc + left(W, t)``; for one vector one ``addmm`` over the samples, for many one
    ``baddbmm`` with ``W`` broadcast over the samples (``acc`` may be a broadcast view)."""
    B, i, k = t.shape
    if k == 1:
        return torch.addmm(acc[:, :, 0], t[:, :, 0], W.T if W_T is None else W_T)[:, :, None]
    if k >= i:
        return torch.baddbmm(acc, W.expand(B, *W.shape), t)
    return acc + left(W, t)


def gather_rows(Z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``out[o, m, k] = sum_b Z[b, m] R[b, o, k]``: a broadcast product when ``k >= m``
    (contiguous result, ``Z`` copied once per ``o``), else one product over the stacked ``R``."""
    B, o, k = R.shape
    if k == 1:
        return (R[:, :, 0].T @ Z)[:, :, None]
    if k >= Z.shape[1]:
        return torch.matmul(Z.T, R.transpose(0, 1))
    return (Z.T @ R.reshape(B, o * k)).reshape(Z.shape[1], o, k).transpose(0, 1)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``(ng, ...)``: the tensors of one group of stages stacked; a view, not a copy, when they
    lie one after the other in one storage (blocks of consecutive stages split from one flat
    vector, parts of an earlier stack): on wide layers a copy costs as much as the products."""
    first = tensors[0]
    if len(tensors) == 1:
        return first[None]
    step = first.numel()
    if first.is_contiguous() and all(
        t.is_contiguous()
        and t.shape == first.shape
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + j * step
        for j, t in enumerate(tensors)
    ):
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()))
    return torch.stack(tensors)


def shape_groups(stages, keys) -> list[list[int]]:
    """Indices of the stages grouped by ``keys`` (their shapes), a stage above
    :data:`BATCH_PARAMS` parameters in a group of its own."""
    groups: dict[tuple, list[int]] = {}
    for i, (d, key) in enumerate(zip(stages, keys, strict=True)):
        groups.setdefault(key if d.num_params <= BATCH_PARAMS else ("alone", i), []).append(i)
    return list(groups.values())


def bmm(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``A @ X`` for stacks ``(ng, I, C)``, ``(ng, C, J)`` (either may be a transposed view);
    a plain product for a stack of one (faster than a batched one on transposed views)."""
    return (A[0] @ X[0])[None] if A.shape[0] == 1 else torch.bmm(A, X)


def bmm_k(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``out[g, i, j, k] = sum_c A[g, i, c] X[g, c, j, k]`` for a stack of matrices ``A``
    ``(ng, I, C)`` and of ``k`` matrices ``X`` ``(ng, C, J, k)`` (either may be a transposed
    view): one batched product for one vector, no copies; an ``einsum`` for several."""
    if X.shape[-1] == 1:
        return bmm(A, X[..., 0])[..., None]
    return torch.einsum("gic,gcjk->gijk", A, X)
