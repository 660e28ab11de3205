"""Data-parallel curvature: each rank holds a shard of the batch (docs/algorithm.md section 17).

Every rank builds :class:`DataParallelHessian` (or :class:`DataParallelGGN`) with the same
model and its own ``(inputs, targets)``. The curvature is that of the loss on the union of
the shards, in rank order, exactly as :class:`~hessinv.ChainHessian` would give it on the
concatenated batch:

* **the loss head of the global batch.** The ranks gather the model outputs and the targets
  (``T K`` numbers for ``T`` samples in all) and each evaluates the loss head on all of them:
  the loss, and the gradient and Hessian blocks of the loss in the outputs, with the global
  reduction (``reduction="mean"`` divides by the global count or weight sum, whatever the
  loss's own rule is). A rank keeps the rows of its own samples; its backward sweep then
  gives its samples' share of every sum over samples.
* **one sum per result.** Products ``C v``, the gradient, the diagonal, the trace and the
  diagonal blocks are sums over samples: each rank computes its share and one
  ``all_reduce`` (``n k`` numbers for ``k`` vectors) gives every rank the same result. Lanczos
  and the eigenvalue tools run on those products, identically on every rank.
* **factorizations of the union.** A factorization couples all samples, so it needs all of
  them. The ranks gather their inputs (``T d_in`` numbers: far fewer than the stage
  derivatives' ``O(L T h)``) and each builds the single-process operator on the union and
  factors it: the factors are those of the concatenated batch, and every solve, logdet and
  inertia is the same on every rank without further communication. The union's memory is
  checked on every rank first, and all refuse together when one lacks it.

Before any of it, the ranks check that they agree on the model (structure and parameter
values), the loss, the parameter selection and the trailing shapes of the batch, and raise
``ValueError`` naming the disagreement otherwise. A rank whose local work fails tells the
others at the next collective (they raise :class:`~hessinv.errors.DistributedError`); a rank
that crashes or stops is reported by the transport, or at the process group's timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from hessinv.curvature.factorization import Factorization
from hessinv.curvature.hessian import ChainGGN, ChainHessian
from hessinv.curvature.memory import available_memory, memory_estimate
from hessinv.curvature.operator import CurvatureOperator
from hessinv.curvature.output_space import OutputSpace
from hessinv.derivatives import LossHead, loss_head
from hessinv.distributed.comm import Communicator, crc, is_collective, mark_collective
from hessinv.distributed.output_space import (
    DistributedOutputSpace,
    DistributedOutputSpaceFactorization,
)
from hessinv.errors import MemoryBudgetError
from hessinv.network.checks import check_model, finite
from hessinv.network.data import resolve_batch
from hessinv.network.sweep import batch_size

__all__ = ["DataParallelHessian", "DataParallelGGN", "DataParallel"]


_FIELDS = (
    "model structure",
    "parameter values",
    "loss",
    "oracle and class",
    "inputs (trailing shapes)",
    "targets (trailing shapes)",
    "batch",
)


def _parameter_checksum(module: nn.Module) -> float:
    """A float64 checksum of every parameter and floating buffer (weighted, so that swapped
    entries change it)."""
    return _checksum([*module.parameters(), *module.buffers()])


def _checksum(tensors: Sequence[Any]) -> float:
    total = 0.0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if not t.dtype.is_floating_point:
            t = t.double()
        if t.numel():
            x = t.detach().reshape(-1).double()
            w = torch.arange(x.numel(), device=x.device, dtype=torch.float64).remainder_(7)
            # one entry changed by d moves it by d (c +- 3), c in [1, 2): never zero
            total += float((x * (1.0 + w / 7.0)).sum() + 3.0 * x.abs().sum())
    return total


def _shapes(tree: Any) -> float:
    leaves, spec = tree_flatten(tree)
    return crc(
        str(spec),
        [
            (tuple(x.shape[1:]), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x)
            for x in leaves
        ],
    )


def _loss_name(loss_fn: Callable) -> str:
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    return f"{name} reduction={getattr(loss_fn, 'reduction', None)}"


class DataParallel(CurvatureOperator):
    """The data-parallel part of :class:`DataParallelHessian` and :class:`DataParallelGGN`
    (module docstring); not used alone."""

    #: the single-process class whose operator is built on the union of the shards
    single: type[CurvatureOperator] = CurvatureOperator

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., torch.Tensor],
        inputs: Any = None,
        targets: Any = None,
        *,
        data: Iterable[Any] | None = None,
        params: Sequence[str | torch.Tensor] | None = None,
        oracle: str = "auto",
        progress: bool | None = None,
        process_group: Any = None,
    ) -> None:
        comm = Communicator(process_group)
        self.comm = comm
        progress = progress if comm.rank == 0 else False
        module = check_model(model)
        first = next(iter(module.parameters()), None)
        self._meet_device = first.device if first is not None else torch.device("cpu")
        self._model, self._params = model, params
        self._checksum = _parameter_checksum(module)
        error: BaseException | None = None
        try:
            if comm.backend == "nccl" and self._meet_device.type != "cuda":
                raise ValueError("the NCCL backend moves CUDA tensors: put the model on the GPU")
            inputs, targets = resolve_batch(inputs, targets, data, progress)
            fields = {
                "model structure": crc(
                    [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()],
                    [type(m).__name__ for m in module.modules()],
                ),
                "parameter values": self._checksum,
                "loss": crc(_loss_name(loss_fn)),
                "oracle and class": crc(oracle, type(self).__name__),
                "inputs (trailing shapes)": _shapes(inputs),
                "targets (trailing shapes)": _shapes(targets),
                "batch": float(batch_size(inputs)),
            }
        except Exception as err:  # told to the other ranks, then raised here
            fields, error = dict.fromkeys(_FIELDS, 0.0), err
        table = comm.agree(
            fields,
            self._meet_device,
            f"building {type(self).__name__}",
            failed=error,
            may_differ=("batch",),
            rel_tol={"parameter values": 1e-12},
        )
        #: samples per rank, in rank order; ``T = sum(batch_sizes)``
        self.batch_sizes = tuple(int(b) for b in table["batch"])
        self.offset = sum(self.batch_sizes[: comm.rank])
        self._global_targets: Any = None
        self._gradient: torch.Tensor | None = None
        self._union_operator: CurvatureOperator | None = None
        self._distributed_space: DistributedOutputSpace | None = None
        self._pending = ["before the loss head", "after the derivative sweep"]
        try:
            super().__init__(
                model, loss_fn, inputs, targets, params=params, oracle=oracle, progress=progress
            )
        except Exception as err:
            if not is_collective(err) and self._pending:
                comm.checkpoint(self._phase(self._pending[0]), self._meet_device, failed=err)
            raise
        self._meet("after the derivative sweep")
        comm.agree(
            {"selected parameters": crc(self.layout.names, self.stage_sizes)},
            self._meet_device,
            self._phase("the selected parameters"),
        )

    # ------------------------------------------------------------------ the hooks
    def _phase(self, where: str) -> str:
        return f"building {type(self).__name__} ({where})"

    def _meet(self, where: str) -> None:
        self._pending.remove(where)
        self.comm.checkpoint(self._phase(where), self._meet_device)

    def _loss_head(
        self, loss_fn: Any, outputs: torch.Tensor, targets: Any, oracle: str = "auto"
    ) -> LossHead:
        """The head of the global batch (module docstring), this rank's rows of it."""
        self._meet("before the loss head")
        phase = self._phase("the loss head")
        everything = self.comm.gather_rows(outputs.detach(), self.batch_sizes, phase)
        self._global_targets = self.comm.gather_tree(targets, self.batch_sizes, phase)
        head = loss_head(loss_fn, everything, self._global_targets, oracle)
        rows = slice(self.offset, self.offset + outputs.shape[0])
        factor = None if head.factor is None else head.factor[rows]
        return head._replace(grad=head.grad[rows], hess=head.hess[rows], factor=factor)

    def _sum_over_ranks(self, blocks: list[torch.Tensor], what: str = "") -> list[torch.Tensor]:
        """One ``all_reduce`` of all the blocks together."""
        if not blocks:
            return blocks
        flat = torch.cat([b.reshape(-1) for b in blocks])
        self.comm.all_reduce(flat, what or "sum over the ranks")
        parts = flat.split([b.numel() for b in blocks])
        return [p.view(b.shape) for p, b in zip(parts, blocks, strict=True)]

    def gradient(self) -> torch.Tensor:
        """The gradient of the global loss (one ``all_reduce``, then kept), flat ``(n,)``."""
        if self._gradient is None:
            self._gradient = super().gradient()
        return self._gradient.clone()

    def _union(self) -> CurvatureOperator:
        if self._union_operator is None:
            self._union_operator = self._build_union()
        return self._union_operator

    def union_bytes(self) -> int:
        """Estimated bytes of the union operator's derivatives on each rank (this rank's
        scaled by ``T / B``: the derivatives are linear in the batch)."""
        stored = memory_estimate(self.stage_derivatives(), self.loss_hessian_blocks())
        return int(stored["derivatives"] * sum(self.batch_sizes) / self.batch_sizes[self.comm.rank])

    def _build_union(self) -> CurvatureOperator:
        phase = f"{type(self).__name__}: the union of the ranks' batches"
        need = self.union_bytes()
        budget = available_memory(self.device)
        changed = _parameter_checksum(check_model(self._model)) != self._checksum
        tab = self.comm.table([float(need), float(budget), float(changed)], self.device, phase)
        if bool(tab[:, 2].any()):
            ranks = [r for r in range(self.comm.size) if tab[r, 2]]
            raise mark_collective(
                ValueError(
                    f"{phase}: the model's parameters changed on rank(s) {ranks} since this "
                    f"{type(self).__name__} was built; a curvature is a snapshot: build a new "
                    "one after an update"
                )
            )
        short = [r for r in range(self.comm.size) if tab[r, 0] > tab[r, 1]]
        if short:
            r = short[0]
            raise mark_collective(
                MemoryBudgetError(
                    f"{phase}: the union ({sum(self.batch_sizes)} samples) needs about "
                    f"{tab[r, 0] / 2**30:.2f} GiB of derivatives on every rank, and rank(s) "
                    f"{short} have {tab[r, 1] / 2**30:.2f} GiB free; factor fewer samples at "
                    "once (products, gradient and diagonal need no union)",
                    int(tab[r, 0]),
                    int(tab[r, 1]),
                )
            )
        inputs = self.comm.gather_tree(self.inputs, self.batch_sizes, phase)
        return self.single(
            self._model,
            self.loss_fn,
            inputs,
            self._global_targets,
            params=self._params,
            oracle=self.oracle,
            progress=self.progress if self.comm.rank == 0 else False,
        )

    def loss_at(self, outputs: torch.Tensor) -> torch.Tensor:
        """The global loss for this rank's model ``outputs`` on its batch (the others give
        theirs): the outputs are gathered (``T K`` numbers) and the loss taken on the
        global targets. For an optimizer's trial step."""
        phase = f"{type(self).__name__}: the loss at a trial point"
        everything = self.comm.gather_rows(outputs.detach(), self.batch_sizes, phase)
        return self.loss_fn(everything, self._global_targets)

    def output_space_or_none(self) -> OutputSpace | None:
        return self._union().output_space_or_none()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_params}, stages={len(self.stage_sizes)}, "
            f"batch={self.batch_sizes[self.comm.rank]} of {sum(self.batch_sizes)} on "
            f"{self.comm.size} ranks, rank={self.comm.rank}, dtype={self.dtype}, "
            f"device={self.device})"
        )


