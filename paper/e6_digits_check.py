"""E6 check: the digits run as a new user would write it, one process, no harness.

sklearn's digits (E6's standardised, stratified 80/20 split), a tanh MLP of depth 8 and
width 32 (E6's model: ``64 -> 32 x 7 -> 10``, Kaiming init, zero biases, float64), mini-batches
of 32 from one seeded stream (the same batches for every method), 80 steps. Methods, with
the library's defaults except where the README's example sets a value:

* ``LM-GGN``: ``hessinv.DampedNewton(model, loss, lr=1.0, damping=1e-2, curvature="ggn")``;
* ``TR-GGN``: ``hessinv.TrustRegionNewton(model, loss, curvature="ggn")``;
* ``TrustRegion``: ``hessinv.TrustRegionNewton(model, loss)`` (the Hessian);
* ``Newton-H``: ``hessinv.DampedNewton(model, loss, lr=1.0, damping=1e-2)`` (the Hessian);
* ``LM-GGN-riccati``: ``LM-GGN`` with every factorization forced onto the Riccati route
  (what ``DampedNewton(curvature="ggn")`` did before the output space was the default);
* ``Adam``: ``torch.optim.Adam(model.parameters(), lr=1e-3)``;
* ``Adam+eval``: the same steps, with the full train loss and test accuracy evaluated after
  every step, and that evaluation timed with the steps.

Every row: the full-train-set loss and the test accuracy after the 80 steps, the wall-clock
of the 80 steps (evaluation excluded, except in ``Adam+eval``), the median step, and for the
curvature methods the factorizations per step (``opt.last_step["factorizations"]``: new
factorizations; the output space's kept eigendecomposition serves every damping for free)
and the accepted steps. It imports ``hessinv`` from wherever ``PYTHONPATH`` points, so the
same file runs an older checkout::

    python paper/e6_digits_check.py --label new --out new.jsonl
    PYTHONPATH=/tmp/old python paper/e6_digits_check.py --label old --out old.jsonl

(run as a file, not with ``-m``, so that the current directory does not shadow
``PYTHONPATH``). One JSON line per run is appended to ``--out``; ``--table`` prints the
markdown table of one or more such files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
from torch import nn

DT = torch.float64
METHODS = ("LM-GGN", "TR-GGN", "TrustRegion", "Newton-H", "LM-GGN-riccati", "Adam", "Adam+eval")


def load_data():
    """E6's digits: standardised with the training split's statistics, stratified 80/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = Xtr.mean(axis=0), Xtr.std(axis=0)
    std[std == 0] = 1.0
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    return (
        torch.as_tensor(Xtr, dtype=DT),
        torch.as_tensor(ytr, dtype=torch.long),
        torch.as_tensor(Xte, dtype=DT),
        torch.as_tensor(yte, dtype=torch.long),
    )


def make_model(depth: int, width: int, seed: int) -> nn.Sequential:
    """E6's tanh MLP: Kaiming-normal weights (gain 5/3, the last layer 1), zero biases."""
    torch.manual_seed(seed)
    sizes = [64] + [width] * (depth - 1) + [10]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        nonlin = "tanh" if i < depth - 1 else "linear"
        nn.init.kaiming_normal_(lin.weight, mode="fan_in", nonlinearity=nonlin)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


def batch_stream(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches: epochs of a seeded permutation (as ``paper.common.Batches``)."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos, out = torch.randperm(n, generator=gen), 0, []
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos : pos + batch])
        pos += batch
    return out


def evaluate(model, loss_fn, data) -> tuple[float, float]:
    """(full train loss, test accuracy)."""
    Xtr, ytr, Xte, yte = data
    with torch.no_grad():
        return (
            float(loss_fn(model(Xtr), ytr)),
            float((model(Xte).argmax(1) == yte).double().mean()),
        )


def _riccati_ggn(model, loss_fn, X, y):
    """A ``ChainGGN`` whose factorizations take the Riccati route (the pre-output-space one)."""
    import hessinv

    class RiccatiGGN(hessinv.ChainGGN):
        def factorize(self, damping=0.0, method="riccati", **kwargs):
            return super().factorize(damping, method="riccati", **kwargs)

    return RiccatiGGN(model, loss_fn, X, y, progress=False)


