"""E7: the regime where exact curvature wins, shown honestly -- Levenberg-Marquardt on
full-batch nonlinear least squares with deep tanh MLPs.

E6 found no regime where exact curvature wins for mini-batch classification. The classic
winner of second-order optimisation is Levenberg-Marquardt (LM) on full-batch nonlinear
least squares, until now limited to small ``n`` by its dense ``O(n^3)`` solve of
``(J^T J + eps I) s = -g``. ``hessinv`` solves with the Gauss-Newton matrix in output space
(docs/algorithm.md section 14: a ``B r x B r`` Gram matrix built stage by stage, Woodbury),
in time linear in depth, so LM scales in ``n``. E7 compares, on the same initial weights
and the whole training set as the batch, with a wall-clock budget per run (evaluation
excluded from the clock):

* ``LM-exact``: ``hessinv.DampedNewton(model, nn.MSELoss(), damping=..., curvature="ggn")``,
  ``loss = opt.step(X, y)`` per step (``ChainGGN`` on the batch, ``G + eps I`` factorized with
  ``method="auto"``, which takes the output-space route here);
* ``LM-dense``: the same damping rule (:class:`DenseLM`, a copy of ``DampedNewton``'s) on the
  Jacobian ``J`` of the outputs in the flat parameters from ``torch.func.jacrev`` (vmapped
  over samples), ``G = (2 / (B r)) J^T J`` formed explicitly and ``G + eps I`` factorized by
  a dense Cholesky: the textbook LM, ``O(B r n^2 + n^3)`` per step;
* ``LM-dense-JJt``: the same rule and the same ``J``, the step from the ``B r x B r`` matrix
  ``eps I + (2 / (B r)) J J^T`` (Woodbury): the output-space identity on an explicit
  Jacobian, ``O((B r)^2 n)`` per step -- what one would write without ``hessinv``;
  both dense variants are skipped, with the reason, where one step is predicted to exceed
  the budget or their memory the cap ``dense_max_gb``;
* ``L-BFGS``: ``torch.optim.LBFGS(params, line_search_fn="strong_wolfe")`` with a closure
  (``max_iter`` iterations per call; a *step* is one L-BFGS iteration);
* ``Adam``: ``torch.optim.Adam`` (default betas, constant learning rate) for every point of a
  learning-rate grid; the tables show the point with the lowest final training loss, all
  points are in ``e7_runs``.

Tasks (float64, ``nn.MSELoss``, full batch):

* ``sines<d>d``: a smooth synthetic target in ``d`` input dimensions with ``r`` outputs,
  ``y_k(x) = sum_{j<3} sin(w_kj . x + phi_kj) + 2 sum_{j<2} exp(-|x - mu_kj|^2 / (2 0.4^2))``,
  ``w ~ N(0, (freq pi / 2)^2 I)``, ``phi ~ U(0, 2 pi)``, ``mu ~ U([-1, 1]^d)``, inputs
  ``U([-1, 1]^d)``, no noise; outputs standardised with the training mean and std; a
  held-out test set from the same distribution;
* ``diabetes``: ``sklearn.datasets.load_diabetes`` (442 x 10, bundled), fixed 80/20 split
  (``random_state=0``), inputs and target standardised with the training split's statistics.

Models: ``nn.Sequential`` of ``depth`` ``nn.Linear`` layers ``d -> w -> ... -> w -> r`` with
``nn.Tanh`` between them; **orthogonal** weights with gain 1 (``nn.init.orthogonal_``, also
the last layer) and zero biases. This is the ordered side of the edge of chaos for tanh:
signals shrink slowly with depth (``tanh' <= 1``) instead of being amplified chaotically as
with PyTorch's tanh gain 5/3, which gave E6's deep nets Hessians with huge negative
outliers; the 64-layer nets here start near a constant predictor and train.

An ``n``-sweep over (depth, width) on the first synthetic task runs every method again with
a shorter budget and reports the seconds per step, the loss reached and the largest ``n``
each method handles (at least one step / the sweep's loss threshold within the budget).
"""

from __future__ import annotations

import math
import pathlib
import time
import traceback
import warnings

import numpy as np
import torch
from torch import nn

import hessinv

from .common import Config, progress, run_with_settings, save_figure, synchronize, write_table

DT = torch.float64
METHODS = ("LM-exact", "LM-dense", "LM-dense-JJt", "L-BFGS", "Adam")
LM_METHODS = ("LM-exact", "LM-dense", "LM-dense-JJt")
_STYLE = {
    "LM-exact": ("tab:green", "-"),
    "LM-dense": ("tab:red", "--"),
    "LM-dense-JJt": ("tab:purple", ":"),
    "L-BFGS": ("tab:blue", "-"),
    "Adam": ("tab:orange", "-"),
}


#: the 2-d synthetic task of both runs (depth and width per run)
_SINES2D = dict(
    name="sines2d", kind="synthetic", d_in=2, d_out=2, n_train=256, n_test=1024, freq=1.0
)


