"""The optimizers as ``torch.optim.Optimizer`` s (hessinv/optim/base.py): parameter groups,
schedulers, ``zero_grad``, the batch in ``step``, closures refused, parameter selection."""

from __future__ import annotations

import copy

import pytest
import torch
from _dense_curvature import DenseCurvature
from torch import nn

import hessinv
from hessinv.optim import DampedNewton, TrustRegionNewton
from hessinv.tools import problems

DT = torch.float64
OPTIMIZERS = pytest.mark.parametrize("cls", [DampedNewton, TrustRegionNewton])


def _problem(seed=0, loss="ce"):
    return problems.make_problem(3, 5, 8, loss=loss, init="default", seed=seed, data_seed=seed)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


@OPTIMIZERS
def test_is_a_torch_optimizer_with_groups_zero_grad_and_keyword_step(cls):
    model, loss_fn, X, y = _problem()
    opt = cls(model, loss_fn)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1 and "lr" in opt.param_groups[0]
    loss_fn(model(X), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    f0 = opt.step(inputs=X, targets=y)
    assert isinstance(f0, float) and opt.step_count == 1
    with torch.no_grad():
        now = float(loss_fn(model(X), y))
    expected = f0 - opt.last_step["actual_reduction"] if opt.last_step["accepted"] else f0
    assert now == pytest.approx(expected, rel=1e-12, abs=1e-14)


@OPTIMIZERS
def test_closure_refused_with_what_to_pass(cls):
    model, loss_fn, X, y = _problem()
    opt = cls(model, loss_fn)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    for call in (
        lambda: opt.step(closure),
        lambda: opt.step(closure=closure),
        lambda: opt.step(X, y, closure=closure),
    ):
        with pytest.raises(TypeError, match=r"opt\.step\(inputs, targets\)"):
            call()
    with pytest.raises(TypeError, match="needs the batch"):
        opt.step()
    assert opt.step_count == 0


def test_lr_scheduler_drives_the_step_length():
    """StepLR halves lr; the damped Newton step is lr times (B + eps I)^-1 g exactly."""
    model, loss_fn, X, y = _problem(loss="mse")
    opt = DampedNewton(model, loss_fn, damping=0.5, curvature="ggn", max_tries=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected_lr in (1.0, 0.5, 0.25):
        assert opt.param_groups[0]["lr"] == expected_lr
        x0 = _flat(model)
        B = DenseCurvature.from_model(model, loss_fn, X, y, "ggn")
        eps = opt.damping
        direction = -torch.linalg.solve(B.matrix + eps * torch.eye(len(x0), dtype=DT), B.gradient())
        opt.step(X, y)
        if opt.last_step["accepted"]:
            step = _flat(model) - x0
            assert float((step - expected_lr * direction).norm()) <= 1e-10 * float(direction.norm())
        sched.step()


def test_parameter_groups_select_parameters_and_scale_their_part():
    """Two groups with lr 1 and 0.5: the step is the exact damped Newton step of the selected
    parameters (the others constants), each group's part times its lr."""
    model, loss_fn, X, y = _problem(seed=2, loss="mse")
    frozen = model[2].weight
    groups = [{"params": [model[0].weight, model[0].bias]}, {"params": ["4.weight"], "lr": 0.5}]
    opt = DampedNewton(model, loss_fn, params=groups, damping=0.3, curvature="hessian", max_tries=1)
    assert opt.param_names == ("0.weight", "0.bias", "4.weight")
    names = list(opt.param_names)
    H = hessinv.ChainHessian(model, loss_fn, X, y, params=names)
    D = H.dense()
    direction = -torch.linalg.solve(D + 0.3 * torch.eye(H.num_params, dtype=DT), H.gradient())
    scale = torch.ones(H.num_params, dtype=DT)
    scale[model[0].weight.numel() + model[0].bias.numel() :] = 0.5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_before = frozen.detach().clone()
    opt.step(X, y)
    assert torch.equal(frozen, frozen_before)  # not selected: untouched
    if opt.last_step["accepted"]:
        step = torch.cat(
            [(dict(model.named_parameters())[n].detach() - before[n]).reshape(-1) for n in names]
        )
        assert float((step - scale * direction).norm()) <= 1e-10 * float(direction.norm())


def test_groups_must_share_the_factorization_hyper_parameters():
    model, loss_fn, X, y = _problem()
    groups = [
        {"params": list(model[0].parameters()), "damping": 0.1},
        {"params": list(model[2].parameters()), "damping": 0.2},
    ]
    with pytest.raises(ValueError, match="damping differs between parameter groups"):
        DampedNewton(model, loss_fn, params=groups)
    with pytest.raises(ValueError, match="no parameter named"):
        DampedNewton(model, loss_fn, params=["nope"])
    with pytest.raises(ValueError, match="parameters of the model"):
        DampedNewton(model, loss_fn, params=[nn.Parameter(torch.zeros(2))])


def test_state_dict_round_trip_with_groups_and_scheduler():
    model, loss_fn, X, y = _problem(seed=4)
    model2 = copy.deepcopy(model)

    def make(m):
        groups = [
            {"params": list(m[0].parameters())},
            {"params": list(m[2].parameters()), "lr": 0.5},
        ]
        return TrustRegionNewton(m, loss_fn, radius=0.3, params=groups)

    opt, opt2 = make(model), make(model2)
    opt.step(X, y)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    model2.load_state_dict(model.state_dict())
    for o in (opt, opt2):
        o.step(X, y)
    assert opt.state_dict() == opt2.state_dict()
    assert torch.equal(_flat(model), _flat(model2))


# ----------------------------------------------------------------------------- preconditioner
@pytest.mark.parametrize("curvature,relative", [("ggn", False), ("ggn", True), ("hessian", False)])
def test_preconditioner_replaces_gradients_by_the_dense_solve(curvature, relative):
    model, loss_fn, X, y = _problem(seed=5, loss="mse")
    damping = 5.0 if curvature == "hessian" else 0.5  # H + eps I must be positive definite
    P = hessinv.optim.CurvaturePreconditioner(
        model, loss_fn, curvature=curvature, damping=damping, every=3, relative=relative
    )
    kind = "ggn" if curvature == "ggn" else "hessian"
    B = DenseCurvature.from_model(model, loss_fn, X, y, kind)
    eps = damping * float(B.matrix.trace()) / B.num_params if relative else damping
    M = B.matrix + eps * torch.eye(B.num_params, dtype=DT)
    loss_fn(model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert P.update(X, y) and P.refreshes == 1 and P.damping_used == pytest.approx(eps)
    P.precondition_()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    ref = torch.linalg.solve(M, g)
    assert float((got - ref).norm()) <= 1e-10 * float(ref.norm())
    assert not P.update(X, y) and not P.update(X, y) and P.update(X, y)  # every 3rd refreshes
    assert P.refreshes == 2


def test_preconditioner_errors():
    model, loss_fn, X, y = _problem(seed=6)
    P = hessinv.optim.CurvaturePreconditioner(model, loss_fn)
    with pytest.raises(RuntimeError, match="update"):
        P.precondition_()
    with pytest.raises(ValueError, match="curvature"):
        hessinv.optim.CurvaturePreconditioner(model, loss_fn, curvature="kfac")
    with pytest.raises(ValueError, match="damping"):
        hessinv.optim.CurvaturePreconditioner(model, loss_fn, damping=-1.0)
    with pytest.raises(ValueError, match="every"):
        hessinv.optim.CurvaturePreconditioner(model, loss_fn, every=0)
    H = hessinv.optim.CurvaturePreconditioner(model, loss_fn, curvature="hessian", damping=0.0)
    with pytest.raises(hessinv.SingularMatrixError, match="H \\+ 0 I"):
        H.update(X, y)  # a cross-entropy Hessian is singular (softmax) or indefinite
