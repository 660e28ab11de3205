"""ChainHessian against the dense ``torch.func.hessian`` reference (float64)."""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import pytest
import torch
from _chains import ACTIVATIONS, make_problem, relative_error, solve_tolerance
from torch import nn

import hessinv

EPS_VALUES = (1e-4, 1e-2, 1.0, 10.0)


def _dense(problem):
    return hessinv.dense_hessian(*problem)


def _check_all(problem, eps_values=EPS_VALUES, methods=("riccati", "tridiagonal"), k=2):
    H = hessinv.ChainHessian(*problem)
    D = _dense(problem)
    n = H.num_params
    assert H.shape == (n, n) == tuple(D.shape)
    # dense() and matvec
    assert relative_error(H.dense(), D) < 1e-12
    v = torch.randn(n, k, dtype=torch.float64)
    assert relative_error(H @ v, D @ v) < 1e-12
    assert relative_error(H.matvec(v[:, 0]), D @ v[:, 0]) < 1e-12
    worst = 0.0
    for eps in eps_values:
        M = D + eps * torch.eye(n, dtype=torch.float64)
        ref = torch.linalg.solve(M, v)
        tol = solve_tolerance(M)
        for method in methods:
            F = H.factorize(eps, method=method)
            err = relative_error(F.solve(v), ref)
            assert F.backward_error <= 1e-12, (method, eps, F.backward_error)
            assert err < tol, (method, eps, err, tol)
            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("loss", ["ce", "mse", "mse_sum"])
def test_depths_and_losses(depth, loss):
    _check_all(make_problem(depth=depth, width=4, batch=3, loss=loss, seed=depth))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_activations(activation, bias):
    _check_all(
        make_problem(depth=3, width=5, batch=7, activation=activation, bias=bias, seed=11),
        eps_values=(1e-2, 1.0),
    )


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batch_sizes(batch):
    _check_all(make_problem(depth=4, width=3, batch=batch, loss="mse", seed=batch))


def test_random_shapes_property():
    """Seeded property sweep over many random chains (shapes, losses, activations, eps)."""
    rng = random.Random(2026)
    for trial in range(25):
        problem = make_problem(
            depth=rng.randint(1, 6),
            width=rng.randint(1, 6),
            batch=rng.randint(1, 6),
            activation=rng.choice(sorted(ACTIVATIONS)),
            bias=rng.random() < 0.7,
            loss=rng.choice(["ce", "mse", "mse_sum"]),
            d_in=rng.randint(1, 4),
            d_out=rng.randint(2, 4),
            seed=trial,
        )
        _check_all(problem, eps_values=(rng.choice(EPS_VALUES),), k=rng.randint(1, 3))


class _Residual(nn.Module):
    """A stage that is not a single layer: x + W2 tanh(W1 x)."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return x + self.outer(torch.tanh(self.inner(x)))


def test_conv_flatten_linear_chain():
    """The shape of network in the seed question: Conv2d -> activation -> Flatten -> Linear."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, 1, 1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    X = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    worst = _check_all((model, nn.CrossEntropyLoss(), X, y), eps_values=(1e-2, 1.0))
    assert worst < 1e-10


