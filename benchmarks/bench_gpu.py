"""hessinv on one GPU: the exact solve over depth, float32 and float64, in one short run.

Every configuration runs in a fresh child process (its own peak memory, a hard time
limit), with the device synchronised around every timing:

* depth sweep -- tanh MLP width 16, batch 32, input 8, 4 classes, cross-entropy,
  ``eps = 1e-2``, depth 64..2048: the derivative sweep (the ``ChainHessian``
  constructor), ``factorize``, the one-off 12-step Lanczos norm estimate of the first
  solve, ``solve``, one extra right-hand side with the kept factorization, peak memory
  (``torch.cuda.max_memory_allocated``; peak RSS growth on CPU) and one Hessian-vector
  product, ours beside forward-over-reverse ``torch.func.jvp(grad(loss))``, and the
  host-device synchronisations of each phase (``hessinv.tools.syncs.HostSyncCounter``), the
  Gauss-Newton factorization stage by stage against runs of stages per host read, and the
  Hessian's with each front's tests read apart against speculative fronts. Fitted
  exponents in depth (log-log least squares) per dtype.
* wide case -- width 1024, depth 16, batch 8: the same times, peak memory and the
  residual ``||(H + eps I) x - g|| / ||g||``.
* per-stage floor -- width 4, batch 4, depth 512: the same phases per stage where the
  arithmetic is negligible, so what is left is the dispatch (on a GPU, the launch) of each
  stage's operators and its host reads; with the operators per stage
  (``hessinv.tools.syncs.KernelCounter``), also given for the depth sweep.

The whole run keeps to ``--budget`` seconds (default 420, under 8 minutes with start-up):
the wide cases run first, then the floor, then the depth sweep with both dtypes
interleaved, and a configuration whose predicted time (linear in depth from the previous
one) does not fit what is left is skipped and marked so.

    python benchmarks/bench_gpu.py --device cuda --out        # one H100: results/bench_gpu.md
    python benchmarks/bench_gpu.py --device cpu --small       # smoke test on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from bench_width import (  # noqa: E402  (the problem and the timing helpers are shared)
    ROOT,
    chain_hessian,
    fmt_e,
    fmt_s,
    loglog_slope,
    median_time,
    problem,
    run_child,
    synchronize,
    timed,
    torch_func_hvp,
)

import hessinv  # noqa: E402
from hessinv import SingularMatrixError  # noqa: E402  (found through bench_width's path)
from hessinv.linalg.riccati import riccati_factorize  # noqa: E402
from hessinv.settings import RUN_LENGTH  # noqa: E402
from hessinv.tools.syncs import HostSyncCounter, KernelCounter  # noqa: E402

EPS = 1e-2
DTYPES = ("float32", "float64")
SWEEP_WIDTH, SWEEP_BATCH = 16, 32
DEPTHS, SMALL_DEPTHS = (64, 128, 256, 512, 1024, 2048), (8, 16, 32, 64)
WIDE, SMALL_WIDE = (16, 1024, 8), (4, 64, 8)  # (depth, width, batch)
FLOOR_WIDTH, FLOOR_BATCH, FLOOR_DEPTH, SMALL_FLOOR_DEPTH = 4, 4, 512, 128


# ----------------------------------------------------------------------------- memory (child)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_memory_count(device: torch.device) -> int:
    """Start counting peak memory; returns the baseline to subtract (0 on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return current_rss_bytes()


def peak_memory_bytes(device: torch.device, baseline: int) -> int:
    """Peak allocated bytes on CUDA; peak RSS growth over ``baseline`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)


# ----------------------------------------------------------------------------- measurement (child)


def warm_up(device: torch.device, dtype: torch.dtype):
    """Every timed path once on a tiny problem: CUDA context, cuSOLVER handles, torch.func."""
    prob = problem(3, 4, 4, dtype=dtype, device=device)
    H = chain_hessian(prob)
    g = H.gradient()
    H.factorize(EPS, method="riccati", progress=False).solve(g)
    torch_func_hvp(*prob)(H @ g)
    synchronize(device)


def relative_residual(H, x, g) -> float:
    """``||(H + eps I) x - g|| / ||g||`` with one exact product."""
    return float(torch.linalg.vector_norm(H @ x + EPS * x - g) / torch.linalg.vector_norm(g))


def solve_times(H, repeats, device) -> dict:
    """Factorization, norm estimate, solve and one extra right-hand side, with their results."""
    out: dict = {}
    out["factorization"], F = median_time(
        lambda: H.factorize(EPS, method="riccati", progress=False), repeats, device
    )
    out["norm_estimate"], _ = timed(H.spectrum_estimate, device)  # cached after this
    g = H.gradient()
    out["solve"], x = median_time(lambda: F.solve(g), repeats, device)
    out["backward_error"], out["method"] = F.backward_error, F.method
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(H.num_params, generator=gen, dtype=H.dtype).to(device)
    out["extra_rhs"], _ = median_time(lambda: F.solve(v), repeats, device)
    out["residual"] = relative_residual(H, x, g)
    return out


def hvp_times(prob, H, products, device) -> dict:
    """One product, ours against torch.func ``jvp(grad)``; their relative difference."""
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(H.num_params, generator=gen, dtype=H.dtype).to(device)
    out: dict = {}
    out["hvp_ours"], ours = median_time(lambda: H @ v, products, device)
    hvp = torch_func_hvp(*prob)
    hvp(v)  # one-off set-up of the transform
    out["hvp_torch_func"], theirs = median_time(lambda: hvp(v), products, device)
    out["hvp_difference"] = float(
        torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs)
    )
    return out


def read_modes(prob, H, device) -> dict:
    """Ways of reading the pivot tests (docs/algorithm.md section 13), one timing each, with
    their host reads: the Gauss-Newton factorization stage by stage against runs of
    ``RUN_LENGTH`` stages per read; the Hessian's with each front's two tests read apart
    against speculative fronts (both tests in one read)."""
    G = hessinv.ChainGGN(*prob, progress=False)
    modes = (
        ("ggn_stagewise", G, {"check_every": 1}),
        ("ggn_runs", G, {"check_every": RUN_LENGTH}),
        ("h_apart", H, {"speculative": False}),
        ("h_speculative", H, {"speculative": True}),
    )
    out = {}
    for key, curvature, kwargs in modes:
        stages, S = curvature.stage_derivatives(), curvature.loss_hessian_blocks()

        def run(stages=stages, S=S, kwargs=kwargs):
            return riccati_factorize(stages, S, EPS, progress=False, **kwargs)

        run()  # warm
        out[key], _ = timed(run, device)
        with HostSyncCounter() as reads:
            run()
        out[key + "_reads"] = reads.count
    return out


def host_reads(prob, H) -> dict:
    """Host-device synchronisations and operators (kernel launches at most; docs/algorithm.md
    section 13) of one derivative sweep, one factorization and one solve with a kept
    factorization (untimed: counting them slows every operator down)."""
    out = {}
    with HostSyncCounter() as reads, KernelCounter() as kernels:
        chain_hessian(prob)
    out["reads_derivatives"], out["kernels_derivatives"] = reads.count, kernels.count
    with HostSyncCounter() as reads, KernelCounter() as kernels:
        F = H.factorize(EPS, method="riccati", progress=False)
    out["reads_factorization"], out["kernels_factorization"] = reads.count, kernels.count
    g = H.gradient()
    F.solve(g)
    with HostSyncCounter() as reads, KernelCounter() as kernels:
        F.solve(g)
    out["reads_solve"], out["kernels_solve"] = reads.count, kernels.count
    return out


def measure(spec: dict) -> dict:
    """One configuration: times, peak memory (of ours, before the torch.func comparison)."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    warm_up(device, dtype)
    start = time.perf_counter()
    prob = problem(spec["depth"], spec["width"], spec["batch"], dtype=dtype, device=device)
    baseline = start_memory_count(device)
    out: dict = {}
    out["derivatives"], H = median_time(lambda: chain_hessian(prob), spec["repeats"], device)
    out["n"] = H.num_params
    try:
        out |= solve_times(H, spec["repeats"], device)
        out["total"] = (
            out["derivatives"] + out["factorization"] + out["norm_estimate"] + out["solve"]
        )
    except SingularMatrixError as err:  # reported in the table, the products still measured
        out["error"] = f"SingularMatrixError after derivatives {out['derivatives']:.3g} s: {err}"
    out["peak_memory"] = peak_memory_bytes(device, baseline)
    out |= hvp_times(prob, H, spec["products"], device)
    if "error" not in out:
        out |= host_reads(prob, H)
        out |= read_modes(prob, H, device)
    out["busy"] = time.perf_counter() - start  # without start-up: for the budget's predictions
    return out


# ----------------------------------------------------------------------------- driver


class Budget:
    """Wall-clock budget of the whole run."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_config(spec: dict, budget: Budget, cap: float | None = None) -> dict:
    """Run one configuration in a child, limited by what is left of the budget (and ``cap``)."""
    limit = budget.left() if cap is None else min(cap, budget.left())
    if limit <= 1:
        return {"skipped": "time budget spent"}
    label = f"{spec['dtype']} depth {spec['depth']} width {spec['width']} batch {spec['batch']}"
    print(f"{label} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    result = run_child("measure", spec, limit, script=__file__)
    result["wall"] = time.monotonic() - start
    return result


def run_wide(args, budget: Budget) -> dict:
    depth, width, batch = SMALL_WIDE if args.small else WIDE
    return {
        dtype: run_config(
            dict(
                depth=depth,
                width=width,
                batch=batch,
                dtype=dtype,
                device=args.device,
                threads=args.threads,
                repeats=1,
                products=args.products,
            ),
            budget,
            cap=args.wide_timeout,
        )
        for dtype in DTYPES
    }


def run_depth_sweep(args, budget: Budget) -> dict:
    """``results[dtype][depth]``; dtypes interleaved, a depth skipped when it would not fit."""
    results: dict = {dtype: {} for dtype in DTYPES}
    last: dict = {}  # dtype -> (depth, start-up seconds, measuring seconds)
    for depth in SMALL_DEPTHS if args.small else DEPTHS:
        for dtype in DTYPES:
            if dtype in last:
                d0, startup, busy = last[dtype]
                if startup + 1.2 * busy * depth / d0 > budget.left():
                    results[dtype][depth] = {"skipped": "predicted time exceeds the budget left"}
                    continue
            repeats = 1 if depth >= args.single_from else args.repeats
            spec = dict(
                depth=depth,
                width=SWEEP_WIDTH,
                batch=SWEEP_BATCH,
                dtype=dtype,
                device=args.device,
                threads=args.threads,
                repeats=repeats,
                products=args.products,
            )
            results[dtype][depth] = run_config(spec, budget) | {"repeats": repeats}
            r = results[dtype][depth]
            if "busy" in r:
                last[dtype] = (depth, r["wall"] - r["busy"], r["busy"])
    return results


def run_floor(args, budget: Budget) -> dict:
    """The per-stage floor: width 4, batch 4, where the arithmetic is negligible and what is
    timed is the dispatch of the operators (and on a GPU their launches and the host reads)."""
    depth = SMALL_FLOOR_DEPTH if args.small else FLOOR_DEPTH
    return {
        dtype: run_config(
            dict(
                depth=depth,
                width=FLOOR_WIDTH,
                batch=FLOOR_BATCH,
                dtype=dtype,
                device=args.device,
                threads=args.threads,
                repeats=args.repeats,
                products=args.products,
            ),
            budget,
        )
        for dtype in DTYPES
    }


def floor_table(results: dict, args) -> str:
    depth = SMALL_FLOOR_DEPTH if args.small else FLOOR_DEPTH
    lines = [
        f"\n## Per-stage floor: width {FLOOR_WIDTH}, batch {FLOOR_BATCH}, depth {depth}, "
        f"eps = {EPS:g}\n",
        "Time per stage (microseconds) where the arithmetic is negligible: the cost of "
        "dispatching (on a GPU, launching) each stage's operators and of its host reads.\n",
        "| dtype | derivatives (us) | factorization (us) | solve (us) | extra RHS (us) "
        "| HVP ours (us) | host reads: derivatives / factorization / solve "
        "| operators per stage: derivatives / factorization / solve |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for dtype, r in results.items():
        if "total" not in r:
            lines.append(f"| {dtype} | {note(r)} |")
            continue
        per = [
            f"{r[k] / depth * 1e6:.0f}"
            for k in ("derivatives", "factorization", "solve", "extra_rhs", "hvp_ours")
        ]
        lines.append(f"| {dtype} | " + " | ".join(per) + f" | {reads(r)} | {kernels(r, depth)} |")
    return "\n".join(lines)


def note(r: dict) -> str:
    """Why a row has no times: the error or the reason it was skipped, shortened."""
    text = r.get("error") or r.get("skipped") or "?"
    return text if len(text) <= 200 else text[:197] + "..."


def reads(r: dict) -> str:
    keys = ("reads_derivatives", "reads_factorization", "reads_solve")
    return " / ".join(str(r[k]) for k in keys) if all(k in r for k in keys) else "-"


def kernels(r: dict, depth: int) -> str:
    """Operators per stage of the three phases (their count over the depth)."""
    keys = ("kernels_derivatives", "kernels_factorization", "kernels_solve")
    return " / ".join(f"{r[k] / depth:.0f}" for k in keys) if all(k in r for k in keys) else "-"


def ggn(r: dict, key: str) -> str:
    return f"{fmt_s(r[key])}, {r[key + '_reads']}" if key in r else "-"


def fmt_mb(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def sweep_table(results: dict, args) -> str:
    mem = "peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    lines = [
        f"## Depth sweep: tanh MLP width {SWEEP_WIDTH}, batch {SWEEP_BATCH}, eps = {EPS:g}\n",
        "total = derivatives + factorization + norm estimate (once) + solve; extra RHS: one "
        f"more solve with the kept factorization; memory: {mem} of ours (MiB); HVP: one "
        "product, median.\n",
        "| dtype | depth | n | derivatives (s) | factorization (s) | norm estimate (s) "
        "| solve (s) | total (s) | extra RHS (s) | memory (MiB) | HVP ours (s) "
        "| HVP torch.func (s) | torch.func / ours | backward error | residual | method "
        "| host reads: derivatives / factorization / solve "
        "| operators per stage: derivatives / factorization / solve "
        "| GGN factorization stage by stage (s, reads) | GGN factorization in runs of "
        f"{RUN_LENGTH} "
        "(s, reads) | H factorization, tests read apart (s, reads) "
        "| H factorization, speculative fronts (s, reads) | repeats |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"
        "---|---|---|---:|",
    ]
    for dtype, rows in results.items():
        for depth, r in rows.items():
            if "total" not in r:
                lines.append(f"| {dtype} | {depth} | {note(r)} |")
                continue
            lines.append(
                f"| {dtype} | {depth} | {r['n']} | {fmt_s(r['derivatives'])} "
                f"| {fmt_s(r['factorization'])} | {fmt_s(r['norm_estimate'])} "
                f"| {fmt_s(r['solve'])} | {fmt_s(r['total'])} | {fmt_s(r['extra_rhs'])} "
                f"| {fmt_mb(r['peak_memory'])} | {fmt_s(r['hvp_ours'])} "
                f"| {fmt_s(r['hvp_torch_func'])} | {r['hvp_torch_func'] / r['hvp_ours']:.2f}x "
                f"| {fmt_e(r['backward_error'])} | {fmt_e(r['residual'])} | {r['method']} "
                f"| {reads(r)} | {kernels(r, depth)} | {ggn(r, 'ggn_stagewise')} | "
                f"{ggn(r, 'ggn_runs')} "
                f"| {ggn(r, 'h_apart')} | {ggn(r, 'h_speculative')} | {r['repeats']} |"
            )
    return "\n".join(lines)


def sweep_exponents(results: dict) -> str:
    fields = (
        "total",
        "derivatives",
        "factorization",
        "solve",
        "extra_rhs",
        "peak_memory",
        "hvp_ours",
        "hvp_torch_func",
    )
    lines = [
        "\nFitted exponents in depth (log-log least squares over the depths that ran):\n",
        "| dtype | depths | " + " | ".join(f.replace("_", " ") for f in fields) + " |",
        "|---|---|" + "---:|" * len(fields),
    ]
    for dtype, rows in results.items():
        ran = {d: r for d, r in rows.items() if "total" in r}
        if not ran:
            continue
        slopes = [loglog_slope(list(ran), [r[f] for r in ran.values()]) for f in fields]
        lines.append(
            f"| {dtype} | {min(ran)}..{max(ran)} | " + " | ".join(f"{s:.2f}" for s in slopes) + " |"
        )
    return "\n".join(lines)


def wide_table(results: dict, args) -> str:
    depth, width, batch = SMALL_WIDE if args.small else WIDE
    lines = [
        f"\n## Wide case: width {width}, depth {depth}, batch {batch}, eps = {EPS:g}, timed once\n",
        "| dtype | n | derivatives (s) | factorization (s) | norm estimate (s) | solve (s) "
        "| total (s) | extra RHS (s) | memory (GiB) | residual | backward error | method |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for dtype, r in results.items():
        if "total" not in r:
            lines.append(f"| {dtype} | {note(r)} |")
            continue
        lines.append(
            f"| {dtype} | {r['n']} | {fmt_s(r['derivatives'])} | {fmt_s(r['factorization'])} "
            f"| {fmt_s(r['norm_estimate'])} | {fmt_s(r['solve'])} | {fmt_s(r['total'])} "
            f"| {fmt_s(r['extra_rhs'])} | {r['peak_memory'] / 2**30:.2f} "
            f"| {fmt_e(r['residual'])} | {fmt_e(r['backward_error'])} | {r['method']} |"
        )
    return "\n".join(lines)


def header(args) -> str:
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else False
    return (
        f"# bench_gpu ({time.strftime('%Y-%m-%d %H:%M')}): {name}, torch {torch.__version__}"
        f"{', CUDA ' + torch.version.cuda if torch.version.cuda else ''}, TF32 matmul "
        f"{tf32}{', --small' if args.small else ''}, budget {args.budget:.0f} s\n"
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small sizes: a smoke test on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--single-from", type=int, default=1024, help="depths timed once from here")
    p.add_argument("--products", type=int, default=20, help="products per HVP median")
    p.add_argument("--budget", type=float, default=420.0, help="wall-clock limit of the run (s)")
    p.add_argument("--wide-timeout", type=float, default=120.0, help="per wide case (s)")
    p.add_argument(
        "--out",
        nargs="?",
        const="",
        help="also write the markdown (default results/bench_gpu[_cpu_small].md)",
    )
    return p.parse_args(argv)


def default_out(args) -> Path:
    suffix = "" if args.device.startswith("cuda") else "_cpu"
    return ROOT / "benchmarks" / "results" / f"bench_gpu{suffix}{'_small' if args.small else ''}.md"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker[1]))))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --small for a smoke test", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    wide = run_wide(args, budget)
    floor = run_floor(args, budget)
    sweep = run_depth_sweep(args, budget)
    report = "\n".join(
        [
            header(args),
            sweep_table(sweep, args),
            sweep_exponents(sweep),
            wide_table(wide, args),
            floor_table(floor, args),
        ]
    )
    print(report)
    if args.out is not None:
        path = Path(args.out) if args.out else default_out(args)
        path.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
