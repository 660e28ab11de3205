"""The Gauss-Newton matrix of the union in output space, its rows spread over the ranks
(docs/algorithm.md sections 14, 17).

``G = U^T U`` with ``U = [U_0; U_1; ...]``: rank ``q`` holds the ``B_q r`` rows of its
samples. Woodbury needs the ``T r x T r`` Gram matrix ``A = U U^T`` and the two sweeps:

* ``A``: the block ``U_q U_s^T`` is a sum over stages of terms built from each batch's
  per-stage factors (:func:`~hessinv.curvature.output_space.stage_gram_factors`: the scaled
  pullback ``D`` ``(B r, h)`` and the inputs ``Zt`` ``(B, m)`` of a ``Linear`` stage, the dense
  rows of another). The ranks gather these factors -- ``sum_l T (r h_l + m_l)`` numbers, no
  derivatives -- each computes its block row ``U_q U^T`` (a ``1 / R`` share of the work) and
  one gather assembles ``A`` on every rank; its Cholesky or eigendecomposition (``(T r)^3 /
  3``) is the same on every rank.
* ``U v``: each rank's rows from its own tangent sweep, gathered (``T r k`` numbers);
  ``U^T w``: each rank's adjoint sweep on its rows of ``w``, summed (``n k`` numbers).

A solve is then one gather and one sum, its work split over the ranks; its residual check is
a data-parallel product (one more sum). The factorization keeps the contract of section 11;
hardening, and the inverse diagonal (whose cross terms would need every rank's pullbacks at
once), go to the union of the batches (:meth:`DataParallel._union`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from hessinv.curvature.factorization import Factorization
from hessinv.curvature.output_space import (
    KeptEigendecomposition,
    OutputSpace,
    gram_from_factors,
    stage_gram_factors,
)
from hessinv.curvature.solvers import OutputSpaceSolver, RiccatiSolver, Solver

if TYPE_CHECKING:
    from hessinv.distributed.data_parallel import DataParallelGGN

__all__ = ["DistributedOutputSpace", "DistributedOutputSpaceFactorization"]


class DistributedOutputSpace(KeptEigendecomposition):
    """``U`` of the union (module docstring), with the interface of
    :class:`~hessinv.curvature.output_space.OutputSpace` that the output-space solver uses."""

    def __init__(self, op: DataParallelGGN, factor: torch.Tensor, exact: bool):
        self.op, self.comm = op, op.comm
        self.local = OutputSpace(op.stage_derivatives(), factor, exact)
        self.factor, self.exact = factor, exact
        self.rank_rows = factor.shape[1]
        self.sizes = [b * self.rank_rows for b in op.batch_sizes]
        self.rows = sum(self.sizes)
        self.batch = sum(op.batch_sizes)
        self.offset = sum(self.sizes[: self.comm.rank])
        self._gram: torch.Tensor | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_params(self) -> int:
        return self.local.num_params

    # ---------------------------------------------------------------- sweeps
    def apply(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        """``U v`` ``(T r, k)``: every rank's rows, gathered."""
        mine = self.local.apply(v)
        return self.comm.gather_rows(mine, self.sizes, "output space: U v")

    def apply_T(self, w: torch.Tensor) -> list[torch.Tensor]:
        """``U^T w`` per stage for ``w`` ``(T r, k)`` (the same on every rank): every rank's
        sweep on its rows, summed."""
        mine = w[self.offset : self.offset + self.sizes[self.comm.rank]].contiguous()
        return self.op._sum_over_ranks(self.local.apply_T(mine), "output space: U^T w")

    # ---------------------------------------------------------------- Gram matrix
    def _gathered_factors(self) -> list[list[tuple[torch.Tensor, ...]]]:
        """Per stage, per rank: that rank's :func:`stage_gram_factors` (one gather for all)."""
        mine: list[tuple[torch.Tensor, ...]] = [()] * len(self.local.stages)
        for l, M in self.local.pullbacks():
            mine[l] = stage_gram_factors(self.local.stages[l], M)
        B = self.op.batch_sizes[self.comm.rank]
        # shapes per rank: the first dimension scales with that rank's batch
        shapes = [
            [[(t.shape[0] // B * b, *t.shape[1:]) for t in f] for f in mine]
            for b in self.op.batch_sizes
        ]
        totals = [sum(int(torch.Size(s).numel()) for f in sh for s in f) for sh in shapes]
        flat = torch.cat([t.reshape(-1) for f in mine for t in f])
        size = max(totals)
        buf = torch.cat([flat, flat.new_zeros(size - flat.numel())])
        parts = self.comm.all_gather(buf, "output space: the Gram matrix's factors")
        out: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in mine]
        for q, (part, sh) in enumerate(zip(parts, shapes, strict=True)):
            at = 0
            for l, f in enumerate(sh):
                pieces: list[torch.Tensor] = []
                for s in f:
                    k = int(torch.Size(s).numel())
                    pieces.append(part[at : at + k].view(s))
                    at += k
                out[l].append(mine[l] if q == self.comm.rank else tuple(pieces))
        return out

    def gram(self) -> torch.Tensor:
        """``A = U U^T`` ``(T r, T r)``, the same on every rank (computed once)."""
        if self._gram is None:
            factors = self._gathered_factors()
            r, me = self.rank_rows, self.comm.rank
            row = self.factor.new_zeros(self.sizes[me], self.rows)
            for per_rank in factors:
                union = tuple(torch.cat(ts) for ts in zip(*per_rank, strict=True))
                row += gram_from_factors(per_rank[me], union, r)
            A = self.comm.gather_rows(row, self.sizes, "output space: the Gram matrix")
            lower = A.tril_()  # rank q's rows of the lower triangle are its own products
            self._gram = lower.add_(lower.tril(-1).T)
        return self._gram

    def stored_bytes(self) -> int:
        """Peak bytes on a rank: the Gram matrix and its factor, the gathered factors."""
        item = self.factor.element_size()
        gathered = 0
        for l, M in self.local.pullbacks():
            f = stage_gram_factors(self.local.stages[l], M)
            gathered += sum(t.numel() for t in f)
        B = self.op.batch_sizes[self.comm.rank]
        return (3 * self.rows**2 + gathered * self.batch // B) * item

    def diag_quadratic(self, X: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError  # the solver's inverse_diagonal goes to the union


class DistributedOutputSpaceSolver(OutputSpaceSolver):
    """The output-space solver on a :class:`DistributedOutputSpace`; hardening and the
    inverse diagonal on the union of the batches (module docstring)."""

    method = "output space (data parallel)"

    def harden(self) -> Solver | None:
        union = self._curvature._union()
        return RiccatiSolver(union, self.damping, progress=False)

    def inverse_diagonal(self) -> list[torch.Tensor]:
        union = self._curvature._union()
        return OutputSpaceSolver(union, self.damping, union.output_space()).inverse_diagonal()


class DistributedOutputSpaceFactorization(Factorization):
    """``G + damping I`` of the union through the distributed output space, under the
    contract of :class:`hessinv.Factorization` (its residual products data-parallel)."""

    def __init__(self, op: DataParallelGGN, damping: float, space: DistributedOutputSpace):
        solver = DistributedOutputSpaceSolver(op, damping, space)  # type: ignore[arg-type]
        super().__init__(op, damping, solver)
