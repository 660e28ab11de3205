"""Time and peak memory of hessinv's exact solves against dense and CG, over depth.

Each measurement runs in a fresh child process, so that its peak memory (peak RSS
growth on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is its own. Times are
medians over ``--repeats`` runs.

Suites:

* ``core`` (issue 3): tanh MLP width 16, batch 16, input 8, 4 classes, depth
  4..128: time of the stage derivatives, of one ``matvec``, of ``solve`` (Riccati
  and tridiagonal), of dense ``torch.func.hessian`` + ``torch.linalg.solve`` (while
  ``n <= --dense-limit``) and of CG to relative residual 1e-8.
* ``scaling`` (issue 4): depth 8..512 for (width, batch) in (16, 16), (16, 32),
  (32, 8): Riccati, tridiagonal, dense and CG, fitted exponents of time and memory in
  depth, the cost of one more right-hand side with a kept factorization, and the
  share of time in the derivative oracle.

Initialisation (``--init``, several values run in one call): ``default`` is PyTorch's own
``nn.Linear`` initialisation (``hessinv.tools.demo.tall_skinny_mlp``; weight std
``1/sqrt(3 fan_in)``, the ordered phase of tanh: the deep stages' inputs collapse to rank 1
and the factorization compresses them, docs/algorithm.md section 8); ``orthogonal`` is
orthogonal weights times ``--gain`` (default 1.1, near the edge of chaos for tanh) and zero
biases, whose every stage keeps inputs of full rank. Every measurement also reports the
stages' input ranks ``r`` (the factorization's basis, ``N = h_out r``) and the smallest
over the largest singular value of the last stage's input matrix ``[Z_in, 1]``.

The ``ChainHessian`` constructor runs the derivative sweep, so it is timed as
"derivatives". The first solve on an operator also runs a one-off 12-step Lanczos
estimate of ``||H + eps I||`` (for the a-posteriori backward error); it is timed
separately, before the solves, and counted once in each method's total.

Damping: ``1e-2`` for the exact solves. ``H + 1e-2 I`` is indefinite for these
networks, where CG breaks down; CG is therefore run on the shifted, positive
definite system ``H + (1e-2 - lambda_min) I``, with ``lambda_min`` found (untimed) by
Lanczos certified by the exact inertia (``positive_definite_shift``), and its iterations are
reported.

    python benchmarks/bench_solve.py --suite core
    python benchmarks/bench_solve.py --suite scaling [--quick] [--device cuda --max-depth 1024]
    python benchmarks/bench_solve.py --suite scaling --init default orthogonal --methods riccati \
        --shapes 16x32 --depths 16 32 64 128 256 512 --threads 1   # full-rank stages
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

DAMPING = 1e-2
INITS = ("default", "orthogonal")
METHODS = ("riccati", "tridiagonal", "dense", "cg")


# ----------------------------------------------------------------------------- worker side


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        out = None  # free the previous result first: peak memory is one result's
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _problem(depth, width, batch, device, seed=0, init="default", gain=1.1):
    """tanh MLP (``depth`` Linear layers, input 8, 4 classes), cross-entropy, a seeded batch.

    ``init="default"``: PyTorch's initialisation (the demo's builder); ``"orthogonal"``:
    orthogonal weights times ``gain`` from a generator seeded with ``seed``, zero biases."""
    from hessinv.tools.demo import tall_skinny_mlp

    model = tall_skinny_mlp(depth, width, 8, 4, torch.float64, device, seed)
    if init == "orthogonal":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, nn.Linear):
                    weight = torch.empty(layer.weight.shape, dtype=torch.float64)
                    nn.init.orthogonal_(weight, gain=gain, generator=gen)
                    layer.weight.copy_(weight)
                    layer.bias.zero_()
    elif init != "default":
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, 8, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 4, (batch,), generator=gen).to(device)
    return model, nn.CrossEntropyLoss(), X, y


def _warm_up(device):
    """Run every code path once on a tiny problem: one-time library start-up is not timed."""
    import hessinv

    H = hessinv.ChainHessian(*_problem(3, 4, 4, device), progress=False)
    g = H.gradient()
    H @ g
    for damping in (DAMPING, 10.0):
        H.factorize(damping, method="riccati", progress=False).solve(g)
    H.solve(g, damping=DAMPING, method="tridiagonal")
    hessinv.conjugate_gradient(H.matvec, g, 10.0, maxiter=5)
    hessinv.dense_hessian(*_problem(3, 4, 4, device))


def _stage_ranks(H, model, X) -> dict:
    """The rank ``r`` of every stage's input ``[Z_in, 1]`` as the factorization uses it (its
    basis has ``N = h_out r`` columns, docs/algorithm.md section 8), and the smallest over the
    largest singular value of the last stage's input matrix."""
    stages = H.stage_derivatives()
    ranks = [getattr(d, "r", None) for d in stages]
    ranks = [r for r in ranks if r is not None]
    with torch.no_grad():
        z = model[:-1](X)
    Zt = torch.cat([z, torch.ones_like(z[:, :1])], 1)
    sv = torch.linalg.svdvals(Zt)
    return {
        "rank_mean": statistics.fmean(ranks) if ranks else None,
        "rank_last": ranks[-1] if ranks else None,
        "m_last": Zt.shape[1],
        "basis_mean": statistics.fmean(d.basis_size for d in stages),
        "sv_ratio_last": float(sv[-1] / sv[0]),
    }


