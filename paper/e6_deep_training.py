"""E6: the paper's hope, tested -- exact curvature for training *deep* tall-skinny MLPs.

The paper ends by hoping that the exact solve could precondition stochastic gradient
descent and "rekindle interest in extremely deep architectures". E6 trains deep narrow
MLPs on a real data set with first-order methods and with every way of using the exact
curvature that ``hessinv`` offers, on the same initialisations and mini-batches, and
reports loss and accuracy against steps and against wall-clock seconds.

Data: scikit-learn's bundled digits (1797 8x8 images, 64 features, 10 classes, no
download), standardised with the training split's mean and std, fixed stratified
80/20 train/test split (``random_state=0``, the same for every seed).

Models: ``nn.Sequential`` of ``depth`` ``nn.Linear`` layers ``64 -> w -> ... -> w -> 10``
with tanh or ReLU between them, float64. Init ``"kaiming"`` (default):
``nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity=act)`` -- std
``gain / sqrt(fan_in)`` with PyTorch's gains (tanh 5/3, ReLU sqrt 2; the last layer
gain 1) -- and zero biases; ``"pytorch"``: ``nn.Linear``'s own default init.

Methods (each run: the model built from the same seed and the same stream of
mini-batches; a budget of wall-clock step time, evaluation excluded: ``first_order_budget_s``
for each SGD / Adam grid point, ``budget_s`` for the others):

* ``SGD``: ``torch.optim.SGD`` with momentum 0.9, learning rate from a log-spaced grid;
* ``Adam``: ``torch.optim.Adam`` (default betas), learning rate from a grid;
* ``Newton-H``: ``hessinv.DampedNewton`` with the exact Hessian of the mini-batch loss
  (``curvature="hessian"``, Levenberg-Marquardt adaptation of ``eps``);
* ``LM-GGN``: ``hessinv.DampedNewton`` with the exact generalized Gauss-Newton matrix
  (``curvature="ggn"``: classic Levenberg-Marquardt);
* ``TrustRegion``: ``hessinv.TrustRegionNewton`` (exact subproblem, Hessian);
* ``TR-GGN``: the same with the Gauss-Newton matrix (its subproblem is solved from one
  eigendecomposition of the ``B r x B r`` Gram matrix, docs/algorithm.md section 14);
* ``HF-GGN``: Hessian-free (Martens 2010): a fixed number of CG iterations
  (``hessinv.conjugate_gradient``) on ``(G + lam I) p = -g`` with products
  ``hessinv.ChainGGN(...).matvec``, warm-started from ``0.95 x`` the previous direction,
  Levenberg-Marquardt adaptation of ``lam`` from the reduction ratio, a step that raises
  the mini-batch loss is rejected;
* ``PSGD-GGN``: mini-batch SGD preconditioned by a stale exact solve, with
  ``hessinv.optim.CurvaturePreconditioner(curvature="ggn", every=refresh_every,
  damping=damping_rel, relative=True)`` and ``torch.optim.SGD`` (no momentum): every
  ``refresh_every`` steps the factorization of ``G + eps I`` is rebuilt on a larger batch
  (its own seeded stream, so the mini-batches stay those of the other methods) with
  ``eps = damping_rel * trace(G) / n``, and every step ``precondition_()`` replaces the
  mini-batch gradient by ``(G + eps I)^-1 g``, so that ``x <- x - lr (G + eps I)^-1 g``;
  ``lr`` from a grid. The refreshes count in the wall-clock.

For the grid methods, every grid point is a full run; the table and the figure show the
point with the lowest final full-training-set loss; all points are in ``e6_runs.csv``.
A run stops early when its training loss is not finite or above 1e3 (diverged). Besides
the final values the table gives every method's values at the common time
``min(first_order_budget_s, budget_s)`` and, for the exact-curvature methods, the lowest
training loss any SGD / Adam grid point had reached after the same number of steps.
"""

from __future__ import annotations

import math
import pathlib
import time
import traceback

import numpy as np
import torch
from torch import nn

import hessinv
from hessinv.optim import CurvaturePreconditioner

from .common import (
    Batches,
    Config,
    TorchOptimizerStep,
    progress,
    run_with_settings,
    save_figure,
    synchronize,
    write_table,
)

DT = torch.float64
N_CLASSES = 10
FIRST_ORDER = ("SGD", "Adam")
EXACT = ("Newton-H", "LM-GGN", "TrustRegion", "TR-GGN", "HF-GGN", "PSGD-GGN")
METHODS = FIRST_ORDER + EXACT
GRID_METHODS = ("SGD", "Adam", "PSGD-GGN")