class DataParallelHessian(DataParallel, ChainHessian):
    """The exact Hessian of the loss on the union of the ranks' batches (module docstring).

    Same arguments as :class:`hessinv.ChainHessian`, plus ``process_group`` (default: the
    default group). Every rank passes the same model, loss and parameter selection, and its
    own ``inputs, targets`` (any sizes). Results are the same on every rank.
    """

    single = ChainHessian


class DataParallelGGN(DataParallel, ChainGGN):
    """The exact Gauss-Newton matrix of the loss on the union of the ranks' batches (module
    docstring); arguments as :class:`DataParallelHessian`.

    Its output space (docs/algorithm.md section 17) is spread over the ranks: ``method="auto"``
    with ``damping != 0`` (or ``method="output"``) factors ``G + damping I`` through it, each
    rank computing its share of the Gram matrix and of every solve's sweeps; the other routes
    factor the union. :meth:`spectrum` uses it too.
    """

    single = ChainGGN

    def output_space_or_none(self) -> OutputSpace | None:
        if self._distributed_space is None:
            head = self._derivatives.head
            if head.factor is None:
                return None
            self._distributed_space = DistributedOutputSpace(self, head.factor, head.factor_exact)
        return self._distributed_space  # type: ignore[return-value]

    def factorize(
        self,
        damping: float = 0.0,
        method: str = "auto",
        max_memory: int | None = None,
        progress: bool | None = None,
    ) -> Factorization:
        """As :meth:`hessinv.ChainGGN.factorize`, on the union; ``"auto"`` with ``damping != 0``
        and ``"output"`` take the distributed output space (the class docstring)."""
        damping = finite(damping, "damping")
        space = self.output_space_or_none()
        if space is None or not (method == "output" or (method == "auto" and damping != 0)):
            return super().factorize(damping, method, max_memory, progress)
        phase = f"{type(self).__name__}: the output space of G + {damping:g} I"
        need = space.stored_bytes()
        budget = available_memory(self.device) if max_memory is None else int(max_memory)
        tab = self.comm.table([float(need), float(budget)], self.device, phase)
        short = [r for r in range(self.comm.size) if tab[r, 0] > tab[r, 1]]
        if short:
            raise mark_collective(
                MemoryBudgetError(
                    f"{phase} needs about {float(tab[short[0], 0]) / 2**30:.2f} GiB on every "
                    f"rank, more than rank(s) {short} have; factor fewer samples at once",
                    int(tab[short[0], 0]),
                    int(tab[short[0], 1]),
                )
            )
        return DistributedOutputSpaceFactorization(self, damping, space)  # type: ignore[arg-type]
