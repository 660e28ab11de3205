"""The reference tools: dense Hessian and conjugate gradients."""

from __future__ import annotations

import torch
from _chains import make_problem

import hessinv


def test_dense_hessian_is_symmetric_and_matches_autograd_hvp():
    problem = make_problem(depth=3, width=3, batch=4, seed=41)
    D = hessinv.dense_hessian(*problem)
    assert torch.allclose(D, D.T, atol=1e-14)
    params = list(problem.model.parameters())
    loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=v)
    assert torch.allclose(D @ hessinv.flatten(v), hessinv.flatten(hv), atol=1e-13)


def test_conjugate_gradient():
    torch.manual_seed(0)
    Q = torch.randn(20, 20, dtype=torch.float64)
    M = Q @ Q.T + torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    res = hessinv.conjugate_gradient(lambda v: M @ v, b, damping=0.5, rtol=1e-12)
    assert res.converged and res.residual <= 1e-12
    assert torch.allclose(
        res.x, torch.linalg.solve(M + 0.5 * torch.eye(20, dtype=torch.float64), b)
    )
    neg = hessinv.conjugate_gradient(lambda v: -M @ v, b)
    assert not neg.converged  # negative curvature is reported, not hidden
    few = hessinv.conjugate_gradient(lambda v: M @ v, b, maxiter=2)
    assert not few.converged and few.iterations == 2