_STYLE = {
    "SGD": ("tab:blue", "-"),
    "Adam": ("tab:orange", "-"),
    "Newton-H": ("tab:red", "-"),
    "LM-GGN": ("tab:green", "-"),
    "TrustRegion": ("tab:brown", "-"),
    "TR-GGN": ("tab:olive", "-"),
    "HF-GGN": ("tab:purple", "-"),
    "PSGD-GGN": ("black", "-"),
}


def settings(cfg: Config) -> dict:
    """The sizes of a run; :func:`run` accepts any of these keys as an override."""
    common = dict(
        activations=["tanh", "relu"],
        init="kaiming",
        batch=64,
        max_steps=1_000_000,
        sgd_lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        adam_lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        psgd_lrs=[0.01, 0.03, 0.1],
        psgd_damping_rel=1.0,
        precond_batch=128,
        refresh_every=20,
        newton_damping=1.0,
        tr_radius=0.5,
        hf_damping=1.0,
        methods=list(METHODS),
        diverge_loss=1e3,
        n_log=40,
    )
    if cfg.quick:
        return dict(
            common,
            configs=[(32, 8), (64, 8)],
            seeds=[cfg.seed],
            first_order_budget_s=3.0,
            budget_s=8.0,
            cg_iters=20,
        )
    return dict(
        common,
        configs=[(32, 8), (64, 8), (128, 8), (32, 16)],
        seeds=[cfg.seed, cfg.seed + 1],
        first_order_budget_s=10.0,
        budget_s=25.0,
        cg_iters=50,
    )


# ---------------------------------------------------------------------------- data, model
def load_data(device, split_seed: int = 0):
    """Standardised digits: ``(Xtr, ytr, Xte, yte)`` float64 / long tensors on ``device``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=split_seed, stratify=y)
    mean, std = Xtr.mean(axis=0), Xtr.std(axis=0)
    std[std == 0] = 1.0  # constant pixels (always 0 in the training split) stay 0
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std

    def t(a, dtype=DT):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    return t(Xtr), t(ytr, torch.long), t(Xte), t(yte, torch.long)


def make_model(depth: int, width: int, activation: str, seed: int, device, init: str = "kaiming"):
    """``depth`` Linear layers ``64 -> width -> ... -> width -> 10``; see the module docstring."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    torch.manual_seed(seed)
    sizes = [64] + [width] * (depth - 1) + [N_CLASSES]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if init == "kaiming":
            nonlin = activation if i < depth - 1 else "linear"
            nn.init.kaiming_normal_(lin.weight, mode="fan_in", nonlinearity=nonlin)
            nn.init.zeros_(lin.bias)
        elif init != "pytorch":
            raise ValueError(f"init must be 'kaiming' or 'pytorch', got {init!r}")
        layers.append(lin)
        if i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers).to(device=device, dtype=DT)


