"""Wide layers: time and peak memory of hessinv's exact solve as the width grows.

Three measurements, each in a fresh child process (so that its peak RSS is its own),
printed as markdown tables:

* ``width`` -- tanh MLP depth 8, batch 16, input 8, 4 classes, cross-entropy, float64,
  ``eps = 1e-2``, widths 32..512: the derivative sweep (the ``ChainHessian``
  constructor), ``factorize``, the one-off 12-step Lanczos norm estimate that the first
  solve triggers, ``solve``, their total, the peak RSS of the child, the library's own
  ``memory_estimate()["riccati"]``, the a-posteriori backward error and the method used.
  A width whose estimate exceeds the free RAM is skipped. The exponent of total time in
  width is a log-log least-squares fit over the widths run.
* ``hvp`` -- one Hessian-vector product, ours (derivatives computed once) against
  forward-over-reverse ``torch.func.jvp(torch.func.grad(loss))`` on the flat parameter
  vector, 1 thread, median of many products; ours is also given with its construction.
* ``reference`` -- the reference shape (depth 16, width 32, batch 8, bias-free tanh MLP):
  the Riccati factorization against the paper's block-tridiagonal one in the same run.

Times are medians of ``--repeats`` (1 from width ``--single-from`` on); they include no
library start-up (every child first runs a tiny problem through the same code).

    python benchmarks/bench_width.py                     # all three, print the tables
    python benchmarks/bench_width.py --out               # ... and write results/bench_width.md
    python benchmarks/bench_width.py --parts width --widths 32 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from _shared import (  # noqa: E402
    free_ram_bytes,
    load_average,
    peak_rss_bytes,
    run_child,
    splice,
)

import hessinv  # noqa: E402
from hessinv.tools import problems  # noqa: E402

#: the children import hessinv from this checkout
CHILD_ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_width.md"
EPS = 1e-2
D_IN, CLASSES = 8, 4
SWEEP_DEPTH, SWEEP_BATCH = 8, 16
WIDTHS = (32, 64, 128, 256, 512)
HVP_SHAPES = ((16, 32, 32), (8, 256, 16))  # (depth, width, batch)
REFERENCE_SHAPE = (16, 32, 8)  # bias-free
TARGET_SECONDS, TARGET_BYTES, TARGET_EXPONENT, TARGET_WIDTH = 60.0, 6e9, 3.2, 256


# ----------------------------------------------------------------------------- the problem


def tanh_mlp(depth, width, *, bias=True, dtype=torch.float64, device="cpu", seed=0):
    """``depth`` Linear layers (input ``D_IN``, output ``CLASSES``) with tanh between them,
    PyTorch's initialisation (the shared builder)."""
    return problems.mlp(
        depth,
        width,
        D_IN,
        CLASSES,
        "tanh",
        bias=bias,
        init="default",
        dtype=dtype,
        device=device,
        seed=seed,
    )


def problem(depth, width, batch, *, bias=True, dtype=torch.float64, device="cpu", seed=0):
    """``(model, loss_fn, X, y)``: a tanh MLP, cross-entropy and a seeded random batch."""
    model = tanh_mlp(depth, width, bias=bias, dtype=dtype, device=device, seed=seed)
    X, y, loss_fn = problems.random_batch(
        batch, D_IN, CLASSES, "ce", dtype=dtype, device=device, data_seed=seed + 1
    )
    return model, loss_fn, X, y


def chain_hessian(prob):
    """Our operator; the constructor runs the whole derivative sweep."""
    return hessinv.ChainHessian(*prob, progress=False)


