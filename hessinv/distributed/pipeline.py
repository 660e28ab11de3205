"""Stage pipeline: each rank owns a contiguous range of the chain's stages (docs/algorithm.md
section 17).

Every rank builds :class:`PipelineHessian` (or :class:`PipelineGGN`) with the same model,
loss and batch; rank ``r`` computes and keeps only the derivatives and the factors of its
stages ``bounds[r] <= l < bounds[r + 1]``, so the memory of a factorization is split across
the ranks. Every algorithm of hessinv is a recursion over the stages with a small state at
each boundary, and that state is what moves between neighbouring ranks:

==================  =========================  ============================  ===========
phase               forward (rank r -> r + 1)  backward (rank r -> r - 1)    per message
==================  =========================  ============================  ===========
derivative sweep    the stage output ``z``     the adjoint ``b``             ``B h``
product ``C v``     the tangent ``t``          the adjoint ``u``             ``B h k``
diagonal                                       the curvature ``R``           ``B h^2``
factorization                                  the state ``V`` (+ delayed)   ``(B h)^2``
solve               ``t`` and delayed          the linear term ``s``         ``B h k``
==================  =========================  ============================  ===========

(``h``: the width at the boundary, ``k``: right-hand sides.) The ranks run one after the
other within a phase (a pipeline of one batch: the gain is memory, not time). Results that
live in parameter space -- gradient, products, diagonal, solves -- are assembled on every
rank with one sum of ``n k`` numbers; ``logdet`` and the inertia are summed over the ranks.
Every operation ends with a collective that carries each rank's status, and a rank whose
work failed keeps sending failure messages in place of its data, so every rank raises (the
failed one its own error, the others :class:`~hessinv.errors.DistributedError` naming it)
and none waits (:class:`~hessinv.distributed.comm.Relay`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from hessinv.curvature.diagonal import output_curvatures
from hessinv.curvature.factorization import accuracy_bound
from hessinv.curvature.memory import available_memory, memory_estimate
from hessinv.curvature.products import ProductSweep
from hessinv.curvature.spectrum import lanczos
from hessinv.derivatives import block_diagonal, loss_head
from hessinv.distributed.comm import Communicator, Relay, crc, mark_collective
from hessinv.distributed.data_parallel import _checksum, _loss_name, _parameter_checksum, _shapes
from hessinv.errors import AccuracyWarning, DistributedError, MemoryBudgetError, SingularMatrixError
from hessinv.linalg.riccati import SolveSweep, _totals, riccati_sweep
from hessinv.network.chain import build_chain
from hessinv.network.checks import check_inputs, check_model, check_oracle, check_targets
from hessinv.network.snapshot import fold_head, gc_paused
from hessinv.network.sweep import backward_sweep, batch_size, forward_pass
from hessinv.settings import MAX_REFINEMENT, REFINEMENT_GAIN
from hessinv.vectors import LayoutMetadata, ParameterLayout, ParameterVector

__all__ = ["PipelineHessian", "PipelineGGN", "PipelineFactorization", "balanced_bounds"]

T = TypeVar("T")


def balanced_bounds(costs: Sequence[float], ranks: int) -> tuple[int, ...]:
    """``ranks + 1`` stage indices splitting stages of the given ``costs`` into contiguous
    ranges of about equal total cost, each range non-empty."""
    L = len(costs)
    if L < ranks:
        raise ValueError(f"a pipeline of {ranks} ranks needs at least {ranks} stages, got {L}")
    total = float(sum(costs))
    bounds, acc = [0], 0.0
    for l, c in enumerate(costs):
        acc += c
        left = ranks - len(bounds)  # ranges still to start after this one
        if left and acc >= total * len(bounds) / ranks and L - (l + 1) >= left:
            bounds.append(l + 1)
    while len(bounds) < ranks:  # too few cuts: split the last ranges one stage each
        bounds.append(L - (ranks - len(bounds)))
    return (*bounds, L)


def _given(x: T | None) -> T:
    """``x``, which is missing only after a failure (when it is not used)."""
    if x is None:
        raise RuntimeError("a message this rank needs did not come")
    return x


def _tensor_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensors among the attributes of ``objs`` (one level down)."""
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    for obj in objs:
        values = vars(obj).values() if hasattr(obj, "__dict__") else ()
        for value in [*values, *(getattr(obj, n, None) for n in getattr(obj, "__slots__", ()))]:
            visit(value)
    return sum(seen.values())