def settings(cfg: Config) -> dict:
    """The sizes of a run; :func:`run` accepts any of these keys as an override."""
    common = dict(
        methods=list(METHODS),
        lm_damping=1e-2,
        lm_damping_down=1.0 / 3.0,
        lm_damping_up=4.0,
        lm_max_tries=10,
        lbfgs_iters_per_call=5,
        lbfgs_history=100,
        thresholds=[1e-1, 1e-2, 1e-4, 1e-6, 1e-8],
        sweep_threshold=1e-4,
        max_steps=10**7,
        diverge_loss=1e3,
        n_log=30,
    )
    if cfg.quick:
        return dict(
            common,
            tasks=[
                dict(_SINES2D, depth=16, width=32),
                dict(_SINES2D, depth=64, width=16),
                dict(name="diabetes", kind="diabetes", depth=8, width=16),
            ],
            budget_s=8.0,
            adam_lrs=[1e-3, 3e-3, 1e-2],
            sweep=[(8, 16), (16, 16), (16, 32), (16, 64), (16, 128)],
            sweep_budget_s=3.0,
            dense_max_gb=2.0,
        )
    return dict(
        common,
        tasks=[
            dict(_SINES2D, depth=16, width=32),
            dict(_SINES2D, depth=64, width=16),
            dict(
                name="sines6d",
                kind="synthetic",
                d_in=6,
                d_out=3,
                n_train=600,
                n_test=2000,
                freq=0.5,
                depth=32,
                width=64,
            ),
            dict(name="diabetes", kind="diabetes", depth=8, width=16),
            dict(name="diabetes", kind="diabetes", depth=32, width=32),
        ],
        budget_s=30.0,
        adam_lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        sweep=[(8, 16), (16, 16), (32, 16), (16, 32), (64, 32), (16, 64), (16, 128), (64, 128)],
        sweep_budget_s=15.0,
        dense_max_gb=8.0,
    )


# ---------------------------------------------------------------------------- data, model
def synthetic_target(X: torch.Tensor, d_out: int, freq: float, seed: int) -> torch.Tensor:
    """The smooth target of the module docstring (before standardisation)."""
    d = X.shape[1]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, 3, d, generator=g, dtype=DT) * (freq * math.pi / 2)
    phase = torch.rand(d_out, 3, generator=g, dtype=DT) * (2 * math.pi)
    mu = torch.rand(d_out, 2, d, generator=g, dtype=DT) * 2 - 1
    cols = []
    for k in range(d_out):
        waves = torch.sin(X @ W[k].T + phase[k]).sum(1)
        bumps = torch.exp(-((X[:, None, :] - mu[k][None]) ** 2).sum(-1) / (2 * 0.4**2)).sum(1)
        cols.append(waves + 2.0 * bumps)
    return torch.stack(cols, 1)


def load_task(task: dict, seed: int, device):
    """``(Xtr, ytr, Xte, yte)`` float64 on ``device``; targets ``(samples, outputs)``."""
    if task["kind"] == "synthetic":
        g = torch.Generator().manual_seed(seed + 1)
        Xtr = torch.rand(task["n_train"], task["d_in"], generator=g, dtype=DT) * 2 - 1
        Xte = torch.rand(task["n_test"], task["d_in"], generator=g, dtype=DT) * 2 - 1
        ytr = synthetic_target(Xtr, task["d_out"], task["freq"], seed)
        yte = synthetic_target(Xte, task["d_out"], task["freq"], seed)
    elif task["kind"] == "diabetes":
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        X, y = load_diabetes(return_X_y=True)
        Xa, Xb, ya, yb = train_test_split(X, y, test_size=0.2, random_state=0)
        mean, std = Xa.mean(axis=0), Xa.std(axis=0)
        Xtr, Xte = [torch.as_tensor((a - mean) / std, dtype=DT) for a in (Xa, Xb)]
        ytr, yte = [torch.as_tensor(a, dtype=DT)[:, None] for a in (ya, yb)]
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")
    m, s = ytr.mean(0), ytr.std(0)
    ytr, yte = (ytr - m) / s, (yte - m) / s
    return tuple(t.to(device) for t in (Xtr, ytr, Xte, yte))


def make_model(d_in: int, depth: int, width: int, d_out: int, seed: int, device) -> nn.Sequential:
    """``depth`` Linear layers ``d_in -> width -> ... -> width -> d_out``, tanh between them,
    orthogonal weights (gain 1), zero biases, float64."""
    torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        nn.init.orthogonal_(lin.weight, gain=1.0)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(device=device, dtype=DT)


def task_label(task: dict) -> str:
    return f"{task['name']} L{task['depth']} w{task['width']}"


# ---------------------------------------------------------------------------- methods
class LMExact:
    """``hessinv.DampedNewton(..., curvature="ggn")``: one ``step(X, y)`` per step."""

    def __init__(self, model, st: dict):
        self.opt = hessinv.DampedNewton(
            model,
            nn.MSELoss(),
            damping=st["lm_damping"],
            damping_down=st["lm_damping_down"],
            damping_up=st["lm_damping_up"],
            max_tries=st["lm_max_tries"],
            curvature="ggn",
        )
        self.steps, self.accepted, self.tries, self.factorizations = 0, 0, 0, 0
        self.gradient_fallbacks, self.eps = 0, []

    def step(self, X, y):
        """-> (step index of the known loss, that loss, known after the call?)"""
        self.opt.step(X, y)
        last = self.opt.last_step
        self.steps += 1
        self.accepted += bool(last["accepted"])
        self.tries += int(last["tries"])
        self.factorizations += int(last["factorizations"])
        self.gradient_fallbacks += last.get("direction") == "gradient"
        self.eps.append(float(last["damping"]))
        return self.steps, float(last["new_loss"]), True

    def note(self) -> str:
        return (
            f"{self.accepted}/{self.steps} accepted, {self.tries} loss evaluations, "
            f"{self.factorizations} factorizations, eps median "
            f"{np.median(self.eps) if self.eps else float('nan'):.2g} last "
            f"{self.eps[-1] if self.eps else float('nan'):.2g}"
            + (f", {self.gradient_fallbacks} gradient fallbacks" if self.gradient_fallbacks else "")
        )