# ---------------------------------------------------------------------------- methods
def _flat_params(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _set_flat(params, vec: torch.Tensor) -> None:
    with torch.no_grad():
        o = 0
        for p in params:
            p.copy_(vec[o : o + p.numel()].view_as(p))
            o += p.numel()


def _hessian(model, loss_fn, X, y):
    return hessinv.ChainHessian(model, loss_fn, X, y, progress=False)


def _ggn(model, loss_fn, X, y):
    return hessinv.ChainGGN(model, loss_fn, X, y, progress=False)


class LibraryOptimizer:
    """``hessinv.DampedNewton`` / ``TrustRegionNewton``: counts accepted steps and
    factorizations."""

    def __init__(self, opt):
        self.opt, self.accepted, self.factorizations = opt, 0, 0
        self.eps: list[float] = []
        self.routes: dict[str, int] = {}  # factorization routes of DampedNewton's steps

    def step(self, X, y) -> float:
        f = self.opt.step(X, y)
        last = self.opt.last_step
        self.accepted += bool(last.get("accepted", False))
        self.factorizations += int(last.get("factorizations", 0))
        key = "damping" if "damping" in last else "lam"
        if last.get(key) is not None:
            self.eps.append(float(last[key]))
        if last.get("method"):
            self.routes[last["method"]] = self.routes.get(last["method"], 0) + 1
        return f

    def note(self, steps: int) -> str:
        text = f"{self.accepted}/{steps} accepted, {self.factorizations} factorizations"
        if self.eps:
            name = "eps" if isinstance(self.opt, hessinv.DampedNewton) else "lam"
            text += f", {name} median {np.median(self.eps):.2g} max {max(self.eps):.2g}"
        if self.routes:
            text += ", route " + " / ".join(f"{k} x{v}" for k, v in self.routes.items())
        return text


class HessianFree:
    """Truncated CG on the damped Gauss-Newton system, Martens (2010) style."""

    def __init__(self, model, loss_fn, damping: float, cg_iters: int, decay: float = 0.95):
        self.model, self.loss_fn = model, loss_fn
        self.params = list(model.parameters())
        self.damping, self.cg_iters, self.decay = damping, cg_iters, decay
        self.prev: torch.Tensor | None = None
        self.accepted = 0

    def step(self, X, y) -> float:
        G = _ggn(self.model, self.loss_fn, X, y)
        f0, g = float(G.loss), G.gradient().reshape(-1)
        lam = self.damping

        def A(v):
            return G.matvec(v) + lam * v

        x0 = torch.zeros_like(g) if self.prev is None else self.decay * self.prev
        # CG from x0 on (G + lam I) p = -g, as CG from 0 on the residual system
        res = hessinv.conjugate_gradient(
            G.matvec, -g - A(x0), damping=lam, rtol=1e-10, maxiter=self.cg_iters
        )
        p = x0 + res.x
        if not bool(g @ p < 0):  # not a descent direction (can only come from x0): restart
            p = hessinv.conjugate_gradient(
                G.matvec, -g, damping=lam, rtol=1e-10, maxiter=self.cg_iters
            ).x
        self.prev = p
        predicted = -float(g @ p + 0.5 * (p @ G.matvec(p)))
        x = _flat_params(self.params).clone()
        _set_flat(self.params, x + p)
        with torch.no_grad():
            f1 = float(self.loss_fn(self.model(X), y))
        rho = (f0 - f1) / predicted if predicted > 0 else -math.inf
        if rho < 0.25:
            self.damping = min(self.damping * 1.5, 1e8)
        elif rho > 0.75:
            self.damping = max(self.damping * (2.0 / 3.0), 1e-8)
        if math.isfinite(f1) and f1 < f0:
            self.accepted += 1
        else:
            _set_flat(self.params, x)
            self.prev = None
        return f0


class PreconditionedSGD:
    """Mini-batch SGD with a stale exact Gauss-Newton preconditioner (see the module docstring):
    ``torch.optim.SGD`` (no momentum) on the gradients that
    ``hessinv.optim.CurvaturePreconditioner`` replaces by exact solves."""

    def __init__(
        self,
        model,
        loss_fn,
        lr: float,
        damping_rel: float,
        refresh_every: int,
        big_batches: Batches,
        data,
    ):
        self.model, self.loss_fn = model, loss_fn
        self.big, self.data = big_batches, data
        # damping = damping_rel * tr(G) / n of the refresh batch, measured at each refresh
        self.precond = CurvaturePreconditioner(
            model, loss_fn, curvature="ggn", damping=damping_rel, every=refresh_every, relative=True
        )
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
        self.big_batch = None

    @property
    def refreshes(self) -> int:
        return self.precond.refreshes

    @property
    def eps(self) -> float | None:
        return self.precond.damping_used

    def step(self, X, y) -> float:
        P = self.precond
        # update() counts every call and refreshes on the first and every refresh_every-th:
        # a new large batch is drawn (from its own stream) only for those, the other calls
        # pass the last one (which they do not read)
        if P.updates % P.every == 0:
            idx = self.big.next()
            self.big_batch = (self.data[0][idx], self.data[1][idx])
        P.update(*self.big_batch)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(X), y)
        loss.backward()
        P.precondition_()  # grad <- (G + eps I)^-1 grad, one exact solve
        self.opt.step()  # x <- x - lr (G + eps I)^-1 g
        return float(loss.detach())


def make_method(name: str, model, loss_fn, st: dict, lr, big_batches, data):
    if name == "SGD":
        return TorchOptimizerStep(
            model, loss_fn, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        )
    if name == "Adam":
        return TorchOptimizerStep(model, loss_fn, torch.optim.Adam(model.parameters(), lr=lr))
    if name in ("Newton-H", "LM-GGN"):
        return LibraryOptimizer(
            hessinv.DampedNewton(
                model,
                loss_fn,
                lr=1.0,
                damping=st["newton_damping"],
                damping_up=4.0,
                damping_down=0.5,
                min_damping=1e-6,
                max_tries=3,
                curvature=_hessian if name == "Newton-H" else _ggn,
            )
        )
    if name in ("TrustRegion", "TR-GGN"):
        return LibraryOptimizer(
            hessinv.TrustRegionNewton(
                model,
                loss_fn,
                radius=st["tr_radius"],
                max_radius=10.0,
                max_tries=2,
                rtol=1e-3,
                curvature=_hessian if name == "TrustRegion" else _ggn,
            )
        )
    if name == "HF-GGN":
        return HessianFree(model, loss_fn, st["hf_damping"], st["cg_iters"])
    if name == "PSGD-GGN":
        return PreconditionedSGD(
            model, loss_fn, lr, st["psgd_damping_rel"], st["refresh_every"], big_batches, data
        )
    raise ValueError(name)


