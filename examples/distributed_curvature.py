"""Exact curvature on several processes (``hessinv.distributed``), launched with ``torchrun``.

What it shows, on a depth-8, width-32 tanh MLP (float64, gloo on CPUs, NCCL on GPUs):

1. **Data parallel.** Each rank takes its shard of the training set, as a
   ``DistributedSampler`` would give it, and builds ``DataParallelGGN`` on it. The gradient,
   ``G v``, ``logdet(G + lam I)`` and the solve are those of the whole set (checked here
   against one process on the concatenated batch), the same on every rank. Then
   ``DampedNewton(..., process_group=WORLD)`` takes Levenberg-Marquardt steps on the shards:
   every rank takes the same step.
2. **Stage pipeline.** ``PipelineGGN`` splits the chain's stages between the ranks: each
   keeps only its stages' derivatives and factors, the state of the factorization passes
   from rank to rank.

It prints what each phase sent (bytes, per rank) and the largest difference from one
process.

Run it::

    torchrun --nproc-per-node 2 examples/distributed_curvature.py
    torchrun --nproc-per-node 2 examples/distributed_curvature.py --small   # seconds

(``python -m torch.distributed.run`` is the same as ``torchrun``.)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import hessinv
from hessinv.distributed import DataParallelGGN, PipelineGGN

DT = torch.float64


def make_problem(n: int, width: int, depth: int, seed: int = 0):
    """A regression of a smooth function of 6 inputs: the data and the model (the same on
    every rank: seeded)."""
    g = torch.Generator().manual_seed(seed)
    X = 2 * torch.rand(n, 6, generator=g, dtype=DT) - 1
    y = torch.stack([torch.sin(3 * X[:, 0]) * X[:, 1], torch.cos(2 * X[:, 2] + X[:, 3])], 1)
    torch.manual_seed(seed)
    sizes = [6] + [width] * (depth - 1) + [2]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT), X, y


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def run(args: argparse.Namespace) -> dict:
    """The demonstration on an initialised process group; returns rank 0's numbers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lam = args.damping
    model, X, y = make_problem(args.samples, args.width, args.depth)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":  # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    model, X, y = model.to(device), X.to(device), y.to(device)
    loss_fn = nn.MSELoss()
    shard = slice(rank, None, world)  # what DistributedSampler(shuffle=False) gives rank r
    out: dict = {"ranks": world}

    # 1. data parallel: the shards' union
    G = DataParallelGGN(model, loss_fn, X[shard], y[shard])
    g = G.gradient()
    v = torch.randn(G.num_params, generator=torch.Generator().manual_seed(1), dtype=DT).to(device)
    Gv = G @ v
    F = G.factorize(lam)
    x = F.solve(g)
    one = hessinv.ChainGGN(
        model,
        loss_fn,
        torch.cat([X[r::world] for r in range(world)]),
        torch.cat([y[r::world] for r in range(world)]),
    )
    ref_F = one.factorize(lam)
    out["data parallel"] = {
        "n": G.num_params,
        "samples per rank": G.batch_sizes,
        "route": F.method,
        "gradient": _rel(g, one.gradient()),
        "G v": _rel(Gv, one @ v),
        "logdet": abs(float(F.logdet()[1] - ref_F.logdet()[1])) / abs(float(ref_F.logdet()[1])),
        "solve": _rel(x, ref_F.solve(g)),
        "bytes sent": dict(G.comm.traffic),
    }
    opt = hessinv.DampedNewton(
        model, loss_fn, curvature="ggn", damping=1e-3, process_group=dist.group.WORLD
    )
    losses = [opt.step(X[shard], y[shard]) for _ in range(args.steps)]
    out["damped newton losses"] = losses

    # 2. stage pipeline: each rank keeps its stages
    P = PipelineGGN(model, loss_fn, X, y)
    PF = P.factorize(lam)
    xp = PF.solve(P.gradient())
    one = hessinv.ChainGGN(model, loss_fn, X, y)
    ref_PF = one.factorize(lam, method="riccati")
    mine = {"derivatives": P.memory()["derivatives"], "factors": PF.memory()["factors"]}
    held = torch.tensor([mine["derivatives"], mine["factors"]], dtype=torch.float64)
    everyone = [torch.zeros_like(held) for _ in range(world)]
    dist.all_gather(everyone, held)
    out["pipeline"] = {
        "stages per rank": [P.bounds[r + 1] - P.bounds[r] for r in range(world)],
        "bytes held per rank (derivatives, factors)": [tuple(int(b) for b in e) for e in everyone],
        "solve": _rel(xp, ref_PF.solve(one.gradient())),
        "logdet": abs(float(PF.logdet()[1] - ref_PF.logdet()[1])) / abs(float(ref_PF.logdet()[1])),
        "inertia equal": PF.inertia() == ref_PF.inertia(),
        "bytes sent": dict(P.comm.traffic),
    }
    return out


def _print(out: dict) -> None:
    for part in ("data parallel", "pipeline"):
        print(f"## {part} ({out['ranks']} ranks)")
        for key, value in out[part].items():
            if key == "bytes sent":
                print("| phase | bytes sent by rank 0 |\n|---|---:|")
                for phase, b in value.items():
                    print(f"| {phase} | {b} |")
            elif isinstance(value, float):
                print(f"- {key}: relative difference from one process {value:.1e}")
            else:
                print(f"- {key}: {value}")
    print(
        "DampedNewton on the shards, loss per step:",
        ", ".join(f"{f:.4g}" for f in out["damped newton losses"]),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a few seconds (the tests)")
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args(argv)
    args.samples, args.width, args.depth, args.steps = (
        (48, 8, 4, 2) if args.small else (512, 32, 8, 5)
    )
    started = not dist.is_initialized()
    if started:  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        if "RANK" not in os.environ:
            parser.error(
                "launch with torchrun --nproc-per-node 2 examples/distributed_curvature.py"
            )
        torch.set_num_threads(1)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        out = run(args)
        if dist.get_rank() == 0:
            _print(out)
        return out
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
