"""Benchmark the pivoted block-tridiagonal solve against dense LU.

For n block rows of size m (float64, CPU) it times ``Tridiagonal.solve``
(= factorize + solve, one right-hand side), the solve alone with a reused
factorization, dense ``torch.linalg.solve`` of the assembled N x N matrix
(N = n*m, only while N <= --dense-max), and ``n`` times one
``torch.linalg.lu_factor`` of an m x m block (the cost of n independent
diagonal-block LUs, the floor for any block method). Times are medians over
repeats. Memory is the exact byte count of the tensors stored in the
factorization (``TridiagonalLU.nbytes``), compared with the N x N dense matrix
(8 N^2 bytes); it is not a measured process RSS. The exponent of time in n is
a log-log least-squares fit per m.

    python benchmarks/bench_tridiagonal.py --quick
    python benchmarks/bench_tridiagonal.py
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np
import torch

from block_partitioned_matrices import Tridiagonal  # noqa: E402

STAT = statistics.median


def measure(fn, budget_s: float, max_repeats: int) -> float:
    """Median (or --stat) wall time of fn(); the first call is a warm-up unless it alone exceeds
    the budget."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first >= budget_s:
        return first
    k = max(1, min(max_repeats, math.ceil(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return STAT(times)


def random_tridiagonal(n: int, m: int, g: torch.Generator) -> Tridiagonal:
    d = torch.float64
    D = [torch.randn(m, m, generator=g, dtype=d) for _ in range(n)]
    L = [torch.randn(m, m, generator=g, dtype=d) / math.sqrt(m) for _ in range(n - 1)]
    U = [torch.randn(m, m, generator=g, dtype=d) / math.sqrt(m) for _ in range(n - 1)]
    return Tridiagonal(D, L, U)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller grid: m=512 only up to n=64, dense only up to N=4096, fewer repeats",
    )
    ap.add_argument("--ns", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--ms", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--dense-max", type=int, default=8192, help="largest N timed with dense solve")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    ap.add_argument("--max-repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--stat", choices=["median", "min"], default="median", help="statistic over repeats"
    )
    args = ap.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    if args.threads:
        torch.set_num_threads(args.threads)
    max_n_for_m = {512: 64} if args.quick else {}
    if args.quick:
        args.budget, args.max_repeats = min(args.budget, 0.5), min(args.max_repeats, 3)
        args.dense_max = min(args.dense_max, 4096)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, float64, CPU"
        + f", {args.stat} over repeats"
        + (", --quick" if args.quick else "")
    )
    print()
    print(
        "| m | n | N | tri factor+solve (ms) | tri solve only (ms) | dense solve (ms) | dense / "
        "tri "
        "| n x lu_factor(m) (ms) | tri / (n x lu) | factor MB | dense MB | rel. residual |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(args.seed)
    fits = {}
    overheads = {}
    for m in args.ms:
        ns_done, ts = [], []
        blk = torch.randn(m, m, generator=g, dtype=torch.float64)
        t_lu = measure(lambda blk=blk: torch.linalg.lu_factor(blk), args.budget, args.max_repeats)
        for n in args.ns:
            if n > max_n_for_m.get(m, 1 << 62):
                continue
            N = n * m
            T = random_tridiagonal(n, m, g)
            b = torch.randn(N, generator=g, dtype=torch.float64)
            t_tri = measure(lambda T=T, b=b: T.solve(b), args.budget, args.max_repeats)
            F = T.factorize()
            t_solve = measure(lambda F=F, b=b: F.solve(b), args.budget, args.max_repeats)
            x = F.solve(b)
            res = float(torch.linalg.norm(T @ x - b) / torch.linalg.norm(b))
            if N <= args.dense_max:
                A = T.to_dense()
                t_dense = measure(
                    lambda A=A, b=b: torch.linalg.solve(A, b), args.budget, args.max_repeats
                )
                del A
                dense_s, ratio_s = f"{1e3 * t_dense:.2f}", f"{t_dense / t_tri:.2f}"
            else:
                dense_s = ratio_s = "-"
            over = t_tri / (n * t_lu)
            overheads.setdefault(m, []).append(over)
            print(
                f"| {m} | {n} | {N} | {1e3 * t_tri:.2f} | {1e3 * t_solve:.2f} | {dense_s} | "
                f"{ratio_s} "
                f"| {1e3 * n * t_lu:.2f} | {over:.1f} | {F.nbytes / 2**20:.2f} | "
                f"{8 * N * N / 2**20:.1f} "
                f"| {res:.1e} |",
                flush=True,
            )
            ns_done.append(n)
            ts.append(t_tri)
            del T, F
        if len(ns_done) >= 2:
            slope = np.polyfit(np.log(ns_done), np.log(ts), 1)[0]
            fits[m] = (slope, ns_done[0], ns_done[-1])
    print()
    print("| m | exponent of time in n (log-log fit) | n range | median tri / (n x lu_factor(m)) |")
    print("|---:|---:|---|---:|")
    for m in args.ms:
        if m in fits:
            slope, lo, hi = fits[m]
            print(f"| {m} | {slope:.2f} | {lo}..{hi} | {statistics.median(overheads[m]):.1f} |")
    print()
    print(
        "Memory column 'factor MB' = bytes of the tensors kept by TridiagonalLU (packed panel LUs, "
        "pivots, V_k and fill-in W_k blocks), not measured RSS."
    )


if __name__ == "__main__":
    main()
