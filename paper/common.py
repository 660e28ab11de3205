"""Shared pieces of the paper experiments: configuration, models, timing, memory, output.

Everything here is deliberately small and dependency-light: ``torch``, ``numpy``,
``matplotlib`` (Agg backend) and ``tqdm``.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hessinv.tools import problems

__all__ = [
    "Config",
    "tall_skinny_mlp",
    "random_data",
    "make_problem",
    "Problem",
    "median_time",
    "peak_memory",
    "memory_method",
    "Budget",
    "write_table",
    "fit_loglog_slope",
    "loglog_figure",
    "progress",
    "synchronize",
    "fmt",
    "run_with_settings",
]

DTYPE = torch.float64


@dataclass(frozen=True)
class Config:
    """What every experiment gets: quick or full sizes, the device, where to write, a seed."""

    quick: bool
    device: torch.device
    outdir: pathlib.Path
    seed: int = 0


# ----------------------------------------------------------------------------- models, data


def tall_skinny_mlp(
    depth: int,
    width: int,
    d_in: int,
    n_classes: int,
    activation: str = "tanh",
    dtype: torch.dtype = DTYPE,
    device: torch.device | str = "cpu",
    *,
    gain: float | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """``depth`` Linear layers (``d_in -> width -> ... -> width -> n_classes``), activation between.

    Weights are drawn ``N(0, gain^2 / fan_in)`` with ``gain`` 1 for tanh-like activations
    and ``sqrt(2)`` for ReLU (close to the edge of chaos, so that deep nets neither
    saturate nor vanish and the Hessian is not just a multiple of eps); biases
    ``N(0, 0.1^2)`` (the shared builder :func:`hessinv.tools.problems.mlp`, ``init="fan_in"``).
    So ``depth`` is the number of stages ``L`` of ``hessinv``.
    """
    return problems.mlp(
        depth,
        width,
        d_in,
        n_classes,
        activation,
        init="fan_in",
        gain=gain,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def random_data(batch: int, d_in: int, n_classes: int, dtype=DTYPE, device="cpu", seed: int = 0):
    """Standard-normal inputs ``(batch, d_in)`` and uniform random class labels ``(batch,)``."""
    X, y, _ = problems.random_batch(
        batch, d_in, n_classes, "ce", dtype=dtype, device=device, data_seed=seed + 1
    )
    return X, y


@dataclass
class Problem:
    model: nn.Sequential
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    def hessian(self):
        import hessinv

        return hessinv.ChainHessian(self.model, self.loss_fn, self.X, self.y)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_problem(
    depth: int,
    width: int,
    batch: int,
    *,
    n_classes: int = 4,
    d_in: int | None = None,
    activation: str = "tanh",
    dtype=DTYPE,
    device="cpu",
    seed: int = 0,
) -> Problem:
    """A tall-skinny MLP with cross-entropy (mean) loss on a random batch."""
    d_in = width if d_in is None else d_in
    model = tall_skinny_mlp(depth, width, d_in, n_classes, activation, dtype, device, seed=seed)
    X, y = random_data(batch, d_in, n_classes, dtype, device, seed)
    return Problem(model, nn.CrossEntropyLoss(), X, y)


# ----------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    """Wait for queued kernels (CUDA); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object],
    repeats: int = 3,
    warmup: int = 1,
    device="cpu",
    budget_s: float | None = None,
) -> float:
    """Median wall time (seconds) of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    With ``budget_s``, stops repeating once that much time has been spent in total
    (at least one timed call is always made; a warm-up longer than the budget
    counts as the only measurement). Synchronizes CUDA around every call.
    """
    spent = 0.0
    times: list[float] = []
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        spent += dt
        if budget_s is not None and spent > budget_s:
            return dt
    for _ in range(max(1, repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if budget_s is not None and spent > budget_s:
            break
    return statistics.median(times)


class Budget:
    """Stops measuring a method at larger sizes once one measurement took too long or too much
    memory.

    ``allowed(name)`` is False after ``record(name, seconds)`` saw a time above ``max_s``
    (the next size would take at least as long again) or ``skip(name)`` was called.
    """

    def __init__(self, max_s: float):
        self.max_s = max_s
        self._stopped: dict[str, str] = {}

    def allowed(self, name: str) -> bool:
        return name not in self._stopped

    def record(self, name: str, seconds: float) -> None:
        if seconds > self.max_s:
            self._stopped[name] = f"stopped after a {seconds:.2f} s measurement"

    def skip(self, name: str, why: str) -> None:
        self._stopped.setdefault(name, why)

    def notes(self) -> dict[str, str]:
        return dict(self._stopped)


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _malloc_trim() -> None:
    """Return every free page of the glibc heap to the OS (so that reusing it counts again)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fixed_mmap_threshold(nbytes: int = 4096) -> None:
    """Make glibc serve every allocation above ``nbytes`` by mmap (returned on free).

    Otherwise glibc's adaptive threshold lets big freed blocks stay in the heap, and a
    later allocation reusing them would not show up as growth of the resident set.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give the top of the heap back at once
    except (OSError, AttributeError):
        pass


def memory_method(device) -> str:
    """How :func:`peak_memory` measures on this device (for the README and tables)."""
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated() growth"
    if hasattr(os, "fork") and os.path.exists("/proc/self/statm"):
        return (
            "peak-RSS growth (VmHWM after clear_refs) of a forked child running the whole "
            "computation"
        )
    return "unavailable"


def peak_memory(fn: Callable[[], object], device="cpu") -> float | None:
    """Peak extra memory (bytes) used while running ``fn()`` from scratch; ``None`` if unknown.

    * CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before.
    * CPU (Linux): ``fn`` runs in a forked child, which resets its resident-set high-water
      mark (``/proc/self/clear_refs``, value 5); the result is the child's peak resident
      set (``VmHWM``) minus its resident set right before ``fn``. ``fn`` runs twice in
      the child and the second run is measured: the first maps in the code pages it
      touches (a fresh child does not count the parent's file-backed pages). The child runs
      single-threaded (OpenMP pools do not survive fork) with
      glibc's mmap threshold fixed at 4 KiB, so that freed big blocks are returned to
      the OS and every new one counts. This is the real working set, allocator slack
      included, so small problems show a floor of a few hundred KB. Run a small warm-up
      in the parent first, so that lazy initialisation is not counted.
    """
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    if memory_method(device) == "unavailable":
        return None
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            # libgomp's thread pool does not survive fork(): run single-threaded here.
            if torch.get_num_threads() != 1:
                torch.set_num_threads(1)
            _fixed_mmap_threshold()
            # a first run maps in the library code pages fn touches (file-backed pages
            # are not in a fresh child's resident set) and returns its data to the OS
            fn()
            _malloc_trim()
            # the child inherits the parent's ru_maxrss; reset its own high-water mark
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss_bytes()
            fn()
            msg = str(max(_peak_rss_bytes() - base, 0))
        except BaseException as err:  # report, never propagate out of the child
            msg = "error " + repr(err)
            code = 1
        os.write(write_fd, msg.encode())
        os.close(write_fd)
        os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    if text.startswith("error"):
        return None
    return float(text)


# ----------------------------------------------------------------------------- output


def fmt(value) -> str:
    """Table formatting: 3 significant digits for floats, ``-`` for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if value == 0:
            return "0"
        return f"{value:.3g}"
    return str(value)


def write_table(rows: Sequence[dict], outdir: pathlib.Path, stem: str, title: str) -> str:
    """Write ``<stem>.csv`` (full precision) and ``<stem>.md`` (3 digits); return the markdown."""
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with open(outdir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k in columns) + " |")
    md = "\n".join(lines) + "\n"
    (outdir / f"{stem}.md").write_text(md)
    return md


def fit_loglog_slope(x: Iterable[float], y: Iterable[float], tail: int | None = None) -> float:
    """Least-squares slope of ``log y`` against ``log x`` over the valid points.

    Only positive finite pairs count. With ``tail``, only the ``tail`` largest ``x``
    are used (the asymptotic regime; fixed overheads flatten the small sizes).
    Returns NaN with fewer than two points.
    """
    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y, strict=True)
        if a is not None
        and b is not None
        and a > 0
        and b > 0
        and math.isfinite(a)
        and math.isfinite(b)
    ]
    pairs.sort()
    if tail is not None:
        pairs = pairs[-tail:]
    if len(pairs) < 2:
        return float("nan")
    lx = np.log([p[0] for p in pairs])
    ly = np.log([p[1] for p in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


_STYLE = {
    "derivatives": ("tab:gray", "o", ":"),
    "matvec": ("tab:blue", "o", "-"),
    "riccati": ("tab:green", "s", "-"),
    "tridiagonal": ("tab:orange", "^", "-"),
    "cg": ("tab:purple", "v", "--"),
    "dense": ("tab:red", "D", "--"),
    "pearlmutter": ("tab:red", "D", "-"),
}


def loglog_figure(
    ax, x, series: dict[str, Sequence], *, tail: int = 4, xlabel="", ylabel="", title=""
):
    """Log-log lines of ``series[name]`` (``None`` = not measured) against ``x``; slopes in the
    legend."""
    for name, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None and b > 0]
        if not pts:
            continue
        slope = fit_loglog_slope([p[0] for p in pts], [p[1] for p in pts], tail=tail)
        color, marker, ls = _STYLE.get(name.split(" ")[0], (None, "o", "-"))
        label = f"{name} (slope {slope:.2f})" if math.isfinite(slope) else name
        ax.loglog(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker=marker,
            linestyle=ls,
            color=color,
            label=label,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def new_figure(ncols: int = 2, width: float = 11.0, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height))
    return fig, np.atleast_1d(axes)


def save_figure(fig, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(items, desc: str, quiet: bool = False):
    """A tqdm bar on stderr (plain iteration when tqdm is missing or ``quiet``)."""
    items = list(items)
    if quiet:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------- spectrum


def positive_definite_shift(H, margin: float = 1.25, rel_tol: float = 0.02):
    """A damping ``eps`` making ``H + eps I`` positive definite: ``margin * (-lambda_min)``.

    ``-lambda_min(H)`` comes from :meth:`hessinv.ChainHessian.positive_definite_shift`
    (Lanczos, certified by the exact inertia). Returns
    ``(eps, lambda_min_estimate)``; ``(0.0, None)`` if ``H`` is positive definite.
    """
    shift = H.positive_definite_shift(rel_tol=rel_tol)
    if shift == 0.0:
        return 0.0, None
    return margin * shift, -shift


class Batches:
    """A reproducible stream of mini-batch indices: epochs of a seeded permutation."""

    def __init__(self, n: int, batch: int, seed: int, device):
        self.n, self.batch, self.device = n, batch, device
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx.to(self.device)


class TorchOptimizerStep:
    """One step of a ``torch.optim`` optimizer on a batch: the first-order baselines of E5, E6.

    ``step(X, y)`` returns the batch loss before the step."""

    def __init__(self, model, loss_fn, opt):
        self.model, self.loss_fn, self.opt = model, loss_fn, opt

    def step(self, X, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(X), y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def run_with_settings(name: str, settings: Callable, body: Callable, cfg, overrides: dict) -> str:
    """Run experiment ``name``: ``body(cfg, st)`` with ``st = settings(cfg)`` updated by
    ``overrides`` (``TypeError`` for a key ``settings`` does not have), on one torch thread
    (small dense kernels; other jobs share the cores), the thread count restored after."""
    unknown = set(overrides) - set(settings(cfg))
    if unknown:
        raise TypeError(f"unknown {name} settings {sorted(unknown)}")
    st = {**settings(cfg), **overrides}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return body(cfg, st)
    finally:
        torch.set_num_threads(threads)
