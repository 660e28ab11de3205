"""Tests of hessinv.optim against dense (torch.func / eigh) references, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy.optimize import brentq, minimize
from torch import nn

import hessinv
from hessinv.optim import DampedNewton, TrustRegionNewton, trust_region_subproblem

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
def make_problem(depth: int, width: int, batch: int, loss: str, seed: int, scale: float = 1.0):
    """A tanh MLP with ``depth`` Linear layers, a batch and a loss (CE or MSE)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in, d_out = 3, 3
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    X = torch.randn(batch, d_in, generator=gen, dtype=DT)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, d_out, (batch,), generator=gen)
    return model, nn.MSELoss(), X, torch.randn(batch, d_out, generator=gen, dtype=DT)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def dense_g_H(model, loss_fn, X, y):
    params = list(model.parameters())
    loss = loss_fn(model(X), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    return float(loss.detach()), g.detach(), hessinv.dense_hessian(model, loss_fn, X, y)


def dense_trust_region(H: torch.Tensor, g: torch.Tensor, radius: float) -> torch.Tensor:
    """Exact TR step by eigendecomposition and the secular equation (easy case only)."""
    lam_all, Q = torch.linalg.eigh(H)
    gt = Q.T @ g

    def step(lam):
        return -Q @ (gt / (lam_all + lam))

    lam_min = float(lam_all[0])
    if lam_min > 0 and float(torch.linalg.vector_norm(step(0.0))) <= radius:
        return step(0.0)
    lo = max(0.0, -lam_min) + 1e-14 * max(1.0, abs(lam_min))
    hi = lo + float(torch.linalg.vector_norm(g)) / radius + 1.0

    def phi(lam):
        return 1.0 / float(torch.linalg.vector_norm(step(lam))) - 1.0 / radius

    assert phi(lo) < 0 < phi(hi), "reference: hard case or bad bracket"
    lam = brentq(phi, lo, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
    return step(lam)


def model_value(H, g, s):
    return float(g @ s + 0.5 * s @ (H @ s))


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ----------------------------------------------------------------------------- DampedNewton
@pytest.mark.parametrize(
    "depth,width,batch,loss,seed",
    [(2, 4, 6, "ce", 0), (3, 5, 8, "mse", 1), (3, 4, 5, "ce", 2)],
)
def test_damped_newton_step_matches_dense(depth, width, batch, loss, seed):
    model, loss_fn, X, y = make_problem(depth, width, batch, loss, seed)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    eps = max(0.5, 0.5 - float(torch.linalg.eigvalsh(H)[0]))  # H + eps I is PD: no raise
    x0 = flat_params(model)
    expected = x0 - 0.7 * torch.linalg.solve(H + eps * torch.eye(len(g), dtype=DT), g)
    opt = DampedNewton(model, loss_fn, lr=0.7, damping=eps, damping_down=0.5)
    ret = opt.step(X, y)
    assert ret == pytest.approx(f0, rel=1e-13)
    info = opt.last_step
    assert info["accepted"] and info["tries"] == 1 and info["damping"] == eps
    assert rel(flat_params(model) - x0, expected - x0) < 1e-10
    s = expected - x0
    assert info["predicted_reduction"] == pytest.approx(-model_value(H, g, s), rel=1e-10)
    with torch.no_grad():
        f1 = float(loss_fn(model(X), y))
    assert info["actual_reduction"] == pytest.approx(f0 - f1, rel=1e-10)
    assert info["step_norm"] == pytest.approx(float(s.norm()), rel=1e-10)
    assert opt.damping == pytest.approx(0.5 * eps)


def test_damped_newton_indefinite_raises_damping_until_pd():
    model, loss_fn, X, y = make_problem(3, 5, 6, "mse", 3, scale=2.5)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    assert lam_min < -1e-3  # H indefinite: a 1e-4 damping is not enough
    x0 = flat_params(model)
    opt = DampedNewton(model, loss_fn, damping=1e-4, damping_up=3.0)
    opt.step(X, y)
    info = opt.last_step
    eps = info["damping"]
    assert eps + lam_min > 0 and eps / 3.0 + lam_min <= 0  # smallest PD value on the grid
    assert info["direction"] == "newton" and info["factorizations"] >= 2
    if info["accepted"]:
        expected = -torch.linalg.solve(H + eps * torch.eye(len(g), dtype=DT), g)
        assert rel(flat_params(model) - x0, expected) < 1e-10
        assert float(loss_fn(model(X), y).detach()) < f0
    else:  # rejected tries restore the parameters exactly
        assert torch.equal(flat_params(model), x0)


def test_damped_newton_rejects_and_restores():
    # lr huge: the first tries overshoot, are rejected (parameters restored), eps grows
    model, loss_fn, X, y = make_problem(2, 4, 6, "mse", 4)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    x0 = flat_params(model)
    opt = DampedNewton(model, loss_fn, lr=1e4, damping=1.0, damping_up=10.0, max_tries=8)
    opt.step(X, y)
    info = opt.last_step
    assert info["tries"] > 1
    eps = info["damping"]
    if info["accepted"]:
        expected = -1e4 * torch.linalg.solve(H + eps * torch.eye(len(g), dtype=DT), g)
        assert rel(flat_params(model) - x0, expected) < 1e-9
        assert info["new_loss"] < f0
    else:
        assert torch.equal(flat_params(model), x0)


def test_damped_newton_max_step_norm():
    model, loss_fn, X, y = make_problem(2, 4, 6, "ce", 5)
    x0 = flat_params(model)
    opt = DampedNewton(model, loss_fn, damping=1e-3, max_step_norm=1e-2)
    opt.step(X, y)
    assert opt.last_step["step_norm"] == pytest.approx(1e-2)
    assert float((flat_params(model) - x0).norm()) == pytest.approx(1e-2, rel=1e-10)


# ----------------------------------------------------------------------------- TrustRegionNewton
@pytest.mark.parametrize(
    "depth,width,batch,loss,seed,radius",
    [(2, 4, 6, "mse", 0, 0.3), (3, 5, 8, "ce", 1, 0.5), (3, 4, 7, "mse", 6, 1.0)],
)
def test_trust_region_step_matches_dense_boundary(depth, width, batch, loss, seed, radius):
    model, loss_fn, X, y = make_problem(depth, width, batch, loss, seed)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    expected = dense_trust_region(H, g, radius)
    assert float(expected.norm()) == pytest.approx(radius, rel=1e-9)  # a boundary case
    x0 = flat_params(model)
    opt = TrustRegionNewton(model, loss_fn, radius=radius)
    assert opt.step(X, y) == pytest.approx(f0, rel=1e-13)
    info = opt.last_step
    assert info["tries"] == 1 and info["on_boundary"] and info["radius"] == radius
    s = flat_params(model) - x0 if info["accepted"] else None
    if s is None:  # rejected: reproduce the step from the subproblem solver itself
        Hc = hessinv.ChainHessian(model, loss_fn, X, y)
        s = trust_region_subproblem(Hc, Hc.gradient(), radius).step
    assert rel(s, expected) < 1e-8
    assert info["predicted_reduction"] == pytest.approx(-model_value(H, g, expected), rel=1e-8)


def test_trust_region_indefinite_boundary():
    model, loss_fn, X, y = make_problem(3, 5, 6, "mse", 3, scale=2.5)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    evals = torch.linalg.eigvalsh(H)
    assert float(evals[0]) < -1e-3  # indefinite
    radius = 0.2
    expected = dense_trust_region(H, g, radius)
    Hc = hessinv.ChainHessian(model, loss_fn, X, y)
    sol = trust_region_subproblem(Hc, Hc.gradient(), radius)
    assert sol.on_boundary and not sol.hard_case
    assert sol.lam > -float(evals[0])
    assert sol.n_negative == int((evals < 0).sum())
    assert rel(sol.step, expected) < 1e-8
    # and through the optimizer
    x0 = flat_params(model)
    opt = TrustRegionNewton(model, loss_fn, radius=radius)
    opt.step(X, y)
    if opt.last_step["accepted"]:
        assert rel(flat_params(model) - x0, expected) < 1e-8
        assert opt.last_step["rho"] > opt.eta
    else:
        assert torch.equal(flat_params(model), x0)


def test_trust_region_interior_step_is_newton_step():
    # linear least squares: H = 2/(Bk) X^T X (x) I is positive definite, a large radius
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X = torch.randn(10, 3, generator=gen, dtype=DT)
    y = torch.randn(10, 2, generator=gen, dtype=DT)
    loss_fn = nn.MSELoss()
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    x0 = flat_params(model)
    opt = TrustRegionNewton(model, loss_fn, radius=50.0)
    opt.step(X, y)
    info = opt.last_step
    assert info["accepted"] and not info["on_boundary"] and info["lam"] == 0.0
    assert rel(flat_params(model) - x0, -torch.linalg.solve(H, g)) < 1e-10
    # a quadratic: the Newton step lands on the minimum
    _, g1, _ = dense_g_H(model, loss_fn, X, y)
    assert float(g1.norm()) < 1e-10


class DenseHessian:
    """A dense stand-in with the parts of the ChainHessian API the subproblem solver uses."""

    class _Factor:
        def __init__(self, M):
            L, info = torch.linalg.cholesky_ex(M)
            self.is_positive_definite = int(info) == 0
            self.method = "riccati"
            self._L = L

        def solve(self, b):
            return torch.cholesky_solve(b.reshape(len(b), -1), self._L).reshape(b.shape)

    def __init__(self, H):
        self.H = H

    def factorize(self, lam, fallback=True):
        return self._Factor(self.H + lam * torch.eye(len(self.H), dtype=self.H.dtype))

    def matvec(self, v):
        return self.H @ v

    def diagonal(self):
        return torch.diagonal(self.H)


def _spectral_problem(evals, seed):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=gen, dtype=DT))
    evals = torch.tensor(evals, dtype=DT)
    return Q, evals, Q @ torch.diag(evals) @ Q.T, gen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subproblem_random_indefinite_matches_eigh(seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(12, 12, generator=gen, dtype=DT)
    H = 0.5 * (A + A.T)
    g = torch.randn(12, generator=gen, dtype=DT)
    for radius in (0.05, 0.5, 5.0):
        sol = trust_region_subproblem(DenseHessian(H), g, radius)
        expected = dense_trust_region(H, g, radius)
        assert rel(sol.step, expected) < 1e-8
        assert sol.on_boundary


def test_subproblem_hard_case():
    # g orthogonal to the eigenvector of lambda_min = -2, ||s(2)|| < radius: the hard case
    Q, evals, H, gen = _spectral_problem([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0, 7.0, 9.0], 3)
    gt = torch.randn(8, generator=gen, dtype=DT)
    gt[0] = 0.0
    g = Q @ gt
    s_perp = -Q[:, 1:] @ (gt[1:] / (evals[1:] - evals[0]))
    radius = 2.0 * float(s_perp.norm())
    tau = math.sqrt(radius**2 - float(s_perp.norm()) ** 2)
    optimum = model_value(H, g, s_perp + tau * Q[:, 0])
    sol = trust_region_subproblem(DenseHessian(H), g, radius)
    assert sol.hard_case and sol.on_boundary
    assert sol.lam == pytest.approx(2.0, rel=1e-8)
    assert float(sol.step.norm()) == pytest.approx(radius, rel=1e-10)
    assert model_value(H, g, sol.step) == pytest.approx(optimum, rel=1e-9)
    # the step is s_perp +- tau q_1 (either sign is optimal)
    sign = 1.0 if float(sol.step @ Q[:, 0]) > 0 else -1.0
    assert rel(sol.step, s_perp + sign * tau * Q[:, 0]) < 1e-6


def test_subproblem_zero_gradient_negative_curvature():
    Q, evals, H, _ = _spectral_problem([-1.0, 2.0, 3.0, 5.0], 4)
    sol = trust_region_subproblem(DenseHessian(H), torch.zeros(4, dtype=DT), 0.5)
    assert float(sol.step.norm()) == pytest.approx(0.5, rel=1e-10)
    assert model_value(H, torch.zeros(4, dtype=DT), sol.step) == pytest.approx(
        -0.5 * 0.25, rel=1e-9
    )


# ----------------------------------------------------------------------------- convex problem
def _logistic_problem():
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(60, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (60,), generator=gen)  # random labels: not separable
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 3)).to(DT)
    loss_fn = nn.CrossEntropyLoss()

    def f_and_g(theta):
        t = torch.tensor(theta, dtype=DT, requires_grad=True)
        W, b = t[:15].reshape(3, 5), t[15:]
        loss = loss_fn(X @ W.T + b, y)
        (grad,) = torch.autograd.grad(loss, t)
        return float(loss.detach()), grad.numpy()

    ref = minimize(f_and_g, flat_params(model).numpy(), jac=True, method="BFGS",
                   options={"gtol": 1e-11, "maxiter": 2000})
    return model, loss_fn, X, y, float(ref.fun)


