"""E1: cost against depth.

Claim: for a chain of L stages of fixed width and batch, a Hessian-vector product and
an exact solve of ``(H + eps I) x = g`` (Riccati or the paper's block-tridiagonal
system) take time and memory linear in L, while forming H densely and solving takes
time cubic and memory quadratic in L. CG is linear per iteration but needs a number of
iterations that depends on the conditioning.

Every method solves the same positive definite system: ``eps = 1.25 * (-lambda_min(H))``
found by Lanczos certified by our exact inertia (so CG, which needs positive definiteness,
is applicable); the right-hand side is the gradient.
"""

from __future__ import annotations

import time

import torch

import hessinv

from .common import (
    DTYPE,
    Budget,
    Config,
    fit_loglog_slope,
    loglog_figure,
    make_problem,
    median_time,
    memory_method,
    new_figure,
    peak_memory,
    positive_definite_shift,
    progress,
    save_figure,
    write_table,
)

METHODS = ("derivatives", "matvec", "riccati", "tridiagonal", "cg", "dense")


def settings(cfg: Config) -> dict:
    if cfg.quick:
        return dict(
            depths=[2, 4, 8, 16, 32, 64, 128],
            width=8,
            batch=8,
            n_classes=4,
            dense_max_n=5000,
            max_s=3.0,
            mem_cap=1.5e9,
            cg_maxiter=2000,
            repeats=3,
        )
    return dict(
        depths=[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
        width=16,
        batch=16,
        n_classes=10,
        dense_max_n=6000,
        max_s=60.0,
        mem_cap=8e9,
        cg_maxiter=20000,
        repeats=5,
    )


def _rel(x, ref) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def measure_point(prob, st: dict, budget: Budget, device, *, memory: bool = True, cg: bool = True):
    """Times (s), peak memory (bytes), CG iterations and errors for one problem.

    Every method is guarded by ``budget`` (time) and a memory prediction; methods that
    are skipped or fail give ``None``.
    """
    row: dict = {}
    H = prob.hessian()
    n = H.num_params
    p = max(H.stage_sizes)
    a = prob.X.shape[0] * max(m.out_features for m in prob.model if hasattr(m, "out_features"))
    L = len(H.stage_sizes)
    row["n"] = n
    H.stage_derivatives()
    eps, lam_min = positive_definite_shift(H)
    row["eps"] = eps
    g = H.gradient()
    v = torch.randn(n, dtype=g.dtype, generator=torch.Generator().manual_seed(1)).to(g.device)
    reps, max_s = st["repeats"], st["max_s"]

    def fresh_derivatives():
        prob.hessian().stage_derivatives()

    def dense_solve():
        D = hessinv.dense_hessian(prob.model, prob.loss_fn, prob.X, prob.y)
        D.diagonal().add_(eps)
        return torch.linalg.solve(D, g)

    def cg_solve(maxiter):
        return hessinv.conjugate_gradient(H.matvec, g, damping=eps, rtol=1e-8, maxiter=maxiter)

    if 3 * 8 * L * (p + 2 * a) ** 2 > st["mem_cap"]:
        budget.skip("tridiagonal", "predicted memory above the cap")
    if n > st["dense_max_n"] or 4 * 8 * n * n > st["mem_cap"]:
        budget.skip("dense", f"n above {st['dense_max_n']}")

    ops = {
        "derivatives": fresh_derivatives,
        "matvec": lambda: H.matvec(v),
        "riccati": lambda: H.solve(g, damping=eps, method="riccati"),
        "tridiagonal": lambda: H.solve(g, damping=eps, method="tridiagonal"),
        "dense": dense_solve,
    }
    sols = {}
    for name, fn in ops.items():
        row[f"t_{name}"] = None
        if not budget.allowed(name):
            continue
        try:
            out = fn()  # warm-up, and the solution for the error check
        except Exception as err:  # e.g. the tridiagonal package not importable yet
            budget.skip(name, f"failed: {type(err).__name__}: {err}")
            continue
        if name in ("riccati", "tridiagonal", "dense"):
            sols[name] = out
        t = median_time(fn, repeats=reps, warmup=0, device=device, budget_s=max_s)
        row[f"t_{name}"] = t
        budget.record(name, t)
    row["t_cg"], row["cg_iters"], row["cg_converged"] = None, None, None
    if cg and budget.allowed("cg"):
        t0 = time.perf_counter()
        res = cg_solve(st["cg_maxiter"])
        t = time.perf_counter() - t0
        row["t_cg"], row["cg_iters"], row["cg_converged"] = t, res.iterations, res.converged
        sols["cg"] = res.x
        budget.record("cg", t)
    ref_name = "dense" if "dense" in sols else "riccati"
    for name in ("riccati", "tridiagonal", "cg"):
        if name in sols and ref_name in sols and name != ref_name:
            row[f"err_{name}"] = _rel(sols[name], sols[ref_name])
    if memory:
        mem_ops = {
            "derivatives": fresh_derivatives,
            "matvec": lambda: prob.hessian().matvec(v),
            "riccati": lambda: prob.hessian().solve(g, damping=eps, method="riccati"),
            "tridiagonal": lambda: prob.hessian().solve(g, damping=eps, method="tridiagonal"),
            "cg": lambda: hessinv.conjugate_gradient(
                prob.hessian().matvec, g, damping=eps, rtol=1e-8, maxiter=10
            ),
            "dense": dense_solve,
        }
        for name, fn in mem_ops.items():
            measured = row.get(f"t_{name}") is not None
            row[f"mem_{name}"] = peak_memory(fn, device) if measured else None
    return row


def run(cfg: Config, **overrides) -> str:
    """Run E1; ``overrides`` replace entries of :func:`settings` (e.g. ``depths=[2, 4]``)."""
    st = {**settings(cfg), **overrides}
    outdir = cfg.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    budget = Budget(st["max_s"])
    # warm-up in this process so that lazy initialisation is not timed or counted
    warm = make_problem(2, 4, 2, device=cfg.device, seed=cfg.seed)
    measure_point(warm, {**st, "repeats": 1}, Budget(1e9), cfg.device, memory=False)

    rows = []
    for L in progress(st["depths"], "E1 depth"):
        prob = make_problem(
            L,
            st["width"],
            st["batch"],
            n_classes=st["n_classes"],
            dtype=DTYPE,
            device=cfg.device,
            seed=cfg.seed,
        )
        row = {"L": L}
        row.update(measure_point(prob, st, budget, cfg.device))
        rows.append(row)

    depths = [r["L"] for r in rows]
    fig, (ax_t, ax_m) = new_figure(2)
    loglog_figure(
        ax_t,
        depths,
        {m: [r.get(f"t_{m}") for r in rows] for m in METHODS},
        xlabel="depth L (stages)",
        ylabel="seconds (median)",
        title=f"time, width {st['width']}, batch {st['batch']}, float64",
    )
    loglog_figure(
        ax_m,
        depths,
        {m: [r.get(f"mem_{m}") for r in rows] for m in METHODS},
        xlabel="depth L (stages)",
        ylabel="peak extra memory (bytes)",
        title="memory ("
        + ("forked-child peak RSS" if cfg.device.type == "cpu" else "CUDA peak")
        + ")",
    )
    save_figure(fig, outdir / "e1_depth.png")

    table_rows = []
    for r in rows:
        t = {k: r.get(k) for k in ("L", "n", "eps")}
        for m in METHODS:
            t[f"{m} s"] = r.get(f"t_{m}")
        t["cg iters"] = r.get("cg_iters")
        for m in ("derivatives", "riccati", "tridiagonal", "dense"):
            mem = r.get(f"mem_{m}")
            t[f"{m} MB"] = None if mem is None else mem / 1e6
        t["err riccati"] = r.get("err_riccati")
        t["err tridiag"] = r.get("err_tridiagonal")
        t["err cg"] = r.get("err_cg")
        table_rows.append(t)
    md = write_table(
        table_rows,
        outdir,
        "e1_depth",
        f"E1: cost against depth (width {st['width']}, batch {st['batch']}, float64, {cfg.device})",
    )
    write_table(rows, outdir, "e1_depth_raw", "E1 raw measurements")
    slopes = []
    for m in METHODS:
        ts = fit_loglog_slope(depths, [r.get(f"t_{m}") for r in rows], tail=4)
        ms = fit_loglog_slope(depths, [r.get(f"mem_{m}") for r in rows], tail=4)
        slopes.append(
            {"method": m, "time slope": ts, "memory slope": ms, "note": budget.notes().get(m, "")}
        )
    md += "\n" + write_table(
        slopes, outdir, "e1_slopes", "E1: fitted log-log slopes over the 4 largest measured depths"
    )
    md += (
        f"\nerrors are relative to the dense solve where it ran, else to the Riccati solve; "
        f"memory: {memory_method(cfg.device)}.\n"
    )
    return md