class DenseLM:
    """Levenberg-Marquardt on a dense Jacobian with the damping rule of
    ``hessinv.DampedNewton`` (so that all LM variants follow the same iterates up to rounding).

    Per step: ``J`` (``B r x n``) of the outputs in the flat parameters by
    ``torch.func.jacrev`` (vmapped over samples, in each parameter tensor, concatenated
    in the order of ``named_parameters()``), the residual ``e``, the MSE loss
    ``f = |e|^2 / N`` (``N = B r``), ``g = c J^T e`` and the Gauss-Newton matrix
    ``G = c J^T J`` with ``c = 2 / N``. Then, like ``DampedNewton``: factor ``G + eps I``
    (raise ``eps`` while the Cholesky factorization fails), step ``s = -(G + eps I)^-1 g``,
    accept if the loss decreased (``eps <- eps * down``), else restore, ``eps <- eps * up``
    and retry with the same ``J`` (``max_tries`` loss evaluations in all); a change at
    rounding level is accepted as converged (``eps`` kept).

    ``mode="normal"`` (``LM-dense``): ``G`` (``n x n``) is formed and factorized, the
    textbook LM, ``O(N n^2 + n^3)`` time and ``O(n^2)`` memory per step.
    ``mode="woodbury"`` (``LM-dense-JJt``): the same step from the ``N x N`` matrix
    ``K = eps I + c J J^T``, ``s = -(g - c J^T K^-1 J g) / eps``: the output-space identity
    of docs/algorithm.md section 14 on the explicit ``J``, ``O(N^2 n + N^3)`` time and
    ``O(N n)`` memory (no refinement: its relative error is about ``u cond(K)``).
    """

    def __init__(
        self,
        model,
        st: dict,
        mode: str = "normal",
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
    ):
        from torch.func import functional_call, jacrev, vmap

        if mode not in ("normal", "woodbury"):
            raise ValueError(f"mode must be 'normal' or 'woodbury', got {mode!r}")
        self.model, self.mode = model, mode
        self.params = list(model.parameters())
        self.names = [k for k, _ in model.named_parameters()]
        self.damping = st["lm_damping"]
        self.down, self.up = st["lm_damping_down"], st["lm_damping_up"]
        self.max_tries = st["lm_max_tries"]
        self.min_damping, self.max_damping = min_damping, max_damping
        self.steps, self.accepted, self.tries, self.factorizations = 0, 0, 0, 0

        def out_single(params, x):
            return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

        # per-sample Jacobians in each parameter tensor (differentiating through a slicing
        # of one flat vector instead would add a zero-filled N x n tensor per parameter)
        self._jac_dict = vmap(jacrev(out_single), in_dims=(None, 0))

    def _jac(self, X) -> torch.Tensor:
        """``J``: ``(B r) x n``, columns in the order of ``named_parameters()``."""
        params = {k: p.detach() for k, p in zip(self.names, self.params, strict=True)}
        jac = self._jac_dict(params, X)
        B = X.shape[0]
        J = torch.cat([jac[k].reshape(B, jac[k].shape[1], -1) for k in self.names], dim=2)
        return J.reshape(-1, J.shape[2])

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def _set(self, vec) -> None:
        with torch.no_grad():
            o = 0
            for p in self.params:
                p.copy_(vec[o : o + p.numel()].view_as(p))
                o += p.numel()

    def _loss(self, X, y) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(self.model(X), y))

    def _raise(self, eps: float) -> float:
        return min(self.max_damping, max(eps * self.up, self.min_damping, 1e-8))

    def step(self, X, y):
        x0 = self._flat()
        with torch.no_grad():
            e = (self.model(X) - y).reshape(-1)
            N = e.numel()
            J = self._jac(X)
            c = 2.0 / N
            f0 = float(e @ e) / N
            g = c * (J.T @ e)
            if self.mode == "normal":
                M = c * (J.T @ J)  # G, n x n
                del J
                Jg = None
            else:
                M = c * (J @ J.T)  # the N x N Gram matrix
                Jg = J @ g
            eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)

            def G_times(v):
                return M @ v if self.mode == "normal" else c * (J.T @ (J @ v))

            noise = 100 * torch.finfo(DT).eps * max(abs(f0), 1e-300)
            new_loss, accepted = f0, False
            for _ in range(self.max_tries):
                eps = self.damping
                while True:  # the smallest eps on the grid with G + eps I positive definite
                    L, info = torch.linalg.cholesky_ex(M + eps * eye)
                    self.factorizations += 1
                    if int(info) == 0 or eps >= self.max_damping:
                        break
                    eps = self._raise(eps)
                if int(info) != 0:
                    s = -g / eps
                elif self.mode == "normal":
                    s = -torch.cholesky_solve(g[:, None], L)[:, 0]
                else:
                    s = -(g - c * (J.T @ torch.cholesky_solve(Jg[:, None], L)[:, 0])) / eps
                predicted = -float(g @ s + 0.5 * (s @ G_times(s)))
                self._set(x0 + s)
                f1 = self._loss(X, y)
                self.tries += 1
                converged = predicted <= noise and math.isfinite(f1) and -(f0 - f1) <= noise
                if math.isfinite(f1) and f1 < f0:
                    self.damping = max(self.min_damping, eps * self.down)
                    new_loss, accepted = f1, True
                    break
                if converged:
                    new_loss, accepted = f1, True
                    break
                self.damping = self._raise(eps)
                self._set(x0)
        self.steps += 1
        self.accepted += accepted
        return self.steps, new_loss, True

    def note(self) -> str:
        return (
            f"{self.accepted}/{self.steps} accepted, {self.tries} loss evaluations, "
            f"{self.factorizations} Cholesky, eps last {self.damping:.2g}"
        )


class LBFGS:
    """``torch.optim.LBFGS(line_search_fn="strong_wolfe")``; a step is one L-BFGS iteration."""

    def __init__(self, model, st: dict):
        self.model = model
        self.first = next(iter(model.parameters()))
        self.opt = torch.optim.LBFGS(
            model.parameters(),
            line_search_fn="strong_wolfe",
            max_iter=st["lbfgs_iters_per_call"],
            history_size=st["lbfgs_history"],
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
        self.loss_fn = nn.MSELoss()

    def _state(self, key):
        return int(self.opt.state[self.first].get(key, 0))

    def step(self, X, y):
        before = self._state("n_iter")

        def closure():
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(X), y)
            loss.backward()
            return loss.detach()

        f = float(self.opt.step(closure))  # the loss at the start of the call
        return before, f, False

    @property
    def steps(self) -> int:
        return self._state("n_iter")

    def note(self) -> str:
        return (
            f"{self._state('n_iter')} iterations, {self._state('func_evals')} loss+gradient "
            "evaluations"
        )


