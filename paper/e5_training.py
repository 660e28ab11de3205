"""E5: training a tall-skinny tanh MLP with exact second-order steps.

Data: scikit-learn's bundled digits (1797 8x8 images, 10 classes; no download),
standardized, projected on 16 principal components (fitted on the training split),
80/20 stratified train/test split. Model: ``depth`` Linear+tanh layers of width 16
(16 -> 16 -> ... -> 10), orthogonal init (gain 1), zero biases, float64 on ``cfg.device``.

Methods, all on the same stream of mini-batches of ``batch`` samples (the exact
methods need the batch's ``(B h)^2`` Riccati matrices, so full-batch is out of reach
for them, and using one batch size for all is the even-handed choice):

* SGD and Adam (``torch.optim``), learning rate picked from a small grid by the
  full-training-set loss after a short run;
* ``DampedNewton`` (exact ``(H + eps I)^-1 g`` on the batch, LM damping);
* ``TrustRegionNewton`` (exact trust-region step on the batch);
* Hessian-free Newton (Martens 2010 style, with the exact Hessian instead of the
  Gauss-Newton matrix): CG on ``(H + eps I) p = -g`` through ``H.matvec``, at most
  ``cg_iters`` iterations (stopping at negative curvature), LM adaptation of ``eps``
  from ``rho``, the step is taken only if the batch loss drops.

Every method gets the same wall-clock budget (and a step cap). The full training
loss and the test accuracy are logged along the way; logging time is excluded.
"""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import torch
from torch import nn

import hessinv
from hessinv.optim import DampedNewton, TrustRegionNewton

from .common import Batches, TorchOptimizerStep

DT = torch.float64


# ---------------------------------------------------------------------------- data, model
def _load_digits(seed: int, n_components: int, device):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    pca = PCA(n_components=n_components, random_state=seed).fit(scaler.transform(Xtr))
    ztr = pca.transform(scaler.transform(Xtr))
    zte = pca.transform(scaler.transform(Xte))
    s = ztr.std(axis=0)
    ztr, zte = ztr / s, zte / s

    def t(a, dtype=DT):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    return t(ztr), t(ytr, torch.long), t(zte), t(yte, torch.long)


def _make_model(depth: int, width: int, d_in: int, n_classes: int, seed: int, device):
    torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [n_classes]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        nn.init.orthogonal_(lin.weight, gain=1.0)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(device=device, dtype=DT)


# ---------------------------------------------------------------------------- methods
class _HessianFree:
    """Truncated-CG Newton on ``H + eps I`` with Levenberg-Marquardt damping (Martens 2010)."""

    def __init__(self, model, loss_fn, damping=1.0, cg_iters=50, min_damping=1e-6):
        self.model, self.loss_fn = model, loss_fn
        self.damping, self.cg_iters, self.min_damping = damping, cg_iters, min_damping
        self.params = list(model.parameters())

    def _set(self, vec):
        with torch.no_grad():
            o = 0
            for p in self.params:
                p.copy_(vec[o : o + p.numel()].view_as(p))
                o += p.numel()

    def step(self, X, y) -> float:
        H = hessinv.ChainHessian(self.model, self.loss_fn, X, y)
        f0, g = float(H.loss), H.gradient()
        x0 = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()
        res = hessinv.conjugate_gradient(
            H.matvec, -g, damping=self.damping, rtol=1e-6, maxiter=self.cg_iters
        )
        s = res.x
        if not bool(torch.any(s != 0)):  # negative curvature at the first CG iteration
            s = -g / max(self.damping, 1.0)
        predicted = -float(g @ s + 0.5 * (s @ H.matvec(s)))
        self._set(x0 + s)
        with torch.no_grad():
            f1 = float(self.loss_fn(self.model(X), y))
        rho = (f0 - f1) / predicted if predicted > 0 else -math.inf
        if rho < 0.25:
            self.damping *= 1.5
        elif rho > 0.75:
            self.damping = max(self.min_damping, self.damping * (2.0 / 3.0))
        if not (math.isfinite(f1) and f1 < f0):
            self._set(x0)
        return f0


