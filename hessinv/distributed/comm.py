"""The collectives a multi-process curvature uses, on a ``torch.distributed`` process group
(docs/algorithm.md section 17).

:class:`Communicator` wraps one process group (gloo on CPUs, NCCL on GPUs): sums
(``all_reduce``), gathers of batch rows of different lengths per rank, and agreement checks.
Every collective

* counts the bytes this rank sends, per phase (:attr:`Communicator.traffic`), as the ring
  algorithms of gloo and NCCL send them: ``2 (R - 1) / R m`` for a sum of ``m`` bytes over
  ``R`` ranks, ``(R - 1) m`` for a gather of ``m`` bytes from each rank;
* turns a failure of the transport (a rank that crashed or stopped, a timeout) into a
  :class:`~hessinv.errors.DistributedError` that names the phase, instead of a bare backend
  error or a wait without end;

and :meth:`Communicator.checkpoint` lets a rank whose local work failed tell the others at
their next collective, so that they raise too instead of waiting for it.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from hessinv.errors import DistributedError

__all__ = ["Communicator", "crc", "mark_collective", "is_collective"]

_HINT = (
    "a rank stopped or crashed, did not reach this call within the process group's timeout "
    "(init_process_group(timeout=...)), or the ranks made different hessinv calls; every rank "
    "must make the same calls in the same order"
)


def crc(*parts: Any) -> float:
    """A checksum of ``parts`` (their ``repr``) that is the same in every process (Python's
    ``hash`` of a string is not), as a float for a float64 tensor."""
    return float(zlib.crc32(repr(parts).encode()))


def mark_collective(err: BaseException) -> BaseException:
    """Mark ``err`` as raised by every rank at the same point (no rank waits for another)."""
    err._hessinv_collective = True  # type: ignore[attr-defined]
    return err


def is_collective(err: BaseException) -> bool:
    return bool(getattr(err, "_hessinv_collective", False))


class Communicator:
    """One process group, the collectives on it and the bytes each phase sent.

    Args:
        process_group: a ``torch.distributed`` process group; ``None``: the default group
            (``init_process_group`` must have been called).

    Attributes:
        rank, size: this process's rank in the group and the number of ranks ``R``.
        traffic: ``{phase: bytes}`` this rank sent (the ring algorithms' count, see the module
            docstring), accumulated over calls.
    """

    def __init__(self, process_group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group (torchrun sets the environment for it) "
                "before building a multi-process curvature, or use the single-process classes"
            )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        self.backend = str(dist.get_backend(process_group))
        self.traffic: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ transport
    def _run(self, phase: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            work = fn(*args, group=self.group)
            if work is not None:  # an async handle on some backends
                work.wait()
        except (RuntimeError, ValueError) as err:  # DistBackendError is a RuntimeError
            raise mark_collective(
                DistributedError(
                    f"{phase}: a collective on rank {self.rank} of {self.size} ({self.backend}) "
                    f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}; {_HINT}",
                    phase,
                )
            ) from err

    def all_reduce(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        """``t`` summed over the ranks, in place (every rank gets the same bits)."""
        if self.size > 1:
            self.traffic[phase] += 2 * (self.size - 1) * t.numel() * t.element_size() // self.size
            self._run(phase, dist.all_reduce, t)
        return t

    def all_gather(self, t: torch.Tensor, phase: str) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
        if self.size == 1:
            return [t]
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        self.traffic[phase] += (self.size - 1) * t.numel() * t.element_size()
        self._run(phase, dist.all_gather, out, t)
        return out

    def gather_rows(self, t: torch.Tensor, sizes: Sequence[int], phase: str) -> torch.Tensor:
        """The ranks' ``t`` (``(sizes[rank], ...)``) concatenated along the first dimension,
        in rank order (padded to the largest for the transport)."""
        if self.size == 1:
            return t
        m = max(sizes)
        flag = t.dtype == torch.bool  # not every backend moves bool tensors
        x = t.to(torch.uint8) if flag else t
        if x.shape[0] < m:
            x = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])
        parts = self.all_gather(x, phase)
        out = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
        return out.bool() if flag else out

    def gather_tree(self, tree: Any, sizes: Sequence[int], phase: str) -> Any:
        """:meth:`gather_rows` of every tensor of a pytree (non-tensor leaves kept)."""
        leaves, spec = tree_flatten(tree)
        out = [
            self.gather_rows(x, sizes, phase) if isinstance(x, torch.Tensor) else x for x in leaves
        ]
        return tree_unflatten(out, spec)

    # ------------------------------------------------------------------ agreement
    def table(self, values: Sequence[float], device: torch.device, phase: str) -> torch.Tensor:
        """``(R, len(values))`` float64: every rank's ``values``."""
        row = torch.tensor(list(values), dtype=torch.float64, device=device)
        return torch.stack(self.all_gather(row, phase)).cpu()

    def agree(
        self,
        fields: dict[str, float],
        device: torch.device,
        phase: str,
        *,
        failed: BaseException | None = None,
        may_differ: Sequence[str] = (),
        rel_tol: dict[str, float] | None = None,
    ) -> dict[str, list[float]]:
        """All ranks meet and compare ``fields``; returns ``{name: [value per rank]}``.

        A rank whose local work ``failed`` (its error passed here) says so: it raises that
        error, every other rank a :class:`~hessinv.errors.DistributedError` naming it, so none
        waits for it. Otherwise a field not in ``may_differ`` that differs between ranks
        (beyond ``rel_tol[name]`` relative, default exactly) raises ``ValueError`` on every
        rank, naming the field and the ranks.
        """
        names = list(fields)
        tab = self.table([float(failed is not None)] + [fields[k] for k in names], device, phase)
        bad_ranks = tuple(r for r in range(self.size) if tab[r, 0] != 0)
        if failed is not None:
            raise mark_collective(failed)
        if bad_ranks:
            raise mark_collective(
                DistributedError(
                    f"{phase}: rank(s) {list(bad_ranks)} failed (their error is raised there); "
                    f"rank {self.rank} stops too",
                    phase,
                    bad_ranks,
                )
            )
        rel_tol = rel_tol or {}
        bad = []
        for j, name in enumerate(names, start=1):
            if name in may_differ:
                continue
            col = tab[:, j]
            tol = rel_tol.get(name, 0.0) * float(col.abs().max())
            ranks = [r for r in range(self.size) if abs(float(col[r] - col[0])) > tol]
            if ranks:
                bad.append(f"{name} (rank 0 differs from rank(s) {ranks})")
        if bad:
            raise mark_collective(
                ValueError(
                    f"{phase}: the ranks disagree on " + "; ".join(bad) + ". Every rank must "
                    "pass the same model (same parameters: broadcast them, as DDP does), loss, "
                    "parameter selection and oracle, and batches of the same trailing shapes"
                )
            )
        return {k: tab[:, j].tolist() for j, k in enumerate(names, start=1)}

    def checkpoint(
        self, phase: str, device: torch.device, failed: BaseException | None = None
    ) -> None:
        """All ranks meet (:meth:`agree` with nothing to compare): a rank that ``failed``
        raises its error, the others a :class:`~hessinv.errors.DistributedError` naming it."""
        self.agree({}, device, phase, failed=failed)


