"""Tests of hessinv.optim against dense (torch.func / eigh) references, in float64.

The subproblem solver and the step template are tested against a dense implementation
of the curvature protocol (``_dense_curvature.py``); the end-to-end tests run each
optimizer with the real ``hessinv.ChainHessian`` and with that dense implementation
(``curvature=`` factory), and compare both with dense formulas.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _dense_curvature import DenseCurvature, dense_ggn_factory, dense_hessian_factory
from scipy.optimize import brentq, minimize
from torch import nn

import hessinv
import hessinv.optim
from hessinv.errors import SingularMatrixError
from hessinv.optim import (
    CurvatureProtocol,
    DampedNewton,
    FactorizationProtocol,
    TrustRegionNewton,
    TrustRegionSolution,
    trust_region_subproblem,
)
from hessinv.tools import problems

DT = torch.float64

# the curvature= argument of the end-to-end tests: the real structured Hessian and the
# dense implementation of the protocol (same matrix, independent code)
CURVATURES = pytest.mark.parametrize(
    "curvature", ["hessian", dense_hessian_factory], ids=["ChainHessian", "dense"]
)


# ----------------------------------------------------------------------------- helpers
def make_problem(depth: int, width: int, batch: int, loss: str, seed: int, scale: float = 1.0):
    """A tanh MLP with ``depth`` Linear layers (PyTorch's initialisation times ``scale``), a
    batch and a loss (CE or MSE): the shared builder."""
    return problems.make_problem(
        depth, width, batch, loss=loss, init="default", scale=scale, seed=seed, data_seed=seed
    )


def dead_relu_problem():
    """A final ReLU that is dead on the batch and a single class: the loss is constant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.ReLU()).to(DT)
    with torch.no_grad():
        model[2].bias.fill_(-10.0)  # |tanh| <= 1 and small weights: pre-activations < 0
    X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    return model, nn.CrossEntropyLoss(), X, torch.zeros(5, dtype=torch.long)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def dense_g_H(model, loss_fn, X, y):
    B = DenseCurvature.from_model(model, loss_fn, X, y)
    return float(B.loss), B.gradient(), B.matrix


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


def _spectral_problem(evals, seed):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=gen, dtype=DT))
    evals = torch.tensor(evals, dtype=DT)
    return Q, evals, Q @ torch.diag(evals) @ Q.T, gen


# ----------------------------------------------------------------------------- the protocol
def test_package_exports():
    assert set(hessinv.optim.__all__) == {
        "DampedNewton",
        "TrustRegionNewton",
        "CurvaturePreconditioner",
        "trust_region_subproblem",
        "TrustRegionSolution",
        "CurvatureProtocol",
        "FactorizationProtocol",
    }
    assert TrustRegionSolution._fields[0] == "step"


def test_dense_curvature_satisfies_protocol():
    Q, evals, H, gen = _spectral_problem([-3.0, -1.0, 0.5, 2.0, 4.0], 0)
    g = torch.randn(5, generator=gen, dtype=DT)
    B = DenseCurvature(H, g, 1.5)
    assert isinstance(B, CurvatureProtocol)
    assert not isinstance(object(), CurvatureProtocol)
    assert not isinstance(torch.eye(3), CurvatureProtocol)
    assert B.num_params == 5 and B.dtype == DT and float(B.loss) == 1.5
    assert torch.equal(B.gradient(), g)
    V = torch.randn(5, 3, generator=gen, dtype=DT)
    assert torch.allclose(B.matvec(V), H @ V)
    assert torch.allclose(torch.cat(list(B.diagonal().values())), torch.diagonal(H))
    for damping, counts in [
        (0.0, (3, 2, 0)),
        (2.0, (4, 1, 0)),
        (5.0, (5, 0, 0)),
        (-1.0, (2, 3, 0)),
    ]:
        F = B.factorize(damping)
        assert isinstance(F, FactorizationProtocol) and F.damping == damping
        assert F.inertia() == counts
        assert F.is_positive_definite == (counts == (5, 0, 0))
        M = H + damping * torch.eye(5, dtype=DT)
        assert torch.allclose(F.solve(g), torch.linalg.solve(M, g), rtol=1e-12, atol=1e-13)
        assert torch.allclose(F.solve(V), torch.linalg.solve(M, V), rtol=1e-12, atol=1e-13)
        sign, logabsdet = F.logdet()
        ref_sign, ref_logabsdet = torch.linalg.slogdet(M)
        assert float(sign) == float(ref_sign)
        assert float(logabsdet) == pytest.approx(float(ref_logabsdet), rel=1e-12)
    for damping in (1.0, 3.0, -0.5):  # eigenvalues -1, -3, 0.5 shifted to 0
        with pytest.raises(SingularMatrixError) as err:
            B.factorize(damping)
        assert err.value.damping == damping and err.value.nullity == 1