def _make_method(name: str, model, loss_fn, lr: float | None):
    if name == "SGD":
        return TorchOptimizerStep(
            model, loss_fn, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        )
    if name == "Adam":
        return TorchOptimizerStep(model, loss_fn, torch.optim.Adam(model.parameters(), lr=lr))
    if name == "DampedNewton":
        return DampedNewton(
            model,
            loss_fn,
            damping=3.0,
            damping_up=4.0,
            damping_down=0.5,
            min_damping=1e-4,
            max_tries=4,
        )
    if name == "TrustRegionNewton":
        return TrustRegionNewton(
            model, loss_fn, radius=0.5, max_radius=10.0, max_tries=2, rtol=1e-3, hard_tol=1e-6
        )
    if name == "HF-CG":
        return _HessianFree(model, loss_fn, damping=1.0, cg_iters=50)
    raise ValueError(name)


SETTINGS = {
    "SGD": "momentum 0.9, lr from grid",
    "Adam": "default betas, lr from grid",
    "DampedNewton": "eps0=3, x4 on reject / x0.5 on accept, eps>=1e-4, <=4 tries",
    "TrustRegionNewton": "radius0=0.5, max 10, eta=0.1, subproblem rtol 1e-3, <=2 tries",
    "HF-CG": "CG <= 50 its on H+eps I (exact H), eps0=1, LM x1.5 / x2/3",
}


def _evaluate(model, loss_fn, data):
    Xtr, ytr, Xte, yte = data
    with torch.no_grad():
        train_loss = float(loss_fn(model(Xtr), ytr))
        acc = float((model(Xte).argmax(1) == yte).double().mean())
    return train_loss, acc


def _run_method(name, lr, cfg, p, data, budget_s, max_steps, log_every, progress=None):
    Xtr, ytr = data[0], data[1]
    loss_fn = nn.CrossEntropyLoss()
    model = _make_model(p["depth"], p["width"], Xtr.shape[1], 10, cfg.seed, cfg.device)
    method = _make_method(name, model, loss_fn, lr)
    batches = Batches(Xtr.shape[0], p["batch"], cfg.seed + 1, cfg.device)
    tl, acc = _evaluate(model, loss_fn, data)
    log = [(0, 0.0, tl, acc)]
    wall = 0.0
    step = 0
    while step < max_steps and wall < budget_s:
        idx = batches.next()
        t0 = time.perf_counter()
        method.step(Xtr[idx], ytr[idx])
        wall += time.perf_counter() - t0
        step += 1
        if progress is not None:
            progress.set_postfix_str(f"{name} step {step} {wall:.1f}s", refresh=False)
        if step % log_every == 0 or step >= max_steps or wall >= budget_s:
            tl, acc = _evaluate(model, loss_fn, data)
            log.append((step, wall, tl, acc))
            if not math.isfinite(tl):
                break
    return log


# ---------------------------------------------------------------------------- entry point
def run(cfg) -> str:
    """Run E5; write e5_training.{png,csv,md} into ``cfg.outdir``; return the markdown."""
    quick = bool(cfg.quick)
    threads = torch.get_num_threads()
    # One intra-op thread: on the shared 2-core machine two threads were ~10x slower
    # for the exact methods' small dense kernels (OpenMP contention).
    torch.set_num_threads(1)
    try:
        return _run(cfg, quick)
    finally:
        torch.set_num_threads(threads)


