"""The derivative oracles: analytic fast path against torch.func, shapes, loss heads."""

from __future__ import annotations

import pytest
import torch
from _chains import ACTIVATIONS, make_problem
from torch import nn

import hessinv
from hessinv.derivatives import loss_head, stage_derivatives


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["ce", "mse", "mse_sum"])
def test_analytic_equals_generic(activation, bias, loss):
    problem = make_problem(depth=3, width=4, batch=5, activation=activation, bias=bias, loss=loss,
                           seed=31)
    fast = hessinv.ChainHessian(*problem, oracle="analytic").stage_derivatives()
    slow = hessinv.ChainHessian(*problem, oracle="generic").stage_derivatives()
    for l, (a, b) in enumerate(zip(fast, slow, strict=True)):
        for name in a._fields:
            x, y = getattr(a, name), getattr(b, name)
            if x is None:
                assert y is None and l == 0
                continue
            assert x.shape == y.shape, (l, name)
            assert torch.allclose(x, y, rtol=0, atol=1e-12 * max(1.0, float(y.abs().max()))), (
                l, name, float((x - y).abs().max()))


def test_shapes_keep_batch_structure():
    B, h, d_in, k = 6, 5, 3, 4
    problem = make_problem(depth=3, width=h, batch=B, d_in=d_in, d_out=k, seed=32)
    stages = hessinv.ChainHessian(*problem).stage_derivatives()
    p = [h * d_in + h, h * h + h, k * h + k]
    first, middle, last = stages
    assert first.Dx.shape == (B, h, p[0]) and first.Dz is None and first.C is None
    assert middle.Dx.shape == (B, h, p[1]) and middle.Dz.shape == (B, h, h)
    assert middle.A.shape == (p[1], p[1]) and middle.C.shape == (B, p[1], h)
    assert middle.Q.shape == (B, h, h)
    assert last.Dx.shape == (1, 1, p[2]) and last.Dz.shape == (B, 1, h)
    assert last.Q.shape == (B, h, h)
    for d in stages:
        assert torch.allclose(d.A, d.A.T, atol=1e-14)
    assert torch.allclose(middle.Q, middle.Q.transpose(1, 2), atol=1e-14)


def test_second_derivative_blocks_against_hessian_of_weighted_output():
    """A, C, Q are the Hessian blocks of b . f(z, x) (ALGORITHM.md section 2)."""
    torch.manual_seed(33)
    stage = hessinv.build_chain(nn.Sequential(nn.Linear(3, 4), nn.GELU())).stages[0]
    stage.modules[0].double()
    z = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn(2, 4, dtype=torch.float64)
    x = stage.flat_params()
    d = stage_derivatives(stage, z, b, need_input=True)

    def phi(xx, zz):
        return (stage.apply(xx, zz) * b).sum()

    (Hxx, Hxz), (_, Hzz) = torch.func.hessian(phi, argnums=(0, 1))(x, z)
    assert torch.allclose(d.A, Hxx, atol=1e-13)
    for i in range(2):
        assert torch.allclose(d.C[i], Hxz[:, i, :], atol=1e-13)
        assert torch.allclose(d.Q[i], Hzz[i, :, i, :], atol=1e-13)
        assert torch.allclose(Hzz[0, :, 1, :], torch.zeros(3, 3, dtype=torch.float64))
    J = torch.func.jacrev(lambda xx: stage.apply(xx, z))(x)
    assert torch.allclose(d.Dx, J, atol=1e-14)


@pytest.mark.parametrize("loss", ["ce", "mse", "mse_sum"])
def test_loss_heads_analytic_equal_generic(loss):
    problem = make_problem(depth=1, batch=5, loss=loss, seed=34)
    out = problem.model(problem.inputs).detach()
    a = loss_head(problem.loss_fn, out, problem.targets, oracle="analytic")
    g = loss_head(problem.loss_fn, out, problem.targets, oracle="generic")
    for x, y in zip(a, g, strict=True):
        assert torch.allclose(x, y, atol=1e-14)


def test_cross_entropy_variants_use_generic_path():
    out = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match="no analytic form"):
        loss_head(smooth, out, y, oracle="analytic")
    head = loss_head(smooth, out, y)
    ref = torch.func.hessian(lambda o: smooth(o, y))(out)
    for i in range(4):
        assert torch.allclose(head.hess[i], ref[i, :, i, :], atol=1e-14)
    with pytest.raises(ValueError, match="oracle"):
        loss_head(smooth, out, y, oracle="fast")


def test_analytic_oracle_refuses_other_stages():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)).double()
    X = torch.randn(3, 1, 4, dtype=torch.float64)
    H = hessinv.ChainHessian(model, nn.MSELoss(), X, torch.randn(3, 2, dtype=torch.float64),
                             oracle="analytic")
    with pytest.raises(ValueError, match="not nn.Linear"):
        H.stage_derivatives()