def test_real_chain_hessian_satisfies_protocol():
    model, loss_fn, X, y = make_problem(2, 4, 6, "ce", 0)
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    assert isinstance(H, CurvatureProtocol)
    assert isinstance(H.factorize(1.0), FactorizationProtocol)


def test_dense_curvature_from_model_matches_autograd():
    model, loss_fn, X, y = make_problem(2, 3, 5, "mse", 1)
    B = DenseCurvature.from_model(model, loss_fn, X, y)
    loss = loss_fn(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    assert torch.allclose(B.gradient(), g.detach(), rtol=1e-12, atol=1e-14)
    v = torch.randn(B.num_params, dtype=DT)
    Hv = torch.autograd.grad(g @ v, list(model.parameters()))
    assert torch.allclose(B.matvec(v), torch.cat([t.reshape(-1) for t in Hv]), atol=1e-12)


# ----------------------------------------------------------------------------- subproblem
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subproblem_random_indefinite_matches_eigh(seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(12, 12, generator=gen, dtype=DT)
    H = 0.5 * (A + A.T)
    g = torch.randn(12, generator=gen, dtype=DT)
    n_negative = int((torch.linalg.eigvalsh(H) < 0).sum())
    for radius in (0.05, 0.5, 5.0):
        sol = trust_region_subproblem(DenseCurvature(H, g), g, radius)
        expected = dense_trust_region(H, g, radius)
        assert rel(sol.step, expected) < 1e-8
        assert sol.on_boundary and not sol.hard_case
        assert sol.n_negative == n_negative


def test_subproblem_positive_definite_interior():
    Q, evals, H, gen = _spectral_problem([0.5, 1.0, 2.0, 3.0], 5)
    g = torch.randn(4, generator=gen, dtype=DT)
    sol = trust_region_subproblem(DenseCurvature(H, g), g, 1e3)
    assert sol.lam == 0.0 and not sol.on_boundary and sol.n_negative == 0
    assert sol.factorizations == 1 and sol.iterations == 0
    assert rel(sol.step, -torch.linalg.solve(H, g)) < 1e-12


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
    sol = trust_region_subproblem(DenseCurvature(H, g), g, radius)
    assert sol.hard_case and sol.on_boundary
    assert sol.lam == pytest.approx(2.0, rel=1e-8)
    assert float(sol.step.norm()) == pytest.approx(radius, rel=1e-10)
    assert model_value(H, g, sol.step) == pytest.approx(optimum, rel=1e-9)
    # the step is s_perp +- tau q_1 (either sign is optimal)
    sign = 1.0 if float(sol.step @ Q[:, 0]) > 0 else -1.0
    assert rel(sol.step, s_perp + sign * tau * Q[:, 0]) < 1e-6


def test_subproblem_zero_gradient_negative_curvature():
    Q, evals, H, _ = _spectral_problem([-1.0, 2.0, 3.0, 5.0], 4)
    g = torch.zeros(4, dtype=DT)
    sol = trust_region_subproblem(DenseCurvature(H), g, 0.5)
    assert float(sol.step.norm()) == pytest.approx(0.5, rel=1e-10)
    assert model_value(H, g, sol.step) == pytest.approx(-0.5 * 0.25, rel=1e-9)


def test_subproblem_zero_gradient_zero_diagonal_indefinite():
    # B = [[0, 1], [1, 0]]: zero diagonal but eigenvalues -1, 1
    H = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    g = torch.zeros(2, dtype=DT)
    sol = trust_region_subproblem(DenseCurvature(H), g, 0.5)
    assert bool(torch.isfinite(sol.step).all())
    assert float(sol.step.norm()) == pytest.approx(0.5, rel=1e-10)
    assert model_value(H, g, sol.step) == pytest.approx(-0.5 * 0.25, rel=1e-9)


def test_subproblem_zero_gradient_zero_curvature():
    # g = 0 and B = 0 (used to give NaN): every s is optimal, the answer is s = 0
    B = DenseCurvature(torch.zeros(6, 6, dtype=DT))
    sol = trust_region_subproblem(B, B.gradient(), 1.0)
    assert torch.equal(sol.step, torch.zeros(6, dtype=DT))
    assert sol.lam == 0.0 and not sol.on_boundary and sol.n_negative == 0


def test_subproblem_zero_curvature_nonzero_gradient():
    g = torch.tensor([3.0, -4.0, 0.0], dtype=DT)
    sol = trust_region_subproblem(DenseCurvature(torch.zeros(3, 3, dtype=DT), g), g, 2.0)
    assert torch.allclose(sol.step, -2.0 * g / 5.0, rtol=1e-15)
    assert sol.on_boundary and sol.lam == pytest.approx(2.5)


def test_subproblem_positive_semidefinite_singular():
    # B = diag(0, 1, 2), g = 0: s = 0 is optimal (H singular, hard case at lam = 0); the
    # first factorization, at lam_tiny, is not singular and counts no negative eigenvalue
    B = DenseCurvature(torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=DT)))
    sol = trust_region_subproblem(B, B.gradient(), 1.0)
    assert float(sol.step.norm()) < 1e-12 and sol.n_negative == 0