class Adam:
    def __init__(self, model, lr: float):
        self.model, self.loss_fn, self.steps = model, nn.MSELoss(), 0
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(self, X, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(X), y)
        loss.backward()
        self.opt.step()
        self.steps += 1
        return self.steps - 1, float(loss.detach()), False

    def note(self) -> str:
        return ""


def describe(name: str, st: dict) -> str:
    return {
        "LM-exact": (
            f"hessinv.DampedNewton(curvature='ggn'), eps0 {st['lm_damping']:g}, "
            f"x{st['lm_damping_up']:g} on reject / x{st['lm_damping_down']:.3g} on accept, "
            f"<= {st['lm_max_tries']} loss evaluations per step"
        ),
        "LM-dense": (
            "the same rule on G = (2/(B r)) J^T J formed from the torch.func.jacrev "
            "Jacobian J, dense n x n Cholesky"
        ),
        "LM-dense-JJt": (
            "the same rule and the same J, the step by Woodbury from the "
            "(B r) x (B r) matrix eps I + (2/(B r)) J J^T (Cholesky)"
        ),
        "L-BFGS": (
            f"torch.optim.LBFGS, strong Wolfe, history {st['lbfgs_history']}, lr 1, "
            f"{st['lbfgs_iters_per_call']} iterations per call, tolerances 0"
        ),
        "Adam": "torch.optim.Adam, default betas, constant lr from the grid",
    }[name]


# ---------------------------------------------------------------------------- dense feasibility
_RATES: dict = {}


def _flop_rates(device) -> tuple[float, float]:
    """Measured (matmul, Cholesky) flop rates of this machine and thread count, once."""
    key = (str(device), torch.get_num_threads())
    if key not in _RATES:
        a = torch.randn(800, 800, dtype=DT, device=device)
        spd = a @ a.T + 800 * torch.eye(800, dtype=DT, device=device)
        for _ in range(2):  # the second is timed
            synchronize(device)
            t0 = time.perf_counter()
            _ = a @ a
            synchronize(device)
            t_mm = time.perf_counter() - t0
            t0 = time.perf_counter()
            torch.linalg.cholesky(spd)
            synchronize(device)
            t_ch = time.perf_counter() - t0
        _RATES[key] = (2 * 800**3 / max(t_mm, 1e-9), 800**3 / 3 / max(t_ch, 1e-9))
    return _RATES[key]


def dense_prediction(name: str, n: int, rows: int, device) -> tuple[float, float]:
    """(seconds, bytes) predicted for one step of a dense LM variant, from the measured
    rates: ``LM-dense`` forms ``J^T J`` (``2 N n^2`` flops) and factors it (``n^3 / 3``),
    holding ``J`` twice (the per-tensor pieces and their concatenation), ``G``, ``G + eps I``
    and its factor; ``LM-dense-JJt`` forms ``J J^T`` (``2 N^2 n``) and factors it
    (``N^3 / 3``), holding ``J`` twice and three ``N x N`` matrices (``N = B r``). The
    Jacobian itself is not in the time (it is ``O(N n)``, but slow in practice: see E7's
    sweep)."""
    r_mm, r_ch = _flop_rates(device)
    if name == "LM-dense":
        return 2.0 * rows * n * n / r_mm + n**3 / 3.0 / r_ch, 8.0 * (2.0 * rows * n + 3.0 * n * n)
    return 2.0 * rows * rows * n / r_mm + rows**3 / 3.0 / r_ch, 8.0 * (
        2.0 * rows * n + 3.0 * rows**2
    )


def dense_skip_reason(name: str, n: int, rows: int, budget: float, st: dict, device) -> str | None:
    """Why a dense LM variant is not run at this size (``None``: it is run): its predicted
    memory is above ``dense_max_gb`` or one step is predicted to take more than the budget."""
    seconds, nbytes = dense_prediction(name, n, rows, device)
    if nbytes > st["dense_max_gb"] * 1e9 or seconds > budget:
        return (
            f"skipped: one step predicted {seconds:.3g} s (budget {budget:g} s) and "
            f"{nbytes / 1e9:.3g} GB (cap {st['dense_max_gb']:g} GB)"
        )
    return None


# ---------------------------------------------------------------------------- one run
def _log_steps(ratio: float, max_steps: int = 10**8) -> set[int]:
    steps, k = set(range(0, 11)), 10.0
    while k < max_steps:
        k *= ratio
        steps.add(int(round(k)))
    return steps


_EVAL_STEPS = _log_steps(1.25)  # where the test loss is evaluated (outside the clock)
_KEEP_STEPS = _log_steps(1.04)  # the points of the training curves written and drawn


def thin(points: list) -> list:
    """The points at steps 0..10 and on a geometric grid (ratio 1.04), and the last one."""
    return [p for i, p in enumerate(points) if p[0] in _KEEP_STEPS or i == len(points) - 1]


def _mse(model, X, y) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(X), y))