def test_residual_block_stage_and_prefix():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 4), nn.Softplus(), _Residual(4), nn.Linear(4, 2)
    ).double()
    X = torch.randn(5, 2, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    H = hessinv.ChainHessian(model, nn.MSELoss(), X, y)
    assert len(H.stage_sizes) == 3
    _check_all((model, nn.MSELoss(), X, y), eps_values=(1e-2, 1.0))


def test_generic_loss_callable():
    """A loss written by hand (sum of per-sample terms) goes through the generic head."""
    problem = make_problem(depth=3, width=4, batch=4, loss="mse", seed=5)

    def loss_fn(out, target):
        return (torch.cosh(out - target).log()).sum() / out.shape[0]

    _check_all((problem.model, loss_fn, problem.inputs, problem.targets), eps_values=(1e-2, 1.0))


def test_loss_and_gradient_match_autograd():
    problem = make_problem(depth=4, width=4, batch=5, seed=6)
    H = hessinv.ChainHessian(*problem)
    loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
    grads = torch.autograd.grad(loss, list(problem.model.parameters()))
    assert torch.allclose(H.loss, loss.detach(), rtol=1e-14, atol=0)
    assert relative_error(H.gradient(), torch.cat([g.reshape(-1) for g in grads])) < 1e-13


def test_param_names_order_and_dict_round_trip():
    problem = make_problem(depth=3, width=4, batch=3, seed=7)
    H = hessinv.ChainHessian(*problem)
    names = [n for n, _ in problem.model.named_parameters()]
    assert list(H.param_names) == names
    assert sum(H.stage_sizes) == H.num_params
    v = {n: torch.randn_like(p) for n, p in problem.model.named_parameters()}
    out = H.matvec(v)
    assert list(out) == names and all(out[n].shape == v[n].shape for n in names)
    flat = H.matvec(hessinv.flatten(v))
    assert torch.allclose(hessinv.flatten(out), flat, rtol=1e-14, atol=1e-15)
    listed = H.matvec(list(v.values()))
    assert isinstance(listed, list)
    assert torch.allclose(hessinv.flatten(listed), flat, rtol=1e-14, atol=1e-15)
    x = H.solve(v, damping=0.5)
    back = H.matvec(x)
    for n in names:
        assert torch.allclose(back[n] + 0.5 * x[n], v[n], rtol=1e-10, atol=1e-12)


def test_to_scipy_linear_operator():
    from scipy.sparse.linalg import eigsh, minres

    problem = make_problem(depth=3, width=4, batch=4, seed=8)
    H = hessinv.ChainHessian(*problem)
    D = _dense(problem).numpy()
    op = H.to_scipy()
    x = np.random.default_rng(0).standard_normal(H.num_params)
    assert np.allclose(op @ x, D @ x, rtol=1e-12, atol=1e-14)
    X = np.random.default_rng(1).standard_normal((H.num_params, 3))
    assert np.allclose(op @ X, D @ X, rtol=1e-12, atol=1e-14)
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False)
    assert np.allclose(np.sort(top), np.sort(np.linalg.eigvalsh(D))[-2:], rtol=1e-8)
    b = np.ones(H.num_params)
    sol, info = minres(op, b, rtol=1e-12, shift=-1.0)  # (H + I) x = b
    assert info == 0
    assert np.allclose((D + np.eye(len(b))) @ sol, b, atol=1e-6)


@pytest.mark.parametrize("oracle", ["auto", "generic"])
def test_float32(oracle):
    problem = make_problem(depth=4, width=4, batch=4, seed=9)
    D = hessinv.dense_hessian(*problem)
    model32 = copy.deepcopy(problem.model).float()
    H = hessinv.ChainHessian(
        model32, problem.loss_fn, problem.inputs.float(), problem.targets, oracle=oracle
    )
    assert H.dtype == torch.float32
    v = torch.randn(H.num_params, dtype=torch.float32)
    assert relative_error(H @ v, (D @ v.double()).float()) < 1e-5
    ref = torch.linalg.solve(D + torch.eye(H.num_params, dtype=torch.float64), v.double())
    x = H.solve(v, damping=1.0)
    assert x.dtype == torch.float32
    assert relative_error(x.double(), ref) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_matches_cpu():
    problem = make_problem(depth=5, width=6, batch=7, seed=10)
    H = hessinv.ChainHessian(*problem)
    model = problem.model.to("cuda")
    Hc = hessinv.ChainHessian(model, problem.loss_fn, problem.inputs.cuda(), problem.targets.cuda())
    v = torch.randn(H.num_params, 2, dtype=torch.float64)
    assert torch.allclose((Hc @ v.cuda()).cpu(), H @ v, rtol=1e-12, atol=1e-14)
    for method in ("riccati", "tridiagonal"):
        x = Hc.solve(v.cuda(), damping=0.1, method=method)
        assert x.device.type == "cuda"
        assert relative_error(x.cpu(), H.solve(v, damping=0.1)) < 1e-10
    F = Hc.factorize(1e-4)
    assert F.inertia() == H.factorize(1e-4).inertia()


# ----------------------------------------------------------------------------- bad input