def test_subproblem_bad_arguments():
    B = DenseCurvature(torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="radius"):
        trust_region_subproblem(B, torch.zeros(3, dtype=DT), 0.0)
    with pytest.raises(TypeError, match="radius"):
        trust_region_subproblem(B, torch.zeros(3, dtype=DT), "1")
    with pytest.raises(TypeError, match="CurvatureProtocol"):
        trust_region_subproblem(torch.eye(3, dtype=DT), torch.zeros(3, dtype=DT), 1.0)
    with pytest.raises(ValueError, match="num_params"):
        trust_region_subproblem(B, torch.zeros(4, dtype=DT), 1.0)


# ----------------------------------------------------------------------------- DampedNewton
@CURVATURES
@pytest.mark.parametrize(
    "depth,width,batch,loss,seed",
    [(2, 4, 6, "ce", 0), (3, 5, 8, "mse", 1), (3, 4, 5, "ce", 2)],
)
def test_damped_newton_step_matches_dense(curvature, depth, width, batch, loss, seed):
    model, loss_fn, X, y = make_problem(depth, width, batch, loss, seed)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    eps = max(0.5, 0.5 - float(torch.linalg.eigvalsh(H)[0]))  # H + eps I is PD: no raise
    x0 = flat_params(model)
    expected = x0 - 0.7 * torch.linalg.solve(H + eps * torch.eye(len(g), dtype=DT), g)
    opt = DampedNewton(model, loss_fn, lr=0.7, damping=eps, damping_down=0.5, curvature=curvature)
    ret = opt.step(X, y)
    assert ret == pytest.approx(f0, rel=1e-13)
    info = opt.last_step
    assert info["accepted"] and info["tries"] == 1 and info["damping"] == eps
    assert info["factorizations"] == 1 and info["direction"] == "newton"
    assert rel(flat_params(model) - x0, expected - x0) < 1e-10
    s = expected - x0
    assert info["predicted_reduction"] == pytest.approx(-model_value(H, g, s), rel=1e-10)
    with torch.no_grad():
        f1 = float(loss_fn(model(X), y))
    assert info["actual_reduction"] == pytest.approx(f0 - f1, rel=1e-10)
    assert info["rho"] == pytest.approx((f0 - f1) / info["predicted_reduction"], rel=1e-12)
    assert info["new_loss"] == f1
    assert info["step_norm"] == pytest.approx(float(s.norm()), rel=1e-10)
    assert opt.damping == pytest.approx(0.5 * eps)


@CURVATURES
def test_damped_newton_indefinite_raises_damping_until_pd(curvature):
    model, loss_fn, X, y = make_problem(3, 5, 6, "mse", 3, scale=2.5)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    assert lam_min < -1e-3  # H indefinite: a 1e-4 damping is not enough
    x0 = flat_params(model)
    opt = DampedNewton(model, loss_fn, damping=1e-4, damping_up=3.0, curvature=curvature)
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