def describe(name: str, st: dict) -> str:
    return {
        "SGD": "momentum 0.9",
        "Adam": "default betas",
        "Newton-H": f"DampedNewton(H), lr 1, eps0 {st['newton_damping']:g}, x4 up / x0.5 down, "
        "<=3 tries",
        "LM-GGN": f"DampedNewton(GGN), lr 1, eps0 {st['newton_damping']:g}, x4 up / x0.5 down, "
        "<=3 tries",
        "TrustRegion": f"TrustRegionNewton(H), radius0 {st['tr_radius']:g}, max 10, <=2 tries",
        "TR-GGN": f"TrustRegionNewton(GGN), radius0 {st['tr_radius']:g}, max 10, <=2 tries",
        "HF-GGN": f"{st['cg_iters']} CG its on GGN + lam I, lam0 {st['hf_damping']:g}, "
        "warm start 0.95, LM x1.5 / x2/3",
        "PSGD-GGN": f"CurvaturePreconditioner(GGN) + SGD (momentum 0), refresh every "
        f"{st['refresh_every']} steps on {st['precond_batch']} samples, "
        f"eps = {st['psgd_damping_rel']:g} tr(G)/n",
    }[name]


# ---------------------------------------------------------------------------- one run
def evaluate(model, loss_fn, data) -> tuple[float, float, float, float]:
    """(train loss, train accuracy, test loss, test accuracy) on the full splits."""
    Xtr, ytr, Xte, yte = data
    with torch.no_grad():
        out_tr, out_te = model(Xtr), model(Xte)
        return (
            float(loss_fn(out_tr, ytr)),
            float((out_tr.argmax(1) == ytr).double().mean()),
            float(loss_fn(out_te, yte)),
            float((out_te.argmax(1) == yte).double().mean()),
        )


def _log_steps(max_steps: int = 10**7) -> set[int]:
    """Steps logged whatever the time: 1..10, then a geometric grid (ratio 1.25)."""
    steps, k = set(range(1, 11)), 10.0
    while k < max_steps:
        k *= 1.25
        steps.add(int(round(k)))
    return steps


_LOG_STEPS = _log_steps()


def run_one(
    name: str, lr, *, depth: int, width: int, activation: str, seed: int, st: dict, data, device
) -> dict:
    """Train one model with one method; returns the log and a status.

    The log has rows ``(step, wall_s, train_loss, train_acc, test_loss, test_acc)``, taken
    at steps 1..10, on a geometric grid of steps and every ``budget / n_log`` seconds.
    """
    loss_fn = nn.CrossEntropyLoss()
    model = make_model(depth, width, activation, seed, device, st["init"])
    n_train = data[0].shape[0]
    batches = Batches(n_train, st["batch"], seed + 1000, device)
    big = Batches(n_train, st["precond_batch"], seed + 2000, device)
    method = make_method(name, model, loss_fn, st, lr, big, data)
    log = [(0, 0.0, *evaluate(model, loss_fn, data))]
    budget = st["first_order_budget_s"] if name in FIRST_ORDER else st["budget_s"]
    wall, step, status = 0.0, 0, "ok"
    next_log = budget / st["n_log"]
    while step < st["max_steps"] and wall < budget:
        idx = batches.next()
        X, y = data[0][idx], data[1][idx]
        synchronize(device)
        t0 = time.perf_counter()
        try:
            method.step(X, y)
        except Exception as err:  # a library failure: record it, keep the other runs going
            status = f"error: {type(err).__name__}: {err}"
            traceback.print_exc()
            break
        synchronize(device)
        wall += time.perf_counter() - t0
        step += 1
        if step in _LOG_STEPS or wall >= next_log or wall >= budget or step >= st["max_steps"]:
            log.append((step, wall, *evaluate(model, loss_fn, data)))
            if wall >= next_log:
                next_log = wall + budget / st["n_log"]
            tl = log[-1][2]
            if not math.isfinite(tl) or tl > st["diverge_loss"]:
                status = "diverged"
                break
    if log[-1][0] != step:
        log.append((step, wall, *evaluate(model, loss_fn, data)))
    extra = ""
    if isinstance(method, LibraryOptimizer):
        extra = method.note(step)
    elif isinstance(method, HessianFree):
        extra = f"{method.accepted}/{step} accepted, lam final {method.damping:.2g}"
    elif isinstance(method, PreconditionedSGD):
        extra = f"{method.refreshes} refreshes"
        if method.eps is not None:
            extra += f", last eps {method.eps:.2g}"
    return dict(
        method=name,
        lr=lr,
        log=log,
        steps=step,
        wall=wall,
        status=status,
        extra=extra,
        budget=budget,
        n_params=sum(p.numel() for p in model.parameters()),
    )


