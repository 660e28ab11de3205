"""``python -m paper [--quick | --full] [--device cpu|cuda] [--only E1 E3] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
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
    "E6": "paper.e6_deep_training",
    "E7": "paper.e7_least_squares",
}
_TITLES = {
    "E1": "cost against depth",
    "E2": "cost against width and batch",
    "E3": "accuracy against a float64 dense solve",
    "E4": "Hessian-vector products vs Pearlmutter",
    "E5": "training",
    "E6": "deep training: the paper's hope, tested",
    "E7": "full-batch least squares: where exact curvature wins",
}


_DESCRIPTION = """\
Reproduce the experiments behind A. Rahimi, "The Hessian of tall-skinny
networks is easy to invert" (arXiv 2601.06096) with hessinv. Each experiment
writes a figure (.png) and tables (.csv, .md) into --out; summary.md collects
every table of the run. What each one claims and measured: paper/README.md."""

#: one line of --help per experiment (``_TITLES`` are the headings of the output)
_SUMMARIES = {
    "E1": "cost against depth: time and memory of each method, linear vs dense",
    "E2": "cost against width and batch: the paper's solve vs the Riccati solve",
    "E3": "accuracy of both exact solves vs a float64 dense solve, indefinite H too",
    "E4": "our Hessian-vector products vs Pearlmutter's (torch.func): agreement, cost",
    "E5": "training a tall-skinny tanh MLP: exact Newton vs SGD, Adam, Hessian-free",
    "E6": "training tall-skinny nets: exact curvature vs SGD/Adam",
    "E7": "full-batch least squares: exact-GGN Levenberg-Marquardt vs L-BFGS, Adam",
}

_EPILOG = """\
examples:
  python -m paper                    every experiment, quick sizes
  python -m paper --only E1 E3       a subset
  python -m paper --full --device cuda"""


def _experiment_lines() -> str:
    """One line per registered experiment, for --help."""
    lines = ["experiments (all of them unless --only is given):"]
    lines += [f"  {name}  {_SUMMARIES.get(name, _TITLES.get(name, ''))}" for name in EXPERIMENTS]
    return "\n".join(lines)


def _threads(text: str) -> int:
    """An argparse ``type``: a number of threads, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m paper",
        epilog=_EPILOG,
        description=f"{_DESCRIPTION}\n\n{_experiment_lines()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=True,
        help="small sizes, a few minutes on 2 CPU cores (default: --quick)",
    )
    mode.add_argument(
        "--full",
        dest="quick",
        action="store_false",
        help="the full sizes, tens of minutes to hours on a CPU",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where to run (default: %(default)s)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="E",
        type=str.upper,
        choices=EXPERIMENTS,
        help=f"run only these experiments, e.g. --only E1 E3 "
        f"(default: all of {' '.join(EXPERIMENTS)})",
    )
    ap.add_argument(
        "--out",
        type=pathlib.Path,
        metavar="DIR",
        default=pathlib.Path(__file__).parent / "results",
        help="folder for the figures and tables (default: %(default)s)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the models and data (default: %(default)s)"
    )
    ap.add_argument(
        "--threads",
        type=_threads,
        default=1,
        metavar="N",
        help="torch CPU threads; multi-threaded small kernels are erratic on a "
        "shared machine (default: %(default)s)",
    )
    return ap


def _merged_summary(path, parts: list[str], selected: list[str]) -> str:
    """The new summary: this run's sections, plus the sections of experiments it did not run
    taken from the existing file (so that ``--only E3`` updates E3 and keeps the others)."""
    kept = {}
    if path.exists():
        pieces = re.split(r"^## (E\d+): ", path.read_text(), flags=re.M)
        for name, body in zip(pieces[1::2], pieces[2::2], strict=True):
            if name in _MODULES and name not in selected:
                kept[name] = f"## {name}: " + body.rstrip("\n") + "\n"
    ran = {part.split(":", 1)[0][3:]: part for part in parts[1:]}
    order = [name for name in _MODULES if name in ran or name in kept]
    return "\n".join([parts[0]] + [ran.get(name) or kept[name] for name in order])


def main(argv=None) -> int:
    ap = _build_parser()
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    cfg = Config(
        quick=args.quick, device=torch.device(args.device), outdir=args.out, seed=args.seed
    )
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
    summary = cfg.outdir / "summary.md"
    summary.write_text(_merged_summary(summary, parts, selected))
    print(f"\nwrote {summary}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
