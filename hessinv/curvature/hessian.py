"""The user API: :class:`ChainHessian` and :class:`ChainGGN` over one shared base.

Both are exact symmetric operators on the selected parameters of a chain network,
built from one forward/backward derivative sweep at construction. They differ only in
the stages' second-order terms: the Hessian keeps ``Dxx``, ``Dzx``, ``Dzz`` (section 2),
the generalized Gauss-Newton matrix ``G = J^T H_loss J`` drops them (section 9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map

from hessinv.curvature.diagonal import diagonal_blocks, hessian_diagonal
from hessinv.curvature.factorization import (
    DenseFactorization,
    Factorization,
    OutputSpaceFactorization,
    RiccatiFactorization,
    TridiagonalFactorization,
)
from hessinv.curvature.memory import available_memory, check_budget, memory_estimate, route_flops
from hessinv.curvature.output_space import OutputSpace
from hessinv.curvature.products import hessian_vector_product
from hessinv.curvature.spectrum import (
    EigenvalueBracket,
    eigenvalue_count,
    lanczos,
    smallest_eigenvalue,
)
from hessinv.derivatives import StageDerivatives, fold_output_activation
from hessinv.errors import SingularMatrixError
from hessinv.network.chain import Chain, build_chain
from hessinv.network.data import resolve_batch
from hessinv.network.sweep import ChainDerivatives, compute_derivatives
from hessinv.vectors import ParameterLayout

__all__ = ["ChainHessian", "ChainGGN"]

#: the routes :meth:`factorize` takes by name; ``"auto"`` picks among a class's ``routes``
_METHODS = ("auto", "output", "riccati", "dense", "tridiagonal")
_FACTORIZATIONS = {
    "output": OutputSpaceFactorization,
    "riccati": RiccatiFactorization,
    "dense": DenseFactorization,
    "tridiagonal": TridiagonalFactorization,
}


def _check_real(value, name: str = "damping") -> float:
    """``value`` as a finite float; the errors name the argument ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)