def run_one(
    task: dict,
    name: str,
    lr,
    *,
    st: dict,
    data,
    budget: float,
    seed: int,
    device,
    verbose: bool = True,
) -> dict:
    """Train one model with one method for ``budget`` seconds of step time.

    Returns the per-step training curve ``points`` (step, wall, train loss; every step),
    the evaluations ``evals`` (step, wall, train loss, test loss)
    outside the clock, the step times and a status."""
    Xtr, ytr, Xte, yte = data
    model = make_model(Xtr.shape[1], task["depth"], task["width"], ytr.shape[1], seed, device)
    n = sum(p.numel() for p in model.parameters())
    rows = ytr.numel()
    base = dict(
        task=task_label(task),
        depth=task["depth"],
        width=task["width"],
        n=n,
        rows=rows,
        method=name,
        lr=lr,
        budget=budget,
    )
    init_train = _mse(model, Xtr, ytr)
    evals = [(0, 0.0, init_train, _mse(model, Xte, yte))]
    points = [(0, 0.0, init_train)]
    if name in ("LM-dense", "LM-dense-JJt"):
        why = dense_skip_reason(name, n, rows, budget, st, device)
        if why is not None:
            return dict(
                base,
                status=why,
                points=points,
                evals=evals,
                steps=0,
                wall=0.0,
                step_times=[],
                note="",
                warnings=0,
            )
    makers = {
        "LM-exact": lambda: LMExact(model, st),
        "LM-dense": lambda: DenseLM(model, st, "normal"),
        "LM-dense-JJt": lambda: DenseLM(model, st, "woodbury"),
        "L-BFGS": lambda: LBFGS(model, st),
        "Adam": lambda: Adam(model, lr),
    }
    if name not in makers:
        raise ValueError(f"unknown method {name!r}")
    method = makers[name]()
    wall, status, step_times, n_warn = 0.0, "ok", [], 0
    next_eval = budget / st["n_log"]
    last_eval_step = 0
    while wall < budget and method.steps < st["max_steps"]:
        steps_before = method.steps
        synchronize(device)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                k, f, after = method.step(Xtr, ytr)
        except Exception as err:  # a library failure: record it, keep the other runs going
            status = f"error: {type(err).__name__}: {err}"
            if verbose:
                traceback.print_exc()
            break
        synchronize(device)
        dt = time.perf_counter() - t0
        if caught and not n_warn and verbose:
            w = caught[0]
            print(f"E7 warning ({base['task']}, {name}): {w.category.__name__}: {w.message}")
        n_warn += len(caught)
        wall_before, wall = wall, wall + dt
        done = max(method.steps - steps_before, 1)
        step_times += [dt / done] * done
        # every step's training loss is known (full batch): after the call (LM) or at its
        # start (Adam, L-BFGS: the loss the call evaluated first)
        if k > points[-1][0]:
            points.append((k, wall if after else wall_before, f))
        if not math.isfinite(f) or f > st["diverge_loss"]:
            status = "diverged"
            break
        if (
            any(s in _EVAL_STEPS for s in range(last_eval_step + 1, method.steps + 1))
            or wall >= next_eval
        ):
            evals.append((method.steps, wall, _mse(model, Xtr, ytr), _mse(model, Xte, yte)))
            last_eval_step = method.steps
            if wall >= next_eval:
                next_eval = wall + budget / st["n_log"]
    steps = method.steps
    final_train, final_test = _mse(model, Xtr, ytr), _mse(model, Xte, yte)
    if evals[-1][0] != steps:
        evals.append((steps, wall, final_train, final_test))
    if points[-1][0] != steps:
        points.append((steps, wall, final_train))
    if status == "ok" and (not math.isfinite(final_train) or final_train > st["diverge_loss"]):
        status = "diverged"
    note = method.note()
    if name == "LM-exact" and status == "ok":
        note += f", route {_route(model, Xtr, ytr, method.opt.damping)}"
    return dict(
        base,
        status=status,
        points=points,
        evals=evals,
        steps=steps,
        wall=wall,
        step_times=step_times,
        note=note,
        warnings=n_warn,
    )


def _route(model, X, y, damping: float) -> str:
    """The route ``method="auto"`` takes for ``G + damping I`` at the final parameters."""
    try:
        G = hessinv.ChainGGN(model, nn.MSELoss(), X, y, progress=False)
        return G.factorize(max(damping, 1e-300)).method
    except Exception as err:  # report, never fail the run on it
        return f"? ({type(err).__name__})"


# ---------------------------------------------------------------------------- reading runs
def final_loss(r: dict) -> float:
    f = r["evals"][-1][2]
    return f if r["status"] == "ok" and math.isfinite(f) else math.inf


def loss_at_time(r: dict, t: float) -> float | None:
    """Training loss at ``t`` seconds of step time (last known point at or before it)."""
    if r["steps"] == 0:
        return None
    pts = [p for p in r["points"] if p[1] <= t * 1.0001]
    return pts[-1][2] if pts else None


def loss_at_step(r: dict, k: int) -> float | None:
    """Training loss after ``k`` steps; ``None`` if the run did not get that far."""
    if k > r["steps"]:
        return None
    pts = [p for p in r["points"] if p[0] <= k]
    return pts[-1][2]


def time_to(r: dict, thr: float) -> tuple[float | None, int | None]:
    """(seconds, steps) of the first known point with training loss <= ``thr``."""
    if r["status"] not in ("ok", "diverged"):
        return None, None
    for step, wall, f in r["points"]:
        if f <= thr:
            return wall, step
    return None, None


def median_step(r: dict) -> float | None:
    return float(np.median(r["step_times"])) if r["step_times"] else None


# ---------------------------------------------------------------------------- entry point
def run(cfg: Config, **overrides) -> str:
    """Run E7; ``overrides`` replace entries of :func:`settings`. Writes ``e7_*`` into
    ``cfg.outdir``."""
    return run_with_settings("E7", settings, _run, cfg, overrides)


def _grid(name: str, st: dict):
    return st["adam_lrs"] if name == "Adam" else [None]


def _best(runs: list[dict], name: str) -> dict | None:
    cand = [r for r in runs if r["method"] == name]
    if not cand:
        return None
    return min(cand, key=lambda r: (final_loss(r), -r["steps"]))