def make_optimizer(name: str, model, loss_fn):
    import hessinv

    if name == "LM-GGN":
        return hessinv.DampedNewton(model, loss_fn, lr=1.0, damping=1e-2, curvature="ggn")
    if name == "LM-GGN-riccati":
        return hessinv.DampedNewton(model, loss_fn, lr=1.0, damping=1e-2, curvature=_riccati_ggn)
    if name == "Newton-H":
        return hessinv.DampedNewton(model, loss_fn, lr=1.0, damping=1e-2)
    if name == "TR-GGN":
        return hessinv.TrustRegionNewton(model, loss_fn, curvature="ggn")
    if name == "TrustRegion":
        return hessinv.TrustRegionNewton(model, loss_fn)
    if name in ("Adam", "Adam+eval"):
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    raise ValueError(name)


def run(name: str, *, depth: int, width: int, batch: int, steps: int, seed: int, data) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    model = make_model(depth, width, seed)
    opt = make_optimizer(name, model, loss_fn)
    first_order = name.startswith("Adam")
    Xtr, ytr = data[0], data[1]
    step_s, facts, accepted, routes, evals = [], [], 0, {}, []
    total = 0.0
    for idx in batch_stream(Xtr.shape[0], batch, steps, seed + 1000):
        X, y = Xtr[idx], ytr[idx]
        t0 = time.perf_counter()
        if first_order:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
        else:
            opt.step(X, y)
        t1 = time.perf_counter()
        evals.append(evaluate(model, loss_fn, data))  # untimed, except in Adam+eval
        t2 = time.perf_counter()
        step_s.append(t1 - t0)
        # Adam+eval: what a loop that prints the train loss and test accuracy every step costs
        total += (t2 - t0) if name == "Adam+eval" else (t1 - t0)
        if not first_order:
            last = opt.last_step
            facts.append(int(last.get("factorizations", 0)))
            accepted += bool(last.get("accepted", False))
            if last.get("method"):
                routes[last["method"]] = routes.get(last["method"], 0) + 1
    train_loss, test_acc = evals[-1]
    import hessinv

    return dict(
        method=name,
        steps=steps,
        train_loss=train_loss,
        test_acc=test_acc,
        wall_s=total,  # the steps (and, for Adam+eval, the evaluations after them)
        steps_s=sum(step_s),
        median_step_s=statistics.median(step_s),
        first_step_s=step_s[0],
        factorizations=facts,
        accepted=accepted if not first_order else None,
        routes=routes,
        curve=evals,  # (full train loss, test accuracy) after each step
        hessinv=hessinv.__file__,
    )


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def table(paths: list[str]) -> str:
    """Markdown: one row per (label, method); the wall-clock is the median over the repeats
    (each repeat's in brackets), the rest is from the first run (the runs are deterministic)."""
    rows: dict = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rows.setdefault((r["label"], r["method"]), []).append(r)
    out = [
        "| code | method | train loss | test acc | train loss, steps 71-80 (min-max) | "
        "wall-clock of the steps (s): median (runs) | median step (s) | "
        "factorizations per step: min / median / max (total) | accepted |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for (label, method), rs in rows.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        step = statistics.median(r["median_step_s"] for r in rs)
        r = rs[0]
        f = r["factorizations"]
        fact = (
            f"{min(f)} / {statistics.median(f):g} / {max(f)} ({sum(f)})"
            if f and not method.startswith("Adam")
            else "-"
        )
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in rs)
        tail = [c[0] for c in r.get("curve", [])[-10:]]
        spread = f"{min(tail):.3g}-{max(tail):.3g}" if tail else "-"
        out.append(
            f"| {label} | {method} | {_fmt(r['train_loss'])} | {_fmt(r['test_acc'])} | {spread} "
            f"| {wall:.2f} ({walls}) | {step:.3g} | {fact} | "
            f"{'-' if r['accepted'] is None else r['accepted']} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="new")
    ap.add_argument("--out", help="append one JSON line per run to this file")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print the table of these files")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    torch.set_num_threads(args.threads)
    data = load_data()
    for name in args.methods:
        r = run(
            name,
            depth=args.depth,
            width=args.width,
            batch=args.batch,
            steps=args.steps,
            seed=args.seed,
            data=data,
        )
        r.update(label=args.label, depth=args.depth, width=args.width, batch=args.batch)
        f = r["factorizations"]
        print(
            f"{args.label} {name}: train loss {r['train_loss']:.4g}, test acc {r['test_acc']:.3f}, "
            f"{r['wall_s']:.2f} s ({r['median_step_s']:.3g} s median step), factorizations "
            f"{sum(f) if f else '-'}, accepted {r['accepted']}, routes {r['routes']}",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