def _run(cfg, quick: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    p = {
        "depth": 16 if quick else 32,
        "width": 16,
        "batch": 32,
        "budget_s": 15.0 if quick else 90.0,
        "tune_steps": 200 if quick else 600,
        "first_order_steps": 3000 if quick else 20000,
        "second_order_steps": 200 if quick else 1000,
    }
    data = _load_digits(cfg.seed, 16, cfg.device)
    n_params = sum(
        q.numel() for q in _make_model(p["depth"], p["width"], 16, 10, 0, "cpu").parameters()
    )
    grids = {"SGD": [0.01, 0.03, 0.1], "Adam": [1e-3, 3e-3, 1e-2]}
    methods = ["SGD", "Adam", "DampedNewton", "TrustRegionNewton", "HF-CG"]
    chosen: dict[str, float | None] = {}
    logs = {}
    bar = tqdm(total=sum(len(v) for v in grids.values()) + len(methods), desc="E5", leave=False)
    for name, grid in grids.items():
        best = (math.inf, grid[0])
        for lr in grid:
            log = _run_method(
                name, lr, cfg, p, data, math.inf, p["tune_steps"], p["tune_steps"], bar
            )
            final = log[-1][2] if math.isfinite(log[-1][2]) else math.inf
            best = min(best, (final, lr))
            bar.update()
        chosen[name] = best[1]
    for name in methods:
        first = name in grids
        logs[name] = _run_method(
            name,
            chosen.get(name),
            cfg,
            p,
            data,
            p["budget_s"],
            p["first_order_steps"] if first else p["second_order_steps"],
            20 if first else 1,
            bar,
        )
        bar.update()
    bar.close()

    out = cfg.outdir
    with open(out / "e5_training.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "step", "wall_s", "train_loss", "test_acc"])
        for name in methods:
            for step, wall, tl, acc in logs[name]:
                w.writerow([name, step, f"{wall:.4f}", f"{tl:.8e}", f"{acc:.4f}"])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in methods:
        arr = np.array([(s, wt, tl) for s, wt, tl, _ in logs[name]], dtype=float)
        axes[0].plot(np.maximum(arr[:, 0], 1), arr[:, 2], label=name, lw=1.5)
        axes[1].plot(arr[:, 1], arr[:, 2], label=name, lw=1.5)
    axes[0].set_xscale("log")
    axes[0].set_xlabel(f"optimizer step (mini-batch of {p['batch']})")
    axes[1].set_xlabel("wall time of the steps [s]")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("full training loss (cross-entropy)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"E5: digits (PCA-16), tanh MLP depth {p['depth']} width {p['width']} "
        f"({n_params} params), float64, {'quick' if quick else 'full'}"
    )
    fig.tight_layout()
    fig.savefig(out / "e5_training.png", dpi=130)
    plt.close(fig)

    lines = [
        f"**E5: training a tall-skinny tanh MLP ({'quick' if quick else 'full'} mode)**",
        "",
        f"digits (sklearn, standardized, PCA to 16 dims, {data[0].shape[0]} train / "
        f"{data[2].shape[0]} test), MLP depth {p['depth']} width {p['width']} "
        f"({n_params} parameters), tanh, float64 on {cfg.device}; all methods on the same "
        f"stream of mini-batches of {p['batch']}, wall budget {p['budget_s']:.0f} s of steps "
        "each (logging excluded), 1 torch thread, seed "
        f"{cfg.seed}. Train loss: full training set; accuracy: test set.",
        "",
        "| method | steps | wall [s] | s/step | final train loss | test acc | settings |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in methods:
        step, wall, tl, acc = logs[name][-1]
        setting = SETTINGS[name]
        if name in chosen:
            setting += f" (lr={chosen[name]:g} from {grids[name]})"
        lines.append(
            f"| {name} | {step} | {wall:.1f} | {wall / max(step, 1):.3g} | {tl:.4g} | "
            f"{acc:.3f} | {setting} |"
        )
    lines += ["", "Files: `e5_training.png`, `e5_training.csv`, `e5_training.md`."]
    md = "\n".join(lines) + "\n"
    (out / "e5_training.md").write_text(md)
    return md