def warm_up(st: dict, device) -> None:
    """A few untimed steps of every method on a tiny problem: one-time initialisations
    (``torch.func`` transforms, forward-mode AD's decompositions, ...) stay out of the clock."""
    task = dict(_SINES2D, name="warm-up", n_train=16, n_test=16, depth=3, width=4)
    data = load_task(task, 0, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in st["methods"]:
            run_one(
                task,
                name,
                st["adam_lrs"][0],
                st=dict(st, max_steps=2),
                data=data,
                budget=10.0,
                seed=0,
                device=device,
                verbose=False,
            )


def _run(cfg: Config, st: dict) -> str:
    t_start = time.perf_counter()
    device, out = cfg.device, pathlib.Path(cfg.outdir)
    out.mkdir(parents=True, exist_ok=True)
    _flop_rates(device)
    warm_up(st, device)
    mode = "quick" if cfg.quick else "full"

    # ---- the tasks
    datas = {task_label(t): load_task(t, cfg.seed, device) for t in st["tasks"]}
    jobs = [(t, m, lr) for t in st["tasks"] for m in st["methods"] for lr in _grid(m, st)]
    results: dict[str, list[dict]] = {}
    bar = progress(jobs, "E7 tasks")
    for task, name, lr in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{task_label(task)} {name}" + (f" lr={lr:g}" if lr else ""))
        r = run_one(
            task,
            name,
            lr,
            st=st,
            data=datas[task_label(task)],
            budget=st["budget_s"],
            seed=cfg.seed,
            device=device,
        )
        results.setdefault(task_label(task), []).append(r)

    # ---- the n-sweep on the first synthetic task's data
    sweep_task = next((t for t in st["tasks"] if t["kind"] == "synthetic"), st["tasks"][0])
    sweep_data = datas[task_label(sweep_task)]
    adam_best = _best(results[task_label(sweep_task)], "Adam")
    sweep_lr = adam_best["lr"] if adam_best is not None else st["adam_lrs"][0]
    sweep_runs: list[dict] = []
    sjobs = [(d, w, m) for d, w in st["sweep"] for m in st["methods"]]
    bar = progress(sjobs, "E7 n-sweep")
    for depth, width, name in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"L={depth} w={width} {name}")
        task = dict(sweep_task, depth=depth, width=width)
        r = run_one(
            task,
            name,
            sweep_lr if name == "Adam" else None,
            st=st,
            data=sweep_data,
            budget=st["sweep_budget_s"],
            seed=cfg.seed,
            device=device,
        )
        sweep_runs.append(r)

    md_parts = _tables(results, sweep_runs, st, out, mode, device, sweep_task, sweep_lr)
    _figure(results, st, out, mode, device)
    _sweep_figure(sweep_runs, st, out, sweep_task, sweep_lr)
    write_curves(results, sweep_runs, out)
    elapsed = time.perf_counter() - t_start
    r_mm, r_ch = _flop_rates(device)
    head = [
        f"E7 ({mode}): full-batch nonlinear least squares (MSELoss), deep tanh MLPs, "
        f"orthogonal init (gain 1), zero biases, float64 on {device}, seed {cfg.seed}, 1 torch "
        f"thread; wall-clock budget per run {st['budget_s']:g} s of step time (n-sweep "
        f"{st['sweep_budget_s']:g} s), evaluation excluded; Adam grid {st['adam_lrs']} "
        f"(n-sweep: lr {sweep_lr:g}, the best on {task_label(sweep_task)}); measured rates "
        f"{r_mm / 1e9:.1f} GFlop/s (matmul), {r_ch / 1e9:.1f} GFlop/s (Cholesky); E7 took "
        f"{elapsed:.0f} s.",
        "",
        "Settings: " + "; ".join(f"{m}: {describe(m, st)}" for m in st["methods"]) + ".",
        "",
    ]
    files = (
        "Files: `e7_least_squares.png` (loss against steps and seconds), `e7_sweep.png`, "
        "`e7_least_squares.{csv,md}`, `e7_verdict.{csv,md}`, `e7_thresholds.{csv,md}`, "
        "`e7_runs.{csv,md}` (every run, all Adam learning rates), `e7_sweep.{csv,md}`, "
        "`e7_sweep_summary.{csv,md}`, `e7_curves.csv` (training curves, thinned)."
    )
    md = "\n".join(head + md_parts + [files]) + "\n"
    (out / "e7_summary.md").write_text(md)
    return md


# ---------------------------------------------------------------------------- tables
def _fmt_thr(t: float) -> str:
    return f"{t:g}"