def init_diagnostics(depth, width, activation, seed, st, data, device) -> dict:
    """Is the initial network alive? Logit spread over the inputs, live ReLU units, gradient."""
    model = make_model(depth, width, activation, seed, device, st["init"])
    loss_fn = nn.CrossEntropyLoss()
    h, min_alive = data[0], width
    with torch.no_grad():
        for mod in model:
            h = mod(h)
            if isinstance(mod, nn.ReLU):  # units positive for at least one training input
                min_alive = min(min_alive, int((h > 0).any(0).sum()))
    idx = Batches(data[0].shape[0], st["batch"], seed + 1000, device).next()
    X, y = data[0][idx], data[1][idx]
    H = _hessian(model, loss_fn, X, y)
    row = {
        "depth": depth,
        "width": width,
        "act": activation,
        "seed": seed,
        "n": H.num_params,
        "train loss": float(loss_fn(h, data[1])),
        "logit std over inputs": float(h.std(0).mean()),
        "min live units per layer": min_alive if activation == "relu" else None,
        "grad norm": float(torch.linalg.vector_norm(H.gradient())),
    }
    # spectrum of the first mini-batch's curvature: certified bracket of lambda_min, exact
    # eigenvalue counts from the inertia of H + t I (H itself is singular: batch < fan-in)
    diagnostics = {
        "H lambda_min": lambda: 0.5 * sum(H.smallest_eigenvalue(rel_tol=1e-2)[:2]),
        "H eigs < -1e-3": lambda: H.factorize(1e-3).inertia()[1],
        "H eigs < -1": lambda: H.factorize(1.0).inertia()[1],
        "H eigs < -100": lambda: H.factorize(100.0).inertia()[1],
        "GGN lambda_max": lambda: _ggn(model, loss_fn, X, y).spectrum_estimate(30)[1],
    }
    for key, fn in diagnostics.items():
        try:
            row[key] = fn()
        except Exception as err:  # singular at the shift, memory, ...: leave it blank
            row[key] = None
            print(f"E6 diagnostic {key!r} failed: {type(err).__name__}: {err}")
    return row


def _final_loss(r: dict) -> float:
    tl = r["log"][-1][2]
    return tl if r["status"] == "ok" and math.isfinite(tl) else math.inf


def _at_time(r: dict, t: float):
    """The last logged point at step time <= ``t`` (1% tolerance for the end of a budget)."""
    pts = [row for row in r["log"] if row[1] <= t * 1.01]
    return pts[-1]


def _at_step(r: dict, k: int):
    """The last logged point at step <= ``k``."""
    pts = [row for row in r["log"] if row[0] <= k]
    return pts[-1]


# ---------------------------------------------------------------------------- entry point
def run(cfg: Config, **overrides) -> str:
    """Run E6; ``overrides`` replace entries of :func:`settings`. Writes ``e6_*`` into
    ``cfg.outdir``."""
    return run_with_settings("E6", settings, _run, cfg, overrides)


def _grid(name: str, st: dict):
    return {"SGD": st["sgd_lrs"], "Adam": st["adam_lrs"], "PSGD-GGN": st["psgd_lrs"]}.get(
        name, [None]
    )


