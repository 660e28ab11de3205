"""hessinv.distributed on one machine: bytes per phase, memory per rank, time against one process.

Two processes of a gloo group on this machine (``--ranks``), each in a fresh process (its
peak memory is its own), against one process running the single-process classes on the same
problem. Float64, one thread per process, tanh MLPs (``depth`` ``nn.Linear`` layers).

* ``pipeline`` -- ``PipelineHessian`` (depth 16, width 128, batch 8, 10 classes; damping 0.1):
  per phase (construction = the derivative sweep, one product, the factorization, one
  solve) the median time, the bytes this rank sent as hessinv counts them (the ring
  algorithms' count; module docstring of :mod:`hessinv.distributed.comm`), the bytes the
  loopback interface carried during the phase (both ranks' sends, with TCP/IP framing; read
  from ``/proc/net/dev``), the tensors each rank holds (derivatives, factors) and the rise
  of its peak resident memory over the phase (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``).
* ``data`` -- ``DataParallelGGN`` (depth 8, width 32, 10 classes, batch 256 split in halves;
  damping 1e-3): the same phases; the factorization is the output space spread over the
  ranks (each gathers the per-stage Gram factors, computes its block row of ``U U^T``, the
  rows are gathered: docs/algorithm.md section 17), built afresh in every repeat, as the
  one-process output space is; its tensors held are the Gram matrix and its factor.

    python benchmarks/bench_distributed.py            # both parts (about 1 minute here)
    python benchmarks/bench_distributed.py --out      # ... and write results/bench_distributed.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hessinv
from hessinv.distributed import DataParallelGGN, PipelineHessian

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_distributed.md"
CASES = {
    "pipeline": {"depth": 16, "width": 128, "batch": 8, "classes": 10, "damping": 0.1},
    "data": {"depth": 8, "width": 32, "batch": 256, "classes": 10, "damping": 1e-3},
}


def problem(depth: int, width: int, batch: int, classes: int, **_):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sizes = [16] + [width] * (depth - 1) + [classes]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).double()
    X = torch.randn(batch, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return model, X, y


# ---------------------------------------------------------------------- measurements
def loopback_bytes() -> int:
    """Bytes sent through the loopback interface so far (every process's)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])  # transmit bytes
    except OSError:
        pass
    return -1


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return -1


def phase(name: str, fn, repeats: int, out: dict, comm=None, sync=None):
    """Run ``fn`` ``repeats`` times (ranks in step); record the median time, the bytes sent
    (hessinv's count and the loopback's) and the peak RSS rise of the first run."""
    times, result = [], None
    sent0 = dict(comm.traffic) if comm is not None else {}
    for i in range(repeats):
        if sync:
            sync()
        lo0, rss0 = loopback_bytes(), current_rss()
        reset_peak()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = peak_rss() - rss0
            if sync:
                sync()
            lo = loopback_bytes() - lo0
    counted = 0
    if comm is not None:
        counted = sum(comm.traffic.values()) - sum(sent0.values())
        counted //= repeats
    out[name] = {
        "time_s": statistics.median(times),
        "peak_rise_bytes": peak,
        "sent_bytes": counted,
        "loopback_bytes": lo,
    }
    return result


# ---------------------------------------------------------------------- the runs
def warm_up(cls) -> None:
    """Every code path once on a tiny problem (lazy initialisations are not timed)."""
    model, X, y = problem(depth=3, width=4, batch=4, classes=3)
    C = cls(model, nn.CrossEntropyLoss(), X, y)
    C @ torch.ones(C.num_params, dtype=torch.float64)
    C.factorize(0.1).solve(C.gradient())


def run_single(case: str, repeats: int) -> dict:
    torch.set_num_threads(1)
    cfg = CASES[case]
    model, X, y = problem(**cfg)
    cls = hessinv.ChainHessian if case == "pipeline" else hessinv.ChainGGN
    method = "riccati" if case == "pipeline" else "auto"
    out: dict = {"rank": "one process"}
    warm_up(cls)
    C = phase("construction", lambda: cls(model, nn.CrossEntropyLoss(), X, y), repeats, out)
    v = torch.randn(C.num_params, dtype=torch.float64)
    phase("product", lambda: C @ v, repeats, out)

    def factor():
        _forget_gram(getattr(C, "_space", None))  # each repeat builds the Gram matrix again
        return C.factorize(cfg["damping"], method=method)

    F = phase("factorization", factor, repeats, out)
    phase("solve", lambda: F.solve(C.gradient()), repeats, out)
    out["held"] = {
        "derivatives": sum(d.stored_bytes() for d in C.stage_derivatives()),
        "factors": _factor_bytes(F),
    }
    out["route"] = F.method
    return out


def _forget_gram(space) -> None:
    """Drop an output space's kept Gram matrix and eigendecomposition (the next
    factorization computes them again, gathers included)."""
    if space is not None:
        space._gram = space._eigh = None


def _factor_bytes(F) -> int:
    """Bytes of the tensors a factorization holds: the Riccati fronts, or the output
    space's Gram matrix with its Cholesky factor or eigendecomposition."""
    from hessinv.distributed.pipeline import _tensor_bytes

    solver = F._solver
    factors = getattr(getattr(solver, "factors", None), "factors", None)
    if factors is not None:
        return _tensor_bytes(*[f.front for f in factors])
    space = getattr(solver, "space", None)
    if space is None:
        return -1
    held = [space._gram, getattr(solver, "_chol", None), *(space._eigh or ())]
    return _tensor_bytes(SimpleNamespace(held=held))


def run_rank(rank: int, world: int, store: str, case: str, repeats: int, result_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    cfg = CASES[case]
    model, X, y = problem(**cfg)
    out: dict = {"rank": rank}
    sync = dist.barrier
    warm_up(PipelineHessian if case == "pipeline" else DataParallelGGN)
    rows = slice(rank, None, world)  # the data-parallel shard

    def build():
        if case == "pipeline":
            return PipelineHessian(model, nn.CrossEntropyLoss(), X, y)
        return DataParallelGGN(model, nn.CrossEntropyLoss(), X[rows], y[rows])

    C = phase("construction", build, repeats, out, sync=sync)
    out["construction"]["sent_bytes"] = sum(C.comm.traffic.values())
    comm = C.comm
    v = torch.randn(C.num_params, dtype=torch.float64)
    phase("product", lambda: C @ v, repeats, out, comm, sync)

    def factor():
        if case != "pipeline":
            C._distributed_space = None  # each repeat gathers and builds the Gram matrix again
        return C.factorize(cfg["damping"])

    F = phase("factorization", factor, repeats, out, comm, sync)
    phase("solve", lambda: F.solve(C.gradient()), repeats, out, comm, sync)
    if case == "pipeline":
        out["held"] = {"derivatives": C.memory()["derivatives"], "factors": F.memory()["factors"]}
        out["stages"] = [C.owned.start, C.owned.stop]
    else:
        out["held"] = {
            "derivatives": sum(d.stored_bytes() for d in C.stage_derivatives()),
            "factors": _factor_bytes(F),
        }
    out["route"] = F.method
    dist.barrier()
    dist.destroy_process_group()
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))


