"""The Laplace log marginal likelihood: ``hessinv.LaplaceGGN`` against laplace-torch.

sklearn's digits (the first N = 128 images, 64 standardized pixels, 10 classes), tanh MLPs
of width 16 whose ``depth`` counts the ``nn.Linear`` layers (64 -> 16 -> ... -> 16 -> 10),
float64, one torch thread. Each network (orthogonal weights, gain 1.2, zero biases) is first
trained to the MAP of cross-entropy with a Gaussian prior of precision 1 (300 full-batch
Adam steps, lr 3e-3: 100% training accuracy, about 80% on the next 128 images), then:

* ``marglik`` -- depth 4, 8, 16, 32: the log marginal likelihood of the Laplace
  approximation with the GGN as Hessian at prior precision 1, end to end from the model:
  ours (``LaplaceGGN(...)`` + ``log_marginal_likelihood()``: the derivative sweep, the Gram
  matrix ``U U^T``, one Cholesky factorization; docs/algorithm.md section 16) against
  laplace-torch's ``Laplace(model, "classification", hessian_structure="full" | "kron")``
  + ``fit`` + ``log_marginal_likelihood`` (its default backend, curvlinops' GGN). Also ours
  at a second scalar prior (the Gram matrix kept) and with one prior per parameter tensor
  (value and gradient: a weighted Gram matrix and one more sweep), and the values.
* ``tuning`` -- depth 4: ``optimize_prior_precision`` (scalar prior, Adam on ``log P``, 100
  steps, lr 0.1, from 1), ours against laplace-torch's (full and kron), and the predictive
  covariance of 128 test images against laplace-torch's ``functional_variance``.

laplace-torch is not a dependency. It runs from a separate virtual environment that shares
this torch (never let pip install another torch there):

    python -m venv /tmp/lt-venv --system-site-packages
    /tmp/lt-venv/bin/pip install --no-deps laplace-torch torchmetrics lightning-utilities \\
        asdfghjkl==0.1a4
    /tmp/lt-venv/bin/python benchmarks/bench_laplace.py --out   # writes results/bench_laplace.md

With a Python where laplace-torch does not import, its columns are skipped (with a note) and
the dense closed form (``torch.func`` Jacobian, ``slogdet``) is the reference instead.

The default dtype is set to float64: laplace-torch's full GGN is ``linop @ torch.eye(n)``
with torch's default dtype, and a float32 identity gives a GGN off by about 3e-8 relative
(the part ``--parts marglik`` reports in its notes).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import hessinv

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_laplace.md"
N, WIDTH, CLASSES = 128, 16, 10
DEPTHS = (4, 8, 16, 32)
PARTS = ("marglik", "tuning")


def laplace_torch():
    """laplace-torch's ``Laplace`` and its version, or ``(None, reason)``."""
    try:
        from importlib.metadata import version

        from laplace import Laplace
    except Exception as err:  # noqa: BLE001 -- any import failure skips the comparison
        return None, f"laplace-torch not importable here ({type(err).__name__}: {err})"
    return Laplace, version("laplace-torch")


# ----------------------------------------------------------------------------- the problem
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float64)
    X = (X - X[:N].mean(0)) / (X[:N].std(0) + 1.0)
    y = torch.tensor(d.target)
    return X[:N], y[:N], X[N : 2 * N], y[N : 2 * N]


def trained_mlp(depth: int, X: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Sequential:
    """``depth`` Linear layers with tanh between; trained to the MAP with prior precision 1."""
    torch.manual_seed(depth)
    layers: list[nn.Module] = [nn.Linear(X.shape[1], WIDTH), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    layers.append(nn.Linear(WIDTH, CLASSES))
    model = nn.Sequential(*layers).double()
    for m in model:  # near-isometric tanh layers: default-initialized ones collapse past depth 8
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain=1.2)
            nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y, reduction="sum")
        loss = loss + 0.5 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


def now() -> float:
    return time.perf_counter()


def timed(fn, repeats: int):
    """``(median seconds, last value)`` over ``repeats`` runs."""
    times, value = [], None
    for _ in range(repeats):
        t = now()
        value = fn()
        times.append(now() - t)
    return statistics.median(times), value