def worker(spec: dict) -> dict:
    """Run one (problem, method) measurement; return times (s) and peak memory (bytes)."""
    import hessinv

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    repeats = spec["repeats"]
    _warm_up(device)
    model, loss_fn, X, y = _problem(
        spec["depth"],
        spec["width"],
        spec["batch"],
        device,
        init=spec.get("init", "default"),
        gain=spec.get("gain", 1.1),
    )
    out: dict = {}
    H = hessinv.ChainHessian(model, loss_fn, X, y, progress=False)
    out["n"] = H.num_params
    out |= _stage_ranks(H, model, X)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    method = spec["method"]
    if method in ("riccati", "tridiagonal"):

        def fresh_derivatives():  # the constructor runs the whole derivative sweep
            return hessinv.ChainHessian(model, loss_fn, X, y, progress=False)

        out["derivatives"], H = _median_time(fresh_derivatives, repeats, device)
        g = H.gradient()
        out["norm_estimate"], _ = _median_time(H.spectrum_estimate, 1, device)  # cached
        if method == "riccati":
            v = torch.randn_like(g)
            out["matvec"], _ = _median_time(lambda: H @ v, repeats, device)
            out["factorize"], F = _median_time(
                lambda: H.factorize(DAMPING, method="riccati", progress=False), repeats, device
            )
            out["solve"], x = _median_time(lambda: F.solve(g), repeats, device)
            out["extra_rhs"], _ = _median_time(lambda: F.solve(v), repeats, device)
            out["extra_rhs_norefine"], _ = _median_time(
                lambda: F.solve(v, refine=0), repeats, device
            )
            out["total"] = (
                out["derivatives"] + out["norm_estimate"] + out["factorize"] + out["solve"]
            )
            out["backward_error"] = F.backward_error
        else:
            reps = 1 if spec["depth"] > 16 else repeats
            out["solve"], x = _median_time(
                lambda: H.solve(g, damping=DAMPING, method="tridiagonal"), reps, device
            )
            out["total"] = out["derivatives"] + out["norm_estimate"] + out["solve"]
        r = H @ x + DAMPING * x - g
        out["residual"] = float(torch.linalg.norm(r) / torch.linalg.norm(g))
    elif method == "dense":
        n = H.num_params

        def dense_solve():
            D = hessinv.dense_hessian(model, loss_fn, X, y)
            eye = torch.eye(n, dtype=D.dtype, device=D.device)
            return torch.linalg.solve(D + DAMPING * eye, H.gradient())

        out["total"], _ = _median_time(dense_solve, 1, device)
    elif method == "cg":
        g = H.gradient()
        first = hessinv.conjugate_gradient(
            H.matvec, g, DAMPING, rtol=1e-8, maxiter=5 * H.num_params
        )
        out["cg_breakdown_iter"] = first.iterations if not first.converged else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        shift = H.positive_definite_shift(DAMPING)
        out["shift"] = shift
        t, res = _median_time(
            lambda: hessinv.conjugate_gradient(
                H.matvec, g, DAMPING + shift, rtol=1e-8, maxiter=20 * H.num_params
            ),
            1,
            device,
        )
        out["total"] = t
        out["cg_iterations"] = res.iterations
        out["cg_converged"] = res.converged
    else:
        raise ValueError(method)
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return out