def torch_func_hvp(model, loss_fn, X, y):
    """``v -> H v`` by forward-over-reverse ``jvp(grad(loss))`` on the flat parameter vector.

    The flat order is ``named_parameters()``, the order of ``ChainHessian``.
    """
    from torch.func import functional_call, grad, jvp

    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss_of(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return loss_fn(functional_call(model, params, (X,)), y)

    gradient = grad(loss_of)
    return lambda v: jvp(gradient, (theta,), (v,))[1]


# ----------------------------------------------------------------------------- timing (child)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """``(seconds, result)`` of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median_time(fn, repeats, device="cpu"):
    """``(median seconds, last result)``; the previous result is freed before each call."""
    times, out = [], None
    for _ in range(repeats):
        out = None  # so that two results never coexist (peak memory is one result's)
        seconds, out = timed(fn, device)
        times.append(seconds)
    return statistics.median(times), out


def relative_residual(H, x, g):
    """``||(H + eps I) x - g|| / ||g||``, with one exact product."""
    return float(torch.linalg.vector_norm(H @ x + EPS * x - g) / torch.linalg.vector_norm(g))


def warm_up():
    """Run every timed code path once on a tiny problem: library start-up is not timed."""
    prob = problem(3, 4, 4)
    H = chain_hessian(prob)
    g = H.gradient()
    H @ g
    torch_func_hvp(*prob)(g)
    for method in ("riccati", "tridiagonal"):
        H.factorize(EPS, method=method, progress=False).solve(g)


# ----------------------------------------------------------------------------- measurements (child)


def measure_width(spec: dict) -> dict:
    """One width of the sweep: derivatives, factorization, norm estimate, solve, memory."""
    repeats = spec["repeats"]
    prob = problem(SWEEP_DEPTH, spec["width"], SWEEP_BATCH)
    out: dict = {}
    out["derivatives"], H = median_time(lambda: chain_hessian(prob), repeats)
    out["n"] = H.num_params
    out["front"] = max(d.basis_size for d in H.stage_derivatives())
    out["estimate"] = H.memory_estimate()["riccati"]
    out["free"] = free_ram_bytes()
    if out["estimate"] > out["free"]:
        out["skipped"] = "estimate exceeds free RAM"
        return out
    out["factorization"], F = median_time(
        lambda: H.factorize(EPS, method="riccati", progress=False), repeats
    )
    out["norm_estimate"], _ = timed(H.spectrum_estimate)  # cached: the first solve's one-off
    g = H.gradient()
    out["solve"], x = median_time(lambda: F.solve(g), repeats)
    out["total"] = out["derivatives"] + out["factorization"] + out["norm_estimate"] + out["solve"]
    out["peak_rss"] = peak_rss_bytes()
    out["backward_error"] = F.backward_error
    out["refinement_steps"] = F.refinement_steps
    out["method"] = F.method
    out["residual"] = relative_residual(H, x, g)
    return out


def measure_hvp(spec: dict) -> dict:
    """One Hessian-vector product: ours against ``torch.func`` ``jvp(grad)``."""
    prob = problem(spec["depth"], spec["width"], spec["batch"])
    products = spec["products"]
    out: dict = {}
    out["construction"], H = median_time(lambda: chain_hessian(prob), spec["repeats"])
    out["n"] = H.num_params
    v = torch.randn(H.num_params, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out["ours"], ours = median_time(lambda: H @ v, products)
    hvp = torch_func_hvp(*prob)
    hvp(v)  # the first call of a torch.func transform pays a one-off set-up
    out["torch_func"], theirs = median_time(lambda: hvp(v), products)
    out["agreement"] = float(
        torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs)
    )
    return out


def measure_reference(spec: dict) -> dict:
    """Riccati against the paper's tridiagonal factorization on one (bias-free) problem."""
    depth, width, batch = REFERENCE_SHAPE
    repeats = spec["repeats"]
    prob = problem(depth, width, batch, bias=False)
    out: dict = {}
    out["derivatives"], H = median_time(lambda: chain_hessian(prob), repeats)
    out["n"] = H.num_params
    out["norm_estimate"], _ = timed(H.spectrum_estimate)
    estimates = H.memory_estimate()
    g = H.gradient()
    solutions = {}
    for method in ("riccati", "tridiagonal"):
        row: dict = {"estimate": estimates[method]}
        row["factorization"], F = median_time(
            lambda m=method: H.factorize(EPS, method=m, progress=False), repeats
        )
        row["solve"], solutions[method] = median_time(lambda F=F: F.solve(g), repeats)
        row["backward_error"] = F.backward_error
        row["refinement_steps"] = F.refinement_steps
        row["method"] = F.method
        out[method] = row
        F = None  # free this factorization before the next one is built
    x_ric, x_tri = solutions["riccati"], solutions["tridiagonal"]
    out["difference"] = float(
        torch.linalg.vector_norm(x_ric - x_tri) / torch.linalg.vector_norm(x_ric)
    )
    return out


MEASUREMENTS = {"width": measure_width, "hvp": measure_hvp, "reference": measure_reference}
# the first words of each part's markdown heading (how ``--out`` finds a section to replace)
HEADINGS = {
    "width": "## Width sweep",
    "hvp": "## One Hessian-vector product",
    "reference": "## Reference shape",
}


def worker(kind: str, spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    warm_up()
    return MEASUREMENTS[kind](spec)


# ----------------------------------------------------------------------------- driver


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (NaN with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(p for p, _ in pts)
    my = statistics.fmean(q for _, q in pts)
    return sum((p - mx) * (q - my) for p, q in pts) / sum((p - mx) ** 2 for p, _ in pts)


def fmt_s(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def fmt_gb(v) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def fmt_e(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def run_width_sweep(args) -> dict:
    results = {}
    for width in args.widths:
        repeats = 1 if width >= args.single_from else args.repeats
        spec = dict(width=width, repeats=repeats, threads=args.threads)
        print(f"width {width} ...", file=sys.stderr, flush=True)
        results[width] = run_child(__file__, "width", spec, args.timeout, CHILD_ENV) | {
            "repeats": repeats
        }
    return results


def width_table(results: dict, threads: int) -> str:
    lines = [
        f"## Width sweep: tanh MLP depth {SWEEP_DEPTH}, batch {SWEEP_BATCH}, input {D_IN}, "
        f"{CLASSES} classes, float64, eps = {EPS:g}, {threads} thread(s)\n",
        "total = derivatives + factorization + norm estimate + solve (what a first solve "
        "costs); peak RSS is the whole child process (Python and torch included).\n",
        "| width | n | front N | derivatives (s) | factorization (s) | norm estimate (s) "
        "| solve (s) | total (s) | peak RSS (GB) | riccati estimate (GB) | backward error "
        "| refinement steps | method | repeats |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for width, r in results.items():
        if "error" in r or "skipped" in r:
            note = r.get("error") or (
                f"skipped: estimate {fmt_gb(r['estimate'])} GB > free {fmt_gb(r['free'])} GB"
            )
            lines.append(f"| {width} | {r.get('n', '-')} | | | | | | | | | | | {note} | |")
            continue
        lines.append(
            f"| {width} | {r['n']} | {r['front']} | {fmt_s(r['derivatives'])} "
            f"| {fmt_s(r['factorization'])} | {fmt_s(r['norm_estimate'])} | {fmt_s(r['solve'])} "
            f"| {fmt_s(r['total'])} | {fmt_gb(r['peak_rss'])} | {fmt_gb(r['estimate'])} "
            f"| {fmt_e(r['backward_error'])} | {r['refinement_steps']} | {r['method']} "
            f"| {r['repeats']} |"
        )
    return "\n".join(lines)


def width_exponents(results: dict) -> dict:
    """Fitted exponents in width of each phase and of the total (widths that ran)."""
    ran = {w: r for w, r in results.items() if "total" in r}
    fields = ("total", "derivatives", "factorization", "norm_estimate", "solve", "peak_rss")
    return {f: loglog_slope(list(ran), [r[f] for r in ran.values()]) for f in fields} | {
        "widths": sorted(ran)
    }


def verdict(value: float, limit: float) -> str:
    if value != value:  # NaN: not measured or not fitted
        return "not measured"
    return "met" if value <= limit else "NOT met"


def width_summary(results: dict) -> str:
    fit = width_exponents(results)
    widths = fit.pop("widths")
    span = f"widths {widths[0]}..{widths[-1]}" if widths else "no widths"
    lines = [
        f"\nFitted exponents in width (log-log least squares, {span}): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in fit.items())
        + "."
    ]
    target = results.get(TARGET_WIDTH, {})
    seconds, peak = target.get("total", math.nan), target.get("peak_rss", math.nan)
    lines.append(
        f"\nTargets: width {TARGET_WIDTH} total {seconds:.1f} s (<= {TARGET_SECONDS:.0f} s: "
        f"{verdict(seconds, TARGET_SECONDS)}), peak RSS {peak / 1e9:.2f} GB "
        f"(<= {TARGET_BYTES / 1e9:.0f} GB: {verdict(peak, TARGET_BYTES)}); exponent "
        f"{fit['total']:.2f} (<= {TARGET_EXPONENT}: {verdict(fit['total'], TARGET_EXPONENT)})."
    )
    return "\n".join(lines)


def run_hvp(args) -> dict:
    results = {}
    for depth, width, batch in HVP_SHAPES:
        spec = dict(
            depth=depth,
            width=width,
            batch=batch,
            products=args.products,
            repeats=args.repeats,
            threads=args.hvp_threads,
        )
        print(f"hvp {depth}x{width}x{batch} ...", file=sys.stderr, flush=True)
        results[(depth, width, batch)] = run_child(__file__, "hvp", spec, args.timeout, CHILD_ENV)
    return results


def hvp_table(results: dict, args) -> str:
    lines = [
        f"\n## One Hessian-vector product: ours against torch.func jvp(grad), float64, "
        f"{args.hvp_threads} thread(s), median of {args.products} products\n",
        "Ours: the derivatives are computed once (construction), then each product reuses "
        "them; torch.func runs forward-over-reverse on the flat parameter vector.\n",
        "| depth | width | batch | n | ours per product (s) | ours construction (s) "
        "| ours incl. construction (s) | torch.func per product (s) | torch.func / ours "
        "| torch.func / ours incl. construction | rel. difference | target (ours <= torch.func) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (depth, width, batch), r in results.items():
        if "error" in r:
            lines.append(f"| {depth} | {width} | {batch} | {r['error']} |")
            continue
        once = r["construction"] + r["ours"]
        lines.append(
            f"| {depth} | {width} | {batch} | {r['n']} | {fmt_s(r['ours'])} "
            f"| {fmt_s(r['construction'])} | {fmt_s(once)} | {fmt_s(r['torch_func'])} "
            f"| {r['torch_func'] / r['ours']:.2f}x | {r['torch_func'] / once:.2f}x "
            f"| {fmt_e(r['agreement'])} | {'met' if r['ours'] <= r['torch_func'] else 'NOT met'} |"
        )
    return "\n".join(lines)


def reference_table(r: dict, args) -> str:
    depth, width, batch = REFERENCE_SHAPE
    head = (
        f"\n## Reference shape: bias-free tanh MLP depth {depth}, width {width}, batch "
        f"{batch}, float64, eps = {EPS:g}, {args.threads} thread(s), median of {args.repeats}\n"
    )
    if "error" in r:
        return head + f"\nerror: {r['error']}"
    lines = [
        head,
        f"n = {r['n']}; shared: derivatives {fmt_s(r['derivatives'])} s, norm estimate "
        f"{fmt_s(r['norm_estimate'])} s (not in the rows below). Solutions differ by "
        f"{fmt_e(r['difference'])} (relative).\n",
        "| method | factorization (s) | solve (s) | factorization + solve (s) | estimate (GB) "
        "| backward error | refinement steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in ("riccati", "tridiagonal"):
        m = r[method]
        lines.append(
            f"| {m['method']} | {fmt_s(m['factorization'])} | {fmt_s(m['solve'])} "
            f"| {fmt_s(m['factorization'] + m['solve'])} | {fmt_gb(m['estimate'])} "
            f"| {fmt_e(m['backward_error'])} | {m['refinement_steps']} |"
        )
    ric, tri = (r[m]["factorization"] + r[m]["solve"] for m in ("riccati", "tridiagonal"))
    shared = r["derivatives"] + r["norm_estimate"]
    lines.append(
        f"\ntridiagonal / riccati: {tri / ric:.1f}x (factorization + solve), "
        f"{(tri + shared) / (ric + shared):.1f}x (with derivatives and norm estimate)."
    )
    return "\n".join(lines)


def header() -> str:
    return (
        f"# bench_width: torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )


def measured(section) -> str:
    """Run one part (``section()`` returns its markdown) and stamp it with date and load."""
    start, when = load_average(), time.strftime("%Y-%m-%d %H:%M")
    text = section()
    return (
        f"{text}\n\nMeasured {when}; load average {start} at the start, "
        f"{load_average()} at the end."
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", choices=list(MEASUREMENTS), default=list(MEASUREMENTS))
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--single-from", type=int, default=256, help="widths from this one on are timed once"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of the width sweep and the reference comparison",
    )
    p.add_argument("--hvp-threads", type=int, default=1)
    p.add_argument("--products", type=int, default=50, help="products per HVP median")
    p.add_argument("--timeout", type=float, default=3600.0, help="per child process (s)")
    p.add_argument(
        "--out",
        nargs="?",
        const=str(DEFAULT_OUT),
        help=f"also write the markdown (default path {DEFAULT_OUT.relative_to(ROOT)})",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        print(json.dumps(worker(kind, json.loads(spec))))
        return 0
    sections: dict[str, str] = {}
    if "width" in args.parts:

        def width_section():
            results = run_width_sweep(args)
            return width_table(results, args.threads) + "\n" + width_summary(results)

        sections["width"] = measured(width_section)
    if "hvp" in args.parts:
        sections["hvp"] = measured(lambda: hvp_table(run_hvp(args), args))
    if "reference" in args.parts:
        print("reference shape ...", file=sys.stderr, flush=True)
        spec = dict(repeats=args.repeats, threads=args.threads)
        sections["reference"] = measured(
            lambda: reference_table(
                run_child(__file__, "reference", spec, args.timeout, CHILD_ENV), args
            )
        )
    report = splice(header(), sections, HEADINGS)
    print(report)
    if args.out:
        out = Path(args.out)
        old = out.read_text() if out.exists() and set(args.parts) != set(MEASUREMENTS) else ""
        out.write_text(splice(old or header(), sections, HEADINGS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