def dense_marglik(model, X, y, P: float = 1.0) -> float:
    """The closed form with a dense Jacobian (``torch.func.jacrev``) and ``slogdet``."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def f(flat):
        ps, i = {}, 0
        for k, p in params.items():
            ps[k] = flat[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.func.functional_call(model, ps, (X,))

    J = torch.func.jacrev(f)(theta).reshape(-1, theta.numel())
    out = model(X).detach()
    p = torch.softmax(out, 1)
    Jb = J.reshape(X.shape[0], CLASSES, -1)
    G = torch.einsum("bkn,bk,bkm->nm", Jb, p, Jb) - torch.einsum("bk,bkn,bl,blm->nm", p, Jb, p, Jb)
    G.diagonal().add_(P)
    log_lik = -nn.functional.cross_entropy(out, y, reduction="sum")
    logdet_ratio = torch.linalg.slogdet(G)[1] - theta.numel() * math.log(P)
    return float(log_lik - 0.5 * (logdet_ratio + P * (theta @ theta)))


# ----------------------------------------------------------------------------- the parts
def ours_marglik(model, X, y):
    return hessinv.LaplaceGGN(model, "classification", X, y).log_marginal_likelihood()


def lt_marglik(Laplace, model, X, y, structure: str):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, y), batch_size=N)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    t = now()
    la.fit(loader)
    fit = now() - t
    t = now()
    value = la.log_marginal_likelihood(torch.tensor(1.0, dtype=torch.float64))
    return fit, now() - t, float(value)


def part_marglik(depths, repeats: int, data, lt) -> tuple[list[str], list[str]]:
    X, y, Xt, yt = data
    Laplace, lt_version = lt
    rows, notes = [], []
    for depth in depths:
        model = trained_mlp(depth, X, y)
        with torch.no_grad():
            acc = [float((model(a).argmax(1) == b).double().mean()) for a, b in ((X, y), (Xt, yt))]
        ours_marglik(model, X, y)  # warm-up
        t_ours, v_ours = timed(lambda m=model: ours_marglik(m, X, y), repeats)
        la = hessinv.LaplaceGGN(model, "classification", X, y)
        la.log_marginal_likelihood(1.0)
        t_second, _ = timed(lambda la=la: la.log_marginal_likelihood(2.0 + 1e-3 * now()), repeats)
        P = torch.linspace(0.5, 2.0, len(la.param_names), dtype=torch.float64)
        t_layer, _ = timed(
            lambda la=la, P=P: la.log_marginal_likelihood_grad(P * (1 + 1e-9 * now())),
            max(1, repeats // 2),
        )
        row = {
            "depth": depth,
            "n": la.num_params,
            "ours": t_ours,
            "second": t_second,
            "layer": t_layer,
            "v_ours": float(v_ours),
            "acc": f"{acc[0]:.2f} / {acc[1]:.2f}",
        }
        if Laplace is not None:
            runs = 1 if depth >= 16 else repeats
            full = [lt_marglik(Laplace, model, X, y, "full") for _ in range(runs)]
            kron = [lt_marglik(Laplace, model, X, y, "kron") for _ in range(repeats)]
            row["full_fit"] = statistics.median(r[0] for r in full)
            row["full_lml"] = statistics.median(r[1] for r in full)
            row["full"] = statistics.median(r[0] + r[1] for r in full)
            row["v_full"] = full[-1][2]
            row["kron"] = statistics.median(r[0] + r[1] for r in kron)
            row["v_kron"] = kron[-1][2]
        else:
            t = now()
            row["v_dense"] = dense_marglik(model, X, y)
            row["dense"] = now() - t
        rows.append(row)
        print(f"  depth {depth}: {row}", flush=True)

    cols = [
        "depth",
        "n",
        "accuracy: train / next 128",
        "ours: model to value (s)",
        "ours, another scalar P (s)",
        "ours, layerwise P: value + gradient (s)",
    ]
    if Laplace is not None:
        cols += [
            "laplace-torch full: fit + value (s)",
            "full / ours",
            "laplace-torch kron (s)",
            "ours: log marg. lik.",
            "full: log marg. lik.",
            "rel. difference",
            "kron: log marg. lik.",
        ]
    else:
        cols += [
            "dense closed form (s)",
            "ours: log marg. lik.",
            "dense: log marg. lik.",
            "rel. difference",
        ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        head = f"| {r['depth']} | {r['n']:,} | {r['acc']} | {r['ours']:.3g} | {r['second']:.3g} |"
        head += f" {r['layer']:.3g} |"
        if Laplace is not None:
            rel = abs(r["v_full"] - r["v_ours"]) / abs(r["v_full"])
            lines.append(
                head + f" {r['full']:.3g} ({r['full_fit']:.3g} + {r['full_lml']:.3g}) |"
                f" {r['full'] / r['ours']:.0f}x | {r['kron']:.3g} | {r['v_ours']:.12g} |"
                f" {r['v_full']:.12g} | {rel:.1e} | {r['v_kron']:.6g} |"
            )
        else:
            rel = abs(r["v_dense"] - r["v_ours"]) / abs(r["v_dense"])
            lines.append(
                head + f" {r['dense']:.3g} | {r['v_ours']:.12g} | {r['v_dense']:.12g} | {rel:.1e} |"
            )
    if Laplace is not None:
        # the same at torch's default float32 dtype (laplace-torch's identity in float32)
        torch.set_default_dtype(torch.float32)
        try:
            model = trained_mlp(depths[0], X, y)
            _, _, v32 = lt_marglik(Laplace, model, X, y, "full")
        finally:
            torch.set_default_dtype(torch.float64)
        v = float(ours_marglik(model, X, y))
        notes.append(
            f"With torch's default dtype left at float32, laplace-torch's full GGN is "
            f"`linop @ torch.eye(n)` with a float32 identity: at depth {depths[0]} its log "
            f"marginal likelihood then differs from ours by {abs(v32 - v) / abs(v):.1e} "
            "relative (the rows above set the default dtype to float64)."
        )
    else:
        notes.append(f"laplace-torch skipped: {lt_version}.")
    return lines, notes


def part_tuning(data, lt, depth: int = 4) -> tuple[list[str], list[str]]:
    X, y, Xt, _ = data
    Laplace, _ = lt
    model = trained_mlp(depth, X, y)
    lines = [
        f"Depth {depth}, scalar prior, Adam on log P, 100 steps, lr 0.1, from P = 1 "
        "(laplace-torch's defaults for `optimize_prior_precision(method='marglik')`); times "
        "include the model to Laplace step (ours: construction; laplace-torch: `fit`).",
        "",
        "| method | time (s) | tuned P | log marg. lik. at tuned P |",
        "|---|---:|---:|---:|",
    ]
    t = now()
    la = hessinv.LaplaceGGN(model, "classification", X, y)
    P = la.optimize_prior_precision("scalar", 1.0, n_steps=100, lr=0.1)
    t_ours = now() - t
    v_ours = float(la.log_marginal_likelihood())
    lines.append(f"| ours (`LaplaceGGN`) | {t_ours:.3g} | {float(P):.10g} | {v_ours:.12g} |")
    notes = []
    if Laplace is None:
        return lines, notes
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(X, y), batch_size=N)
    for structure in ("full", "kron"):
        t = now()
        lt = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        lt.fit(loader)
        lt.optimize_prior_precision(
            pred_type="glm",
            method="marglik",
            n_steps=100,
            lr=0.1,
            init_prior_prec=1.0,
            prior_structure="scalar",
        )
        elapsed = now() - t
        Plt = float(lt.prior_precision)
        v = float(lt.log_marginal_likelihood())
        lines.append(f"| laplace-torch {structure} | {elapsed:.3g} | {Plt:.10g} | {v:.12g} |")
        if structure == "full":
            notes.append(
                f"Tuned P, ours against laplace-torch full: {abs(Plt - float(P)) / float(P):.1e} "
                f"relative; time ratio {elapsed / t_ours:.0f}x."
            )
            # the predictive covariance of 128 test images at the tuned prior
            t = now()
            V = la.posterior_variance(Xt)
            t_var = now() - t
            t = now()
            Js, _ = lt.backend.jacobians(Xt)
            W = lt.functional_variance(Js)
            t_lt = now() - t
            rel = float((V - W).abs().max() / W.abs().max())
            notes.append(
                f"Predictive covariance `posterior_variance` of {Xt.shape[0]} test images "
                f"({Xt.shape[0]} x {CLASSES} x {CLASSES}) against laplace-torch's "
                f"`functional_variance(jacobians)`: max difference {rel:.1e} relative to the "
                f"largest entry; {t_var:.3g} s against {t_lt:.3g} s (its posterior covariance "
                "already computed by the tuning)."
            )
    return lines, notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", nargs="?", const=str(DEFAULT_OUT), default=None)
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    lt = laplace_torch()
    data = digits()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = [
        f"# bench_laplace: torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), "
        f"laplace-torch {lt[1] if lt[0] is not None else 'not available'}",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')}, load average {load:.2f} at the start. sklearn "
        f"digits, N = {N}, tanh MLP width {WIDTH}, {CLASSES} classes, float64, trained to the "
        "MAP with prior precision 1. Times: medians of --repeats runs (one run for "
        "laplace-torch full at depth >= 16), in one process, ours first.",
    ]
    if "marglik" in args.parts:
        lines, notes = part_marglik(args.depths, args.repeats, data, lt)
        text += ["", "## Log marginal likelihood, prior precision 1", "", *lines, ""]
        text += [f"- {n}" for n in notes]
    if "tuning" in args.parts:
        lines, notes = part_tuning(data, lt)
        text += ["", "## Tuning the prior precision; the predictive covariance", "", *lines, ""]
        text += [f"- {n}" for n in notes]
    report = "\n".join(text) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
