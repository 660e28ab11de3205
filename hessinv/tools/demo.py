"""``python -m hessinv demo``: when to use the exact solve, and when conjugate gradients.

The demo builds a deep, narrow tanh MLP with a cross-entropy loss on random data and
solves two damped Newton systems, right-hand side ``g`` = the gradient, timing every
method and checking every answer:

1. ``(H + eps I) x = g`` with the exact Hessian ``H``, indefinite at such a point: the
   exact (Riccati) solve, optionally the paper's block-tridiagonal solve, conjugate
   gradients (which stop at the first direction of negative curvature), scipy's MINRES
   (which tolerates it, at the price of many products) and, while ``n <= dense_limit``,
   dense ``torch.func.hessian`` + ``torch.linalg.solve`` as the independent reference.
2. ``(G + eps I) x = g`` with the generalized Gauss-Newton matrix ``G`` (positive
   semi-definite): the exact solve against conjugate gradients (ours and scipy's) on
   the same exact products.

It then prints what only a factorization gives (the exact ``log det`` and inertia),
the backward error of the exact solves, and a "when to use what" verdict computed from
the measured rows. It needs only the core dependencies: torch, numpy, scipy, tqdm.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg, minres
from torch import nn
from tqdm.auto import tqdm

from hessinv.curvature.hessian import ChainGGN, ChainHessian
from hessinv.progress import progress_bar
from hessinv.tools.problems import mlp
from hessinv.tools.reference import conjugate_gradient, dense_hessian

__all__ = [
    "DemoConfig",
    "Problem",
    "Row",
    "Facts",
    "Part",
    "DemoReport",
    "tall_skinny_mlp",
    "make_problem",
    "run_demo",
    "verdict",
    "format_report",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}

#: the relative residual the iterative methods stop at, when ``DemoConfig.rtol`` is None
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4}

#: what the verdict recommends, by the kind of the fastest row; ``{M}`` is the matrix
ADVICE = {
    "exact": "the exact factorization: F = {M}.factorize(eps); x = F.solve(g)",
    "iterative": "conjugate gradients on the exact products: "
    "hessinv.conjugate_gradient({M}.matvec, g, eps)",
    "dense": "a dense solve (the problem is small enough)",
}


# ----------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class DemoConfig:
    """The problem and the methods' settings; the CLI's defaults come from here."""

    depth: int = 16
    width: int = 16
    batch: int = 16
    d_in: int = 8
    n_classes: int = 4
    damping: float = 1e-2
    rtol: float | None = None  # None: DEFAULT_RTOL[dtype]
    maxiter: int = 2000
    device: str = "cpu"
    dtype: str = "float64"
    dense_limit: int = 6000
    tridiagonal: bool = False
    seed: int = 0
    progress: bool | None = None

    @property
    def target(self) -> float:
        """The relative residual the iterative methods stop at and every row is judged by."""
        return DEFAULT_RTOL[self.dtype] if self.rtol is None else self.rtol


@dataclass(frozen=True)
class Row:
    """One measured method. ``products``: matrix-vector products (iterative methods only)."""

    method: str
    kind: str  # "exact", "iterative" or "dense"
    seconds: float
    status: str
    products: int | None = None
    rel_error: float = math.nan
    rel_residual: float = math.nan
    is_reference: bool = False


@dataclass(frozen=True)
class Facts:
    """What the exact factorization says about ``A = M + eps I`` beyond the solution."""

    sign: int
    logabsdet: float
    inertia: tuple[int, int, int]
    backward_error: float
    refinement_steps: int
    method: str


@dataclass
class Part:
    """One linear system ``A x = g`` and the rows that solved it."""

    title: str
    matrix: str  # "H" or "G"
    operator: str  # "H + 0.01 I"
    derivatives_s: float
    reference: str
    rows: list[Row]
    facts: Facts


@dataclass
class DemoReport:
    """Everything the demo measured: the indefinite part, then the positive definite one."""

    config: DemoConfig
    num_params: int
    threads: int
    parts: list[Part]


@dataclass(frozen=True)
class Problem:
    """The network, its loss and the batch the curvature is taken at."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor


# ----------------------------------------------------------------------------- problem
def tall_skinny_mlp(depth, width, d_in, n_classes, dtype, device, seed=0):
    """``depth`` Linear layers with tanh between them, PyTorch's default initialisation
    (:func:`hessinv.tools.problems.mlp`)."""
    return mlp(
        depth, width, d_in, n_classes, "tanh", init="default", dtype=dtype, device=device, seed=seed
    )