@CURVATURES
def test_damped_newton_rejects_and_restores(curvature):
    # lr huge: the first tries overshoot, are rejected (parameters restored), eps grows
    model, loss_fn, X, y = make_problem(2, 4, 6, "mse", 4)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    x0 = flat_params(model)
    opt = DampedNewton(
        model, loss_fn, lr=1e4, damping=1.0, damping_up=10.0, max_tries=8, curvature=curvature
    )
    opt.step(X, y)
    info = opt.last_step
    assert info["tries"] > 1
    eps = info["damping"]
    if info["accepted"]:
        expected = -1e4 * torch.linalg.solve(H + eps * torch.eye(len(g), dtype=DT), g)
        assert rel(flat_params(model) - x0, expected) < 1e-9
        assert info["new_loss"] < f0
        assert opt.damping == pytest.approx(0.5 * eps)
    else:
        assert torch.equal(flat_params(model), x0)


def test_damped_newton_all_tries_rejected_restores_exactly():
    model, loss_fn, X, y = make_problem(2, 4, 6, "mse", 4)
    x0 = flat_params(model)
    opt = DampedNewton(
        model,
        loss_fn,
        lr=1e6,
        damping=1.0,
        damping_up=2.0,
        max_tries=2,
        curvature=dense_hessian_factory,
    )
    f0 = opt.step(X, y)
    info = opt.last_step
    assert not info["accepted"] and info["tries"] == 2 and info["new_loss"] == f0
    assert info["rho"] < 0
    assert torch.equal(flat_params(model), x0)
    assert opt.damping == 4.0  # raised after each rejection


@CURVATURES
def test_damped_newton_max_step_norm(curvature):
    model, loss_fn, X, y = make_problem(2, 4, 6, "ce", 5)
    x0 = flat_params(model)
    opt = DampedNewton(model, loss_fn, damping=1e-3, max_step_norm=1e-2, curvature=curvature)
    opt.step(X, y)
    assert opt.last_step["step_norm"] == pytest.approx(1e-2)
    assert float((flat_params(model) - x0).norm()) == pytest.approx(1e-2, rel=1e-10)


# ----------------------------------------------------------------------------- TrustRegionNewton
@CURVATURES
@pytest.mark.parametrize(
    "depth,width,batch,loss,seed,radius",
    [(2, 4, 6, "mse", 0, 0.3), (3, 5, 8, "ce", 1, 0.5), (3, 4, 7, "mse", 6, 1.0)],
)
def test_trust_region_step_matches_dense_boundary(
    curvature, depth, width, batch, loss, seed, radius
):
    model, loss_fn, X, y = make_problem(depth, width, batch, loss, seed)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    expected = dense_trust_region(H, g, radius)
    assert float(expected.norm()) == pytest.approx(radius, rel=1e-9)  # a boundary case
    x0 = flat_params(model)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = TrustRegionNewton(model, loss_fn, radius=radius, curvature=curvature)
    assert opt.step(X, y) == pytest.approx(f0, rel=1e-13)
    info = opt.last_step
    assert info["tries"] == 1 and info["on_boundary"] and info["radius"] == radius
    s = flat_params(model) - x0 if info["accepted"] else None
    if s is None:  # rejected: reproduce the step from the subproblem solver itself
        B = opt._build_curvature(X, y)
        s = trust_region_subproblem(B, B.gradient(), radius, rtol=opt.defaults["rtol"]).step
    # the default rtol (1e-2) lets ||s|| miss the radius by that much; s is then the exact
    # minimiser for the radius ||s||
    assert abs(float(s.norm()) - radius) <= opt.defaults["rtol"] * radius
    exact = dense_trust_region(H, g, float(s.norm()))
    assert rel(s, exact) < 1e-8
    assert info["predicted_reduction"] == pytest.approx(-model_value(H, g, exact), rel=1e-8)
    # with a tight rtol the step is that of the radius itself
    model.load_state_dict(model_state)
    tight = TrustRegionNewton(model, loss_fn, radius=radius, curvature=curvature, rtol=1e-10)
    tight.step(X, y)
    B = tight._build_curvature(X, y) if not tight.last_step["accepted"] else None
    s = (
        flat_params(model) - x0
        if B is None
        else trust_region_subproblem(B, B.gradient(), radius, rtol=1e-10).step
    )
    assert rel(s, expected) < 1e-8