@pytest.mark.parametrize("cls,kwargs", [(DampedNewton, {"damping": 1e-3}),
                                        (TrustRegionNewton, {"radius": 1.0})])
def test_convex_logistic_regression_converges(cls, kwargs):
    model, loss_fn, X, y, fmin = _logistic_problem()
    opt = cls(model, loss_fn, **kwargs)
    losses = [opt.step(X, y) for _ in range(10)]
    final = float(loss_fn(model(X), y).detach())
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))  # monotone
    assert losses[0] - fmin > 0.1  # started far from the minimum
    assert final - fmin < 1e-9
    assert opt.step_count == 10


# ----------------------------------------------------------------------------- state, arguments
@pytest.mark.parametrize("cls,kwargs,key", [(DampedNewton, {"damping": 0.1}, "damping"),
                                            (TrustRegionNewton, {"radius": 0.3}, "radius")])
def test_state_dict_round_trip(cls, kwargs, key):
    model, loss_fn, X, y = make_problem(2, 4, 6, "ce", 8)
    opt = cls(model, loss_fn, **kwargs)
    opt.step(X, y)
    opt.step(X, y)
    state = opt.state_dict()
    assert state["step_count"] == 2 and state[key] == getattr(opt, key)
    assert state[key] != kwargs[key]  # the adaptive state moved
    model2 = copy.deepcopy(model)
    opt2 = cls(model2, loss_fn)
    opt2.load_state_dict(state)
    assert opt2.state_dict() == state
    opt.step(X, y)
    opt2.step(X, y)
    assert torch.equal(flat_params(model), flat_params(model2))
    assert opt.state_dict() == opt2.state_dict()
    with pytest.raises(ValueError):
        opt2.load_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError):
        opt2.load_state_dict({**state, key: -1.0})