def make_problem(cfg: DemoConfig) -> Problem:
    """The model, a cross-entropy loss and a random batch, all from ``cfg.seed``."""
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
    model = tall_skinny_mlp(cfg.depth, cfg.width, cfg.d_in, cfg.n_classes, dtype, device, cfg.seed)
    inputs = torch.randn(cfg.batch, cfg.d_in, dtype=dtype, device=device)
    targets = torch.randint(0, cfg.n_classes, (cfg.batch,), device=device)
    return Problem(model, nn.CrossEntropyLoss(), inputs, targets)


# ----------------------------------------------------------------------------- measuring
def _timed(fn, device: torch.device):
    """``(fn(), seconds)``, synchronising a CUDA device around the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - reference) / torch.linalg.vector_norm(reference))


def _relative_residual(curvature, damping: float, x: torch.Tensor, g: torch.Tensor) -> float:
    """``||(M + eps I) x - g|| / ||g||``, with the exact product of ``curvature``."""
    residual = curvature.matvec(x) + damping * x - g
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(g))


def _scored(rows_and_solutions, curvature, damping, g, reference):
    """Fill every row's error against ``reference`` and its residual with exact products."""
    return [
        replace(
            row,
            rel_error=_relative_error(x, reference),
            is_reference=x is reference,
            rel_residual=_relative_residual(curvature, damping, x, g),
        )
        for row, x in rows_and_solutions
    ]


# ----------------------------------------------------------------------------- methods
def _derivatives(kind, problem: Problem, cfg: DemoConfig):
    """``(kind(...), seconds)``: the constructor of ``ChainHessian`` or ``ChainGGN``, timed."""
    return _timed(
        lambda: kind(
            problem.model, problem.loss_fn, problem.inputs, problem.targets, progress=cfg.progress
        ),
        torch.device(cfg.device),
    )


def _exact(curvature, g, damping, derivatives_s, progress):
    """Factorize ``M + eps I`` and solve: ``(row, x, factorization)``."""
    device = curvature.device
    F, t_factor = _timed(lambda: curvature.factorize(damping, progress=progress), device)
    x, t_solve = _timed(lambda: F.solve(g), device)
    status = f"factorize {t_factor:.3f} s + solve {t_solve:.3f} s"
    row = Row(f"exact ({F.method}, ours)", "exact", derivatives_s + t_factor + t_solve, status)
    return row, x, F


def _tridiagonal(H, g, damping, derivatives_s):
    """The paper's augmented block-tridiagonal solve."""
    x, seconds = _timed(lambda: H.solve(g, damping=damping, method="tridiagonal"), H.device)
    return Row("exact (tridiagonal, paper)", "exact", derivatives_s + seconds, "pivoted band LU"), x


def _our_cg(curvature, g, damping, rtol, maxiter, derivatives_s):
    """``hessinv.conjugate_gradient`` on the exact products."""
    result, seconds = _timed(
        lambda: conjugate_gradient(curvature.matvec, g, damping, rtol=rtol, maxiter=maxiter),
        curvature.device,
    )
    if result.converged:
        status = "converged"
    elif result.iterations < maxiter:
        status = "stopped: negative curvature"
    else:
        status = f"stopped: --maxiter {maxiter}"
    row = Row(
        "CG (hessinv) on our products",
        "iterative",
        derivatives_s + seconds,
        status,
        products=result.iterations,
    )
    return row, result.x


def _damped_operator(curvature, damping) -> LinearOperator:
    """``M + eps I`` as a scipy ``LinearOperator`` on the exact products."""
    op = curvature.to_scipy()
    return LinearOperator(
        op.shape,
        matvec=lambda v: op.matvec(v) + damping * v,
        rmatvec=lambda v: op.matvec(v) + damping * v,
        dtype=op.dtype,
    )


def _scipy_status(info: int) -> str:
    if info == 0:
        return "converged (by scipy's own test)"
    return f"stopped: --maxiter {info}" if info > 0 else f"breakdown (info {info})"


def _scipy_solver(name, solver, curvature, g, damping, rtol, maxiter, derivatives_s):
    """scipy's ``cg`` or ``minres`` on ``M + eps I``, counting its iterations."""
    count = [0]

    def step(_):
        count[0] += 1

    A, b = _damped_operator(curvature, damping), g.detach().cpu().numpy()
    (x, info), seconds = _timed(
        lambda: solver(A, b, rtol=rtol, maxiter=maxiter, callback=step), curvature.device
    )
    x = torch.as_tensor(np.asarray(x), dtype=g.dtype, device=g.device)
    row = Row(
        f"{name} (scipy) on our products",
        "iterative",
        derivatives_s + seconds,
        _scipy_status(info),
        products=count[0],
    )
    return row, x


