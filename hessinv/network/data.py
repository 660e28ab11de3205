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
from torch.utils.data import Dataset, IterableDataset

__all__ = ["concatenate_batches", "resolve_batch"]

_WANT_BATCHES = (
    "data= must yield batches (inputs, targets) with the batch dimension first, like a "
    "DataLoader; for a Dataset of single samples pass "
    "torch.utils.data.DataLoader(dataset, batch_size=...)"
)


def _shapes(tree) -> str:
    leaves = tree_flatten(tree)[0]
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _check_batch(k: int, inputs, targets) -> None:
    """``ValueError`` if batch ``k`` does not look like a batch: a 0-d tensor, or tensors
    whose leading sizes differ (the items of a ``Dataset``: one sample's features and target,
    without the batch dimension)."""
    leaves = [t for t in tree_flatten((inputs, targets))[0] if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if None in sizes or len(sizes) > 1:
        raise ValueError(
            f"batch {k} of data= has inputs of shape {_shapes(inputs)} and targets of shape "
            f"{_shapes(targets)}, which share no batch dimension: it looks like a single sample "
            f"(an item of a Dataset). {_WANT_BATCHES}"
        )


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
    """``(inputs, targets)`` of the union of an iterable of ``(inputs, targets)`` batches.

    Raises ``TypeError`` for a map-style ``torch.utils.data.Dataset`` (it yields single
    samples; wrap it in a ``DataLoader``, or ``DataLoader(dataset, batch_size=None)`` if its
    items are batches already) and ``ValueError`` for a yielded pair that is no batch (a 0-d
    tensor, or leading sizes that differ: one sample's features and target)."""
    from hessinv.progress import progress_bar

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        raise TypeError(
            f"data= is a {type(data).__name__}, a Dataset: it yields single samples, without "
            f"the batch dimension. {_WANT_BATCHES} (or batch_size=None if its items are "
            "batches already)"
        )
    inputs, targets = [], []
    total = len(data) if hasattr(data, "__len__") else None
    bar = progress_bar(total, "batches", progress)
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "data must yield (inputs, targets) pairs, like a DataLoader over a TensorDataset; "
                f"got {type(batch).__name__}"
            )
        _check_batch(len(inputs), batch[0], batch[1])
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