def _run(cfg: Config, st: dict) -> str:
    t_start = time.perf_counter()
    device = cfg.device
    data = load_data(device)
    configs = [(d, w, a) for d, w in st["configs"] for a in st["activations"]]
    jobs = [
        (c, s, m, lr)
        for c in configs
        for s in st["seeds"]
        for m in st["methods"]
        for lr in _grid(m, st)
    ]
    results: dict = {}  # ((depth, width, act), seed) -> list of run dicts
    bar = progress(jobs, "E6")
    for (depth, width, act), seed, name, lr in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"L={depth} {act} seed {seed} {name} lr={lr}")
        r = run_one(
            name,
            lr,
            depth=depth,
            width=width,
            activation=act,
            seed=seed,
            st=st,
            data=data,
            device=device,
        )
        results.setdefault(((depth, width, act), seed), []).append(r)

    diag_rows = [
        init_diagnostics(d, w, a, s, st, data, device) for (d, w, a) in configs for s in st["seeds"]
    ]
    diag_md = write_table(
        diag_rows, cfg.outdir, "e6_init", "E6: the networks at initialisation (before any step)"
    )

    # the grid point with the lowest final training loss, per (config, seed, method)
    best: dict = {}
    for key, runs in results.items():
        for name in st["methods"]:
            cand = [r for r in runs if r["method"] == name]
            best[key + (name,)] = min(cand, key=lambda r: (_final_loss(r), -r["steps"]))
    t_eq = min(st["budget_s"], st["first_order_budget_s"])

    out = cfg.outdir
    out.mkdir(parents=True, exist_ok=True)
    curve_rows = []
    for ((depth, width, act), seed), runs in results.items():
        for r in runs:
            chosen = best[((depth, width, act), seed, r["method"])] is r
            for step, wall, trl, tra, tel, tea in r["log"]:
                curve_rows.append(
                    dict(
                        depth=depth,
                        width=width,
                        activation=act,
                        seed=seed,
                        method=r["method"],
                        lr=r["lr"],
                        chosen=chosen,
                        status=r["status"],
                        step=step,
                        wall_s=wall,
                        train_loss=trl,
                        train_acc=tra,
                        test_loss=tel,
                        test_acc=tea,
                    )
                )
    write_curves(curve_rows, out)

    rows = []
    for ((depth, width, act), seed), runs in results.items():
        first = [r for r in runs if r["method"] in FIRST_ORDER]
        for name in st["methods"]:
            r = best[((depth, width, act), seed, name)]
            step, wall, trl, tra, tel, tea = r["log"][-1]
            eq = _at_time(r, t_eq)
            row = {
                "depth": depth,
                "act": act,
                "seed": seed,
                "method": name,
                "lr": r["lr"],
                "steps": step,
                "wall s": wall,
                "s/step": wall / max(step, 1),
                "train loss": trl,
                "train acc": tra,
                "test loss": tel,
                "test acc": tea,
                f"train loss @{t_eq:g}s": eq[2],
                f"test acc @{t_eq:g}s": eq[5],
                "best 1st-order train loss @same steps": None,
            }
            if name not in FIRST_ORDER and first:
                vals = [_at_step(f, step)[2] for f in first]
                vals = [v for v in vals if math.isfinite(v)]
                row["best 1st-order train loss @same steps"] = min(vals) if vals else None
            row.update(
                {
                    "status": r["status"],
                    "note": r["extra"],
                    "width": width,
                    "n": r["n_params"],
                    "init train loss": r["log"][0][2],
                }
            )
            rows.append(row)
    mode = "quick" if cfg.quick else "full"
    title = (
        f"E6: final and equal-time ({t_eq:g} s) train/test loss and accuracy; batch "
        f"{st['batch']}, {st['init']} init, float64, {device} ({mode})"
    )
    table_md = write_table(rows, out, "e6_deep_training", title)

    win_md, agg_md = summarize(rows, t_eq, out)

    n_params = {c: results[(c, st["seeds"][0])][0]["n_params"] for c in configs}
    figures(
        curve_rows,
        out,
        seed=st["seeds"][0],
        batch=st["batch"],
        budget_s=st["budget_s"],
        first_order_budget_s=st["first_order_budget_s"],
        n_params=n_params,
        title=(
            f"E6: digits, deep tall-skinny MLPs, {st['init']} init, float64, {device}, "
            f"{st['first_order_budget_s']:g} s (SGD, Adam) / {st['budget_s']:g} s "
            f"(others) of steps per run ({mode})"
        ),
    )
    elapsed = time.perf_counter() - t_start
    lines = [
        f"E6 ({mode}): digits ({data[0].shape[0]} train / {data[2].shape[0]} test, 64 standardised "
        f"features), MLPs (depth, width) {[tuple(c) for c in st['configs']]}, "
        f"{', '.join(st['activations'])}, "
        f"{st['init']} init, float64 on {device}, seeds {st['seeds']}; mini-batches of "
        f"{st['batch']}; step-time budget per run {st['first_order_budget_s']:g} s (SGD, Adam: "
        "every "
        f"grid point) and {st['budget_s']:g} s (exact-curvature methods), evaluation excluded; "
        f"grids: SGD {st['sgd_lrs']}, Adam {st['adam_lrs']}, PSGD-GGN {st['psgd_lrs']}; "
        f"1 torch thread; E6 took {elapsed:.0f} s.",
        "",
        "Settings: " + "; ".join(f"{m}: {describe(m, st)}" for m in st["methods"]) + ".",
        "",
        diag_md,
        table_md,
        win_md,
        agg_md,
        "Files: `e6_deep_training.png` (loss), `e6_accuracy.png`, `e6_deep_training.{csv,md}`, "
        "`e6_winners.{csv,md}`, `e6_by_method.{csv,md}`, `e6_init.{csv,md}`, "
        "`e6_runs.{csv,md}` (every run, all grid points), `e6_curves.csv` (every logged point "
        "of the chosen runs).",
    ]
    md = "\n".join(lines) + "\n"
    (out / "e6_summary.md").write_text(md)
    return md