class StagePipeline(LayoutMetadata):
    """The stage-pipelined operator (module docstring); :class:`PipelineHessian` and
    :class:`PipelineGGN` set :attr:`second_order`.

    Args:
        model, loss_fn, inputs, targets, params, oracle, progress: as for
            :class:`hessinv.ChainHessian`, the same on every rank.
        process_group: the ``torch.distributed`` group of the pipeline (default: the default
            group); rank ``r`` of it owns the ``r``-th range of stages.
        bounds: ``R + 1`` stage indices ``0 = b_0 < b_1 < ... < b_R = L`` (default:
            :func:`balanced_bounds` by each stage's estimated factor size).
    """

    second_order = True
    symbol = "H"

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        loss_fn: Callable[..., torch.Tensor],
        inputs: Any,
        targets: Any,
        *,
        params: Sequence[str | torch.Tensor] | None = None,
        oracle: str = "auto",
        progress: bool | None = None,
        process_group: Any = None,
        bounds: Sequence[int] | None = None,
    ) -> None:
        comm = self.comm = Communicator(process_group)
        check_oracle(oracle)
        module = check_model(model)
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        self._relay = Relay(comm, device)
        self.loss_fn, self.oracle = loss_fn, oracle
        self.progress = progress if comm.rank == 0 else False
        error: BaseException | None = None
        fields: dict[str, float] = {}
        try:
            with gc_paused():
                chain, head_loss = fold_head(build_chain(model, params), loss_fn)
            flat = chain.flat_params()
            if not bool(torch.isfinite(flat).all()):
                raise ValueError("the selected parameters contain NaN or Inf")
            check_inputs(inputs, flat.dtype, flat.device)
            check_targets(targets, flat.device)
            L, B = len(chain.stages), batch_size(inputs)
            self.layout = ParameterLayout(
                names=chain.param_names,
                shapes=tuple(sh for s in chain.stages for sh in s.param_shapes),
                stage_sizes=tuple(s.num_params for s in chain.stages),
                dtype=flat.dtype,
                device=flat.device,
            )
            cuts = (
                balanced_bounds([B * s.num_params for s in chain.stages], comm.size)
                if bounds is None  # B p_l: a proxy of the work
                else tuple(int(b) for b in bounds)
            )
            if (
                len(cuts) != comm.size + 1
                or cuts[0] != 0
                or cuts[-1] != L
                or any(a >= b for a, b in zip(cuts, cuts[1:], strict=False))
            ):
                raise ValueError(
                    f"bounds must be {comm.size + 1} increasing stage indices from 0 to {L} "
                    f"(one non-empty range per rank), got {cuts}"
                )
            fields = {
                "model structure": crc(
                    [(n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()],
                    [type(m).__name__ for m in module.modules()],
                ),
                "parameter values": _parameter_checksum(module),
                "loss": crc(_loss_name(loss_fn)),
                "oracle and class": crc(oracle, type(self).__name__),
                "selected parameters": crc(self.layout.names, self.layout.stage_sizes),
                "stage ranges": crc(cuts),
                "input shapes": _shapes(inputs) + float(B),
                "target shapes": _shapes(targets),
                "inputs": _checksum(tree_flatten(inputs)[0]),
                "targets": _checksum(tree_flatten(targets)[0]),
            }
        except Exception as err:
            error = err
        table_fields = fields or dict.fromkeys(
            [
                "model structure",
                "parameter values",
                "loss",
                "oracle and class",
                "selected parameters",
                "stage ranges",
                "input shapes",
                "target shapes",
                "inputs",
                "targets",
            ],
            0.0,
        )
        comm.agree(
            table_fields,
            device,
            f"building {type(self).__name__}",
            failed=error,
            rel_tol={"parameter values": 1e-12, "inputs": 1e-12, "targets": 1e-12},
        )
        self.bounds: tuple[int, ...] = cuts
        lo, hi = cuts[comm.rank], cuts[comm.rank + 1]
        #: this rank's stages, ``range(lo, hi)``
        self.owned = range(lo, hi)
        self.batch = B
        self._offset = sum(self.layout.stage_sizes[:lo])
        parts = flat.split(list(self.layout.stage_sizes))[lo:hi]
        self._params = tuple(p.clone() for p in parts)
        del flat, parts
        self._spectrum: tuple[float, float] | None = None
        self._read(chain, head_loss, inputs, targets)

    # ------------------------------------------------------------------ construction
    @property
    def _first(self) -> bool:
        return self.comm.rank == 0

    @property
    def _S(self) -> torch.Tensor:
        """The loss Hessian blocks (the last rank's)."""
        return _given(self._head).hess

    @property
    def _last(self) -> bool:
        return self.comm.rank == self.comm.size - 1

    def _read(self, chain: Any, head_loss: Any, inputs: Any, targets: Any) -> None:
        """The derivative sweep: stage outputs forward, adjoints backward (module docstring)."""
        relay, r = self._relay, self.comm.rank
        phase = f"building {type(self).__name__} (the derivative sweep)"
        stages = chain.stages[self.owned.start : self.owned.stop]
        zs: list = []
        self._head = None
        z = None
        if not self._first:
            msg, _ = relay.recv(r - 1, phase)
            z = msg[0] if msg else None
        if not relay.failed:
            try:
                with torch.no_grad():
                    if self._first:
                        z = chain.apply_prefix(
                            tree_map(
                                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                                inputs,
                            )
                        )
                    zs = forward_pass(stages, self._params, z, self.batch)
                if self._last:
                    self._head = loss_head(head_loss, zs[-1], targets, self.oracle)
            except Exception as err:
                relay.fail(err)
        if not self._last:
            relay.send(r + 1, [zs[-1]] if zs else [], phase)
        b = self._head.grad if self._head is not None else None
        if not self._last:
            msg, _ = relay.recv(r + 1, phase)
            b = msg[0] if msg else None
        self._derivs: tuple = ()
        grads: tuple = ()
        b_in = None
        if not relay.failed:
            try:
                self._derivs, grads, b_in = backward_sweep(
                    stages,
                    self._params,
                    zs,
                    _given(b),
                    first_has_input=not self._first,
                    second_order=self.second_order,
                    oracle=self.oracle,
                    progress=self.progress,
                )
            except Exception as err:
                relay.fail(err)
        if not self._first:
            relay.send(r - 1, [b_in] if b_in is not None else [], phase)
        loss = self._head.value.reshape(1) if self._head is not None else None
        out = self._close(phase, 1, loss, 1, list(grads))
        self.loss = out[0]
        self._gradient = out[1:]

    def _close(
        self,
        phase: str,
        n_extra: int = 0,
        extra: torch.Tensor | None = None,
        k: int = 0,
        blocks: list[torch.Tensor] | None = None,
        damping: float | None = None,
    ) -> torch.Tensor:
        """The operation's last collective: every rank's status and the sum of the ranks' parts
        of the result -- ``n_extra`` values (this rank's ``extra``, or none) then its stages'
        ``blocks`` at their offset in ``(n, k)`` (``k = 0``: no parameter-space part) --
        returned flat, the same on every rank. When a rank failed, every rank raises: that one
        its own error, the others :class:`~hessinv.errors.DistributedError` naming it, or
        :class:`~hessinv.errors.SingularMatrixError` when that was the failure (given the
        ``damping`` of the matrix)."""
        relay = self._relay
        buf = torch.zeros(
            4 + n_extra + self.num_params * k, dtype=self.layout.dtype, device=self.layout.device
        )
        failure = relay.failure
        if relay.failed:
            buf[0] = 1.0
            if failure is not None:  # this rank's own: it is the origin
                buf[1] = float(isinstance(failure, SingularMatrixError))
                buf[2], buf[3] = float(self.comm.rank + 1), 1.0
        else:
            if extra is not None:
                buf[4 : 4 + extra.numel()] = extra.reshape(-1)
            if blocks:
                start = 4 + n_extra + self._offset * k
                mine = torch.cat([b.reshape(-1, k) for b in blocks]).reshape(-1)
                buf[start : start + mine.numel()] = mine
        self.comm.all_reduce(buf, phase)
        relay.reset()
        if float(buf[0]) > 0:
            if failure is not None:
                raise mark_collective(failure)
            origin = int(round(float(buf[2]))) - 1 if float(buf[3]) == 1 else None
            where = f"rank {origin}" if origin is not None else "a rank"
            if float(buf[1]) > 0 and damping is not None:
                raise mark_collective(
                    SingularMatrixError(
                        f"{phase}: {self.symbol} + {damping:g} I is singular to working precision "
                        f"(found in the stages of {where}; its message says more); use a "
                        "damping that is not an eigenvalue of -" + self.symbol,
                        damping,
                    )
                )
            raise mark_collective(
                DistributedError(
                    f"{phase}: {where} failed (its error is raised there); rank "
                    f"{self.comm.rank} stops too",
                    phase,
                    () if origin is None else (origin,),
                )
            )
        return buf[4:]

    def stage_derivatives(self) -> tuple:
        """This rank's stages' derivative objects (:attr:`owned`)."""
        return self._derivs

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds: its stages' ``derivatives``."""
        return {"derivatives": sum(d.stored_bytes() for d in self._derivs)}

    def gradient(self) -> torch.Tensor:
        """The gradient, flat ``(n,)``, on every rank."""
        return self._gradient.clone()

    # ------------------------------------------------------------------ products
    def _flat_product(self, V: torch.Tensor) -> torch.Tensor:
        """``C V`` for ``V`` ``(n, k)`` (the same on every rank): tangents forward, adjoints
        backward, one sum."""
        relay, r, k = self._relay, self.comm.rank, V.shape[1]
        phase = "product"
        lo, hi = self.owned.start, self.owned.stop
        mine = list(V.split(list(self.stage_sizes)))[lo:hi]
        sweep = t = out = u_in = None
        t_in = None
        if not self._first:
            msg, _ = relay.recv(r - 1, phase)
            t_in = msg[0] if msg else None
        if not relay.failed:
            try:
                sweep = ProductSweep(self._derivs, mine)
                t = sweep.forward(t_in)
            except Exception as err:
                relay.fail(err)
        if not self._last:
            relay.send(r + 1, [t] if t is not None and not relay.failed else [], phase)
            msg, _ = relay.recv(r + 1, phase)
            u = msg[0] if msg else None
        else:
            u = None if relay.failed else torch.bmm(self._S, _given(t))
        if not relay.failed:
            try:
                out, u_in = _given(sweep).backward(_given(u))
            except Exception as err:
                relay.fail(err)
        if not self._first:
            relay.send(r - 1, [u_in] if u_in is not None and not relay.failed else [], phase)
        return self._close(phase, 0, None, k, out).reshape(-1, k)

    def matvec(self, v: ParameterVector) -> Any:
        """``C v`` (``v`` flat ``(n,)``/``(n, k)``, a dict or a list; the same on every rank)."""
        blocks, kind = self.layout.to_blocks(v, "v")
        out = self._flat_product(torch.cat(blocks))
        return self.layout.from_blocks(list(out.split(list(self.stage_sizes))), kind)

    def __matmul__(self, v: ParameterVector) -> Any:
        return self.matvec(v)

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The exact diagonal (section 6): the curvature ``R`` passes backward."""
        relay, r = self._relay, self.comm.rank
        phase = "diagonal"
        R_out = self._S if self._last else None
        if not self._last:
            msg, _ = relay.recv(r + 1, phase)
            R_out = msg[0] if msg else None
        diag = R_in = None
        if not relay.failed:
            try:
                R = output_curvatures(self._derivs, _given(R_out))
                diag = [d.diagonal(x) for d, x in zip(self._derivs, R, strict=True)]
                if not self._first:
                    R_in = self._derivs[0].propagate_curvature(R[0])
            except Exception as err:
                relay.fail(err)
        if not self._first:
            relay.send(r - 1, [R_in] if R_in is not None and not relay.failed else [], phase)
        full = self._close(phase, 0, None, 1, diag)
        return self.layout.from_blocks([full[:, None]], ("dict",))

    def trace(self) -> torch.Tensor:
        return sum(t.sum() for t in self.diagonal().values())  # type: ignore[return-value]

    def spectrum_estimate(self, steps: int = 12) -> tuple[float, float]:
        """Lanczos estimates ``(theta_min, theta_max)`` on the pipeline's products (cached)."""
        if self._spectrum is None:
            theta, _ = lanczos(
                lambda q: self._flat_product(q[:, None])[:, 0],
                self.num_params,
                steps,
                self.dtype,
                self.device,
            )
            self._spectrum = (float(theta[0]), float(theta[-1]))
        return self._spectrum

    def factorize(self, damping: float = 0.0) -> PipelineFactorization:
        """The stage-wise factorization of ``C + damping I``, each rank's stages' factors on that
        rank (section 17)."""
        return PipelineFactorization(self, float(damping))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_params}, stages={len(self.stage_sizes)}, "
            f"rank {self.comm.rank} of {self.comm.size} owns stages {self.owned.start}.."
            f"{self.owned.stop - 1}, batch={self.batch}, dtype={self.dtype})"
        )


