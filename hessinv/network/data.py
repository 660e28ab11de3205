"""Several batches as one: the union a curvature is taken on (docs/algorithm.md section 1).

Convention: the loss over an iterable of ``(inputs, targets)`` batches is
``loss_fn(model(all inputs), all targets)`` on their concatenation, exactly as if the
batches were one. With ``reduction="mean"`` it is the mean over every sample of every
batch (what curvlinops calls ``num_data`` scaling); with ``"sum"`` the sum. Products,
the gradient, the loss and the diagonal are sums over samples and are the same whether
computed batch by batch or on the union. A factorization works on the union: its stage
size ``a = N h`` grows with the total number of samples ``N``, and its cost with ``a^3``,
which the memory estimate checks before it starts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["concatenate_batches", "resolve_batch"]


def _cat(items, what: str):
    flats = [tree_flatten(it) for it in items]
    spec = flats[0][1]
    for _, s in flats[1:]:
        if s != spec:
            raise ValueError(f"every batch's {what} must have the same structure")
    leaves = []
    for parts in zip(*(f[0] for f in flats), strict=True):
        if all(isinstance(p, torch.Tensor) for p in parts):
            leaves.append(torch.cat(parts, dim=0))
        else:
            raise TypeError(f"{what} must be tensors (or tuples/dicts of tensors) to concatenate")
    return tree_unflatten(leaves, spec)


def concatenate_batches(data: Iterable, progress: bool | None = None):
    """``(inputs, targets)`` of the union of an iterable of ``(inputs, targets)`` batches."""
    from hessinv.progress import progress_bar

    inputs, targets = [], []
    total = len(data) if hasattr(data, "__len__") else None
    bar = progress_bar(total, "batches", progress)
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "data must yield (inputs, targets) pairs, like a DataLoader over a TensorDataset; "
                f"got {type(batch).__name__}"
            )
        inputs.append(batch[0])
        targets.append(batch[1])
        bar.update()
    bar.close()
    if not inputs:
        raise ValueError("data yielded no batches")
    return _cat(inputs, "inputs"), _cat(targets, "targets")


def resolve_batch(inputs, targets, data, progress: bool | None = None):
    """Either ``(inputs, targets)`` or ``data=``, not both; returns one batch."""
    if data is not None:
        if inputs is not None or targets is not None:
            raise TypeError("pass either inputs and targets, or data=, not both")
        return concatenate_batches(data, progress)
    if inputs is None or targets is None:
        raise TypeError("inputs and targets are required (or pass data= an iterable of batches)")
    return inputs, targets
