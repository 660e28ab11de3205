"""The Gauss-Newton matrix: output-space, Riccati and dense routes, and against CG.

Four parts, printed as markdown tables (float64, damping ``lam = 1e-3``, tanh MLPs
whose ``depth`` counts the ``nn.Linear`` layers, input dimension 8; 10 classes:
``CrossEntropyLoss`` with class-index targets; 1 output: ``MSELoss`` regression):

* ``routes`` -- depth 8, width 32..1024, batch 16 and 128, 1 and 10 outputs: per
  configuration and route (``method="output"``, ``"riccati"``, ``"dense"``) the
  construction (``ChainGGN``, the derivative sweep), ``factorize``, one solve of the
  gradient (its first solve: refinement and the a-posteriori check included), their
  total, backward error, refinement steps, the relative residual
  ``||(G + lam I) x - g|| / ||g||``, the route's ``memory_estimate()`` and the peak RSS of
  the child process that ran it, and which route ``method="auto"`` picks. A route is
  skipped when its memory estimate exceeds the free memory or when its
  ``cost_estimate()`` predicts more than ``--cell-budget`` seconds at a rate calibrated
  per route on the first (reference) configuration, width 16, which every route runs.
  The largest configuration (width 1024, batch 128, 10 classes) always runs the output
  route; it is repeated with input dimension 1024 (7.36 M parameters).
* ``cg`` -- the exact solve against curvlinops' ``CGInverseLinearOperator`` (GPyTorch's
  ``linear_cg``) on ``GGNLinearOperator + lam I`` at (depth, width, batch, classes) =
  (8, 32, 32, 10) and (32, 16, 64, 10), end to end from the model, at equal accuracy:
  the CG tolerance is lowered until the true relative residual is at most ours. Also
  scipy's CG on curvlinops' operator (``to_scipy()``), hessinv's CG on our own
  products, and ``linear_cg`` with its default ``eps`` and ``stop_updating_after``.
  Skipped with a message when curvlinops is not installed.
* ``rhs`` -- 200 right-hand sides in one pass on a kept factorization at (32, 16, 64, 10)
  against one solve, and against curvlinops' batched CG on the same 200 columns.
* ``batch`` -- the demo's problem (``hessinv.tools.demo.make_problem``: tanh MLP depth 16,
  width 16, input 8, 4 classes, ``CrossEntropyLoss``, float64, its damping ``1e-2``) at
  batch 8..128: the exact solve end to end (``ChainGGN`` + ``factorize(1e-2)`` with
  ``method="auto"``, and with ``method="riccati"``, + one ``solve(g)``) against CG on our
  exact products (``hessinv.conjugate_gradient(G.matvec, g, 1e-2, rtol=1e-10)``,
  construction included) and curvlinops' ``CGInverseLinearOperator`` (its tolerance lowered
  until the true relative residual is at most 1e-10; skipped with a note without
  curvlinops). Two initialisations, one table each (``--batch-init``): the demo's own
  (PyTorch's default: the deep stages' inputs collapse to rank 1 and ``G + 1e-2 I`` has
  3 eigenvalues above ``2e-2`` at every batch, a spectrum CG resolves in 5 products) and
  orthogonal weights times ``--batch-gain`` (1.1) with zero biases, the same data (every
  stage keeps inputs of full rank). Untimed, per case: the eigenvalues of ``G + 1e-2 I``
  from the dense ``n x n`` matrix (``G @ I``, ``eigvalsh``), checked against
  ``G.spectrum()``.

Every run of a route runs in a fresh child process (its peak RSS is its own); the ``cg``
and ``rhs`` parts run one child per case. Each child first runs every timed code path on a
tiny problem (start-up is not timed). Times are medians over rounds whose runs of the
compared methods are interleaved.

    python benchmarks/bench_ggn.py                       # everything (4.5-6.5 minutes here)
    python benchmarks/bench_ggn.py --out                 # ... and write results/bench_ggn.md
    python benchmarks/bench_ggn.py --quick               # without the 1024-wide cells
    python benchmarks/bench_ggn.py --parts cg rhs --out  # rerun two parts, replace their sections
    python benchmarks/bench_ggn.py --parts batch --out   # the batch axis, both inits (~4 min)
    python benchmarks/bench_ggn.py --parts batch --batch-init orthogonal   # one init only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _shared import free_ram_bytes, load_average, peak_rss_bytes, run_child, splice
from torch import nn

import hessinv

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_ggn.md"
LAM = 1e-3
D_IN = 8
ROUTES = ("output", "riccati", "dense")
DEPTH = 8
WIDTHS = (32, 64, 128, 256, 512, 1024)
BATCHES = (16, 128)
CLASSES = (1, 10)
REFERENCE = (8, 16, 16, 10)  # (depth, width, batch, classes): calibrates the cost model
LARGEST = (8, 1024, 128, 10)
CG_CASES = ((8, 32, 32, 10), (32, 16, 64, 10))
RHS_CASE, RHS_COLUMNS = (32, 16, 64, 10), 200
BATCH_SIZES = (8, 16, 32, 64, 128)
BATCH_INITS = ("default", "orthogonal")
#: the rate (flop/s) assumed for a route that has not been calibrated
FALLBACK_RATE = 5e9


# ----------------------------------------------------------------------------- the problem


def tanh_mlp(depth, width, classes, *, d_in=D_IN, seed=0):
    """``depth`` Linear layers (input ``d_in``, output ``classes``) with tanh between them."""
    torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [classes]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(torch.float64)


def problem(depth, width, batch, classes, *, d_in=D_IN, seed=0):
    """``(model, loss_fn, X, y)``: cross-entropy on class indices for ``classes > 1``,
    mean squared error on one output for ``classes == 1``; a seeded random batch."""
    model = tanh_mlp(depth, width, classes, d_in=d_in, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
    if classes == 1:
        return model, nn.MSELoss(), X, torch.randn(batch, 1, generator=gen, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, classes, (batch,), generator=gen)


def ggn(prob):
    """Our operator; the constructor runs the whole derivative sweep."""
    return hessinv.ChainGGN(*prob, progress=False)


def relative_residuals(G, x, g, lam=LAM) -> torch.Tensor:
    """``||(G + lam I) x_j - g_j|| / ||g_j||`` per column, with one exact product of ours."""
    x2, g2 = x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1)
    r = G @ x2 + lam * x2 - g2
    return torch.linalg.vector_norm(r, dim=0) / torch.linalg.vector_norm(g2, dim=0)


# ----------------------------------------------------------------------------- timing (child)


def now() -> float:
    return time.perf_counter()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def warm_up_hessinv():
    """Every code path of ours once on tiny problems (both losses): start-up is not timed."""
    for classes in (1, 3):
        G = ggn(problem(3, 4, 4, classes))
        g = G.gradient()
        G @ g
        for route in ROUTES:
            F = G.factorize(LAM, method=route)
            F.solve(g)
            F.solve(torch.stack([g, g], 1))
        G.factorize(LAM).solve(g)
        hessinv.conjugate_gradient(G.matvec, g, LAM, rtol=1e-10, maxiter=20)


# ----------------------------------------------------------------------------- part 1 (child)


def measure_route(spec: dict) -> dict:
    """One configuration and route from the model: construction, factorization, one solve."""
    prob = problem(
        spec["depth"], spec["width"], spec["batch"], spec["classes"], d_in=spec.get("d_in", D_IN)
    )
    out: dict = {"baseline_rss": rss_bytes()}
    t0 = now()
    G = ggn(prob)
    t1 = now()
    F = G.factorize(LAM, method=spec["route"])
    t2 = now()
    g = G.gradient()
    x = F.solve(g)
    t3 = now()
    out["peak_rss"] = peak_rss_bytes()
    out |= {
        "construction": t1 - t0,
        "factorization": t2 - t1,
        "solve": t3 - t2,
        "total": t3 - t0,
        "n": G.num_params,
        "method": F.method,
        "backward_error": F.backward_error,
        "refinement_steps": F.refinement_steps,
    }
    out["residual"] = float(relative_residuals(G, x, g).max())
    return out


# ----------------------------------------------------------------------------- parts 2, 3 (child)


def curvlinops_tools():
    """``(make_operator, cg_inverse)`` or raise ``ImportError``: curvlinops stays optional."""
    from curvlinops import CGInverseLinearOperator, GGNLinearOperator
    from curvlinops._torch_base import PyTorchLinearOperator

    class Damped(PyTorchLinearOperator):
        """``A + lam I`` for a curvlinops operator ``A``; counts its products (columns)."""

        SELF_ADJOINT = True

        def __init__(self, A, lam):
            super().__init__(A._in_shape, A._out_shape)
            self._A, self._lam, self.products = A, lam, 0

        def _matmat(self, X):
            self.products += X[0].shape[-1]
            return [a + self._lam * x for a, x in zip(self._A._matmat(X), X, strict=True)]

        def _adjoint(self):
            return self

        @property
        def device(self):
            return self._A.device

        @property
        def dtype(self):
            return self._A.dtype

    def make_operator(prob, lam=LAM):
        """``(A + lam I, flat gradient)``: what a curvlinops user builds from the model."""
        model, loss_fn, X, y = prob
        A = GGNLinearOperator(
            model, loss_fn, list(model.parameters()), [(X, y)], check_deterministic=False
        )
        grad, _ = A.gradient_and_loss()
        return Damped(A, lam), torch.cat([t.reshape(-1) for t in grad])

    return make_operator, CGInverseLinearOperator


#: ``linear_cg`` options for a fair CG: its default ``eps = 1e-10`` zeroes every step
#: whose curvature ``p^T A p`` (of the normalised residual) falls below 1e-10, and the
#: default ``stop_updating_after = 1e-10`` freezes columns; both stall it near 1e-5 here
FAIR_CG = {"eps": torch.finfo(torch.float64).tiny, "stop_updating_after": 0.0}
TOLERANCE_STEPS = 6  # tolerance = target * 10^-k, k < TOLERANCE_STEPS


def search(run, target, start, floor=1e-18):
    """Lower a tolerance from ``start`` by 10x until ``run(tol)`` (returning ``(seconds,
    residual, products)``) reaches ``residual <= target``; stop early when it stalls.

    Returns ``{"tol", "seconds", "residual", "products", "reached", "tries"}`` of the first
    tolerance that reached the target, else of the best try."""
    best, tries, tol = None, [], start
    for _ in range(TOLERANCE_STEPS):
        seconds, residual, products = run(tol)
        tries.append((tol, residual))
        row = {"tol": tol, "seconds": seconds, "residual": residual, "products": products}
        if residual <= target:
            return row | {"reached": True, "tries": tries}
        if best is not None and residual > 0.5 * best["residual"]:
            best = min(best, row, key=lambda r: r["residual"])
            break  # stalled: a smaller tolerance no longer helps
        best = row if best is None else min(best, row, key=lambda r: r["residual"])
        tol /= 10
        if tol < floor:
            break
    return best | {"reached": False, "tries": tries}


def warm_up_curvlinops(make_operator, cg_inverse):
    from scipy.sparse.linalg import cg

    for classes in (1, 3):
        prob = problem(3, 4, 4, classes)
        D, g = make_operator(prob)
        D @ g
        D @ torch.stack([g, g], 1)
        cg_inverse(D, tolerance=1e-10, max_iter=20, **FAIR_CG) @ g
        cg_inverse(D, tolerance=1e-10, max_iter=20, **FAIR_CG) @ torch.stack([g, g], 1)
        cg(D.to_scipy(), g.numpy(), rtol=1e-10, atol=0.0, maxiter=20)


def measure_cg(spec: dict) -> dict:
    """Ours against curvlinops' CG (and scipy's, and CG on our products), end to end."""
    from scipy.sparse.linalg import cg

    make_operator, cg_inverse = curvlinops_tools()
    warm_up_curvlinops(make_operator, cg_inverse)
    prob = problem(*spec["case"])
    repeats, max_iter = spec["repeats"], spec["max_iter"]
    ref = ggn(prob)  # the reference for every residual: our exact product
    g = ref.gradient()
    out: dict = {"n": ref.num_params}
    e = ref.spectrum()  # the top B r eigenvalues of G (the others are 0): what CG sees
    out |= {
        "rows": e.numel(),
        "above_lam": int((e > LAM).sum()),
        "condition": float((e[-1] + LAM) / LAM),
    }

    def ours():
        G = ggn(prob)
        F = G.factorize(LAM)
        x = F.solve(G.gradient())
        return x, F

    x, F = ours()
    target = float(relative_residuals(ref, x, g).max())
    out |= {
        "target": target,
        "method": F.method,
        "backward_error": F.backward_error,
        "refinement_steps": F.refinement_steps,
    }
    D, gc = make_operator(prob)
    v = torch.randn(ref.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out["gradient_difference"] = float(
        torch.linalg.vector_norm(gc - g) / torch.linalg.vector_norm(g)
    )
    out["product_difference"] = float(
        torch.linalg.vector_norm(D @ v - ref @ v - LAM * v) / torch.linalg.vector_norm(D @ v)
    )

    def linear_cg(tol, options=FAIR_CG, iters=max_iter):
        start = now()
        D, gc = make_operator(prob)
        xc = cg_inverse(D, tolerance=tol, max_iter=iters, **options) @ gc
        seconds = now() - start
        return seconds, float(relative_residuals(ref, xc, g).max()), D.products

    def scipy_cg(tol):
        start = now()
        D, gc = make_operator(prob)
        xs, _ = cg(D.to_scipy(), gc.numpy(), rtol=tol, atol=0.0, maxiter=max_iter)
        seconds = now() - start
        return seconds, float(relative_residuals(ref, torch.from_numpy(xs), g).max()), D.products

    def our_cg(tol):
        start = now()
        G = ggn(prob)
        res = hessinv.conjugate_gradient(G.matvec, G.gradient(), LAM, rtol=tol, maxiter=max_iter)
        seconds = now() - start
        return seconds, float(relative_residuals(ref, res.x, g).max()), res.iterations

    methods = {"linear_cg": linear_cg, "scipy_cg": scipy_cg, "our_cg": our_cg}
    found = {name: search(run, target, target) for name, run in methods.items()}
    out["search"] = found
    if spec["default_max_iter"] > 0:  # linear_cg with its defaults (eps, stop_updating_after)
        seconds, residual, products = linear_cg(target, options={}, iters=spec["default_max_iter"])
        out["default"] = {
            "seconds": seconds,
            "residual": residual,
            "products": products,
            "max_iter": spec["default_max_iter"],
        }
    # timed: interleaved rounds, each method from the model with the tolerance found above
    times: dict[str, list[float]] = {"ours": [], **{name: [] for name in methods}}
    for _ in range(repeats):
        start = now()
        ours()
        times["ours"].append(now() - start)
        for name, run in methods.items():
            times[name].append(run(found[name]["tol"])[0])
    out["times"] = {k: statistics.median(v) for k, v in times.items()}
    out["repeats"] = repeats
    return out


def block_solve_flops(model, batch: int, k: int) -> float:
    """Arithmetic of an output-space solve of ``k`` columns with its residual check: two
    tangent and two adjoint sweeps, each ``2 B k h_out (h_in + 1)`` for the parameters and
    ``2 B k h_out h_in`` for the state per ``Linear`` layer (none for the first one's state);
    the ``B r``-sized Woodbury solve is negligible here."""
    total = 0.0
    for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
        h_out, h_in = layer.weight.shape
        total += 2.0 * batch * k * h_out * ((h_in + 1) + (h_in if i else 0))
    return 4 * total


def measure_rhs(spec: dict) -> dict:
    """``F.solve(V)`` with ``V`` ``(n, k)`` against one ``F.solve(g)`` on a kept
    factorization, and against curvlinops' batched CG on the same ``k`` columns."""
    prob = problem(*spec["case"])
    k, repeats = spec["columns"], spec["repeats"]
    start = now()
    G = ggn(prob)
    F = G.factorize(LAM)
    setup = now() - start
    g = G.gradient()
    n = G.num_params
    V = torch.randn(n, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out: dict = {"n": n, "columns": k, "method": F.method, "setup": setup, "repeats": repeats}
    F.solve(g)
    F.solve(V)  # both code paths once before timing
    one, block = [], []
    for _ in range(repeats):
        start = now()
        F.solve(g)
        one.append(now() - start)
        start = now()
        X = F.solve(V)
        block.append(now() - start)
    out["one"], out["block"] = statistics.median(one), statistics.median(block)
    out["block_backward_error"], out["block_steps"] = F.backward_error, F.refinement_steps
    out["block_flops"] = block_solve_flops(prob[0], spec["case"][2], k)
    res = relative_residuals(G, X, V)
    out["block_residual_max"], out["block_residual_median"] = float(res.max()), float(res.median())
    start = now()
    G @ V
    out["product"] = now() - start
    try:
        make_operator, cg_inverse = curvlinops_tools()
    except ImportError as exc:
        out["curvlinops"] = f"not installed ({exc})"
        return out
    warm_up_curvlinops(make_operator, cg_inverse)
    start = now()
    D, _ = make_operator(prob)
    out["cg_setup"] = now() - start
    target = out["block_residual_max"]

    def batched_cg(tol):
        D.products = 0
        start = now()
        Xc = cg_inverse(D, tolerance=tol, max_iter=spec["max_iter"], **FAIR_CG) @ V
        seconds = now() - start
        return seconds, float(relative_residuals(G, Xc, V).max()), D.products // k

    found = search(batched_cg, target, target)
    out["cg"] = found
    block_again, cg_times = [], []
    for _ in range(repeats):
        start = now()
        F.solve(V)
        block_again.append(now() - start)
        cg_times.append(batched_cg(found["tol"])[0])
    out["block_again"], out["cg_time"] = statistics.median(block_again), statistics.median(cg_times)
    start = now()
    D @ V
    out["cg_product"] = now() - start
    return out


def demo_problem(batch: int, init: str = "default", gain: float = 1.1):
    """``(config, (model, loss_fn, X, y))``: the demo's problem (``python -m hessinv demo``)
    at ``batch``, built by the demo's own builder.

    ``init="default"``: as the demo builds it (PyTorch's initialisation); ``"orthogonal"``:
    the same model and data, its weights replaced by orthogonal ones times ``gain`` (from a
    generator seeded with the demo's seed) and its biases zeroed, as ``bench_solve.py
    --init orthogonal`` does."""
    from hessinv.tools.demo import DemoConfig, make_problem

    cfg = DemoConfig(batch=batch)
    p = make_problem(cfg)
    if init == "orthogonal":
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for layer in p.model:
                if isinstance(layer, nn.Linear):
                    weight = torch.empty(layer.weight.shape, dtype=layer.weight.dtype)
                    nn.init.orthogonal_(weight, gain=gain, generator=gen)
                    layer.weight.copy_(weight)
                    layer.bias.zero_()
    elif init != "default":
        raise ValueError(f"init must be one of {BATCH_INITS}, got {init!r}")
    return cfg, (p.model, p.loss_fn, p.inputs, p.targets)


def dense_spectrum(G, chunk: int = 512) -> torch.Tensor:
    """All ``n`` eigenvalues of ``G`` (ascending) from the dense matrix ``G @ I``, built
    ``chunk`` columns at a time and symmetrised: the independent check of ``G.spectrum()``."""
    n = G.num_params
    eye = torch.eye(n, dtype=torch.float64)
    M = torch.cat([G @ eye[:, i : i + chunk] for i in range(0, n, chunk)], 1)
    return torch.linalg.eigvalsh((M + M.T) / 2)


def measure_batch(spec: dict) -> dict:
    """The demo's problem at one batch size: the exact solve (auto and Riccati routes)
    against CG on our products and curvlinops' CG, end to end from the model."""
    cfg, prob = demo_problem(spec["batch"], spec.get("init", "default"), spec.get("gain", 1.1))
    lam, target, max_iter = cfg.damping, cfg.target, spec["max_iter"]
    ref = ggn(prob)  # the reference for every residual: our exact product
    g = ref.gradient()
    e = ref.spectrum()  # the top B r eigenvalues of G (the others are 0): what CG sees
    start = now()
    d = dense_spectrum(ref) + lam  # all n eigenvalues of G + lam I, untimed
    dense_seconds = now() - start
    out: dict = {
        "n": ref.num_params,
        "depth": cfg.depth,
        "width": cfg.width,
        "d_in": cfg.d_in,
        "classes": cfg.n_classes,
        "lam": lam,
        "target": target,
        "rows": e.numel(),
        "above_2lam": int((e > lam).sum()),
        "condition": float((e[-1] + lam) / lam),
        "dense_above_2lam": int((d > 2 * lam).sum()),
        "dense_condition": float(d[-1] / d[0]),
        "dense_min": float(d[0]),
        "dense_max": float(d[-1]),
        "dense_seconds": dense_seconds,
        "init": spec.get("init", "default"),
        "gain": spec.get("gain", 1.1),
        "repeats": spec["repeats"],
    }

    def residual(x) -> float:
        return float(relative_residuals(ref, x, g, lam).max())

    def exact(method):
        def run():
            start = now()
            G = ggn(prob)
            F = G.factorize(lam, method=method)
            x = F.solve(G.gradient())
            seconds = now() - start
            return seconds, {
                "residual": residual(x),
                "method": F.method,
                "backward_error": F.backward_error,
                "refinement_steps": F.refinement_steps,
            }

        return run

    def our_cg():
        start = now()
        G = ggn(prob)
        res = hessinv.conjugate_gradient(G.matvec, G.gradient(), lam, rtol=target, maxiter=max_iter)
        seconds = now() - start
        return seconds, {
            "residual": residual(res.x),
            "products": res.iterations,
            "converged": res.converged,
        }

    runs = {"auto": exact("auto"), "riccati": exact("riccati"), "our_cg": our_cg}
    try:
        make_operator, cg_inverse = curvlinops_tools()
    except ImportError as exc:
        out["curvlinops"] = f"not installed ({exc})"
    else:
        warm_up_curvlinops(make_operator, cg_inverse)

        def linear_cg(tol):
            start = now()
            D, gc = make_operator(prob, lam)
            xc = cg_inverse(D, tolerance=tol, max_iter=max_iter, **FAIR_CG) @ gc
            seconds = now() - start
            return seconds, residual(xc), D.products

        found = search(linear_cg, target, target)  # untimed: the tolerance that reaches 1e-10
        out["curvlinops_search"] = found

        def curvlinops_run():
            seconds, res, products = linear_cg(found["tol"])
            return seconds, {"residual": res, "products": products, "tol": found["tol"]}

        runs["curvlinops"] = curvlinops_run
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    info: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(spec["repeats"]):  # interleaved rounds, the order rotated each round
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds, row = runs[name]()
            times[name].append(seconds)
            info[name].append(row)
    for name in names:
        rows = info[name]
        out[name] = rows[-1] | {
            "seconds": statistics.median(times[name]),
            "residual": max(r["residual"] for r in rows),
            "all_seconds": times[name],
        }
    return out


MEASUREMENTS = {
    "route": measure_route,
    "cg": measure_cg,
    "rhs": measure_rhs,
    "batch": measure_batch,
}


def worker(kind: str, spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    warm_up_hessinv()
    return MEASUREMENTS[kind](spec)


# ----------------------------------------------------------------------------- driver


def fmt_s(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def fmt_gb(v) -> str:
    return "-" if v is None else f"{v / 2**30:.3g}"


def fmt_e(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def plan(config: tuple, d_in: int, threads: int) -> dict:
    """Estimates of every route for one configuration (in this process: nothing timed) and
    the route ``method="auto"`` takes (its factorization costs at most the output route's,
    the cheapest by the cost model that fits, so it is affordable here)."""
    torch.set_num_threads(threads)
    G = ggn(problem(*config, d_in=d_in))
    info = {
        "n": G.num_params,
        "memory": G.memory_estimate(),
        "cost": G.cost_estimate(),
        "free": free_ram_bytes(),
    }
    info["auto"] = G.factorize(LAM).method
    return info


def decide(info: dict, route: str, rates: dict, budget: float) -> str | None:
    """``None`` to run the route, else why it is skipped."""
    need, free = info["memory"][route], info["free"]
    if need > free:
        return f"skipped: needs {need / 2**30:.1f} GiB (free {free / 2**30:.1f} GiB)"
    seconds = info["cost"][route] / rates.get(route, FALLBACK_RATE)
    if seconds > budget:
        return f"skipped: estimated {seconds:.3g} s > budget {budget:g} s"
    return None


def measure_config(
    config: tuple,
    routes,
    args,
    rates: dict,
    *,
    d_in: int = D_IN,
    force: tuple = (),
    rounds: int | None = None,
) -> dict:
    """Plan one configuration, then run its routes in interleaved rounds of fresh children."""
    depth, width, batch, classes = config
    info = plan(config, d_in, args.threads)
    rows: dict[str, dict] = {}
    running = []
    for route in routes:
        why = None if route in force else decide(info, route, rates, args.cell_budget)
        est = info["cost"][route] / rates.get(route, FALLBACK_RATE)
        rows[route] = {
            "estimate_s": est,
            "memory_estimate": info["memory"][route],
            "cost": info["cost"][route],
        }
        if why:
            rows[route]["skipped"] = why
        else:
            running.append(route)
    if rounds is None:
        cheap = all(rows[r]["estimate_s"] <= args.single_above for r in running)
        rounds = args.repeats if cheap else 1
    runs: dict[str, list[dict]] = {r: [] for r in running}
    for i in range(rounds):
        order = running[i % len(running) :] + running[: i % len(running)] if running else []
        for route in order:
            progress(f"  {config} input {d_in}: {route}, round {i + 1}/{rounds}")
            spec = dict(
                depth=depth,
                width=width,
                batch=batch,
                classes=classes,
                d_in=d_in,
                route=route,
                threads=args.threads,
            )
            runs[route].append(run_child(__file__, "route", spec, args.timeout))
    for route, results in runs.items():
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            rows[route]["error"] = errors[0]
            continue
        row = rows[route]
        for key in ("construction", "factorization", "solve", "total"):
            row[key] = statistics.median(r[key] for r in results)
        last = results[-1]
        for key in ("method", "backward_error", "refinement_steps", "residual", "baseline_rss"):
            row[key] = last[key]
        row["backward_error"] = max(r["backward_error"] for r in results)
        row["residual"] = max(r["residual"] for r in results)
        row["peak_rss"] = max(r["peak_rss"] for r in results)
        row["fastest_work"] = min(r["factorization"] + r["solve"] for r in results)
        row["rounds"] = len(results)
    return {
        "config": config,
        "d_in": d_in,
        "n": info["n"],
        "auto": info["auto"],
        "free": info["free"],
        "routes": rows,
    }


def calibrate(result: dict) -> dict:
    """Flop/s per route: cost estimate over the fastest round's factorization + solve (the
    fastest: a load spike on the shared machine should not skip routes that fit)."""
    rates = {}
    for route, row in result["routes"].items():
        seconds = row.get("fastest_work", 0)
        if seconds > 0:
            rates[route] = row["cost"] / seconds
    return rates


def run_routes(args) -> dict:
    progress("routes: reference configuration (calibration) ...")
    reference = measure_config(REFERENCE, ROUTES, args, {}, force=ROUTES, rounds=args.repeats)
    rates = calibrate(reference)
    configs = [(DEPTH, w, b, c) for w in args.widths for b in BATCHES for c in CLASSES]
    results = [reference]
    for config in configs:
        progress(f"routes: {config} ...")
        force = ("output",) if config == LARGEST else ()
        results.append(measure_config(config, ROUTES, args, rates, force=force))
    largest = [r for r in results if r["config"] == LARGEST]
    if largest:
        progress(f"routes: {LARGEST} with input {LARGEST[1]} ...")
        largest.append(
            measure_config(LARGEST, ("output",), args, rates, d_in=LARGEST[1], force=("output",))
        )
    return {"results": results, "rates": rates, "largest": largest}


def route_name(route: str) -> str:
    return {"output": "output space"}.get(route, route)


def routes_section(data: dict, args) -> str:
    results, rates = data["results"], data["rates"]
    rate_text = ", ".join(f"{route_name(r)} {rates[r]:.2g}" for r in ROUTES if r in rates)
    lines = [
        f"## Routes: tanh MLP depth {DEPTH}, input {D_IN}, float64, lam = {LAM:g}, "
        f"{args.threads} thread(s)\n",
        "1 output: MSELoss regression; 10 classes: CrossEntropyLoss on class indices. Each "
        "route runs from the model in fresh child processes: total = construction "
        "(`ChainGGN`, the derivative sweep) + `factorize(lam, method=route)` + one "
        "`F.solve(g)` of the gradient (refinement and the a-posteriori check included). "
        f"Medians over interleaved rounds ({args.repeats} where every running route is "
        f"estimated under {args.single_above:g} s, else 1). Peak RSS is the whole child "
        "process (Python and torch, about 0.25 GB, included; maximum over rounds); the "
        "memory estimate is the route's `memory_estimate()` entry. residual = "
        "||(G + lam I) x - g|| / ||g|| with one exact product.\n",
        f"Skipping: a route runs when its memory estimate fits the free RAM and its "
        f"`cost_estimate()` divided by the route's rate is at most --cell-budget = "
        f"{args.cell_budget:g} s. Rates (flop/s), calibrated on the reference configuration "
        f"(depth {REFERENCE[0]}, width {REFERENCE[1]}, batch {REFERENCE[2]}, "
        f"{REFERENCE[3]} classes) as cost estimate / (factorization + solve) of its fastest "
        f"round: {rate_text}. The last column of the detail table gives the same ratio "
        "(medians) for every cell that ran: the cost model's accuracy.\n",
        '### Side by side: total time (s) per route, and the route `method="auto"` takes\n',
        "| width | batch | classes | n | output space | riccati | dense | riccati / output "
        "| dense / output | auto picks |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(row):
        if "error" in row:
            return row["error"]
        if "skipped" in row:
            return row["skipped"]
        return fmt_s(row["total"])

    def ratio(row, base):
        if "total" in row and base and "total" in base:
            return f"{row['total'] / base['total']:.1f}x"
        return "-"

    for res in results:
        _, width, batch, classes = res["config"]
        r = res["routes"]
        out = r.get("output")
        lines.append(
            f"| {width} | {batch} | {classes} | {res['n']:,} | {cell(r['output'])} "
            f"| {cell(r['riccati'])} | {cell(r['dense'])} | {ratio(r['riccati'], out)} "
            f"| {ratio(r['dense'], out)} | {res['auto']} |"
        )
    lines += [
        "\n### Detail\n",
        "| width | batch | classes | route | construction (s) | factorization (s) | solve (s) "
        "| total (s) | backward error | refinement steps | residual | memory estimate (GiB) "
        "| peak RSS (GiB) | estimated (s) | rounds | cost / measured (flop/s) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        _, width, batch, classes = res["config"]
        for route in ROUTES:
            row = res["routes"][route]
            head = f"| {width} | {batch} | {classes} | {route_name(route)}"
            if "skipped" in row or "error" in row:
                note = row.get("error") or row["skipped"]
                lines.append(
                    f"{head} | {note} | | | | | | | {fmt_gb(row['memory_estimate'])} "
                    f"| | {fmt_s(row['estimate_s'])} | | |"
                )
                continue
            measured = row["factorization"] + row["solve"]
            lines.append(
                f"{head} | {fmt_s(row['construction'])} | {fmt_s(row['factorization'])} "
                f"| {fmt_s(row['solve'])} | {fmt_s(row['total'])} | {fmt_e(row['backward_error'])} "
                f"| {row['refinement_steps']} | {fmt_e(row['residual'])} "
                f"| {fmt_gb(row['memory_estimate'])} | {fmt_gb(row['peak_rss'])} "
                f"| {fmt_s(row['estimate_s'])} | {row['rounds']} "
                f"| {row['cost'] / measured:.2g} |"
            )
            if row["method"] != route_name(route):
                lines[-1] = lines[-1].replace(
                    f"| {route_name(route)} |", f"| {route_name(route)} (ran as {row['method']}) |"
                )
    lines.append(largest_section(data["largest"]))
    return "\n".join(lines)


def largest_section(largest: list) -> str:
    depth, width, batch, classes = LARGEST
    lines = [
        f"\n### The largest case: depth {depth}, width {width}, batch {batch}, "
        f"{classes} classes, output route\n"
    ]
    if not largest:
        return "\n".join(lines + ["not run (`--quick` or `--widths` without it)."])
    lines += [
        "A fresh child process per run; peak RSS is the whole process. The second row uses "
        f"input dimension {width} instead of {D_IN} (one more {width} x {width} layer's worth "
        "of parameters).\n",
        "| input | n | construction (s) | factorization (s) | solve (s) | total (s) "
        "| peak RSS (GiB) | memory estimate (GiB) | residual | backward error | refinement steps | "
        "method |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in largest:
        row = res["routes"]["output"]
        if "total" not in row:
            lines.append(
                f"| {res['d_in']} | {res['n']:,} | {row.get('error') or row.get('skipped')} |"
            )
            continue
        lines.append(
            f"| {res['d_in']} | {res['n']:,} | {fmt_s(row['construction'])} "
            f"| {fmt_s(row['factorization'])} | {fmt_s(row['solve'])} | {fmt_s(row['total'])} "
            f"| {fmt_gb(row['peak_rss'])} | {fmt_gb(row['memory_estimate'])} "
            f"| {fmt_e(row['residual'])} | {fmt_e(row['backward_error'])} "
            f"| {row['refinement_steps']} | {row['method']} |"
        )
    return "\n".join(lines)


def curvlinops_available() -> str | None:
    """``None`` when curvlinops imports, else the reason."""
    try:
        import curvlinops  # noqa: F401
    except ImportError as exc:
        return f"curvlinops is not installed ({exc}); `pip install curvlinops-for-pytorch`"
    return None


def cg_section(args) -> str:
    head = (
        f"## Exact solve against curvlinops' CG: (G + lam I) x = g, lam = {LAM:g}, "
        f"float64, {args.threads} thread(s)\n"
    )
    missing = curvlinops_available()
    if missing:
        return head + f"\nskipped: {missing}."
    lines = [
        head,
        "End to end from the model (operator construction and gradient included) for every "
        "row. ours: `ChainGGN` + `factorize(lam)` (auto) + `solve`; its relative residual "
        "(exact product) is the target. curvlinops: `GGNLinearOperator(..., "
        "check_deterministic=False)` + `gradient_and_loss()` + `CGInverseLinearOperator(A + "
        "lam I, tolerance, max_iter, eps=tiny, stop_updating_after=0)`, the tolerance lowered "
        "10x at a time from the target until the true relative residual is at most the "
        "target; scipy: `scipy.sparse.linalg.cg` on `(A + lam I).to_scipy()`, rtol likewise; "
        "hessinv CG: `hessinv.conjugate_gradient` on our products, rtol likewise. "
        f"max_iter {args.cg_max_iter}. Times are medians of {args.cg_repeats} interleaved "
        "rounds; products are columns multiplied.\n",
    ]
    table = [
        "| depth | width | batch | classes | n | method | tolerance | products | time (s) "
        "| relative residual | reached target | time / ours |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    notes, verdicts = [], []
    for case in CG_CASES:
        progress(f"cg: {case} ...")
        spec = dict(
            case=case,
            threads=args.threads,
            repeats=args.cg_repeats,
            max_iter=args.cg_max_iter,
            default_max_iter=args.cg_default_max_iter,
        )
        r = run_child(__file__, "cg", spec, args.timeout)
        depth, width, batch, classes = case
        prefix = f"| {depth} | {width} | {batch} | {classes}"
        if "error" in r:
            table.append(f"{prefix} | | error: {r['error']} |")
            continue
        t = r["times"]
        prefix += f" | {r['n']:,}"
        table.append(
            f"{prefix} | ours ({r['method']}) | - | - | {fmt_s(t['ours'])} "
            f"| {fmt_e(r['target'])} | target | 1.0x |"
        )
        names = {
            "linear_cg": "curvlinops CG (linear_cg)",
            "scipy_cg": "scipy CG on curvlinops",
            "our_cg": "hessinv CG on our products",
        }
        for key, name in names.items():
            s = r["search"][key]
            table.append(
                f"{prefix} | {name} | {s['tol']:.0e} | {s['products']} "
                f"| {fmt_s(t[key])} | {fmt_e(s['residual'])} "
                f"| {'yes' if s['reached'] else 'no (best)'} | {t[key] / t['ours']:.1f}x |"
            )
        d = r.get("default")
        if d:
            table.append(
                f"{prefix} | curvlinops CG, linear_cg defaults (eps 1e-10, stop_updating_after "
                f"1e-10), max_iter {d['max_iter']} | {r['target']:.0e} | {d['products']} "
                f"| {fmt_s(d['seconds'])} (once) | {fmt_e(d['residual'])} "
                f"| {'yes' if d['residual'] <= r['target'] else 'no'} "
                f"| {d['seconds'] / t['ours']:.1f}x |"
            )
        verdicts.append(
            f"({depth}, {width}, {batch}, {classes}) "
            f"{t['linear_cg'] / t['ours']:.1f}x "
            f"({'met' if t['linear_cg'] >= 3 * t['ours'] else 'NOT met'})"
        )
        notes.append(
            f"({depth}, {width}, {batch}, {classes}): G + lam I has condition number "
            f"{r['condition']:.3g}, and {r['above_lam']} of its {r['n']:,} eigenvalues "
            f"exceed 2 lam, the others lie in [lam, 2 lam] (G has rank <= B r = "
            f"{r['rows']}): a spectrum CG resolves in few products; ours backward error "
            f"{fmt_e(r['backward_error'])} after {r['refinement_steps']} refinement "
            f"step(s); curvlinops' gradient and product agree with ours to "
            f"{fmt_e(r['gradient_difference'])} and {fmt_e(r['product_difference'])}; "
            "tolerances tried by curvlinops CG (tol: residual): "
            + ", ".join(f"{a:.0e}: {b:.1e}" for a, b in r["search"]["linear_cg"]["tries"])
        )
    verdict = (
        "\nTarget (the exact solve at least 3x faster than curvlinops' CG at equal "
        "accuracy, end to end): " + "; ".join(verdicts) + "."
    )
    return "\n".join(lines + table + [verdict, ""] + ["- " + note for note in notes])


def rhs_section(args) -> str:
    depth, width, batch, classes = RHS_CASE
    k = RHS_COLUMNS
    head = (
        f"## Many right-hand sides: {k} columns in one pass, depth {depth}, width {width}, "
        f"batch {batch}, {classes} classes, lam = {LAM:g}, {args.threads} thread(s)\n"
    )
    progress("rhs ...")
    spec = dict(
        case=RHS_CASE,
        columns=k,
        threads=args.threads,
        repeats=args.rhs_repeats,
        max_iter=args.cg_max_iter,
    )
    r = run_child(__file__, "rhs", spec, args.timeout)
    if "error" in r:
        return head + f"\nerror: {r['error']}"
    ratio = r["block"] / r["one"]
    lines = [
        head,
        f"n = {r['n']:,}; kept factorization `F = G.factorize(lam)` ({r['method']}; "
        f"construction + factorization {fmt_s(r['setup'])} s, not in the rows below). "
        f"V: {k} Gaussian columns. Medians of {r['repeats']} interleaved rounds.\n",
        "| what | time (s) | per column (s) | vs one solve | max residual | note |",
        "|---|---:|---:|---:|---:|---|",
        f"| `F.solve(g)`, one column | {fmt_s(r['one'])} | {fmt_s(r['one'])} | 1.0x | - | |",
        f"| `F.solve(V)`, {k} columns in one pass | {fmt_s(r['block'])} | {fmt_s(r['block'] / k)} "
        f"| {ratio:.1f}x | {fmt_e(r['block_residual_max'])} | backward error "
        f"{fmt_e(r['block_backward_error'])}, {r['block_steps']} refinement step(s); median "
        f"column residual {fmt_e(r['block_residual_median'])} |",
        f"| {k} separate `F.solve` calls (from the first row) | {fmt_s(k * r['one'])} "
        f"| {fmt_s(r['one'])} | {k:.1f}x | - | computed, not run |",
        f"| one product `G @ V` ({k} columns, ours) | {fmt_s(r['product'])} "
        f"| {fmt_s(r['product'] / k)} | {r['product'] / r['one']:.1f}x | - | what the solve's "
        "residual check costs |",
    ]
    if isinstance(r.get("curvlinops"), str):
        lines.append(f"\ncurvlinops part skipped: {r['curvlinops']}.")
    else:
        c = r["cg"]
        lines += [
            f"| curvlinops batched CG on the same {k} columns (operator kept) | "
            f"{fmt_s(r['cg_time'])} | {fmt_s(r['cg_time'] / k)} | {r['cg_time'] / r['one']:.1f}x "
            f"| {fmt_e(c['residual'])} | tolerance {c['tol']:.0e} (mean column residual), "
            f"{c['products']} products per column, "
            f"{'reached' if c['reached'] else 'did NOT reach'} our max residual; operator "
            f"construction {fmt_s(r['cg_setup'])} s not included |",
            f"| one curvlinops product `(A + lam I) @ V` ({k} columns) | {fmt_s(r['cg_product'])} "
            f"| {fmt_s(r['cg_product'] / k)} | {r['cg_product'] / r['one']:.1f}x | - | |",
            f"\nIn the same rounds: `F.solve(V)` {fmt_s(r['block_again'])} s against curvlinops' "
            f"batched CG {fmt_s(r['cg_time'])} s: {r['cg_time'] / r['block_again']:.1f}x "
            "(kept factorization against kept operator).",
        ]
    flops = r["block_flops"]
    lines.append(
        f"\nArithmetic: the {k}-column solve with its residual check is two tangent and two "
        f"adjoint sweeps, about {flops / 1e9:.2f} Gflop here, so `F.solve(V)` runs at "
        f"{flops / r['block'] / 1e9:.1f} GFlop/s; the one-column solve moves "
        f"{flops / k / 1e6:.1f} Mflop in {fmt_s(r['one'])} s, bound by the per-stage "
        f"overhead ({r['one'] / (4 * depth) * 1e6:.0f} us per stage and sweep). {k} columns "
        f"within 3x of one solve would need {flops / (3 * r['one']) / 1e9:.0f} GFlop/s on "
        f"{args.threads} thread(s)."
    )
    lines.append(
        f"\nTarget ({k} right-hand sides within 3x of one solve): {ratio:.1f}x, "
        f"{'met' if ratio <= 3 else 'NOT met'}."
    )
    return "\n".join(lines)


def batch_section(args) -> str:
    cfg, _ = demo_problem(BATCH_SIZES[0])
    head = (
        f"## Batch axis: the demo's problem, exact solve against CG, depth {cfg.depth}, "
        f"width {cfg.width}, input {cfg.d_in}, {cfg.n_classes} classes, lam = {cfg.damping:g}, "
        f"{args.threads} thread(s)\n"
    )
    missing = curvlinops_available()
    lines = [
        head,
        "The problem of `python -m hessinv demo` (`hessinv.tools.demo.make_problem`: seed 0, "
        "CrossEntropyLoss, float64) at each batch size, with PyTorch's default initialisation "
        "(the demo's) and with orthogonal weights times a gain and zero biases (the same data; "
        "every stage keeps inputs of full rank); "
        "g = the gradient, (G + lam I) x = g. Every column is end to end from the model "
        '(construction included). exact: `ChainGGN` + `factorize(lam)` (method="auto", the '
        'route it picked is named; or method="riccati") + one `solve(g)`. CG on ours: '
        "`ChainGGN` + `hessinv.conjugate_gradient(G.matvec, g, lam, rtol=1e-10)`. curvlinops: "
        "`GGNLinearOperator(..., check_deterministic=False)` + `gradient_and_loss()` + "
        "`CGInverseLinearOperator(A + lam I, tolerance, eps=tiny, stop_updating_after=0)`, "
        "its tolerance lowered 10x at a time from 1e-10 (untimed tries) until the true "
        "relative residual is at most 1e-10. Products: matrix-vector products (columns). "
        f"Medians of {args.batch_repeats} interleaved rounds in one child process per batch "
        "size. exact / CG < 1: the exact solve is faster.\n",
    ]
    for init in args.batch_init:
        lines += batch_tables(args, init, missing)
    return "\n".join(lines)


def batch_tables(args, init: str, missing) -> list[str]:
    """The timing and accuracy tables of the batch part for one initialisation."""
    title = (
        "PyTorch's default initialisation (the demo's)"
        if init == "default"
        else f"orthogonal weights, gain {args.batch_gain:g}, zero biases"
    )
    lines = [
        f"\n### {title}\n",
        "| batch | n | B r | auto picks | exact, auto (s) | exact, riccati (s) | riccati / auto "
        "| CG on ours (s) | products | curvlinops CG (s) | products | auto / CG on ours "
        "| riccati / CG on ours | auto / curvlinops CG |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    accuracy = [
        "\nResiduals: ||(G + lam I) x - g|| / ||g|| with our exact product (maximum over "
        "rounds). The spectrum of G + lam I: its condition number and how many of its "
        "eigenvalues exceed 2 lam (G has rank <= B r; the others equal lam).\n",
        "| batch | exact, auto | backward error (refinement steps) | exact, riccati "
        "| CG on ours | curvlinops CG (tolerance) | condition number | eigenvalues > 2 lam |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cg_products, curvlinops_products, above = set(), set(), set()
    for batch in BATCH_SIZES:
        progress(f"batch ({init}): {batch} ...")
        spec = dict(
            batch=batch,
            threads=args.threads,
            repeats=args.batch_repeats,
            max_iter=args.cg_max_iter,
            init=init,
            gain=args.batch_gain,
        )
        r = run_child(__file__, "batch", spec, args.timeout)
        if "error" in r:
            lines.append(f"| {batch} | error: {r['error']} |")
            continue
        auto, ric, ours = r["auto"], r["riccati"], r["our_cg"]
        cl = r.get("curvlinops")
        if isinstance(cl, dict):
            cl_time, cl_products = fmt_s(cl["seconds"]), str(cl["products"])
            cl_ratio = f"{auto['seconds'] / cl['seconds']:.2f}"
            reached = "" if cl["residual"] <= r["target"] else ", NOT reached"
            cl_res = f"{fmt_e(cl['residual'])} ({cl['tol']:.0e}{reached})"
        else:
            cl_time = cl_products = cl_ratio = "-"
            cl_res = "-"
        converged = "" if ours["converged"] else " (not converged)"
        cg_products.add(ours["products"])
        above.add(r["above_2lam"])
        if isinstance(cl, dict):
            curvlinops_products.add(cl["products"])
        lines.append(
            f"| {batch} | {r['n']:,} | {r['rows']} | {auto['method']} | {fmt_s(auto['seconds'])} "
            f"| {fmt_s(ric['seconds'])} | {ric['seconds'] / auto['seconds']:.1f}x "
            f"| {fmt_s(ours['seconds'])} | {ours['products']}{converged} | {cl_time} "
            f"| {cl_products} | {auto['seconds'] / ours['seconds']:.2f} "
            f"| {ric['seconds'] / ours['seconds']:.2f} | {cl_ratio} |"
        )
        accuracy.append(
            f"| {batch} | {fmt_e(auto['residual'])} | {fmt_e(auto['backward_error'])} "
            f"({auto['refinement_steps']}) | {fmt_e(ric['residual'])} "
            f"| {fmt_e(ours['residual'])} | {cl_res} | {r['condition']:.3g} "
            f"| {r['above_2lam']} of {r['n']:,} |"
        )
    notes = []
    if len(cg_products) == 1 and len(above) == 1:
        notes.append(
            f"CG on ours needs {min(cg_products)} products at every batch size: G + lam I has "
            f"{min(above)} eigenvalues above 2 lam here, whatever the batch (the spectrum "
            "columns above), so the Krylov space it needs does not grow with the batch."
        )
    elif cg_products:
        notes.append(
            f"CG on ours needs {min(cg_products)} to {max(cg_products)} products: G + lam I has "
            f"{min(above)} to {max(above)} eigenvalues above 2 lam over these batch sizes (the "
            "spectrum columns above), and CG needs more products as that number grows."
        )
    if curvlinops_products and max(curvlinops_products) <= 12:
        notes.append(
            f"curvlinops' CG takes {'-'.join(str(v) for v in sorted(curvlinops_products))} "
            "products: `linear_cg` tests its stopping criterion only from iteration "
            "min(10, max_iter - 1) on, so it cannot stop earlier whatever the tolerance."
        )
    elif curvlinops_products:
        notes.append(
            f"curvlinops' CG takes {min(curvlinops_products)} to {max(curvlinops_products)} "
            "products, about as many as CG on ours: the same Krylov method, each product "
            "dearer."
        )
    if missing:
        notes.append(f"curvlinops columns skipped: {missing}.")
    return lines + accuracy + [""] + ["- " + note for note in notes]


# ----------------------------------------------------------------------------- output


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(args) -> str:
    return (
        f"# bench_ggn: torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} torch thread(s)\n"
    )


def measured(section) -> str:
    """Run one part (``section()`` returns its markdown) and stamp it."""
    start, when, t0 = load_average(), time.strftime("%Y-%m-%d %H:%M"), now()
    text = section()
    return (
        f"{text}\n\nMeasured {when} at commit {commit()} in {now() - t0:.0f} s; load "
        f"average {start} at the start, {load_average()} at the end."
    )


HEADINGS = {
    "routes": "## Routes",
    "cg": "## Exact solve against",
    "rhs": "## Many right-hand",
    "batch": "## Batch axis",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", choices=list(HEADINGS), default=list(HEADINGS))
    p.add_argument("--quick", action="store_true", help="drop the 1024-wide configurations")
    p.add_argument(
        "--widths",
        nargs="+",
        type=int,
        default=None,
        help=f"widths of the routes part (default {' '.join(map(str, WIDTHS))})",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="rounds of a cheap configuration")
    p.add_argument(
        "--single-above",
        type=float,
        default=5.0,
        help="a configuration with a route estimated above this (s) runs one round",
    )
    p.add_argument(
        "--cell-budget",
        type=float,
        default=30.0,
        help="skip a route whose calibrated cost estimate exceeds this (s)",
    )
    p.add_argument("--cg-repeats", type=int, default=5)
    p.add_argument("--cg-max-iter", type=int, default=2000)
    p.add_argument(
        "--cg-default-max-iter",
        type=int,
        default=2000,
        help="max_iter of the run with linear_cg's default eps (0: skip it)",
    )
    p.add_argument("--rhs-repeats", type=int, default=5)
    p.add_argument("--batch-repeats", type=int, default=5, help="rounds of the batch part")
    p.add_argument(
        "--batch-init",
        nargs="+",
        choices=BATCH_INITS,
        default=list(BATCH_INITS),
        help="initialisations of the batch part, one table each",
    )
    p.add_argument("--batch-gain", type=float, default=1.1, help="gain of the orthogonal init")
    p.add_argument("--timeout", type=float, default=900.0, help="per child process (s)")
    p.add_argument(
        "--out",
        nargs="?",
        const=str(DEFAULT_OUT),
        help=f"also write the markdown (default path {DEFAULT_OUT.relative_to(ROOT)})",
    )
    args = p.parse_args(argv)
    if args.widths is None:
        args.widths = [w for w in WIDTHS if not (args.quick and w >= 1024)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        print(json.dumps(worker(kind, json.loads(spec))))
        return 0
    torch.set_num_threads(args.threads)
    sections: dict[str, str] = {}
    if "routes" in args.parts:
        sections["routes"] = measured(lambda: routes_section(run_routes(args), args))
    if "cg" in args.parts:
        sections["cg"] = measured(lambda: cg_section(args))
    if "rhs" in args.parts:
        sections["rhs"] = measured(lambda: rhs_section(args))
    if "batch" in args.parts:
        sections["batch"] = measured(lambda: batch_section(args))
    report = splice(header(args), sections, HEADINGS)
    print(report)
    if args.out:
        out = Path(args.out)
        old = out.read_text() if out.exists() and set(args.parts) != set(HEADINGS) else ""
        out.write_text(splice(old or header(args), sections, HEADINGS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