def write_curves(curve_rows: list[dict], out) -> None:
    """``e6_curves.csv``: every logged point of the chosen runs; ``e6_runs.{csv,md}``: the
    last point of every run (all grid points), with its status."""
    import csv

    chosen = [r for r in curve_rows if r["chosen"] in (True, "True")]
    with open(pathlib.Path(out) / "e6_curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curve_rows[0]))
        w.writeheader()
        w.writerows(chosen)
    last: dict = {}
    for r in curve_rows:
        last[(r["depth"], r["width"], r["activation"], r["seed"], r["method"], r["lr"])] = r
    write_table(
        list(last.values()), out, "e6_runs", "E6: every run (all grid points), last logged point"
    )


def _winner(first: float, exact: float) -> str:
    if abs(first - exact) <= 0.01 * min(abs(first), abs(exact)):
        return "tie (within 1%)"
    return "first-order" if first < exact else "exact"


def summarize(rows: list[dict], t_eq: float, out) -> tuple[str, str]:
    """From the rows of ``e6_deep_training``: ``e6_winners`` and ``e6_by_method`` (medians over
    seeds)."""
    lt, la = f"train loss @{t_eq:g}s", f"test acc @{t_eq:g}s"
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["depth"], r["width"], r["act"], r["seed"]), []).append(r)
    win_rows = []
    for (depth, width, act, seed), rs in groups.items():
        for label, key, acc in (("final", "train loss", "test acc"), (f"@{t_eq:g}s", lt, la)):
            ok = [r for r in rs if r["status"] == "ok" and math.isfinite(r[key])]
            fo = [r for r in ok if r["method"] in FIRST_ORDER]
            ex = [r for r in ok if r["method"] in EXACT]
            if not fo or not ex:
                continue
            bfo, bex = min(fo, key=lambda r: r[key]), min(ex, key=lambda r: r[key])
            win_rows.append(
                {
                    "depth": depth,
                    "width": width,
                    "act": act,
                    "seed": seed,
                    "when": label,
                    "best first-order": bfo["method"],
                    "its train loss": bfo[key],
                    "its test acc": bfo[acc],
                    "best exact-curvature": bex["method"],
                    "its train loss ": bex[key],
                    "its test acc ": bex[acc],
                    "winner (train loss)": _winner(bfo[key], bex[key]),
                }
            )
    win_md = write_table(
        win_rows,
        out,
        "e6_winners",
        "E6: best first-order vs best exact-curvature method (train loss)",
    )

    by: dict = {}
    for r in rows:
        by.setdefault((r["depth"], r["width"], r["act"], r["method"]), []).append(r)
    fo_key = "best 1st-order train loss @same steps"

    def med(rs, key):
        vals = [r[key] for r in rs if r[key] is not None]
        return float(np.median(vals)) if vals else None

    agg = []
    for (depth, width, act, name), rs in by.items():
        agg.append(
            {
                "depth": depth,
                "width": width,
                "act": act,
                "method": name,
                "seeds": len(rs),
                "lr per seed": "/".join(f"{r['lr']:g}" for r in rs if r["lr"] is not None) or None,
                "steps": int(round(med(rs, "steps"))),
                "s/step": med(rs, "s/step"),
                "train loss": med(rs, "train loss"),
                "test acc": med(rs, "test acc"),
                lt: med(rs, lt),
                la: med(rs, la),
                fo_key: med(rs, fo_key),
                "not ok": sum(r["status"] != "ok" for r in rs),
            }
        )
    agg_md = write_table(
        agg,
        out,
        "e6_by_method",
        "E6: per method, medians over seeds (lr: the chosen grid point per seed)",
    )
    return win_md, agg_md


def resummarize(outdir, t_eq: float) -> tuple[str, str]:
    """Rebuild ``e6_winners`` and ``e6_by_method`` from an existing ``e6_deep_training.csv``."""
    import csv
    import pathlib

    outdir = pathlib.Path(outdir)
    with open(outdir / "e6_deep_training.csv") as f:
        raw = list(csv.DictReader(f))
    text = ("act", "method", "status", "note")
    rows = []
    for r in raw:
        rows.append(
            {k: (v if k in text else (None if v == "" else float(v))) for k, v in r.items()}
        )
        for k in ("depth", "width", "seed", "steps", "n"):
            rows[-1][k] = int(rows[-1][k])
    return summarize(rows, t_eq, outdir)


def _n_params(depth: int, width: int) -> int:
    """Parameters of :func:`make_model` (64 inputs, 10 classes)."""
    return 65 * width + (depth - 2) * (width * width + width) + 10 * width + 10


def _chosen_logs(curve_rows: list[dict], seed: int) -> dict:
    """``{(depth, width, act): {method: (lr, status, log array)}}`` of the chosen runs of
    ``seed``."""
    panels: dict = {}
    for r in curve_rows:
        if not r["chosen"] or r["seed"] != seed:
            continue
        entry = panels.setdefault((r["depth"], r["width"], r["activation"]), {}).setdefault(
            r["method"], [r["lr"], r["status"], []]
        )
        entry[2].append(
            [r[k] for k in ("step", "wall_s", "train_loss", "train_acc", "test_loss", "test_acc")]
        )
    for methods in panels.values():
        for entry in methods.values():
            entry[2] = np.array(entry[2], dtype=float)
    return panels


