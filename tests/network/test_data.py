"""More than one batch, tuple inputs and parameter subsets (docs/algorithm.md section 1)."""

from __future__ import annotations

import pytest
import torch
from _chains import make_problem
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessinv


@pytest.mark.parametrize("loss", ["ce", "mse", "mse_sum"])
def test_data_loader_equals_the_union_batch(loss):
    problem = make_problem(depth=3, width=4, batch=10, loss=loss, seed=70)
    loader = DataLoader(TensorDataset(problem.inputs, problem.targets), batch_size=4)
    H = hessinv.ChainHessian(problem.model, problem.loss_fn, data=loader)
    D = hessinv.dense_hessian(*problem)  # one batch of all 10 samples
    scale = float(D.abs().max())
    assert float((H.dense() - D).abs().max()) <= 1e-13 * scale
    ref_loss = problem.loss_fn(problem.model(problem.inputs), problem.targets).detach()
    assert abs(float(H.loss - ref_loss)) <= 1e-14 * max(1.0, abs(float(ref_loss)))
    g = torch.randn(H.num_params, dtype=torch.float64)
    x = H.solve(g, damping=0.5)
    ref = torch.linalg.solve(D + 0.5 * torch.eye(H.num_params, dtype=torch.float64), g)
    assert float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref)) <= 1e-10


def test_data_errors():
    problem = make_problem(depth=2, width=3, batch=4, seed=71)
    with pytest.raises(TypeError, match="either"):
        hessinv.ChainHessian(
            problem.model,
            problem.loss_fn,
            problem.inputs,
            problem.targets,
            data=[(problem.inputs, problem.targets)],
        )
    with pytest.raises(ValueError, match="no batches"):
        hessinv.ChainHessian(problem.model, problem.loss_fn, data=[])
    with pytest.raises(TypeError, match="pairs"):
        hessinv.ChainHessian(problem.model, problem.loss_fn, data=[problem.inputs])
    with pytest.raises(TypeError, match="required"):
        hessinv.ChainHessian(problem.model, problem.loss_fn, problem.inputs)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, inputs):
        x, z = inputs
        return torch.tanh(self.a(x) + self.b(z))


def test_tuple_inputs_to_the_first_stage():
    gen = torch.Generator().manual_seed(72)
    model = nn.Sequential(_TwoInputs(), nn.Linear(4, 3)).double()
    X = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 2, generator=gen, dtype=torch.float64),
    )
    y = torch.randint(0, 3, (5,), generator=gen)
    H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    D = hessinv.dense_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert float((H.dense() - D).abs().max()) <= 1e-13 * float(D.abs().max())
    loader = [((X[0][:2], X[1][:2]), y[:2]), ((X[0][2:], X[1][2:]), y[2:])]
    H2 = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), data=loader)
    assert float((H2.dense() - D).abs().max()) <= 1e-13 * float(D.abs().max())


def test_parameter_subsets_by_tensor_and_name():
    problem = make_problem(depth=3, width=4, batch=5, seed=73)
    m = problem.model
    full = hessinv.dense_hessian(*problem)
    names = [n for n, _ in m.named_parameters()]
    sizes = [p.numel() for p in m.parameters()]
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist(), strict=False))
    chosen = ["0.weight", "2.bias", "4.weight"]
    idx = torch.cat(
        [
            torch.arange(offsets[n], offsets[n] + dict(zip(names, sizes, strict=True))[n])
            for n in chosen
        ]
    )
    for params in (chosen, [m[0].weight, m[2].bias, m[4].weight]):
        H = hessinv.ChainHessian(*problem, params=params)
        assert H.param_names == tuple(chosen)
        assert float((H.dense() - full[idx][:, idx]).abs().max()) <= 1e-13 * float(full.abs().max())
    with pytest.raises(ValueError, match="no parameter named"):
        hessinv.ChainHessian(*problem, params=["9.weight"])
    with pytest.raises(ValueError, match="not a parameter"):
        hessinv.ChainHessian(*problem, params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="empty"):
        hessinv.ChainHessian(*problem, params=[])


class _DictInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, inputs):
        return torch.tanh(self.a(inputs["x"]) + self.b(inputs["z"]))


def test_dict_inputs_to_the_first_stage():
    gen = torch.Generator().manual_seed(74)
    model = nn.Sequential(_DictInputs(), nn.Linear(4, 3)).double()
    X = {
        "x": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "z": torch.randn(5, 2, generator=gen, dtype=torch.float64),
    }
    y = torch.randint(0, 3, (5,), generator=gen)
    H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    D = hessinv.dense_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert float((H.dense() - D).abs().max()) <= 1e-13 * float(D.abs().max())