def _tables(results, sweep_runs, st, out, mode, device, sweep_task, sweep_lr) -> list[str]:
    thr = st["thresholds"]
    T = st["budget_s"]
    main_rows, run_rows, thr_rows, verdict_rows = [], [], [], []
    for label, runs in results.items():
        chosen = {m: _best(runs, m) for m in st["methods"]}
        for name, r in chosen.items():
            if r is None:
                continue
            row = {
                "task": label,
                "n": r["n"],
                "rows B*r": r["rows"],
                "method": name,
                "lr": r["lr"],
                "steps": r["steps"],
                "s/step": median_step(r),
                "init train loss": r["evals"][0][2],
                "train loss": r["evals"][-1][2] if r["steps"] else None,
                "test loss": r["evals"][-1][3] if r["steps"] else None,
                f"train loss @{T / 10:g}s": loss_at_time(r, T / 10),
            }
            best_test = min(r["evals"][1:], key=lambda e: e[3], default=None)
            row["best test loss"] = best_test[3] if best_test else None
            row["s at best test"] = best_test[1] if best_test else None
            for t in thr:
                row[f"s to {_fmt_thr(t)}"] = time_to(r, t)[0]
            row["status"] = r["status"]
            row["note"] = r["note"]
            if name in LM_METHODS[1:] and chosen.get("LM-exact") is not None:
                agree = agreement(chosen["LM-exact"], r)
                if agree is not None:
                    row["note"] += (
                        f"; training losses agree with LM-exact's to {agree[0]:.1g} "
                        f"(max relative difference over steps 1-{agree[1]}, "
                        f"losses >= {AGREE_FLOOR:g})"
                    )
            main_rows.append(row)
            for t in thr:
                s, k = time_to(r, t)
                thr_rows.append(
                    {"task": label, "method": name, "threshold": t, "seconds": s, "steps": k}
                )
        for r in runs:
            run_rows.append(
                {
                    "task": label,
                    "n": r["n"],
                    "method": r["method"],
                    "lr": r["lr"],
                    "steps": r["steps"],
                    "wall s": r["wall"],
                    "s/step": median_step(r),
                    "train loss": r["evals"][-1][2] if r["steps"] else None,
                    "test loss": r["evals"][-1][3] if r["steps"] else None,
                    "status": r["status"],
                    "warnings": r["warnings"],
                }
            )
        verdict_rows.append(_verdict(label, chosen, st))
    title = (
        f"E7: full-batch least squares, final losses after {T:g} s of steps and seconds "
        f"to reach training-loss thresholds (float64, {device}, {mode}; Adam: the best lr)"
    )
    parts = [write_table(main_rows, out, "e7_least_squares", title)]
    parts.append(
        write_table(
            verdict_rows, out, "e7_verdict", "E7: who wins, per second and per step (training loss)"
        )
    )
    write_table(
        thr_rows,
        out,
        "e7_thresholds",
        "E7: seconds and steps to reach each training-loss threshold",
    )
    write_table(run_rows, out, "e7_runs", "E7: every run (all Adam learning rates)")

    # ---- the sweep
    sweep_rows = []
    thr_s = st["sweep_threshold"]
    for r in sweep_runs:
        sweep_rows.append(
            {
                "depth": r["depth"],
                "width": r["width"],
                "n": r["n"],
                "rows B*r": r["rows"],
                "method": r["method"],
                "steps": r["steps"],
                "s/step": median_step(r),
                "train loss": r["evals"][-1][2] if r["steps"] else None,
                f"s to {_fmt_thr(thr_s)}": time_to(r, thr_s)[0],
                "status": r["status"],
            }
        )
    parts.append(
        write_table(
            sweep_rows,
            out,
            "e7_sweep",
            f"E7: n-sweep on {sweep_task['name']} ({sweep_task.get('n_train', '')} samples, "
            f"{st['sweep_budget_s']:g} s per run; Adam lr {sweep_lr:g})",
        )
    )
    summ = []
    for name in st["methods"]:
        rs = [r for r in sweep_runs if r["method"] == name]
        ran = [r for r in rs if r["steps"] > 0 and r["status"] == "ok"]
        hit = [r for r in ran if time_to(r, thr_s)[0] is not None]
        big = max(ran, key=lambda r: r["n"]) if ran else None
        skipped = [r for r in rs if r["status"].startswith("skipped")]
        summ.append(
            {
                "method": name,
                "largest n with a step": big["n"] if big else None,
                f"largest n reaching {_fmt_thr(thr_s)}": max(r["n"] for r in hit) if hit else None,
                "s/step at largest n": median_step(big) if big else None,
                "train loss at largest n": big["evals"][-1][2] if big else None,
                "beyond": (
                    f"n = {min(r['n'] for r in skipped)}: {skipped[0]['status']}"
                    if skipped
                    else "-"
                ),
            }
        )
    parts.append(
        write_table(
            summ,
            out,
            "e7_sweep_summary",
            f"E7: the largest n each method handles within {st['sweep_budget_s']:g} s",
        )
    )
    return parts


AGREE_FLOOR = 1e-8  # below it the loss of a least-squares fit is dominated by rounding


def agreement(a: dict, b: dict) -> tuple[float, int] | None:
    """(max relative difference of the training losses, steps compared) of two LM runs, over
    their common steps with both losses >= ``AGREE_FLOOR``; ``None`` if there are none."""
    diffs, last = [], 0
    for j in range(1, min(a["steps"], b["steps"]) + 1):
        fa, fb = loss_at_step(a, j), loss_at_step(b, j)
        if fa is None or fb is None or min(fa, fb) < AGREE_FLOOR:
            break
        diffs.append(abs(fa - fb) / abs(fa))
        last = j
    return (max(diffs), last) if diffs else None


def _verdict(label: str, chosen: dict, st: dict) -> dict:
    T = st["budget_s"]
    ok = {
        m: r for m, r in chosen.items() if r is not None and r["steps"] > 0 and r["status"] == "ok"
    }

    def best_at(fn):
        vals = {m: fn(r) for m, r in ok.items()}
        vals = {m: v for m, v in vals.items() if v is not None and math.isfinite(v)}
        if not vals:
            return None, None
        m = min(vals, key=vals.get)
        return m, vals[m]

    early_m, early_v = best_at(lambda r: loss_at_time(r, T / 10))
    final_m, final_v = best_at(final_loss)
    lm = ok.get("LM-exact")
    others = {m: final_loss(r) for m, r in ok.items() if m not in LM_METHODS}
    best_other = min(others, key=others.get) if others else None
    k = lm["steps"] if lm else None
    row = {
        "task": label,
        "n": next(iter(ok.values()))["n"] if ok else None,
        f"best @{T / 10:g}s": early_m,
        f"its loss @{T / 10:g}s": early_v,
        f"best @{T:g}s": final_m,
        f"its loss @{T:g}s": final_v,
        "LM-exact final": final_loss(lm) if lm else None,
        "best first-order / quasi-Newton": best_other,
        "its final": others.get(best_other) if best_other else None,
        "ratio (other / LM-exact)": (
            others[best_other] / final_loss(lm)
            if lm and best_other and final_loss(lm) > 0
            else None
        ),
    }
    thr = st["thresholds"]
    lowest = None
    for t in thr:  # the lowest threshold any method reached
        if any(time_to(r, t)[0] is not None for r in ok.values()):
            lowest = t
    if lowest is not None:
        times = {m: time_to(r, lowest)[0] for m, r in ok.items()}
        times = {m: v for m, v in times.items() if v is not None}
        row["lowest threshold reached"] = lowest
        row["first there (s)"] = ", ".join(
            f"{m} {v:.3g}" for m, v in sorted(times.items(), key=lambda x: x[1])
        )
    row["K = LM-exact steps"] = k
    for m in METHODS:
        if m in st["methods"]:
            row[f"{m} @K steps"] = loss_at_step(ok[m], k) if m in ok and k else None
    return row