class PipelineFactorization:
    """``C + damping I`` factored stage-wise across the pipeline's ranks: the state ``V``
    passes backward from rank to rank and each rank keeps its stages' fronts.

    :meth:`solve` has the contract of :class:`hessinv.Factorization` for solves: iterative
    refinement until the backward error is below ``1e-12`` (float64), a warning if it is not
    reached. ``logdet`` and ``inertia`` are summed over the ranks.
    """

    method = "riccati (pipeline)"

    def __init__(self, op: StagePipeline, damping: float):
        self.op, self.damping = op, damping
        relay, r = op._relay, op.comm.rank
        phase = f"factorization of {op.symbol} + {damping:g} I"
        like = torch.empty(0, dtype=op.dtype, device=op.device)
        need = memory_estimate(op._derivs, op._S if op._last else like.new_zeros(1, 1, 1))
        V: torch.Tensor | None = None
        if op._last:
            V, n_delay = block_diagonal(op._S), 0
        else:
            msg, n_delay = relay.recv(r + 1, phase)
            V = msg[0] if msg else None
        self._factors: list = []
        V_in, nd_in = None, 0
        if not relay.failed:
            try:
                if need["riccati"] > available_memory(op.device):
                    raise MemoryBudgetError(
                        f"{phase}: rank {r}'s stages need about {need['riccati'] / 2**30:.2f} "
                        "GiB; use more ranks",
                        need["riccati"],
                        available_memory(op.device),
                    )
                self._factors, V_in, nd_in = riccati_sweep(
                    op._derivs, _given(V), n_delay, damping, root=op._first, progress=op.progress
                )
            except Exception as err:
                relay.fail(err)
        if not op._first:
            relay.send(r - 1, [V_in] if V_in is not None and not relay.failed else [], phase, nd_in)
        totals = like.new_zeros(5)
        if not relay.failed:
            t = _totals(self._factors, damping, like.new_zeros(()))
            totals = torch.stack(
                [
                    like.new_tensor(float(t.inertia[0])),
                    like.new_tensor(float(t.inertia[1])),
                    t.logabsdet.to(like.dtype),
                    (t.sign < 0).to(like.dtype),
                    like.new_tensor(float(t.n_delayed)),
                ]
            )
        out = op._close(phase, 5, totals, damping=damping)
        n_pos, n_neg, logabsdet, negatives, delayed = out.tolist()
        self._inertia = (int(round(n_pos)), int(round(n_neg)), 0)
        self._sign = -1.0 if int(round(negatives)) % 2 else 1.0
        self._logabsdet = logabsdet
        self.n_delayed = int(round(delayed))
        self.backward_error: float | None = None
        self.refinement_steps: int | None = None

    # ------------------------------------------------------------------ results
    def logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det(C + damping I)|)`` (0-d), summed over the ranks."""
        like = torch.empty((), dtype=self.op.dtype, device=self.op.device)
        return like.new_tensor(self._sign), like.new_tensor(self._logabsdet)

    def inertia(self) -> tuple[int, int, int]:
        """``(n_positive, n_negative, 0)`` of ``C + damping I``, summed over the ranks."""
        return self._inertia

    @property
    def is_positive_definite(self) -> bool:
        return self._inertia[1] == 0

    def memory(self) -> dict[str, int]:
        """Bytes of this rank's factors."""
        return {"factors": _tensor_bytes(*[f.front for f in self._factors])}

    # ------------------------------------------------------------------ solves
    def _direct(self, G: torch.Tensor) -> torch.Tensor:
        """One pass: the linear term ``s`` backward, then the tangent and delayed controls
        forward (module docstring)."""
        op = self.op
        relay, r, k = op._relay, op.comm.rank, G.shape[1]
        phase = f"solve with {op.symbol} + {self.damping:g} I"
        lo, hi = op.owned.start, op.owned.stop
        mine = list(G.split(list(op.stage_sizes)))[lo:hi]
        s = None
        if not op._last:
            msg, _ = relay.recv(r + 1, phase)
            s = msg[0] if msg else None
        sweep = s_out = out = t = delayed = None
        if not relay.failed:
            try:
                sweep = SolveSweep(op._derivs, self._factors, self.damping, mine)
                s_out = sweep.backward(s)
            except Exception as err:
                relay.fail(err)
        if not op._first:
            relay.send(r - 1, [s_out] if s_out is not None and not relay.failed else [], phase)
            msg, _ = relay.recv(r - 1, phase)
            t, delayed = (msg[0], msg[1]) if len(msg) == 2 else (None, None)
        if not relay.failed:
            try:
                out, t, delayed = sweep.forward(t, delayed)  # type: ignore[union-attr]
            except Exception as err:
                relay.fail(err)
        if not op._last:
            ok = t is not None and not relay.failed
            relay.send(r + 1, [t, delayed] if ok else [], phase)  # type: ignore[list-item]
        return op._close(phase, 0, None, k, out).reshape(-1, k)

    def _residual(self, G: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(R, berr)`` as :meth:`hessinv.Factorization.solve` measures them (``||C + eps I||``
        by the free lower bound, then by Lanczos)."""
        image = self.op._flat_product(X).add_(X, alpha=self.damping)
        R = G - image
        num = torch.linalg.vector_norm(R, dim=0)
        xn, gn = torch.linalg.vector_norm(X, dim=0), torch.linalg.vector_norm(G, dim=0)
        tiny = torch.finfo(R.dtype).tiny

        def worst(norm: float) -> float:
            den = norm * xn + gn
            ratio = torch.where(den > 0, num / den.clamp_min(tiny), 0.0)
            return float(ratio.max()) if ratio.numel() else 0.0

        free = float((torch.linalg.vector_norm(image, dim=0) / xn.clamp_min(tiny)).max())
        berr = worst(free)
        if berr > accuracy_bound(R.dtype):
            lo, hi = self.op.spectrum_estimate()
            berr = worst(max(free, abs(hi + self.damping), abs(lo + self.damping)))
        return R, berr

    def solve(self, g: ParameterVector, refine: str | int = "auto") -> Any:
        """``(C + damping I)^-1 g`` on every rank; ``g`` as for :meth:`StagePipeline.matvec`."""
        blocks, kind = self.op.layout.to_blocks(g, "g")
        G = torch.cat(blocks)
        auto = refine == "auto"
        limit = MAX_REFINEMENT if isinstance(refine, str) else int(refine)
        bound = accuracy_bound(G.dtype)
        X = self._direct(G)
        R, err = self._residual(G, X)
        steps = 0
        while steps < limit and not (auto and err <= bound):
            X = X + self._direct(R)
            steps += 1
            R, new = self._residual(G, X)
            stalled = auto and new > REFINEMENT_GAIN * err
            err = new
            if stalled:
                break
        self.backward_error, self.refinement_steps = err, steps
        if auto and err > bound:
            warnings.warn(
                f"solve with {self.op.symbol} + {self.damping:g} I across the pipeline: "
                f"backward error {err:.2e} above {bound:.0e} after {steps} refinement steps "
                "(nearly singular); the result may be inaccurate",
                AccuracyWarning,
                stacklevel=2,
            )
        return self.op.layout.from_blocks(list(X.split(list(self.op.stage_sizes))), kind)


class PipelineHessian(StagePipeline):
    """The exact Hessian, its stages split over the ranks of a process group (module
    docstring). Same arguments on every rank; results the same on every rank."""

    second_order = True
    symbol = "H"


class PipelineGGN(StagePipeline):
    """The exact Gauss-Newton matrix, its stages split over the ranks (module docstring)."""

    second_order = False
    symbol = "G"
