"""The one problem builder of the tests, the demo, the paper's experiments and the benchmarks.

A *problem* is a chain network, a loss and a batch. :func:`mlp` builds ``depth``
``nn.Linear`` layers ``d_in -> width -> ... -> width -> d_out`` with an activation between
them (``depth`` is the number of stages of hessinv), initialised one of three ways:

* ``"default"``: PyTorch's own ``nn.Linear`` initialisation after ``torch.manual_seed(seed)``;
* ``"normal"``: every weight and bias ``N(0, 1)`` from a generator seeded with ``seed``, in
  ``parameters()`` order;
* ``"fan_in"``: weights ``N(0, gain^2 / fan_in)`` (``gain`` 1 for tanh-like activations,
  ``sqrt 2`` for ReLU: near the edge of chaos, so deep nets neither saturate nor vanish),
  biases ``N(0, 0.1^2)``, from a generator seeded with ``seed``;

then every parameter is multiplied by ``scale``. :func:`random_batch` draws standard-normal
inputs and class labels (cross-entropy) or normal targets (MSE) from a generator seeded
with ``data_seed``. Everything is a pure function of its arguments.

>>> p = make_problem(depth=3, width=4, batch=5, seed=0)
>>> [type(m).__name__ for m in p.model], tuple(p.inputs.shape), p.targets.dtype
(['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear'], (5, 3), torch.int64)
>>> torch.equal(make_problem(3, 4, 5, seed=0).model[0].weight, p.model[0].weight)
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Problem", "ACTIVATIONS", "mlp", "random_batch", "make_problem"]

#: the activations by name
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
    """A model, its loss and a batch: ``ChainHessian(*problem)`` takes them in this order."""

    model: nn.Sequential
    loss_fn: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def mlp(
    depth: int,
    width: int,
    d_in: int,
    d_out: int,
    activation: str = "tanh",
    *,
    bias: bool = True,
    init: str = "default",
    scale: float = 1.0,
    gain: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Sequential:
    """``depth`` Linear layers with ``activation`` between them (see the module docstring)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if init not in ("default", "normal", "fan_in"):
        raise ValueError(f"init must be 'default', 'normal' or 'fan_in', got {init!r}")
    if init == "default":
        torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < depth - 1:
            layers.append(ACTIVATIONS[activation]())
    model = nn.Sequential(*layers).to(dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if init == "normal":
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
        elif init == "fan_in":
            g = (math.sqrt(2.0) if activation == "relu" else 1.0) if gain is None else gain
            for lin in model[::2]:
                lin.weight.copy_(
                    torch.randn(lin.weight.shape, generator=gen) * g / math.sqrt(lin.in_features)
                )
                if bias:
                    lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen))
        if scale != 1.0:
            for p in model.parameters():
                p.mul_(scale)
    return model.to(device=device)


def random_batch(
    batch: int,
    d_in: int,
    d_out: int,
    loss: str = "ce",
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    data_seed: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """``(inputs, targets, loss_fn)``: ``(batch, d_in)`` standard-normal inputs and, for
    ``loss="ce"``, class labels with ``nn.CrossEntropyLoss()``; for ``"mse"`` / ``"mse_sum"``
    normal targets ``(batch, d_out)`` with ``nn.MSELoss`` (mean / sum)."""
    gen = torch.Generator().manual_seed(data_seed)
    X = torch.randn(batch, d_in, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if loss == "ce":
        y = torch.randint(0, d_out, (batch,), generator=gen).to(device)
        return X, y, nn.CrossEntropyLoss()
    if loss in ("mse", "mse_sum"):
        y = torch.randn(batch, d_out, generator=gen, dtype=torch.float64).to(
            dtype=dtype, device=device
        )
        return X, y, nn.MSELoss(reduction="sum" if loss == "mse_sum" else "mean")
    raise ValueError(f"loss must be 'ce', 'mse' or 'mse_sum', got {loss!r}")


def make_problem(
    depth: int = 3,
    width: int = 4,
    batch: int = 5,
    *,
    d_in: int = 3,
    d_out: int = 3,
    activation: str = "tanh",
    loss: str = "ce",
    bias: bool = True,
    init: str = "default",
    scale: float = 1.0,
    gain: float | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    data_seed: int | None = None,
) -> Problem:
    """:func:`mlp` and :func:`random_batch` together (``data_seed`` defaults to ``seed + 1``)."""
    model = mlp(
        depth,
        width,
        d_in,
        d_out,
        activation,
        bias=bias,
        init=init,
        scale=scale,
        gain=gain,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    X, y, loss_fn = random_batch(
        batch,
        d_in,
        d_out,
        loss,
        dtype=dtype,
        device=device,
        data_seed=seed + 1 if data_seed is None else data_seed,
    )
    return Problem(model, loss_fn, X, y)