@CURVATURES
def test_trust_region_indefinite_boundary(curvature):
    model, loss_fn, X, y = make_problem(3, 5, 6, "mse", 3, scale=2.5)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    evals = torch.linalg.eigvalsh(H)
    assert float(evals[0]) < -1e-3  # indefinite
    radius = 0.2
    expected = dense_trust_region(H, g, radius)
    x0 = flat_params(model)
    opt = TrustRegionNewton(model, loss_fn, radius=radius, curvature=curvature)
    B = opt._build_curvature(X, y)
    sol = trust_region_subproblem(B, B.gradient(), radius)
    assert sol.on_boundary and not sol.hard_case
    assert sol.lam > -float(evals[0])
    assert sol.n_negative == int((evals < 0).sum())
    assert rel(sol.step, expected) < 1e-8
    # and through the optimizer
    opt.step(X, y)
    assert opt.last_step["n_negative"] == int((evals < 0).sum())
    if opt.last_step["accepted"]:  # exact for the radius ||s|| (within rtol of radius)
        s = flat_params(model) - x0
        assert abs(float(s.norm()) - radius) <= opt.defaults["rtol"] * radius
        assert rel(s, dense_trust_region(H, g, float(s.norm()))) < 1e-8
        assert opt.last_step["rho"] > opt.param_groups[0]["eta"]
    else:
        assert torch.equal(flat_params(model), x0)


@CURVATURES
def test_trust_region_interior_step_is_newton_step(curvature):
    # linear least squares: H = 2/(Bk) X^T X (x) I is positive definite, a large radius
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X = torch.randn(10, 3, generator=gen, dtype=DT)
    y = torch.randn(10, 2, generator=gen, dtype=DT)
    loss_fn = nn.MSELoss()
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    x0 = flat_params(model)
    opt = TrustRegionNewton(model, loss_fn, radius=50.0, curvature=curvature)
    opt.step(X, y)
    info = opt.last_step
    assert info["accepted"] and not info["on_boundary"] and info["lam"] == 0.0
    assert rel(flat_params(model) - x0, -torch.linalg.solve(H, g)) < 1e-10
    # a quadratic: the Newton step lands on the minimum
    _, g1, _ = dense_g_H(model, loss_fn, X, y)
    assert float(g1.norm()) < 1e-10


def test_trust_region_rejection_shrinks_radius_and_restores():
    # a huge radius on a strongly nonlinear model: rho < 0, rejected, radius shrunk
    model, loss_fn, X, y = make_problem(3, 5, 6, "mse", 3, scale=2.5)
    x0 = flat_params(model)
    opt = TrustRegionNewton(
        model, loss_fn, radius=50.0, max_tries=1, curvature=dense_hessian_factory
    )
    f0 = opt.step(X, y)
    info = opt.last_step
    assert not info["accepted"] and info["rho"] < 0.25 and info["on_boundary"]
    assert torch.equal(flat_params(model), x0) and info["new_loss"] == f0
    shrunk = 0.25 * min(info["radius"], info["step_norm"])  # ||s|| is within rtol of 50
    assert opt.radius == info["new_radius"] == pytest.approx(shrunk, rel=1e-15)
    assert info["step_norm"] == pytest.approx(50.0, rel=opt.defaults["rtol"])


def test_trust_region_ggn_with_dropped_eigenvalues():
    """A deep narrow tanh net (Kaiming gain): half of U U^T's eigenvalues are at rounding
    level and dropped, so the gradient keeps a part outside the kept row space (perp > 0)
    while ||g|| / radius < max eigenvalue. The output-space subproblem started at
    lam = 1e-300 there and divided by its underflowed square (E6's TR-GGN crashed). Checked
    by the optimality conditions of a PSD G: (G + lam I) s = -g, lam >= 0, ||s|| = radius."""
    torch.manual_seed(0)
    dims = [64] + [8] * 31 + [10]
    layers: list[nn.Module] = []
    for i in range(32):
        lin = nn.Linear(dims[i], dims[i + 1])
        nn.init.kaiming_normal_(lin.weight, nonlinearity="tanh" if i < 31 else "linear")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()] if i < 31 else [lin]
    model = nn.Sequential(*layers).double()
    X, y = torch.randn(64, 64, dtype=DT), torch.randint(0, 10, (64,))
    G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y, progress=False)
    g, radius = G.gradient(), 0.5
    e = G.spectrum()
    assert float(e.max()) > float(g.norm()) / radius  # the start the bug needed
    sol = trust_region_subproblem(G, g, radius, rtol=1e-10)
    assert sol.on_boundary and sol.lam > 0
    assert abs(float(sol.step.norm()) - radius) <= 1e-10 * radius
    residual = G @ sol.step + sol.lam * sol.step + g
    assert float(residual.norm()) <= 1e-10 * float(g.norm())