def _check_inputs(inputs, dtype, device) -> None:
    leaves = [t for t in tree_flatten(inputs)[0]]
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(
            f"inputs must be a torch.Tensor of shape (B, ...) (or a tuple/dict of them), got "
            f"{type(inputs).__name__}"
        )
    for t in leaves:
        if t.dim() == 0 or t.shape[0] == 0:
            raise ValueError(f"inputs must have a non-empty batch dimension, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"inputs are on {t.device} but the model is on {device}")
        if t.dtype.is_floating_point:
            if t.dtype != dtype:
                raise TypeError(f"inputs have dtype {t.dtype} but the model is {dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError("inputs contain NaN or Inf")


def _fold_head(chain: Chain, loss_fn):
    """The chain with a trailing activation folded into the loss where the pair has a
    closed form without cancellation (:func:`~hessinv.derivatives.fold_output_activation`)."""
    last = chain.stages[-1]
    k, folded = fold_output_activation(last.modules[1:], loss_fn)
    if not k:
        return chain, loss_fn
    stages = (*chain.stages[:-1], dataclasses.replace(last, modules=last.modules[:-k]))
    return dataclasses.replace(chain, stages=stages), folded


def _clone(tree):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off while a chain's stages are built: the sweep
    makes a few small objects per stage, and at depth 1000 the collections they trigger
    (each scanning every object alive) took 40% of the time. Cyclic garbage made meanwhile
    is collected as usual afterwards; the collector is left as it was found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _ChainCurvature:
    """Shared machinery: construction, products, diagonal, factorizations, spectrum tools.

    Subclasses set :attr:`second_order`.
    """

    second_order: bool = True

    def __init__(self, model, loss_fn, inputs=None, targets=None, *, data=None, params=None,
                 oracle: str = "auto", progress: bool = True):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if oracle not in ("auto", "generic", "analytic"):
            raise ValueError(f"oracle must be 'auto', 'generic' or 'analytic', got {oracle!r}")
        inputs, targets = resolve_batch(inputs, targets, data, progress)
        with _gc_paused():
            self._build(model, loss_fn, inputs, targets, params, oracle, progress)

    def _build(self, model, loss_fn, inputs, targets, params, oracle, progress):
        self.chain, head_loss = _fold_head(build_chain(model, params), loss_fn)
        self.loss_fn = loss_fn
        self.oracle = oracle
        self.progress = progress
        flat = self.chain.flat_params()
        self._params = list(flat.split([s.num_params for s in self.chain.stages]))
        dtype, device = flat.dtype, flat.device
        if not bool(torch.isfinite(flat).all()):  # one sync; the culprit found only on failure
            for stage, x in zip(self.chain.stages, self._params, strict=True):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"parameters {stage.param_names} contain NaN or Inf")
        _check_inputs(inputs, dtype, device)
        if isinstance(targets, torch.Tensor):
            if targets.device != device:
                raise ValueError(f"targets are on {targets.device} but the model is on {device}")
            if targets.dtype.is_floating_point and not bool(torch.isfinite(targets).all()):
                raise ValueError("targets contain NaN or Inf")
        self.inputs, self.targets = _clone(inputs), _clone(targets)
        self.layout = ParameterLayout(
            names=self.chain.param_names,
            shapes=tuple(sh for s in self.chain.stages for sh in s.param_shapes),
            stage_sizes=tuple(s.num_params for s in self.chain.stages),
            dtype=dtype,
            device=device,
        )
        self._derivatives: ChainDerivatives = compute_derivatives(
            self.chain, self._params, self.inputs, head_loss, self.targets,
            second_order=self.second_order, oracle=oracle, progress=progress,
        )
        self._spectrum: tuple[float, float] | None = None

    # ------------------------------------------------------------------ metadata
    @property
    def num_params(self) -> int:
        """``n``, the number of selected parameters."""
        return self.layout.numel

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in the model's ``named_parameters()`` order (the order of ``dense()``)."""
        return self.layout.names

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        """``(p_1, ..., p_L)``: selected parameters per stage."""
        return self.layout.stage_sizes

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    # ------------------------------------------------------------------ derivatives
    def stage_derivatives(self) -> tuple[StageDerivatives, ...]:
        """Per-stage derivative objects (see :mod:`hessinv.derivatives`)."""
        return self._derivatives.stages

    def loss_hessian_blocks(self) -> torch.Tensor:
        """``S`` ``(B, K, K)``: the per-sample Hessian blocks of the loss in the model outputs."""
        return self._derivatives.head.hess

    @property
    def loss(self) -> torch.Tensor:
        """The loss at the stored parameters (0-d tensor)."""
        return self._derivatives.loss

    def gradient(self) -> torch.Tensor:
        """The gradient as a flat ``(n,)`` tensor in ``param_names`` order."""
        return torch.cat(self._derivatives.gradient)

    # ------------------------------------------------------------------ products
    def matvec(self, v):
        """``H v`` (section 3); ``v`` flat ``(n,)``/``(n, k)``, a dict or a list (same kind back)."""
        blocks, kind = self.layout.to_blocks(v, "v")
        out = hessian_vector_product(self.stage_derivatives(), self.loss_hessian_blocks(), blocks)
        return self.layout.from_blocks(out, kind)

    def __matmul__(self, v):
        return self.matvec(v)

    def _flat_matvec(self, v: torch.Tensor) -> torch.Tensor:
        blocks = list(v.reshape(-1, 1).split(list(self.stage_sizes)))
        out = hessian_vector_product(self.stage_derivatives(), self.loss_hessian_blocks(), blocks)
        return torch.cat(out)[:, 0]

    def dense(self, chunk: int = 1024) -> torch.Tensor:
        """The ``(n, n)`` matrix in ``param_names`` order, from products with identity columns."""
        n = self.num_params
        check_budget(n * n * self.layout.dtype.itemsize, self.device, None, "dense()")
        cols = []
        for start in range(0, n, chunk):
            eye = torch.zeros(n, min(chunk, n - start), dtype=self.dtype, device=self.device)
            eye[start : start + eye.shape[1]].fill_diagonal_(1.0)
            cols.append(self.matvec(eye))
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A symmetric ``scipy.sparse.linalg.LinearOperator`` (for ``eigsh``, ``cg``, ``minres``)."""
        from scipy.sparse.linalg import LinearOperator

        def apply(x):
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype).to(self.device)
            out = self.matvec(t.reshape(self.num_params, -1))
            return out.detach().cpu().numpy().reshape(np.shape(x))

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply, dtype=np_dtype)

    # ------------------------------------------------------------------ diagonal
    def diagonal(self) -> dict[str, torch.Tensor]:
        """The exact diagonal as ``{name: tensor shaped like the parameter}`` (section 6).

        ``O(B h_out m)`` per ``Linear`` stage; no block is formed.
        """
        diag = torch.cat(hessian_diagonal(self.stage_derivatives(), self.loss_hessian_blocks()))
        return self.layout.from_blocks([diag[:, None]], ("dict",))

    def trace(self) -> torch.Tensor:
        """The exact trace (the sum of the diagonal), 0-d."""
        return torch.cat(hessian_diagonal(self.stage_derivatives(), self.loss_hessian_blocks())).sum()

    def diagonal_blocks(self, stages=None, max_memory: int | None = None) -> list[torch.Tensor]:
        """Dense diagonal blocks ``H_ll`` ``(p_l, p_l)`` of the stages ``stages`` (default: all).

        A block is ``p_l^2`` numbers: for a wide ``Linear`` stage (``p_l = h_out (h_in+1)``)
        that is ``O(h^4)`` memory and time; ask for the stages you need. The total is
        checked against the memory budget first (``max_memory`` or free memory).
        """
        which = range(len(self.stage_sizes)) if stages is None else list(stages)
        for l in which:
            if not (isinstance(l, int) and 0 <= l < len(self.stage_sizes)):
                raise ValueError(f"stage indices must be in 0..{len(self.stage_sizes) - 1}, got {l!r}")
        need = sum(self.stage_sizes[l] ** 2 for l in which) * self.layout.dtype.itemsize
        check_budget(need, self.device, max_memory, "diagonal_blocks()")
        return diagonal_blocks(self.stage_derivatives(), self.loss_hessian_blocks(), which)

    # ------------------------------------------------------------------ solves
    #: the matrix in messages (``"H + 0.01 I"``)
    symbol = "H"
    #: the routes ``method="auto"`` chooses from, in order of preference on a tie
    routes: tuple[str, ...] = ("riccati", "dense")

    def _output_space(self) -> OutputSpace | None:
        return None

    def memory_estimate(self) -> dict[str, int]:
        """Estimated peak bytes per route (``riccati``, ``tridiagonal``, ``dense``, and
        ``output`` for the Gauss-Newton matrix) and ``derivatives`` (held now); checked
        against the budget before a factorization allocates anything."""
        est = memory_estimate(self.stage_derivatives(), self.loss_hessian_blocks())
        space = self._output_space()
        if space is not None:
            est["output"] = space.stored_bytes()
        return est

    def cost_estimate(self) -> dict[str, float]:
        """Estimated floating-point operations per route, with each stage's operators
        counted as a fixed amount of work (their dispatch; docs/algorithm.md section 15):
        what ``method="auto"`` compares."""
        costs = route_flops(self.stage_derivatives(), self.num_params)
        space = self._output_space()
        if space is not None:
            costs["output"] = space.flops() + costs.pop("_output_overhead")
        else:
            costs.pop("_output_overhead")
        return costs

    def _choose(self, damping: float, method: str, max_memory: int | None) -> str:
        """The route for ``method`` (docs/algorithm.md section 15): by name, or for
        ``"auto"`` the cheapest of :attr:`routes` that fits the budget."""
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        name = f"{self.symbol} + {damping:g} I"
        est = self.memory_estimate()
        if method != "auto":
            if method not in est:
                raise ValueError(
                    f"method={method!r} is not available for {type(self).__name__}"
                    + (" (the loss Hessian blocks are indefinite, so G has no output-space "
                       "factor)" if method == "output" and self.symbol == "G" else "")
                    + f"; available: {sorted(k for k in est if k != 'derivatives')}")
            check_budget(est[method], self.device, max_memory,
                         f"the {method} factorization of {name}")
            return method
        candidates = [r for r in self.routes if r in est]
        if damping == 0 and "output" in candidates and len(candidates) > 1:
            candidates.remove("output")  # Woodbury divides by the damping
        budget = available_memory(self.device) if max_memory is None else int(max_memory)
        fitting = [r for r in candidates if est[r] <= budget]
        if not fitting:
            from hessinv.errors import MemoryBudgetError

            needs = ", ".join(f"{r}: {est[r] / 2**30:.2f} GiB" for r in candidates)
            source = "max_memory" if max_memory is not None else f"free memory on {self.device}"
            raise MemoryBudgetError(
                f"no route to factor {name} fits the budget ({source}: {budget / 2**30:.2f} "
                f"GiB); each needs about {needs}. Use fewer samples per factorization, float32, "
                "a narrower model, or pass max_memory= to override", min(est[r] for r in
                                                                        candidates), budget)
        costs = self.cost_estimate()
        return min(fitting, key=lambda r: (costs[r], candidates.index(r)))

    def factorize(self, damping: float = 0.0, method: str = "auto",
                  max_memory: int | None = None, progress: bool | None = None) -> Factorization:
        """Factor ``C + damping I`` once; see :mod:`hessinv.factorization` for the contract.

        ``method``: ``"auto"`` (default: the cheapest route that fits, by
        :meth:`cost_estimate` and :meth:`memory_estimate`), ``"output"`` (Gauss-Newton matrix
        only, section 14), ``"riccati"`` (sections 5, 8, 10), ``"dense"`` (section 15) or
        ``"tridiagonal"`` (the paper's, section 4). ``F.method`` names the route taken.
        ``damping`` may be any finite real: a negative value shifts the spectrum, so
        ``factorize(-sigma).inertia()[1]`` counts the eigenvalues below ``sigma``. The
        estimated memory is checked against ``max_memory`` bytes (default: the free memory
        of the device) before anything is allocated.

        Raises:
            SingularMatrixError: ``C + damping I`` is singular to working precision.
            MemoryBudgetError: the factorization would not fit (for ``"auto"``: no route
                fits; the message lists what each needs).
        """
        damping = _check_real(damping, "damping")
        if max_memory is not None and (isinstance(max_memory, bool)
                                       or not isinstance(max_memory, (int, float))
                                       or not max_memory >= 0):
            raise TypeError(f"max_memory must be a number of bytes >= 0, got {max_memory!r}")
        route = self._choose(damping, method, max_memory)
        progress = self.progress if progress is None else progress
        if route == "riccati":
            return RiccatiFactorization(self, damping, progress=progress)
        return _FACTORIZATIONS[route](self, damping)

    def solve(self, g, damping: float = 0.0, method: str = "auto", refine="auto"):
        """``(C + damping I)^-1 g``, exactly; ``g`` of any kind :meth:`matvec` takes
        (``(n, k)`` blocks in one pass)."""
        return self.factorize(damping, method).solve(g, refine=refine)

    # ------------------------------------------------------------------ spectrum
    def spectrum_estimate(self, steps: int = 12) -> tuple[float, float]:
        """Lanczos estimates ``(theta_min, theta_max)`` (cached): inside ``[lambda_min, lambda_max]``."""
        if self._spectrum is None:
            theta, _ = lanczos(self._flat_matvec, self.num_params, steps, self.dtype, self.device)
            self._spectrum = (float(theta[0]), float(theta[-1]))
        return self._spectrum

    def eigenvalue_count(self, lower: float, upper: float) -> int:
        """Exact number of eigenvalues in ``[lower, upper)``, from two inertias (section 12).

        Raises :class:`~hessinv.errors.SingularMatrixError` when ``lower`` or ``upper`` is an
        eigenvalue of ``H`` (for instance ``0`` when a wide layer gives ``H`` a null space).
        """
        return eigenvalue_count(self, _check_real(lower, "lower"), _check_real(upper, "upper"))

    def smallest_eigenvalue(self, rel_tol: float = 1e-3) -> EigenvalueBracket:
        """A certified bracket ``lower <= lambda_min <= upper`` (Lanczos + inertias, section 12)."""
        rel_tol = _check_real(rel_tol, "rel_tol")
        if not 0 < rel_tol < 1:
            raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol}")
        return smallest_eigenvalue(self, rel_tol)

    def positive_definite_shift(self, damping: float = 0.0, rel_tol: float = 1e-3) -> float:
        """The smallest ``s >= 0`` with ``H + (damping + s) I`` positive semi-definite, from above.

        ``0`` when ``H + damping I`` is positive definite; otherwise ``-lower - damping`` for
        the certified bracket ``lower <= lambda_min`` of :meth:`smallest_eigenvalue`, so
        ``H + (damping + s) I`` is positive semi-definite and ``s`` exceeds the exact shift
        by at most ``rel_tol |lambda_min|``.
        """
        damping = _check_real(damping, "damping")
        try:
            if self.factorize(damping, progress=False).is_positive_definite:
                return 0.0
        except SingularMatrixError:
            pass  # singular: not positive definite
        bracket = self.smallest_eigenvalue(rel_tol)
        return max(0.0, -bracket.lower - damping)

    def __repr__(self) -> str:
        B = tree_flatten(self.inputs)[0][0].shape[0]
        return (
            f"{type(self).__name__}(n={self.num_params}, stages={len(self.stage_sizes)}, "
            f"batch={B}, dtype={self.dtype}, device={self.device})"
        )


class ChainHessian(_ChainCurvature):
    """The exact Hessian of ``loss_fn(model(inputs), targets)`` in the model's parameters.

    The model is split into stages (docs/algorithm.md section 1); each stage's
    derivatives are computed once, at construction, and every operation below costs
    time linear in the number of stages. ``H`` is never formed unless :meth:`dense` is
    called.

    Args:
        model: ``nn.Sequential`` or a list of modules; every child with selected
            parameters starts a stage, the other children join the stage before.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar that is a sum (or mean)
            of per-sample terms, e.g. ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``.
        inputs: the batch ``(B, ...)`` (or a tuple/dict the first stage takes).
        targets: whatever ``loss_fn`` takes.
        data: instead of ``inputs, targets``: an iterable of ``(inputs, targets)`` batches
            (a ``DataLoader``), taken as one batch (see :mod:`hessinv.data`).
        params: the parameters to differentiate in (tensors or names from
            ``named_parameters()``); default: those with ``requires_grad``. The others are
            constants.
        oracle: ``"auto"`` (structured ``Linear`` stages and closed-form losses where they
            apply, ``torch.func`` otherwise), ``"generic"`` or ``"analytic"``.
        progress: progress bars on sweeps that take more than two seconds.

    Everything (parameters, constants, inputs, targets) is read at construction; build a
    new object after an update.

    Example, checked against the dense Hessian of ``torch.func``:

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
    ...                       nn.Linear(5, 3)).double()
    >>> X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    >>> H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    >>> H.shape, H.stage_sizes
    ((73, 73), (25, 30, 18))
    >>> dense = hessinv.dense_hessian(model, nn.CrossEntropyLoss(), X, y)
    >>> v = torch.randn(73, dtype=torch.float64)
    >>> torch.allclose(H @ v, dense @ v, rtol=1e-12, atol=1e-14)
    True
    >>> x = H.solve(v, damping=0.1)
    >>> torch.allclose(x, torch.linalg.solve(dense + 0.1 * torch.eye(73, dtype=torch.float64), v))
    True
    """

    second_order = True


class ChainGGN(_ChainCurvature):
    """The exact generalized Gauss-Newton matrix ``G = J^T H_loss J`` (docs/algorithm.md section 9).

    ``J`` is the Jacobian of the model outputs in the parameters and ``H_loss`` the
    Hessian of the loss in the outputs (split at the model output: an activation in the
    last stage belongs to ``J``). ``G`` has the chain structure of the Hessian with every
    stage's second-order terms dropped, so the same linear-time products, diagonal
    (BackPACK's ``DiagGGNExact``), factorization, logdet and solves apply; it is positive
    semi-definite for convex losses, so ``G + eps I`` (``eps > 0``) factors by Cholesky at
    every stage. ``G = U^T U`` has only ``B r`` rows (``r`` per sample, the loss factor's),
    so it also factors in output space (section 14): a ``B r x B r`` Gram matrix,
    linear in depth, which gives the inverse diagonal (:meth:`Factorization.inverse_diagonal`)
    and the spectrum (:meth:`spectrum`) too; ``method="auto"`` picks the cheaper route
    (section 15). Same constructor as :class:`ChainHessian`.

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    >>> G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y)
    >>> J = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(
    ...     dict(model.named_parameters()))
    >>> J = torch.cat([j.reshape(10, -1) for j in J.values()], 1)   # (B K, n)
    >>> p = torch.softmax(model(X), 1).detach()
    >>> S = torch.block_diag(*[(torch.diag(q) - torch.outer(q, q)) / 5 for q in p])
    >>> torch.allclose(G.dense(), J.T @ S @ J, atol=1e-14)
    True
    >>> G.factorize(1e-3).method       # the route chosen by cost: n = 26 is small
    'dense'
    >>> F = G.factorize(1e-3, method="output")   # B r = 10 rows
    >>> F.method, F.is_positive_definite
    ('output space', True)
    >>> M = J.T @ S @ J + 1e-3 * torch.eye(26, dtype=torch.float64)
    >>> torch.allclose(F.solve(G.gradient()), torch.linalg.solve(M, G.gradient()))
    True
    >>> torch.allclose(hessinv.flatten(F.inverse_diagonal()), torch.linalg.inv(M).diagonal())
    True
    >>> torch.allclose(G.spectrum(), torch.linalg.eigvalsh(J.T @ S @ J)[-10:], atol=1e-14)
    True
    """

    second_order = False
    symbol = "G"
    routes = ("output", "riccati", "dense")

    def _output_space(self) -> OutputSpace | None:
        if not hasattr(self, "_space"):
            head = self._derivatives.head
            self._space = None if head.factor is None else OutputSpace(
                self.stage_derivatives(), head.factor, head.factor_exact)
        return self._space

    def output_space(self) -> OutputSpace:
        """``U = F J`` with ``G = U^T U`` (docs/algorithm.md section 14): ``B r`` rows, its
        Gram matrix ``U U^T`` kept once computed. Raises ``ValueError`` when the loss Hessian
        blocks are indefinite (a non-convex loss: no real factor ``F``)."""
        space = self._output_space()
        if space is None:
            raise ValueError(
                "the loss Hessian blocks have a negative eigenvalue, so G = J^T S J has no "
                "output-space factor U = S^(1/2) J; use method='riccati' or 'dense'")
        return space

    def spectrum(self, eigenvectors: int = 0):
        """The largest ``min(n, B r)`` eigenvalues of ``G``, ascending, exactly (the others
        are zero): the eigenvalues of the Gram matrix ``U U^T`` (docs/algorithm.md section 14).

        With ``eigenvectors=k > 0`` returns ``(values, vectors)``: also the unit eigenvectors
        of the ``k`` largest as an ``(n, k)`` tensor in ``param_names`` order,
        ``v_i = U^T q_i / sqrt(e_i)`` (one adjoint sweep with ``k`` columns). Eigenvalues have
        an absolute error of about ``B r u ||G||``.
        """
        if isinstance(eigenvectors, bool) or not isinstance(eigenvectors, int) or eigenvectors < 0:
            raise ValueError(f"eigenvectors must be an int >= 0, got {eigenvectors!r}")
        space = self.output_space()
        e, Q = space.eigh()
        m = min(self.num_params, space.rows)
        values = e[e.numel() - m:]
        if not eigenvectors:
            return values
        k = min(eigenvectors, m)
        top, q = values[m - k:], Q[:, Q.shape[1] - k:]
        scale = top.clamp_min(torch.finfo(top.dtype).tiny).sqrt()
        vectors = torch.cat(space.apply_T(q / scale)) if k else values.new_zeros(
            self.num_params, 0)
        return values, vectors
