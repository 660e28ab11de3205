"""Train an MLP with exact Levenberg-Marquardt steps (``hessinv.optim.DampedNewton``).

What it shows: ``DampedNewton`` is a ``torch.optim.Optimizer``, so the usual loop works -- a
``DataLoader`` of mini-batches, a learning-rate scheduler (``StepLR``) -- except that
``step`` takes the batch, ``opt.step(inputs, targets)``: it builds the exact Gauss-Newton
matrix ``G`` of that batch (``curvature="ggn"``), takes ``s = -lr (G + eps I)^-1 g`` with the
exact solve and adapts ``eps`` from the outcome (Levenberg-Marquardt). ``min_damping=1``
keeps ``eps >= 1``: a mini-batch is a noisy sample of the loss, and without the floor ``eps``
shrinks after every successful step until each step fits its batch (the training loss then
jumps between epochs). The same loop with ``torch.optim.Adam`` is the comparison.

Data: scikit-learn's bundled digits (8x8 images, 10 classes, no download), standardized, an
80/20 split; a synthetic 10-class problem of the same shape if scikit-learn is missing (or
with ``--synthetic``). Model: a depth-8, width-32 tanh MLP, float64.

Run it (about 15 s on one CPU core)::

    python examples/train_damped_newton.py
    python examples/train_damped_newton.py --small        # a few seconds, for the tests

It prints the training loss (whole training set) and test accuracy after every epoch for each
optimizer, then a summary table (time, final loss, final accuracy).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessinv.optim import DampedNewton

DT = torch.float64


def load_data(n_max: int | None, synthetic: bool, seed: int):
    """``(X_train, y_train, X_test, y_test)``: standardized digits, or a synthetic stand-in."""
    g = torch.Generator().manual_seed(seed)
    X = y = None
    if not synthetic:
        try:
            from sklearn.datasets import load_digits

            data = load_digits()
            X = torch.as_tensor(data.data, dtype=DT)
            y = torch.as_tensor(data.target, dtype=torch.long)
        except ImportError:
            pass
    if X is None:  # 10 Gaussian classes in 64 dimensions, labels from the nearest centre
        centres = 2.0 * torch.randn(10, 64, generator=g, dtype=DT)
        y = torch.randint(0, 10, (1800,), generator=g)
        X = centres[y] + 3.0 * torch.randn(1800, 64, generator=g, dtype=DT)
    perm = torch.randperm(X.shape[0], generator=g)
    if n_max is not None:
        perm = perm[:n_max]
    X, y = X[perm], y[perm]
    n_train = int(0.8 * X.shape[0])
    mean, std = X[:n_train].mean(0), X[:n_train].std(0).clamp_min(1e-3)
    X = (X - mean) / std
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def make_mlp(d_in: int, width: int, depth: int, n_classes: int, seed: int) -> nn.Sequential:
    """``depth`` Linear layers with tanh between them (an ``nn.Sequential``: a chain)."""
    torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [n_classes]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


@torch.no_grad()
def evaluate(model, loss_fn, X_train, y_train, X_test, y_test) -> tuple[float, float]:
    """The loss on the whole training set and the accuracy on the test set."""
    loss = float(loss_fn(model(X_train), y_train))
    accuracy = float((model(X_test).argmax(1) == y_test).to(DT).mean())
    return loss, accuracy


def train(name, args, data) -> dict:
    X_train, y_train, X_test, y_test = data
    model = make_mlp(X_train.shape[1], args.width, args.depth, 10, args.seed)
    loss_fn = nn.CrossEntropyLoss()
    if name == "DampedNewton":
        # exact (G + eps I)^-1 g on each batch; eps adapts (x0.5 on success, x8 on failure)
        opt = DampedNewton(
            model,
            loss_fn,
            lr=args.lr,
            damping=args.damping,
            min_damping=args.min_damping,
            curvature="ggn",
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.adam_lr)
    # a scheduler works on DampedNewton's lr (the multiplier of the Newton step) as on Adam's
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_step, gamma=args.gamma)
    loader = DataLoader(
        TensorDataset(X_train, y_train),
        batch_size=args.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    losses, accuracies, elapsed = [], [], 0.0
    loss0, acc0 = evaluate(model, loss_fn, *data)
    print(f"| {name} | 0 | {loss0:.4f} | {acc0:.3f} | - | 0.0 |")
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        for xb, yb in loader:
            if name == "DampedNewton":
                opt.step(xb, yb)  # the batch goes to step: the curvature is built on it
            else:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
        sched.step()
        elapsed += time.perf_counter() - start  # training time only, not the evaluation
        loss, acc = evaluate(model, loss_fn, *data)
        losses.append(loss)
        accuracies.append(acc)
        extra = f"{opt.damping:.1e}" if name == "DampedNewton" else "-"
        print(f"| {name} | {epoch} | {loss:.4f} | {acc:.3f} | {extra} | {elapsed:.1f} |")
    return {
        "initial_loss": loss0,
        "losses": losses,
        "test_accuracy": accuracies,
        "time": elapsed,
        "lr": opt.param_groups[0]["lr"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.0, help="DampedNewton's step multiplier")
    parser.add_argument("--damping", type=float, default=1.0, help="DampedNewton's initial eps")
    parser.add_argument(
        "--min-damping", type=float, default=1.0, help="floor on eps: a batch is a noisy sample"
    )
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--lr-step", type=int, default=2, help="StepLR: epochs per decay")
    parser.add_argument("--gamma", type=float, default=0.5, help="StepLR: decay factor")
    parser.add_argument("--n-max", type=int, default=None, help="use at most this many samples")
    parser.add_argument("--synthetic", action="store_true", help="skip scikit-learn's digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--small", action="store_true", help="tiny configuration (CI): 2 epochs, depth 3, width 8"
    )
    args = parser.parse_args(argv)
    if args.small:
        args.epochs, args.depth, args.width, args.n_max = 2, 3, 8, 320
        args.lr_step = 1
    torch.set_num_threads(1)

    data = load_data(args.n_max, args.synthetic, args.seed)
    print(
        f"{data[0].shape[0]} training / {data[2].shape[0]} test samples, {data[0].shape[1]} "
        f"features; tanh MLP depth {args.depth}, width {args.width}; batch {args.batch}; "
        f"StepLR(step_size={args.lr_step}, gamma={args.gamma})\n"
    )
    print("| optimizer | epoch | train loss | test acc. | damping | time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    results = {name: train(name, args, data) for name in ("DampedNewton", "Adam")}

    print("\n| optimizer | time (s) | final train loss | final test acc. |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['time']:.1f} | {r['losses'][-1]:.4f} | {r['test_accuracy'][-1]:.3f} |"
        )
    return results


if __name__ == "__main__":
    main()