@pytest.mark.parametrize("rtol", [1e-2, 1e-10])
def test_trust_region_on_ggn_stays_in_the_output_space(rtol):
    """Every subproblem on G goes through the output space's eigendecomposition (one solve
    per step), at the default rtol too: never the general method's factorizations at
    lam_tiny (G + 1e-14 I is singular to working precision for a softmax network)."""
    model, loss_fn, X, y = make_problem(3, 6, 12, "ce", 2)
    dampings: list[float] = []

    def factory(*args):
        G = hessinv.ChainGGN(*args, progress=False)
        factorize = G.factorize

        def logged(damping=0.0, *a, **k):
            dampings.append(float(damping))
            return factorize(damping, *a, **k)

        G.factorize = logged
        return G

    opt = TrustRegionNewton(model, loss_fn, radius=0.5, curvature=factory, rtol=rtol)
    for _ in range(6):
        opt.step(X, y)
        assert opt.last_step["factorizations"] <= 2
    assert len(dampings) <= 6 * opt.defaults["max_tries"]
    assert min(dampings) > 1e-8  # no lam_tiny: the general method never ran


def test_trust_region_retry_starts_where_the_first_try_ended():
    """A rejected try's multiplier and negative count carry over to the retry (same B,
    smaller radius): no second factorization at lam_tiny, every factorization counted."""
    model, loss_fn, X, y = make_problem(3, 5, 6, "mse", 3, scale=2.5)
    dampings: list[float] = []

    def factory(*args):
        B = dense_hessian_factory(*args)
        factorize = B.factorize

        def logged(damping=0.0, *a, **k):
            dampings.append(float(damping))
            return factorize(damping, *a, **k)

        B.factorize = logged
        return B

    evals = torch.linalg.eigvalsh(dense_g_H(model, loss_fn, X, y)[2])
    opt = TrustRegionNewton(model, loss_fn, radius=50.0, max_tries=2, curvature=factory)
    opt.step(X, y)
    info = opt.last_step
    assert info["tries"] == 2 and info["n_negative"] == int((evals < 0).sum()) > 0
    assert info["factorizations"] == len(dampings)
    assert sum(d < 1e-10 for d in dampings) == 1  # lam_tiny in the first try only
    assert info["lam"] > -float(evals[0])


# ----------------------------------------------------------------------------- constant loss
@CURVATURES
@pytest.mark.parametrize("cls", [DampedNewton, TrustRegionNewton])
def test_dead_relu_single_class_constant_loss(cls, curvature):
    # g = 0 and H = 0: the trust-region step used to be NaN
    model, loss_fn, X, y = dead_relu_problem()
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    assert f0 == 0.0 and float(g.abs().max()) == 0.0 and float(H.abs().max()) == 0.0
    x0 = flat_params(model)
    opt = cls(model, loss_fn, curvature=curvature)
    state = opt.state_dict()
    for _ in range(2):
        assert opt.step(X, y) == 0.0
        info = opt.last_step
        assert info["accepted"] and info["converged"] and info["tries"] == 1
        assert info["step_norm"] == 0.0 and info["rho"] == 1.0 and info["new_loss"] == 0.0
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in info.values()), info
    assert torch.equal(flat_params(model), x0)
    adaptive = ("damping",) if cls is DampedNewton else ("radius",)
    for key in adaptive:  # damping / radius kept
        assert opt.state_dict()["param_groups"][0][key] == state["param_groups"][0][key]


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

    ref = minimize(
        f_and_g,
        flat_params(model).numpy(),
        jac=True,
        method="BFGS",
        options={"gtol": 1e-11, "maxiter": 2000},
    )
    return model, loss_fn, X, y, float(ref.fun)