def figures(
    curve_rows: list[dict],
    out,
    *,
    seed: int,
    batch: int,
    budget_s: float,
    first_order_budget_s: float,
    title: str,
    n_params: dict | None = None,
) -> None:
    """``e6_deep_training.png`` (loss) and ``e6_accuracy.png`` of the chosen runs of ``seed``.

    One panel per (depth, width, activation), at most 4 across; under each, the same
    curves against wall-clock seconds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _chosen_logs(curve_rows, seed)
    keys = list(panels)
    ncol = min(4, len(keys))
    nblock = -(-len(keys) // ncol)
    t_eq, t_max = min(budget_s, first_order_budget_s), max(budget_s, first_order_budget_s)
    for stem, col_tr, col_te, ylab, logy in (
        ("e6_deep_training", 2, 4, "cross-entropy (solid: train, dashed: test)", True),
        ("e6_accuracy", 3, 5, "accuracy (solid: train, dashed: test)", False),
    ):
        fig, axes = plt.subplots(
            2 * nblock, ncol, figsize=(4.3 * ncol, 3.6 * 2 * nblock), squeeze=False
        )
        for k, key in enumerate(keys):
            depth, width, act = key
            ax_s, ax_t = axes[2 * (k // ncol), k % ncol], axes[2 * (k // ncol) + 1, k % ncol]
            init_loss = None
            for name in METHODS:
                if name not in panels[key]:
                    continue
                lr, status, arr = panels[key][name]
                init_loss = arr[0, 2] if init_loss is None else init_loss
                color, _ = _STYLE.get(name, (None, "-"))
                lab = name + (f" (lr {lr:g})" if lr is not None else "")
                if status != "ok":
                    lab += f" [{status.split(':')[0]}]"
                for ax, x in ((ax_s, np.maximum(arr[:, 0], 1)), (ax_t, arr[:, 1])):
                    ax.plot(
                        x,
                        arr[:, col_tr],
                        color=color,
                        ls="-",
                        lw=1.4,
                        label=lab if ax is ax_s else None,
                    )
                    ax.plot(x, arr[:, col_te], color=color, ls="--", lw=1.0)
            n_par = (n_params or {}).get(key, _n_params(depth, width))
            n = f" (n = {n_par})"
            ax_s.set_title(f"depth {depth}, width {width}, {act}{n}, seed {seed}", fontsize=9)
            ax_s.set_xlabel(f"step (mini-batch of {batch})", fontsize=8)
            ax_s.set_xscale("log")
            ax_t.set_xlabel("wall-clock seconds of steps (cut at 1.5x the budget)", fontsize=8)
            ax_t.set_xlim(0, 1.5 * t_max)
            ax_t.axvline(t_eq, color="gray", lw=0.8, ls=":")
            for ax in (ax_s, ax_t):
                if logy:  # diverged runs would squash the others: clip at 3x the initial loss
                    ax.set_yscale("log")
                    ax.set_ylim(top=3 * init_loss)
                else:
                    ax.set_ylim(0, 1)
                ax.grid(True, which="both", alpha=0.3)
                if k % ncol == 0:
                    ax.set_ylabel(ylab, fontsize=8)
            ax_s.legend(fontsize=6)
        for k in range(len(keys), nblock * ncol):
            axes[2 * (k // ncol), k % ncol].axis("off")
            axes[2 * (k // ncol) + 1, k % ncol].axis("off")
        fig.suptitle(title, fontsize=10)
        save_figure(fig, pathlib.Path(out) / f"{stem}.png")


def refigure(
    outdir, *, seed: int, batch: int, budget_s: float, first_order_budget_s: float, title: str
) -> None:
    """Redraw the figures from an existing ``e6_curves.csv``."""
    import csv

    with open(pathlib.Path(outdir) / "e6_curves.csv") as f:
        raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        row = dict(r)
        for k in ("depth", "width", "seed", "step"):
            row[k] = int(r[k])
        for k in ("wall_s", "train_loss", "train_acc", "test_loss", "test_acc"):
            row[k] = float(r[k])
        row["lr"] = None if r["lr"] == "" else float(r["lr"])
        row["chosen"] = r["chosen"] == "True"
        rows.append(row)
    figures(
        rows,
        outdir,
        seed=seed,
        batch=batch,
        budget_s=budget_s,
        first_order_budget_s=first_order_budget_s,
        title=title,
    )


__all__ = ["run", "settings", "load_data", "make_model", "METHODS", "resummarize", "refigure"]