# ----------------------------------------------------------------------------- driver side


def run_child(spec: dict, timeout: float) -> dict | None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    )
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    num = sum((x - mx) * (y - my) for x, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return num / den


def _fmt_t(v):
    return "-" if v is None else f"{v:.3g}"


def _fmt_mb(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def _progress(items, desc):
    try:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return items


def measure(configs, methods, args, limits):
    """``results[(depth, width, batch, init)][method] = dict``; skips past a method's limits
    (a config without ``init`` is ``"default"``)."""
    results = {}
    stopped = set()
    configs = [tuple(c) if len(c) == 4 else (*c, "default") for c in configs]
    jobs = [(c, m) for c in configs for m in methods]
    for (depth, width, batch, init), method in _progress(jobs, "bench"):
        key = (depth, width, batch, init)
        results.setdefault(key, {})
        n_est = depth * (width * width + width)
        a = width * batch
        p = width * width + width
        if (width, batch, init, method) in stopped or not limits[method](depth, n_est, p, a):
            continue
        spec = dict(
            depth=depth,
            width=width,
            batch=batch,
            init=init,
            gain=args.gain,
            method=method,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
        )
        res = run_child(spec, args.timeout)
        results[key][method] = res
        if "error" in res:
            stopped.add((width, batch, init, method))
            print(f"  {method} at {key}: {res['error']} (larger depths skipped)", file=sys.stderr)
    return results


def core_table(results) -> str:
    lines = [
        "| depth | n | derivatives (s) | matvec (s) | riccati factor+solve (s) | tridiagonal solve "
        "(s) "
        "| dense hessian+solve (s) | CG to 1e-8 (s) | CG iters (shift) | CG at eps=1e-2 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (depth, *_), r in sorted(results.items()):
        ric, tri, den, cg = (r.get(m, {}) for m in ("riccati", "tridiagonal", "dense", "cg"))
        n = ric.get("n", "-")
        fs = ric["factorize"] + ric["solve"] if "factorize" in ric else None
        cg_iters = (
            f"{cg['cg_iterations']}{'' if cg.get('cg_converged') else ' (no conv.)'} "
            f"(+{cg['shift']:.2f})"
            if "cg_iterations" in cg
            else "-"
        )
        breakdown = (
            f"breakdown at it. {cg['cg_breakdown_iter']}"
            if cg.get("cg_breakdown_iter")
            else ("converged" if "total" in cg else "-")
        )
        lines.append(
            f"| {depth} | {n} | {_fmt_t(ric.get('derivatives'))} | {_fmt_t(ric.get('matvec'))} | "
            f"{_fmt_t(fs)} | {_fmt_t(tri.get('solve'))} | {_fmt_t(den.get('total'))} | "
            f"{_fmt_t(cg.get('total'))} | {cg_iters} | {breakdown} |"
        )
    return "\n".join(lines)


def init_name(init: str, gain: float) -> str:
    if init == "orthogonal":
        return f"orthogonal init (gain {gain:g}, zero biases)"
    return "PyTorch default init"


def fits_of(rows, fields) -> list[str]:
    """Fitted exponents in depth (depth >= 16) of ``(method, field)`` pairs over ``rows``."""
    fits = []
    for method, field in fields:
        pts = [
            (k[0], v[method][field]) for k, v in rows if field in v.get(method, {}) and k[0] >= 16
        ]
        if len(pts) >= 2:
            xs, ys = zip(*pts, strict=True)
            fits.append(
                f"{method} {'time' if field == 'total' else 'peak memory'}: "
                f"{slope(xs, ys):.2f} (depth {min(xs)}..{max(xs)})"
            )
    return fits


def scaling_tables(results, shapes, inits=("default",), gain=1.1) -> str:
    out = []
    for (width, batch), init in ((s, i) for s in shapes for i in inits):
        rows = sorted((k, v) for k, v in results.items() if k[1:] == (width, batch, init))
        title = f"width {width}, batch {batch}"
        if inits != ("default",):
            title += f", {init_name(init, gain)}"
        out.append(f"\n### {title}\n")
        out.append(
            "| depth | n | riccati total (s) | riccati peak MB | derivatives share | extra RHS (s) "
            "| factor+solve / extra RHS | same, refine=0 | tridiagonal total (s) | tridiagonal "
            "peak MB "
            "| tri / riccati | dense (s) | dense peak MB | CG (s) | CG iters |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (depth, *_), r in rows:
            ric, tri, den, cg = (r.get(m, {}) for m in ("riccati", "tridiagonal", "dense", "cg"))
            share = ric["derivatives"] / ric["total"] if "total" in ric else None
            fs = ric["factorize"] + ric["solve"] if "factorize" in ric else None
            ratio_rhs = fs / ric["extra_rhs"] if fs else None
            ratio_rhs0 = fs / ric["extra_rhs_norefine"] if fs else None
            tri_ratio = tri["total"] / ric["total"] if "total" in tri and "total" in ric else None
            out.append(
                f"| {depth} | {ric.get('n', '-')} | {_fmt_t(ric.get('total'))} | "
                f"{_fmt_mb(ric.get('peak_bytes'))} | {'-' if share is None else f'{share:.0%}'} | "
                f"{_fmt_t(ric.get('extra_rhs'))} | "
                f"{'-' if ratio_rhs is None else f'{ratio_rhs:.0f}x'} | "
                f"{'-' if ratio_rhs0 is None else f'{ratio_rhs0:.0f}x'} | "
                f"{_fmt_t(tri.get('total'))} | {_fmt_mb(tri.get('peak_bytes'))} | "
                f"{'-' if tri_ratio is None else f'{tri_ratio:.1f}x'} | {_fmt_t(den.get('total'))} "
                "| "
                f"{_fmt_mb(den.get('peak_bytes'))} | {_fmt_t(cg.get('total'))} | "
                f"{cg.get('cg_iterations', '-')} |"
            )
        fits = fits_of(
            rows,
            [(m, f) for m in ("riccati", "tridiagonal", "dense") for f in ("total", "peak_bytes")],
        )
        out.append(
            "\nFitted exponents in depth (log-log least squares, depth >= 16): "
            + "; ".join(fits)
            + "."
        )
    return "\n".join(out)


def rank_table(results, shapes, inits, gain) -> str:
    """Per init: the Riccati solve's time split, peak memory, the stages' input ranks, and
    the fitted exponents side by side."""
    out = []
    for width, batch in shapes:
        out.append(
            f"\n### stage input ranks and the Riccati solve by init: width {width}, batch {batch}\n"
        )
        out.append(
            "r: rank of a stage's input matrix [Z_in, 1] (B x m, m = width + 1 after the first "
            "stage) as the factorization uses it, its basis has N = h_out r columns "
            "(docs/algorithm.md section 8); sv ratio: smallest / largest singular value of the "
            "last stage's input matrix. total = derivatives + norm estimate + factorize + "
            "solve (medians). residual = ||(H + eps I) x - g|| / ||g||.\n"
        )
        out.append(
            "| init | depth | n | total (s) | derivatives (s) | factorize (s) | solve (s) "
            "| peak MB | mean r | last stage r / m | last stage sv ratio | mean N "
            "| backward error | residual |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        fits = []
        for init in inits:
            rows = sorted((k, v) for k, v in results.items() if k[1:] == (width, batch, init))
            for (depth, *_), r in rows:
                ric = r.get("riccati", {})
                if "total" not in ric:
                    out.append(f"| {init} | {depth} | {ric.get('error', '-')} |")
                    continue
                out.append(
                    f"| {init} | {depth} | {ric['n']} | {_fmt_t(ric['total'])} "
                    f"| {_fmt_t(ric['derivatives'])} | {_fmt_t(ric['factorize'])} "
                    f"| {_fmt_t(ric['solve'])} | {_fmt_mb(ric['peak_bytes'])} "
                    f"| {ric['rank_mean']:.2f} | {ric['rank_last']} / {ric['m_last']} "
                    f"| {ric['sv_ratio_last']:.1e} | {ric['basis_mean']:.0f} "
                    f"| {ric['backward_error']:.1e} | {ric['residual']:.1e} |"
                )
            found = fits_of(rows, [("riccati", "total"), ("riccati", "peak_bytes")])
            if found:
                fits.append(f"{init_name(init, gain)}: " + "; ".join(found))
        out.append(
            "\nFitted exponents in depth (log-log least squares, depth >= 16): "
            + ". ".join(fits)
            + "."
        )
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--suite", choices=["core", "scaling", "all"], default="core")
    parser.add_argument("--quick", action="store_true", help="smaller depths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="per measurement (s)")
    parser.add_argument("--max-depth", type=int, default=512)
    parser.add_argument("--dense-limit", type=int, default=6000, help="max n for dense")
    parser.add_argument(
        "--tri-bytes",
        type=float,
        default=6e9,
        help="skip tridiagonal when its estimated storage exceeds this",
    )
    parser.add_argument("--cg-max-depth", type=int, default=128)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["16x16", "16x32", "32x8"],
        help="scaling suite: WIDTHxBATCH pairs",
    )
    parser.add_argument(
        "--init",
        nargs="+",
        choices=INITS,
        default=["default"],
        help="weight initialisations, each run over the same depths (see the docstring)",
    )
    parser.add_argument(
        "--gain", type=float, default=1.1, help="gain of the orthogonal initialisation"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run"
    )
    parser.add_argument("--depths", nargs="+", type=int, help="override the suite's depths")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    limits = {
        "riccati": lambda L, n, p, a: True,
        "tridiagonal": lambda L, n, p, a: 10 * 8 * L * (p + 2 * a) ** 2 <= args.tri_bytes,
        "dense": lambda L, n, p, a: n <= args.dense_limit,
        "cg": lambda L, n, p, a: L <= args.cg_max_depth,
    }
    methods = list(args.methods)
    inits = tuple(args.init)
    header = (
        f"device {args.device}, {args.threads} threads, float64, damping {DAMPING}, "
        f"median of {args.repeats}"
    )
    if inits != ("default",):
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        header += (
            f"; inits: {', '.join(init_name(i, args.gain) for i in inits)}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load} at the start"
        )
    header += "\n"
    text = [header]
    if args.suite in ("core", "all"):
        depths = [4, 8, 16, 32] if args.quick else [4, 8, 16, 32, 64, 128]
        depths = args.depths or depths
        res = measure([(L, 16, 16) for L in depths if L <= args.max_depth], methods, args, limits)
        text.append("## core: tanh MLP width 16, batch 16, input 8, 4 classes\n")
        text.append(core_table(res))
    if args.suite in ("scaling", "all"):
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        depths = [8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024]
        depths = args.depths or depths
        configs = [
            (L, w, b, i) for (w, b) in shapes for i in inits for L in depths if L <= args.max_depth
        ]
        res = measure(configs, methods, args, limits)
        text.append("\n## scaling in depth")
        text.append(scaling_tables(res, shapes, inits, args.gain))
        if inits != ("default",) and "riccati" in methods:
            text.append(rank_table(res, shapes, inits, args.gain))
        key = (32, 16, 32, "default")
        if "total" in res.get(key, {}).get("tridiagonal", {}):
            ratio = res[key]["tridiagonal"]["total"] / res[key]["riccati"]["total"]
            text.append(
                f"\nriccati speed-up over tridiagonal at depth 32, width 16, batch 32: {ratio:.1f}x"
            )
    if inits != ("default",):
        text.append("\nload average at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    report = "\n".join(text)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
