"""Counting host-device synchronisations and operators (docs/algorithm.md section 13).

On a GPU every ``float(t)``, ``int(t)``, ``bool(t)``, ``t.item()`` or ``t.tolist()`` of a
device tensor waits for the queue of kernels to drain, so a loop over stages that reads
one number per stage runs at the speed of the round trip, not of the kernels.
:class:`HostSyncCounter` counts such reads on any device, so the count can be checked on
a CPU: the scalar reads through the one operator they all reach,
``aten._local_scalar_dense``, and ``tolist`` calls (one transfer each) by wrapping the
method while the counter is active.

Each operator on a tensor costs the host a dispatch, and on a GPU a kernel launch unless it
only makes a view; in a loop over stages at small width these costs, not the arithmetic,
set the time. :class:`KernelCounter` counts the operators that may launch a kernel (views
and bare allocations are left out), so that their number per stage can be checked on a CPU.
"""

from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "KernelCounter"]


class HostSyncCounter(TorchDispatchMode):
    """Context manager: ``count`` scalar reads made inside it, ``sites`` where (file:line).

    >>> import torch
    >>> with HostSyncCounter() as syncs:
    ...     x = torch.ones(3)
    ...     _ = float(x.sum()) + int(x.argmax()) + len(x.tolist())
    >>> syncs.count
    3
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()

    def _record(self):
        self.count += 1
        torch_dir = os.sep + "torch" + os.sep
        frames = [
            f
            for f in traceback.extract_stack()[:-2]
            if torch_dir not in f.filename and f.filename != __file__
        ]
        if frames:
            self.sites[f"{frames[-1].filename}:{frames[-1].lineno}"] += 1

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist
        counter = self

        def counted_tolist(t):
            counter._record()
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record()
        return func(*args, **(kwargs or {}))


_aten = torch.ops.aten
#: operators that are not views by their schema but launch nothing
_NO_KERNEL = {
    _aten._unsafe_view.default,
    _aten.empty.memory_format,
    _aten.new_empty.default,
    _aten.empty_strided.default,
    _aten.is_same_size.default,
    _aten._has_same_storage_numel.default,
}


class KernelCounter(TorchDispatchMode):
    """Context manager: ``count`` operators made inside it that may launch a kernel on a GPU
    (not views, not bare allocations), ``ops`` by name.

    >>> import torch
    >>> with KernelCounter() as kernels:
    ...     x = torch.ones(3, 4)
    ...     y = (x.T @ x).reshape(-1)[:5].exp()  # transpose, reshape, slice: views
    >>> kernels.count, sorted(kernels.ops)
    (3, ['exp', 'mm', 'ones'])
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in _NO_KERNEL:
            self.count += 1
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))
