"""``python -m paper [--quick | --full] [--device cpu|cuda] [--only E1 E3] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time
import traceback

import torch

from . import EXPERIMENTS
from .common import Config

_MODULES = {
    "E1": "paper.e1_depth",
    "E2": "paper.e2_width_batch",
    "E3": "paper.e3_accuracy",
    "E4": "paper.e4_pearlmutter",
    "E5": "paper.e5_training",
}
_TITLES = {
    "E1": "cost against depth",
    "E2": "cost against width and batch",
    "E3": "accuracy against a float64 dense solve",
    "E4": "Hessian-vector products vs Pearlmutter",
    "E5": "training",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper", description=__doc__)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="small sizes, a few minutes on 2 CPU cores (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="the full sizes")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", nargs="+", metavar="E", type=str.upper, choices=EXPERIMENTS,
                    help="run only these experiments (E1 ... E5)")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: multi-threaded small kernels are "
                         "erratic on a shared machine)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    cfg = Config(quick=args.quick, device=torch.device(args.device), outdir=args.out, seed=args.seed)
    cfg.outdir.mkdir(parents=True, exist_ok=True)

    selected = args.only or list(EXPERIMENTS)
    mode_name = "quick" if cfg.quick else "full"
    parts = [
        f"# Results ({mode_name} mode, device {cfg.device}, {args.threads} CPU thread(s), "
        f"torch {torch.__version__}, seed {cfg.seed})\n"
    ]
    failures = 0
    for name in selected:
        print(f"\n=== {name}: {_TITLES[name]} ===", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(_MODULES[name])
        except ModuleNotFoundError as err:
            text = f"_{name} not run: {_MODULES[name]} could not be imported ({err})._\n"
            failures += name != "E5"
        else:
            try:
                text = module.run(cfg)
            except Exception:
                text = f"_{name} failed:_\n\n```\n{traceback.format_exc()}```\n"
                failures += 1
        elapsed = time.perf_counter() - t0
        print(text, flush=True)
        print(f"({name} took {elapsed:.1f} s)", flush=True)
        parts.append(f"## {name}: {_TITLES[name]} ({elapsed:.1f} s)\n\n{text}\n")
    (cfg.outdir / "summary.md").write_text("\n".join(parts))
    print(f"\nwrote {cfg.outdir / 'summary.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
