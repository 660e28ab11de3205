"""Parameter subsets with frozen middle layers: what building the Hessian of two weights of
a deep MLP costs, against ``hessinv.dense_hessian`` on the same two tensors.

A 32-layer tanh MLP (63 modules, width ``--width``, input 8, 4 classes, batch ``--batch``,
float64, 1 thread); only ``0.weight`` and the last layer's weight are selected (the other
parameters have ``requires_grad=False``). The layers between are frozen tails of the first
stage (docs/algorithm.md section 2): they cost products through their input, not a
derivative sweep. Prints the medians of ``--repeats`` constructions of ``ChainHessian`` and
of ``dense_hessian``, and their agreement. Run it on an older checkout with
``PYTHONPATH=<checkout> python benchmarks/bench_frozen.py`` for a before/after in one sitting.

    python benchmarks/bench_frozen.py                  # width 64, batch 64
    python benchmarks/bench_frozen.py --width 16 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import hessinv


def build(width: int, batch: int, depth: int = 32):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, width)]
    for _ in range(depth - 2):
        layers += [nn.Tanh(), nn.Linear(width, width)]
    layers += [nn.Tanh(), nn.Linear(width, 4)]
    model = nn.Sequential(*layers).double()
    names = ["0.weight", f"{len(layers) - 1}.weight"]
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    X = torch.randn(batch, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,))
    return model, nn.CrossEntropyLoss(), X, y, names


def timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, loss, X, y, names = build(args.width, args.batch)
    t_h, H = timed(
        lambda: hessinv.ChainHessian(model, loss, X, y, params=names, progress=False),
        args.repeats,
    )
    t_d, D = timed(lambda: hessinv.dense_hessian(model, loss, X, y), args.repeats)
    M = H @ torch.eye(H.num_params, dtype=torch.float64)
    print(f"hessinv {hessinv.__version__} from {hessinv.__file__}")
    print(f"width {args.width}, batch {args.batch}, {len(model)} modules, params {names}")
    print(f"ChainHessian construction: {t_h:.3f} s (median of {args.repeats})")
    print(f"dense_hessian on the same tensors: {t_d:.3f} s")
    print(f"n = {H.num_params}, relative difference {float((M - D).norm() / D.norm()):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