# ---------------------------------------------------------------------- point to point
#: dtypes a message may carry, by code (the header says which)
_DTYPES = (torch.float64, torch.float32, torch.int64, torch.bfloat16, torch.float16)
_MAX_DIMS = 6


class Relay:
    """Messages between neighbouring ranks of a stage pipeline (docs/algorithm.md section 17),
    failures included.

    Each message is a header (``int64``: status, origin rank, the number of tensors, one
    integer of the caller's, then per tensor its dtype code and shape) and the tensors. A rank
    whose local work failed still sends and receives every message of the operation, with a
    failure status naming the rank where it started instead of tensors, and every operation
    ends with a collective that carries the status (:meth:`Communicator.checkpoint` or a sum
    with a flag): so no rank waits for a message that will not come, and every rank raises.
    """

    def __init__(self, comm: Communicator, device: torch.device):
        self.comm, self.device = comm, device
        self.failure: BaseException | None = None  #: this rank's own error in this operation
        self.origin: int | None = None  #: the rank whose failure this operation carries

    def reset(self) -> None:
        self.failure, self.origin = None, None

    @property
    def failed(self) -> bool:
        return self.origin is not None

    def fail(self, err: BaseException) -> None:
        """This rank's local work failed (first failure wins)."""
        if self.origin is None:
            self.failure, self.origin = err, self.comm.rank

    def send(self, dst: int, tensors: Sequence[torch.Tensor], phase: str, extra: int = 0) -> None:
        """``tensors`` (or the failure status) to rank ``dst``."""
        ok = not self.failed
        origin = -1 if self.origin is None else self.origin
        head = [1 if ok else 0, origin, len(tensors) if ok else 0, extra]
        if ok:
            for t in tensors:
                shape = list(t.shape) + [0] * (_MAX_DIMS - t.dim())
                head += [_DTYPES.index(t.dtype), t.dim(), *shape]
        header = torch.zeros(4 + 8 * 8, dtype=torch.int64, device=self.device)
        header[: len(head)] = torch.tensor(head, dtype=torch.int64)
        self.comm.traffic[phase] += header.numel() * 8
        self._p2p(phase, dist.send, header, dst)
        if ok:
            for t in tensors:
                t = t.contiguous()
                self.comm.traffic[phase] += t.numel() * t.element_size()
                self._p2p(phase, dist.send, t, dst)

    def recv(self, src: int, phase: str) -> tuple[list[torch.Tensor], int]:
        """``(tensors, extra)`` from rank ``src``; a failure status is recorded (and ``([],
        0)`` returned)."""
        header = torch.empty(4 + 8 * 8, dtype=torch.int64, device=self.device)
        self._p2p(phase, dist.recv, header, src)
        head = header.tolist()
        if head[0] != 1:
            if self.origin is None:
                self.origin = int(head[1])
            return [], 0
        out = []
        for j in range(head[2]):
            code, ndim, *shape = head[4 + 8 * j : 12 + 8 * j]
            t = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=self.device)
            self._p2p(phase, dist.recv, t, src)
            out.append(t)
        return out, int(head[3])

    def _p2p(self, phase: str, fn: Callable[..., Any], t: torch.Tensor, peer: int) -> None:
        comm = self.comm
        try:
            if comm.group is None:
                fn(t, peer)
            else:
                fn(t, group=comm.group, **{("group_dst" if fn is dist.send else "group_src"): peer})
        except (RuntimeError, ValueError) as err:
            raise mark_collective(
                DistributedError(
                    f"{phase}: a message between rank {comm.rank} and rank {peer} of "
                    f"{comm.size} ({comm.backend}) failed: {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:300]}; {_HINT}",
                    phase,
                )
            ) from err

    def finish(self, phase: str) -> None:
        """All ranks meet; raises on every rank when one failed (its own error there)."""
        failure = self.failure
        if failure is None and self.failed:
            failure = mark_collective(
                DistributedError(
                    f"{phase}: rank {self.origin} failed (its error is raised there); rank "
                    f"{self.comm.rank} stops too",
                    phase,
                    (int(self.origin),),  # type: ignore[arg-type]
                )
            )
        self.reset()
        self.comm.checkpoint(phase, self.device, failed=failure)