@CURVATURES
@pytest.mark.parametrize(
    "cls,kwargs", [(DampedNewton, {"damping": 1e-3}), (TrustRegionNewton, {"radius": 1.0})]
)
def test_convex_logistic_regression_converges(cls, kwargs, curvature):
    model, loss_fn, X, y, fmin = _logistic_problem()
    opt = cls(model, loss_fn, curvature=curvature, **kwargs)
    losses = [opt.step(X, y) for _ in range(10)]
    final = float(loss_fn(model(X), y).detach())
    # monotone, up to the rounding level at which a step counts as converged (and is
    # accepted even if the loss moves by an ulp): 100 eps |f|
    noise = 100 * torch.finfo(DT).eps
    assert all(b <= a * (1 + noise) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[0] - fmin > 0.1  # started far from the minimum
    assert final - fmin < 1e-9
    assert opt.step_count == 10


# ----------------------------------------------------------------------------- curvature=
def test_ggn_is_levenberg_marquardt(monkeypatch):
    # the built-in "ggn" curvature replaced by a dense stand-in with its signature
    calls = []

    def fake_ggn(model, loss_fn, inputs, targets, oracle="auto", **kwargs):
        calls.append(oracle)
        return dense_ggn_factory(model, loss_fn, inputs, targets)

    monkeypatch.setitem(hessinv.optim.base._BUILTIN_CURVATURES, "ggn", fake_ggn)
    model, loss_fn, X, y = make_problem(3, 4, 6, "mse", 2, scale=2.0)
    G = dense_ggn_factory(model, loss_fn, X, y)
    f0, g, H = dense_g_H(model, loss_fn, X, y)
    assert torch.allclose(G.gradient(), g, atol=1e-13)
    assert float(torch.linalg.eigvalsh(G.matrix)[0]) > -1e-12  # GGN: PSD
    x0 = flat_params(model)
    eps = 1e-2
    expected = -torch.linalg.solve(G.matrix + eps * torch.eye(len(g), dtype=DT), g)
    opt = DampedNewton(model, loss_fn, damping=eps, curvature="ggn", oracle="generic")
    opt.step(X, y)
    info = opt.last_step
    assert calls == ["generic"]
    assert info["factorizations"] == 1 and info["direction"] == "newton"  # no raise: PSD
    assert info["predicted_reduction"] == pytest.approx(-model_value(G.matrix, g, expected))
    if info["accepted"]:
        assert rel(flat_params(model) - x0, expected) < 1e-10
    else:
        assert torch.equal(flat_params(model), x0)


@pytest.mark.parametrize("cls", [DampedNewton, TrustRegionNewton])
def test_real_ggn_matches_dense_ggn(cls):
    model, loss_fn, X, y = make_problem(3, 4, 6, "ce", 3)
    model2 = copy.deepcopy(model)
    # the trust region's boundary to rounding (its default rtol lets the two solvers, whose
    # iterations differ, stop at radii 1e-2 apart)
    kw = {"rtol": 1e-12} if cls is TrustRegionNewton else {}
    cls(model, loss_fn, curvature="ggn", **kw).step(X, y)
    cls(model2, loss_fn, curvature=dense_ggn_factory, **kw).step(X, y)
    assert rel(flat_params(model), flat_params(model2)) < 1e-10


@pytest.mark.parametrize("cls", [DampedNewton, TrustRegionNewton])
def test_curvature_argument_checks(cls):
    model, loss_fn, X, y = make_problem(2, 4, 6, "ce", 0)
    with pytest.raises(ValueError, match="curvature"):
        cls(model, loss_fn, curvature="fisher")
    with pytest.raises(TypeError, match="curvature"):
        cls(model, loss_fn, curvature=3)
    opt = cls(model, loss_fn, curvature=lambda m, lf, x, t: torch.eye(3))
    with pytest.raises(TypeError, match="CurvatureProtocol"):
        opt.step(X, y)
    opt = cls(model, loss_fn, curvature=lambda m, lf, x, t: DenseCurvature(torch.eye(3, dtype=DT)))
    with pytest.raises(ValueError, match="num_params"):
        opt.step(X, y)


def test_curvature_factory_receives_the_batch():
    model, loss_fn, X, y = make_problem(2, 4, 6, "mse", 1)
    seen = []

    def factory(m, lf, inputs, targets):
        seen.append((m, lf, inputs, targets))
        return dense_hessian_factory(m, lf, inputs, targets)

    TrustRegionNewton(model, loss_fn, curvature=factory).step(X, y)
    assert len(seen) == 1 and seen[0][0] is model and seen[0][1] is loss_fn
    assert seen[0][2] is X and seen[0][3] is y


# ----------------------------------------------------------------------------- state, arguments
@CURVATURES
@pytest.mark.parametrize(
    "cls,kwargs,key",
    [(DampedNewton, {"damping": 0.1}, "damping"), (TrustRegionNewton, {"radius": 0.3}, "radius")],
)
def test_state_dict_round_trip(cls, kwargs, key, curvature):
    """The adaptive state (damping / radius) and the step count live in ``param_groups``
    and round-trip through ``state_dict`` like any ``torch.optim`` optimizer's."""
    model, loss_fn, X, y = make_problem(2, 4, 6, "ce", 8)
    opt = cls(model, loss_fn, curvature=curvature, **kwargs)
    opt.step(X, y)
    opt.step(X, y)
    state = opt.state_dict()
    group = state["param_groups"][0]
    assert group["step_count"] == 2 == opt.step_count and group[key] == getattr(opt, key)
    assert group[key] != kwargs[key]  # the adaptive state moved
    model2 = copy.deepcopy(model)
    opt2 = cls(model2, loss_fn, curvature=curvature)
    opt2.load_state_dict(state)
    assert opt2.state_dict() == state
    opt.step(X, y)
    opt2.step(X, y)
    assert torch.equal(flat_params(model), flat_params(model2))
    assert opt.state_dict() == opt2.state_dict()
    bad = copy.deepcopy(state)
    del bad["param_groups"][0][key]
    with pytest.raises(ValueError, match=key):
        opt2.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["param_groups"][0][key] = -1.0
    with pytest.raises(ValueError, match=key):
        opt2.load_state_dict(bad)
    assert opt2.state_dict() == opt.state_dict()  # a refused state leaves the optimizer as it was
    bad = copy.deepcopy(state)
    bad["param_groups"][0]["step_count"] = -1
    with pytest.raises(ValueError, match="step_count"):
        opt2.load_state_dict(bad)
    with pytest.raises(TypeError, match="state"):
        opt2.load_state_dict([("step_count", 1)])


@CURVATURES
def test_list_of_modules_model(curvature):
    model, loss_fn, X, y = make_problem(2, 4, 6, "mse", 9)
    model2 = copy.deepcopy(model)
    DampedNewton(list(model), loss_fn, damping=0.5, curvature=curvature).step(X, y)
    DampedNewton(model2, loss_fn, damping=0.5, curvature=curvature).step(X, y)
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
        (DampedNewton, {"oracle": "exact"}, ValueError),
        (TrustRegionNewton, {"radius": 0.0}, ValueError),
        (TrustRegionNewton, {"radius": -1.0}, ValueError),
        (TrustRegionNewton, {"radius": 10.0, "max_radius": 1.0}, ValueError),
        (TrustRegionNewton, {"eta": 0.5}, ValueError),
        (TrustRegionNewton, {"shrink": 1.5}, ValueError),
        (TrustRegionNewton, {"grow": 0.5}, ValueError),
        (TrustRegionNewton, {"max_tries": 1.5}, TypeError),
        (TrustRegionNewton, {"rtol": 0.0}, ValueError),
    ],
)
def test_bad_hyperparameters(cls, kwargs, exc):
    model, loss_fn, _, _ = make_problem(2, 4, 6, "ce", 0)
    name = next(iter(kwargs))
    with pytest.raises(exc, match=name):
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