def run_case(case: str, ranks: int, repeats: int) -> dict:
    single = mp.get_context("spawn").Pool(1)
    try:
        baseline = single.apply(run_single, (case, repeats))
    finally:
        single.close()
        single.join()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(
            run_rank, args=(ranks, store, case, repeats, tmp), nprocs=ranks, start_method="spawn"
        )
        per_rank = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(ranks)]
    return {"single": baseline, "ranks": per_rank}


# ---------------------------------------------------------------------- report
def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def report(results: dict, ranks: int) -> str:
    lines = [
        "# hessinv.distributed on one machine",
        "",
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, gloo, "
        f"{ranks} processes (one thread each) against one process; float64; "
        f"`python benchmarks/bench_distributed.py` ({time.strftime('%Y-%m-%d')}). Times are "
        "medians. *sent* is what hessinv counts per rank; *loopback* is what the loopback "
        "interface carried during the phase (every rank's sends with TCP/IP framing, and the "
        "barriers' few hundred bytes).",
    ]
    for case, res in results.items():
        cfg = CASES[case]
        single, per_rank = res["single"], res["ranks"]
        title = {
            "pipeline": "Stage pipeline, `PipelineHessian`",
            "data": "Data parallel, `DataParallelGGN`",
        }[case]
        lines += [
            "",
            f"## {title}: depth {cfg['depth']}, width {cfg['width']}, batch {cfg['batch']}, "
            f"{cfg['classes']} classes, damping {cfg['damping']:g}",
            "",
            f"Route: one process `{single['route']}`, {ranks} ranks `{per_rank[0]['route']}`"
            + (
                "; stages per rank: "
                + ", ".join(f"{r['stages'][0]}..{r['stages'][1] - 1}" for r in per_rank)
                if case == "pipeline"
                else ""
            )
            + ".",
            "",
            "| phase | one process (s) | "
            + " | ".join(f"rank {r} (s)" for r in range(ranks))
            + " | time ratio | sent per rank (bytes) | loopback (bytes) |",
            "|---|---:|" + "---:|" * ranks + "---:|---|---:|",
        ]
        for name in ("construction", "product", "factorization", "solve"):
            t1 = single[name]["time_s"]
            ts = [r[name]["time_s"] for r in per_rank]
            sent = ", ".join(str(r[name]["sent_bytes"]) for r in per_rank)
            lines.append(
                f"| {name} | {t1:.4f} | "
                + " | ".join(f"{t:.4f}" for t in ts)
                + f" | {max(ts) / t1:.2f} | {sent} | {per_rank[0][name]['loopback_bytes']} |"
            )
        lines += [
            "",
            "| memory (MiB) | one process | "
            + " | ".join(f"rank {r}" for r in range(ranks))
            + " |",
            "|---|---:|" + "---:|" * ranks,
        ]
        for k in per_rank[0]["held"]:
            one = single["held"].get(k)
            lines.append(
                f"| {k} (tensors held) | {_mib(one) if one is not None else '-'} | "
                + " | ".join(_mib(r["held"][k]) for r in per_rank)
                + " |"
            )
        for name in ("construction", "factorization"):
            lines.append(
                f"| peak RSS rise, {name} | {_mib(single[name]['peak_rise_bytes'])} | "
                + " | ".join(_mib(r[name]["peak_rise_bytes"]) for r in per_rank)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", nargs="?", const=str(DEFAULT_OUT), default=None)
    args = parser.parse_args(argv)
    results = {case: run_case(case, args.ranks, args.repeats) for case in args.parts}
    text = report(results, args.ranks)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