def _dense(problem: Problem, g, damping):
    """``torch.func.hessian`` of the loss, then ``torch.linalg.solve``: the independent check."""

    def solve():
        D = dense_hessian(problem.model, problem.loss_fn, problem.inputs, problem.targets)
        eye = torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
        return torch.linalg.solve(D + damping * eye, g)

    x, seconds = _timed(solve, g.device)
    return Row("dense torch.func.hessian + solve", "dense", seconds, "forms H from scratch"), x


def _facts(F) -> Facts:
    """Exact logdet and inertia of the factorized matrix, and its last solve's accuracy."""
    sign, logabsdet = F.logdet()
    return Facts(
        int(sign),
        float(logabsdet),
        tuple(F.inertia()),
        F.backward_error,
        F.refinement_steps,
        F.method,
    )


# ----------------------------------------------------------------------------- the two parts
def _indefinite_part(problem, cfg: DemoConfig, bar) -> tuple[Part, int]:
    """``(H + eps I) x = g``: exact vs CG vs MINRES vs dense; ``(part, n)``."""
    eps, rtol, maxiter = cfg.damping, cfg.target, cfg.maxiter
    H, t_deriv = _run_step(
        bar, "Hessian derivatives", lambda: _derivatives(ChainHessian, problem, cfg)
    )
    g = H.gradient()
    exact_row, x_exact, F = _run_step(
        bar, "exact solve (H)", lambda: _exact(H, g, eps, t_deriv, cfg.progress)
    )
    solved = [(exact_row, x_exact)]
    if cfg.tridiagonal:
        solved.append(_run_step(bar, "tridiagonal solve", lambda: _tridiagonal(H, g, eps, t_deriv)))
    solved.append(_run_step(bar, "CG (H)", lambda: _our_cg(H, g, eps, rtol, maxiter, t_deriv)))
    solved.append(
        _run_step(
            bar,
            "MINRES (H)",
            lambda: _scipy_solver("MINRES", minres, H, g, eps, rtol, maxiter, t_deriv),
        )
    )
    reference, reference_name = x_exact, f"exact solve (n > --dense-limit {cfg.dense_limit})"
    if H.num_params <= cfg.dense_limit:
        dense_row, reference = _run_step(bar, "dense Hessian", lambda: _dense(problem, g, eps))
        solved.append((dense_row, reference))
        reference_name = "dense solve"
    part = Part(
        title="indefinite: the exact Hessian, damped",
        matrix="H",
        operator=f"H + {eps:g} I",
        derivatives_s=t_deriv,
        reference=reference_name,
        rows=_scored(solved, H, eps, g, reference),
        facts=_facts(F),
    )
    return part, H.num_params


def _positive_definite_part(problem, cfg: DemoConfig, bar) -> Part:
    """``(G + eps I) x = g`` with the Gauss-Newton matrix: exact vs CG (ours and scipy's)."""
    eps, rtol, maxiter = cfg.damping, cfg.target, cfg.maxiter
    G, t_deriv = _run_step(
        bar, "Gauss-Newton derivatives", lambda: _derivatives(ChainGGN, problem, cfg)
    )
    g = G.gradient()
    exact_row, x_exact, F = _run_step(
        bar, "exact solve (G)", lambda: _exact(G, g, eps, t_deriv, cfg.progress)
    )
    solved = [(exact_row, x_exact)]
    solved.append(_run_step(bar, "CG (G)", lambda: _our_cg(G, g, eps, rtol, maxiter, t_deriv)))
    solved.append(
        _run_step(
            bar, "scipy CG (G)", lambda: _scipy_solver("CG", cg, G, g, eps, rtol, maxiter, t_deriv)
        )
    )
    return Part(
        title="positive definite: the Gauss-Newton matrix (ChainGGN), damped",
        matrix="G",
        operator=f"G + {eps:g} I",
        derivatives_s=t_deriv,
        reference="exact solve (its backward error is the check)",
        rows=_scored(solved, G, eps, g, x_exact),
        facts=_facts(F),
    )


def _run_step(bar, name: str, fn):
    """``fn()``, with the progress bar naming the step while it runs."""
    bar.set_postfix_str(name)
    out = fn()
    bar.update()
    return out


def _step_count(cfg: DemoConfig, problem: Problem) -> int:
    """How many steps :func:`_indefinite_part` and :func:`_positive_definite_part` take."""
    n = sum(p.numel() for p in problem.model.parameters())
    return 8 + cfg.tridiagonal + (n <= cfg.dense_limit)


