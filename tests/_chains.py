"""Small random chains and their dense float64 references, shared by the tests."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import hessinv

ACTIVATIONS = {
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.1),
}


class Problem(NamedTuple):
    model: nn.Sequential
    loss_fn: object
    inputs: torch.Tensor
    targets: torch.Tensor


def make_mlp(depth, width, d_in=3, d_out=3, activation="tanh", bias=True, dtype=torch.float64,
             seed=0):
    """``depth`` Linear layers (``depth - 1`` hidden of ``width``) with an activation after each."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    d = d_in
    for _ in range(depth - 1):
        lin = nn.Linear(d, width, bias=bias)
        layers += [lin, ACTIVATIONS[activation]()]
        d = width
    layers.append(nn.Linear(d, d_out, bias=bias))
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.8)
    return model


def make_problem(depth=3, width=4, batch=5, activation="tanh", bias=True, loss="ce", d_in=3,
                 d_out=3, dtype=torch.float64, seed=0) -> Problem:
    """A random chain, batch and loss (``"ce"``, ``"mse"`` or ``"mse_sum"``)."""
    model = make_mlp(depth, width, d_in, d_out, activation, bias, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, d_in, generator=gen, dtype=dtype)
    if loss == "ce":
        y = torch.randint(0, d_out, (batch,), generator=gen)
        loss_fn = nn.CrossEntropyLoss()
    else:
        y = torch.randn(batch, d_out, generator=gen, dtype=dtype)
        loss_fn = nn.MSELoss(reduction="sum" if loss == "mse_sum" else "mean")
    return Problem(model, loss_fn, X, y)


def dense_reference(problem: Problem) -> torch.Tensor:
    return hessinv.dense_hessian(problem.model, problem.loss_fn, problem.inputs, problem.targets)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def solve_tolerance(matrix: torch.Tensor) -> float:
    """1e-10 where cond < 1e6 (the project's bar); a cond-scaled bound beyond that."""
    cond = float(torch.linalg.cond(matrix))
    return 1e-10 if cond < 1e6 else 1e-15 * cond * 100

