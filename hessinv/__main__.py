"""The command line: ``python -m hessinv demo [options]``, also the ``hessinv`` console script.

Parsing and validation only; the demo itself is :mod:`hessinv.demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch

from hessinv.tools.demo import DTYPES, DemoConfig, format_report, run_demo

DESCRIPTION = "hessinv: the exact Hessian of deep chain networks, in time linear in depth."

DEMO_DESCRIPTION = """\
Solve two damped Newton systems of a deep, narrow tanh MLP (cross-entropy loss,
random data, right-hand side g = the gradient) and time every method:

  1. (H + eps I) x = g, H the exact Hessian, indefinite here: our exact solve
     against conjugate gradients (which stop at negative curvature), scipy's
     MINRES on our Hessian-vector products, and a dense torch.func.hessian
     solve as the independent reference (up to --dense-limit parameters).
  2. (G + eps I) x = g, G the Gauss-Newton matrix, positive definite: our
     exact solve against conjugate gradients (ours, scipy's) on our products.

It prints a table per system (time, products, error, residual), the exact
log-determinant and inertia, the backward error of our solves, and a "when to
use what" verdict computed from the measured rows. The default problem takes
about 6 CPU-seconds on one thread (mostly MINRES and the dense reference) and
1.5 GB of memory (mostly the dense reference; --dense-limit 0 skips it)."""

DEMO_EPILOG = """\
examples:
  python -m hessinv demo
  python -m hessinv demo --depth 64 --width 16 --batch 32 --dense-limit 0
  python -m hessinv demo --device cuda --dtype float32"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; every option's help names its default itself."""


# ----------------------------------------------------------------------------- value checks
def _int_at_least(low: int):
    """An argparse ``type``: an integer ``>= low``, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse ``type``: a finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _tolerance(text: str) -> float:
    """An argparse ``type``: a relative tolerance in ``(0, 1)``."""
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def _device(text: str) -> str:
    """An argparse ``type``: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (try cpu, cuda or cuda:0)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise argparse.ArgumentTypeError(f"cannot use device {text!r}: {err}") from None
    return text


# ----------------------------------------------------------------------------- parser
def _add_problem_options(demo: argparse.ArgumentParser, d: DemoConfig) -> None:
    group = demo.add_argument_group("the problem")
    group.add_argument(
        "--depth",
        type=_int_at_least(1),
        metavar="L",
        default=d.depth,
        help="number of Linear layers (default: %(default)s)",
    )
    group.add_argument(
        "--width",
        type=_int_at_least(1),
        metavar="W",
        default=d.width,
        help="width of the hidden layers (default: %(default)s)",
    )
    group.add_argument(
        "--batch",
        type=_int_at_least(1),
        metavar="B",
        default=d.batch,
        help="number of samples (default: %(default)s)",
    )
    group.add_argument(
        "--input",
        dest="d_in",
        type=_int_at_least(1),
        metavar="D",
        default=d.d_in,
        help="input features (default: %(default)s)",
    )
    group.add_argument(
        "--classes",
        dest="n_classes",
        type=_int_at_least(2),
        metavar="K",
        default=d.n_classes,
        help="output classes (default: %(default)s)",
    )
    group.add_argument(
        "--damping",
        type=_positive_float,
        metavar="EPS",
        default=d.damping,
        help="eps in (H + eps I) and (G + eps I) (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=_int_at_least(0),
        metavar="S",
        default=d.seed,
        help="seed of the weights and the data (default: %(default)s)",
    )


def _add_method_options(demo: argparse.ArgumentParser, d: DemoConfig) -> None:
    group = demo.add_argument_group("the methods")
    group.add_argument(
        "--rtol",
        type=_tolerance,
        metavar="TOL",
        default=None,
        help="relative residual ||(A x - g)|| / ||g|| the iterative methods stop "
        "at, and that every row is judged by (default: 1e-10 in float64, "
        "1e-4 in float32)",
    )
    group.add_argument(
        "--maxiter",
        type=_int_at_least(1),
        metavar="N",
        default=d.maxiter,
        help="at most this many products per iterative solve (default: %(default)s)",
    )
    group.add_argument(
        "--dense-limit",
        type=_int_at_least(0),
        metavar="N",
        default=d.dense_limit,
        help="skip the dense torch.func.hessian reference above this many "
        "parameters; the exact solve is then the reference "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--tridiagonal",
        action="store_true",
        default=d.tridiagonal,
        help="also time the paper's block-tridiagonal solve (about 3 s more at "
        "the default size) (default: off)",
    )


def _add_machine_options(demo: argparse.ArgumentParser, d: DemoConfig) -> None:
    group = demo.add_argument_group("the machine")
    group.add_argument(
        "--device",
        type=_device,
        metavar="DEV",
        default=d.device,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)",
    )
    group.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=d.dtype,
        help="precision of the model, the data and every solve (default: %(default)s)",
    )
    group.add_argument(
        "--threads",
        type=_int_at_least(1),
        metavar="N",
        default=1,
        help="torch CPU threads; more threads slow these small kernels down "
        "on a busy machine (default: %(default)s)",
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=d.progress,
        help="no progress bars (default: bars on stderr when it is a terminal)",
    )


def build_parser(prog: str = "hessinv") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo = commands.add_parser(
        "demo",
        help="when to use the exact solve, and when CG: measured on a deep narrow MLP",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=_HelpFormatter,
    )
    defaults = DemoConfig()
    _add_problem_options(demo, defaults)
    _add_method_options(demo, defaults)
    _add_machine_options(demo, defaults)
    demo.set_defaults(parser=demo)  # so that errors name the subcommand
    return parser


def _check_combination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that involve more than one option."""
    if args.dtype == "float32" and args.rtol is not None and args.rtol < 1e-6:
        parser.error(
            f"--rtol {args.rtol:g} is below what float32 can reach; "
            "use --rtol 1e-6 or more with --dtype float32"
        )


def _config(args: argparse.Namespace) -> DemoConfig:
    fields = (
        "depth",
        "width",
        "batch",
        "d_in",
        "n_classes",
        "damping",
        "rtol",
        "maxiter",
        "device",
        "dtype",
        "dense_limit",
        "tridiagonal",
        "seed",
        "progress",
    )
    return DemoConfig(**{name: getattr(args, name) for name in fields})


@contextlib.contextmanager
def _torch_threads(n: int):
    """Use ``n`` torch CPU threads inside the block, the previous number after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv=None, prog: str = "hessinv") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_combination(args.parser, args)
    with _torch_threads(args.threads):
        report = run_demo(_config(args))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m hessinv"))