def _warm_up(cfg: DemoConfig) -> None:
    """Run every code path once on a tiny problem, so one-time start-up costs are not timed."""
    tiny = replace(
        cfg,
        depth=2,
        width=2,
        batch=2,
        d_in=2,
        n_classes=2,
        maxiter=3,
        dense_limit=100,
        progress=False,
    )
    problem = make_problem(tiny)
    bar = tqdm(total=_step_count(tiny, problem), disable=True)
    _indefinite_part(problem, tiny, bar)
    _positive_definite_part(problem, tiny, bar)


def run_demo(cfg: DemoConfig = DemoConfig()) -> DemoReport:
    """Warm up, then measure both parts on the problem ``cfg`` describes."""
    _warm_up(cfg)
    problem = make_problem(cfg)
    steps = _step_count(cfg, problem)
    with progress_bar(steps, "demo", cfg.progress) as bar:
        indefinite, n = _indefinite_part(problem, cfg, bar)
        positive_definite = _positive_definite_part(problem, cfg, bar)
    return DemoReport(cfg, n, torch.get_num_threads(), [indefinite, positive_definite])


# ----------------------------------------------------------------------------- verdict
def _reached(part: Part, target: float) -> list[Row]:
    """The rows whose relative residual is at most ``target``, fastest first."""
    return sorted((r for r in part.rows if r.rel_residual <= target), key=lambda r: r.seconds)


def _products(row: Row) -> str:
    if row.products is None:
        return ""
    return f", {row.products} product{'' if row.products == 1 else 's'}"


def verdict(part: Part, target: float) -> list[str]:
    """Which row was fastest to the target residual, how the others compare, the advice."""
    reached = _reached(part, target)
    if not reached:
        return [f"{part.operator}: no method reached a relative residual <= {target:.0e}"]
    best = reached[0]
    lines = [
        f"{part.operator}: fastest to a relative residual <= {target:.0e}: "
        f"{best.method} ({best.seconds:.3f} s{_products(best)})"
    ]
    for row in reached[1:]:
        lines.append(
            f"    {row.method}: {row.seconds / best.seconds:.1f}x slower "
            f"({row.seconds:.3f} s{_products(row)})"
        )
    for row in part.rows:
        if row not in reached:
            lines.append(
                f"    {row.method}: did not reach it in {row.seconds:.3f} s "
                f"(residual {row.rel_residual:.1e}, {row.status}{_products(row)})"
            )
    lines.append(f"    -> use {ADVICE[best.kind].format(M=part.matrix)}")
    return lines


# ----------------------------------------------------------------------------- output
def _cell(value: float, fmt: str = ".1e") -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    lines = [
        "| method | time (s) | products | rel. error | rel. residual | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        error = "reference" if r.is_reference else _cell(r.rel_error)
        products = "-" if r.products is None else str(r.products)
        lines.append(
            f"| {r.method} | {r.seconds:.3f} | {products} | {error} | "
            f"{_cell(r.rel_residual)} | {r.status} |"
        )
    return "\n".join(lines)


def format_facts(operator: str, facts: Facts) -> str:
    pos, neg, zero = facts.inertia
    return (
        f"exact, from the factorization (no iterative method gives these):\n"
        f"  log|det({operator})| = {facts.logabsdet:.6g}, sign {facts.sign:+d}\n"
        f"  inertia: {pos} positive, {neg} negative, {zero} zero eigenvalues\n"
        f"  our solve: backward error {facts.backward_error:.1e} after "
        f"{facts.refinement_steps} refinement step(s) ({facts.method})"
    )


def format_part(number: int, part: Part) -> str:
    return (
        f"{number}. {part.title}: ({part.operator}) x = g\n"
        f"derivatives (constructor): {part.derivatives_s:.3f} s, included in every row that "
        f"uses them; errors relative to the {part.reference}\n\n"
        f"{format_table(part.rows)}\n\n{format_facts(part.operator, part.facts)}"
    )


def format_header(report: DemoReport) -> str:
    c = report.config
    return (
        f"tanh MLP: depth {c.depth}, width {c.width}, input {c.d_in}, {c.n_classes} classes, "
        f"batch {c.batch}: {report.num_params} parameters, {c.dtype} on {c.device}, "
        f"{report.threads} thread(s)\n"
        f"g = the gradient; iterative methods stop at relative residual {c.target:.0e} or "
        f"{c.maxiter} products; times are one run each, after an untimed warm-up"
    )


def format_report(report: DemoReport) -> str:
    target = report.config.target
    sections = [format_header(report)]
    sections += [format_part(i, part) for i, part in enumerate(report.parts, 1)]
    advice = [line for part in report.parts for line in verdict(part, target)]
    advice.append("log det and inertia (above) come only from a factorization.")
    sections.append("When to use what (from the rows above):\n" + "\n".join(advice))
    return "\n\n".join(sections)