def test_list_of_modules_model():
    model, loss_fn, X, y = make_problem(2, 4, 6, "mse", 9)
    model2 = copy.deepcopy(model)
    DampedNewton(list(model), loss_fn, damping=0.5).step(X, y)
    DampedNewton(model2, loss_fn, damping=0.5).step(X, y)
    assert torch.equal(flat_params(model), flat_params(model2))


@pytest.mark.parametrize(
    "cls,kwargs,exc",
    [
        (DampedNewton, {"lr": 0.0}, ValueError),
        (DampedNewton, {"lr": -1.0}, ValueError),
        (DampedNewton, {"lr": "1"}, TypeError),
        (DampedNewton, {"damping": -1e-3}, ValueError),
        (DampedNewton, {"damping": float("nan")}, ValueError),
        (DampedNewton, {"damping_up": 0.5}, ValueError),
        (DampedNewton, {"damping_down": 2.0}, ValueError),
        (DampedNewton, {"min_damping": 1.0, "max_damping": 0.1, "damping": 0.5}, ValueError),
        (DampedNewton, {"max_step_norm": 0.0}, ValueError),
        (DampedNewton, {"max_tries": 0}, ValueError),
        (TrustRegionNewton, {"radius": 0.0}, ValueError),
        (TrustRegionNewton, {"radius": -1.0}, ValueError),
        (TrustRegionNewton, {"radius": 10.0, "max_radius": 1.0}, ValueError),
        (TrustRegionNewton, {"eta": 0.5}, ValueError),
        (TrustRegionNewton, {"shrink": 1.5}, ValueError),
        (TrustRegionNewton, {"grow": 0.5}, ValueError),
        (TrustRegionNewton, {"max_tries": 1.5}, TypeError),
    ],
)
def test_bad_hyperparameters(cls, kwargs, exc):
    model, loss_fn, _, _ = make_problem(2, 4, 6, "ce", 0)
    with pytest.raises(exc):
        cls(model, loss_fn, **kwargs)


@pytest.mark.parametrize("cls", [DampedNewton, TrustRegionNewton])
def test_bad_model_or_loss(cls):
    model, loss_fn, _, _ = make_problem(2, 4, 6, "ce", 0)
    with pytest.raises(TypeError, match="loss_fn"):
        cls(model, "not a loss")
    with pytest.raises(TypeError, match="Sequential"):
        cls(nn.Linear(3, 3), loss_fn)
    with pytest.raises(TypeError, match="Sequential"):
        cls([], loss_fn)
    with pytest.raises(ValueError, match="radius"):
        trust_region_subproblem(None, torch.zeros(3, dtype=DT), 0.0)