def test_bad_vectors():
    problem = make_problem(depth=2, width=3, batch=2, seed=12)
    H = hessinv.ChainHessian(*problem)
    n = H.num_params
    with pytest.raises(ValueError, match=rf"\({n},\)"):
        H.matvec(torch.zeros(n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        H.matvec(torch.zeros(n, 2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        H.matvec(torch.zeros(n))
    with pytest.raises(ValueError, match="missing"):
        H.matvec({"0.weight": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="expected"):
        names = H.param_names
        H.matvec({k: torch.zeros(1, dtype=torch.float64) for k in names})
    with pytest.raises(ValueError, match="list"):
        H.matvec([torch.zeros(1, dtype=torch.float64)])
    with pytest.raises(TypeError):
        H.matvec(np.zeros(n))
    with pytest.raises(ValueError, match="NaN"):
        H.solve(torch.full((n,), float("nan"), dtype=torch.float64), damping=1.0)
    with pytest.raises(ValueError, match="finite"):
        H.solve(torch.zeros(n, dtype=torch.float64), damping=float("inf"))
    with pytest.raises(ValueError, match="method"):
        H.solve(torch.zeros(n, dtype=torch.float64), damping=1.0, method="lu")


def test_bad_models_and_inputs():
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    ce = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match="Sequential"):
        hessinv.ChainHessian(nn.Linear(3, 2).double(), ce, X, y)
    with pytest.raises(ValueError, match="no selected \\(trainable\\) parameters"):
        hessinv.ChainHessian(nn.Sequential(nn.Tanh()), ce, X, y)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="training mode"):
        hessinv.ChainHessian(bn, ce, X, y)
    bn.eval()
    H = hessinv.ChainHessian(bn, ce, X, y)  # eval-mode BatchNorm is per-sample: fine
    v = torch.randn(H.num_params, dtype=torch.float64)
    assert relative_error(H @ v, hessinv.dense_hessian(bn, ce, X, y) @ v) < 1e-12
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(TypeError, match="dtype"):
        hessinv.ChainHessian(model, ce, X.float(), y)
    with pytest.raises(ValueError, match="NaN"):
        hessinv.ChainHessian(model, ce, X * float("nan"), y)
    with pytest.raises(TypeError, match="callable"):
        hessinv.ChainHessian(model, "ce", X, y)
    with pytest.raises(TypeError, match="Tensor"):
        hessinv.ChainHessian(model, ce, X.numpy(), y)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        hessinv.ChainHessian(model, ce, X, y)


class _BatchMix(nn.Module):
    """Couples samples: subtracts the batch mean (like BatchNorm in training mode)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        out = self.lin(x)
        return out - out.mean(0, keepdim=True)


def test_sample_coupling_is_detected():
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    model = nn.Sequential(_BatchMix(), nn.Linear(3, 3)).double()
    with pytest.raises(ValueError, match="couples"):  # at construction, not at a product
        hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)


def test_non_scalar_and_coupling_losses():
    problem = make_problem(depth=2, width=3, batch=4, loss="mse", seed=13)
    with pytest.raises(ValueError, match="scalar"):  # errors arrive at construction
        hessinv.ChainHessian(problem.model, lambda o, t: (o - t) ** 2, *problem[2:])
    with pytest.raises(ValueError, match="couples"):
        hessinv.ChainHessian(problem.model, lambda o, t: ((o - t).sum(0) ** 2).sum(), *problem[2:])


def test_param_grid_exhaustive_small():
    """Every (depth, batch) pair of the validation grid with both losses, bias on and off."""
    for depth, batch, loss, bias in itertools.product(
        (1, 2, 3), (1, 3), ("ce", "mse"), (True, False)
    ):
        _check_all(
            make_problem(
                depth=depth, width=3, batch=batch, loss=loss, bias=bias, seed=depth * batch
            ),
            eps_values=(1e-2,),
            methods=("riccati",),
            k=1,
        )


def test_garbage_collector_paused_during_construction_and_restored():
    """The constructor turns Python's cyclic collector off while it builds the stages and
    leaves it as it found it, also when it raises."""
    import gc

    from torch import nn

    seen = []
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    model[0].register_forward_pre_hook(lambda m, args: seen.append(gc.isenabled()))
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            hessinv.ChainHessian(model, nn.MSELoss(), X, y, progress=False)
            assert gc.isenabled() == enabled
            with pytest.raises(RuntimeError):
                hessinv.ChainHessian(model, nn.MSELoss(), X[:, :1], y, progress=False)
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
    assert seen == [] or not any(seen)