def write_curves(results, sweep_runs, out) -> None:
    """``e7_curves.csv``: the kept points of every run's training curve and the evaluations."""
    import csv

    rows = []
    for part, runs in (("task", [r for rs in results.values() for r in rs]), ("sweep", sweep_runs)):
        for r in runs:
            for step, wall, f in thin(r["points"]):
                rows.append(
                    dict(
                        part=part,
                        task=r["task"],
                        n=r["n"],
                        method=r["method"],
                        lr=r["lr"],
                        kind="train (per step)",
                        step=step,
                        wall_s=wall,
                        train_loss=f,
                        test_loss="",
                    )
                )
            for step, wall, f, te in r["evals"]:
                rows.append(
                    dict(
                        part=part,
                        task=r["task"],
                        n=r["n"],
                        method=r["method"],
                        lr=r["lr"],
                        kind="evaluation",
                        step=step,
                        wall_s=wall,
                        train_loss=f,
                        test_loss=te,
                    )
                )
    if not rows:
        return
    with open(pathlib.Path(out) / "e7_curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------- figures
FIGURE_FLOOR = 1e-15  # losses below are rounding noise of the residuals; the axes stop here


def _figure(results, st, out, mode, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    ncol = len(labels)
    fig, axes = plt.subplots(2, ncol, figsize=(4.4 * ncol, 7.4), squeeze=False)
    for c, label in enumerate(labels):
        runs = results[label]
        ax_s, ax_t = axes[0, c], axes[1, c]
        n = runs[0]["n"]
        floor = math.inf
        for name in st["methods"]:
            r = _best(runs, name)
            if r is None:
                continue
            color, ls = _STYLE[name]
            if r["steps"] == 0:
                why = "skipped" if r["status"].startswith("skipped") else r["status"][:30]
                ax_s.plot([], [], color=color, ls=ls, label=f"{name}: {why} (see table)")
                continue
            pts = np.array(thin(r["points"]), dtype=float)
            ev = np.array(r["evals"], dtype=float)
            lab = name + (f" (lr {r['lr']:g})" if r["lr"] is not None else "")
            if r["status"] != "ok":
                lab += f" [{r['status'].split(':')[0]}]"
            ax_s.plot(np.maximum(pts[:, 0], 1), pts[:, 2], color=color, ls=ls, lw=1.5, label=lab)
            ax_t.plot(np.maximum(pts[:, 1], 1e-3), pts[:, 2], color=color, ls=ls, lw=1.5)
            ax_s.plot(np.maximum(ev[:, 0], 1), ev[:, 3], color=color, ls=":", lw=1.0)
            ax_t.plot(np.maximum(ev[:, 1], 1e-3), ev[:, 3], color=color, ls=":", lw=1.0)
            floor = min(floor, float(np.nanmin(pts[:, 2])))
        for ax in (ax_s, ax_t):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if math.isfinite(floor) and floor > 0:
                ax.set_ylim(bottom=max(floor / 3, FIGURE_FLOOR))
        clipped = " [clipped]" if floor < FIGURE_FLOOR else ""
        ax_s.set_title(f"{label} (n = {n}, B r = {runs[0]['rows']}){clipped}", fontsize=9)
        ax_s.set_xlabel("step (LM: one LM step; L-BFGS: one iteration; Adam: one step)", fontsize=7)
        ax_t.set_xlabel("wall-clock seconds of steps", fontsize=8)
        ax_t.axvline(st["budget_s"] / 10, color="gray", lw=0.8, ls=":")
        if c == 0:
            ax_s.set_ylabel("MSE (solid: train, dotted: test)", fontsize=8)
            ax_t.set_ylabel("MSE (solid: train, dotted: test)", fontsize=8)
        ax_s.legend(fontsize=6)
    fig.suptitle(
        f"E7: full-batch least squares, deep tanh MLPs, float64, {device}, "
        f"{st['budget_s']:g} s of steps per run ({mode})",
        fontsize=10,
    )
    save_figure(fig, out / "e7_least_squares.png")


def _sweep_figure(sweep_runs, st, out, sweep_task, sweep_lr) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in st["methods"]:
        rs = sorted(
            [r for r in sweep_runs if r["method"] == name and r["steps"] > 0], key=lambda r: r["n"]
        )
        if not rs:
            continue
        color, ls = _STYLE[name]
        lab = name + (f" (lr {sweep_lr:g})" if name == "Adam" else "")
        ax1.loglog(
            [r["n"] for r in rs],
            [median_step(r) for r in rs],
            marker="o",
            color=color,
            ls=ls,
            label=lab,
        )
        ax2.loglog(
            [r["n"] for r in rs],
            [max(r["evals"][-1][2], 1e-16) for r in rs],
            marker="o",
            color=color,
            ls=ls,
            label=lab,
        )
    ax1.set_ylabel("seconds per step (median)")
    ax2.set_ylabel(f"training MSE after {st['sweep_budget_s']:g} s")
    ax2.axhline(st["sweep_threshold"], color="gray", lw=0.8, ls=":")
    for ax in (ax1, ax2):
        ax.set_xlabel("n (parameters)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"E7 n-sweep on {sweep_task['name']} ({sweep_task.get('n_train', '')} samples), "
        f"(depth, width) in {st['sweep']}",
        fontsize=9,
    )
    save_figure(fig, out / "e7_sweep.png")


__all__ = ["run", "settings", "load_task", "make_model", "METHODS", "DenseLM"]