@pytest.mark.parametrize("loss,seed", [("ce", 0), ("mse", 1), ("ce", 2)])
def test_subproblem_on_the_ggn_output_space_matches_dense(loss, seed):
    """The Gauss-Newton matrix's subproblem through one eigendecomposition of U U^T (no
    factorization per lam, docs/algorithm.md section 14) against the dense solution, for
    boundary radii and for a radius containing the minimum-norm Gauss-Newton step."""
    model, loss_fn, X, y = make_problem(3, 6, 4, loss, seed)
    G = hessinv.ChainGGN(model, loss_fn, X, y)
    D = dense_ggn_factory(model, loss_fn, X, y).matrix
    g = G.gradient()
    assert G.num_params > G.output_space().rows  # G is singular: g lies in its range
    pinv_step = -torch.linalg.pinv(D, hermitian=True, rtol=1e-12) @ g
    for radius in (0.01, 0.1, 0.5 * float(pinv_step.norm()), 2 * float(pinv_step.norm())):
        sol = trust_region_subproblem(G, g, radius)
        assert sol.factorizations <= 1 and sol.n_negative == 0
        if radius > float(pinv_step.norm()):
            assert not sol.on_boundary and sol.lam == 0.0
            assert rel(sol.step, pinv_step) < 1e-8
        else:
            expected = dense_trust_region(D, g, radius)
            assert sol.on_boundary and rel(sol.step, expected) < 1e-8
    sol = trust_region_subproblem(G, g, 0.05)
    assert sol.factorizations == 0  # the eigendecomposition is kept from the first call
