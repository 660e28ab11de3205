"""Frozen modules inside a chain (docs/algorithm.md sections 1, 2): the modules after a
stage's first that own only unselected parameters form the stage's *tail*, differentiated
only through its input and composed with the stage's head by the chain rule.

Correctness against the independent dense references of ``_autograd_reference``
(reverse-over-reverse autograd for ``H``, ``J^T A J`` for ``G``), through the contract
checker ``_chains.check_hessian`` and ``_dense_checks.check_factorization`` (bounds stated
there); cost counted in floating-point operations of matrix products, which do not depend
on the machine or its load.
"""

from __future__ import annotations

import pytest
import torch
from _autograd_reference import UNIT_ROUNDOFF, autograd_ggn, autograd_hessian
from _chains import check_hessian, require_contract
from _dense_checks import check_factorization
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import hessinv
from hessinv.network.chain import build_chain
from hessinv.tools import problems

f64 = torch.float64


def _check_ggn(model, loss_fn, X, y, params, what: str, oracle: str = "auto") -> None:
    """``G`` against ``J^T A J``: ``||G - G_ref||_2 <= 2 delta + 64 u ||G_ref||`` (``delta``
    the reference's rounding bound), products alike, and a factorization's solve, logdet and
    inertia (``check_factorization``)."""
    ref = autograd_ggn(model, loss_fn, X, y, params)
    G = hessinv.ChainGGN(model, loss_fn, X, y, params=params, oracle=oracle, progress=False)
    assert G.param_names == ref.names, what
    tol = 2 * ref.error + 64 * UNIT_ROUNDOFF * float(torch.linalg.matrix_norm(ref.ggn, 2))
    err = float(torch.linalg.matrix_norm(G.dense() - ref.ggn, 2))
    assert err <= tol, (what, err, tol)
    V = torch.randn(G.num_params, 2, generator=torch.Generator().manual_seed(2), dtype=f64)
    err = float(torch.linalg.matrix_norm(G @ V - ref.ggn @ V, 2))
    assert err <= tol * float(torch.linalg.matrix_norm(V, 2)), (what, err)
    check_factorization(G, ref.ggn, 1e-2)


def _check_hessian(model, loss_fn, X, y, params, what: str, oracle: str = "auto") -> None:
    ref = autograd_hessian(model, loss_fn, X, y, params)

    def make():
        return hessinv.ChainHessian(
            model, loss_fn, X, y, params=params, oracle=oracle, progress=False
        )

    for eps in (1e-2, 1.0):
        require_contract(check_hessian(make, ref, eps, description=f"{what} eps={eps:g}", k=2))


def test_frozen_modules_after_a_stage_are_its_tail():
    """A stage's tail starts at the first module after its first that owns (unselected)
    parameters; parameter-free modules before it stay in the head, those after it are in the
    tail; ``apply`` is the tail after the head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4),  # 0: stage 0
        nn.Tanh(),  # 1: head
        nn.Linear(4, 4),  # 2: frozen -> tail
        nn.Tanh(),  # 3: tail
        nn.Linear(4, 4),  # 4: stage 1, no tail
        nn.ReLU(),  # 5
        nn.Linear(4, 2),  # 6: stage 2 (bias only), its weight frozen inside the stage
    ).to(f64)
    chain = build_chain(model, params=["0.weight", "4.weight", "4.bias", "6.bias"])
    assert [s.tail_start for s in chain.stages] == [2, 2, 1]
    assert [s.has_tail for s in chain.stages] == [True, False, False]
    model[2].requires_grad_(False)  # frozen by requires_grad: stage 0's tail takes 2..5
    model[4].requires_grad_(False)
    chain = build_chain(model)
    assert [s.param_names for s in chain.stages] == [("0.weight", "0.bias"), ("6.weight", "6.bias")]
    assert chain.stages[0].tail_start == 2 and len(chain.stages[0].modules) == 6
    z = torch.randn(5, 3, dtype=f64)
    s = chain.stages[0]
    x = s.flat_params()
    assert torch.equal(s.apply(x, z), s.apply_tail(s.apply_head(x, z)))
    assert torch.equal(s.apply(x, z), model[:6](z).detach())


@pytest.mark.parametrize("selection", ["params_names", "requires_grad", "with_biases"])
@pytest.mark.parametrize("oracle", ["auto", "generic"])
def test_deep_frozen_middle_against_dense(selection, oracle):
    """24 tanh ``Linear`` layers of width 5 with a few selected parameters: the frozen middle
    is the tail of the stages before it. ``H`` (the contract: products, gradient, solves,
    logdet, inertia) and ``G`` against the dense references with the same selection."""
    model, loss_fn, X, y = problems.make_problem(
        24, 5, 6, d_in=3, d_out=3, init="fan_in", seed=4, loss="ce"
    )
    if selection == "params_names":
        params = ["0.weight", "22.weight"]
    elif selection == "with_biases":
        params = ["2.bias", "22.weight", "22.bias", "46.bias"]
    else:
        params = None
        keep = {"0.weight", "0.bias", "30.weight", "46.weight"}
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
    chain = build_chain(model, params)
    assert sum(s.has_tail for s in chain.stages) >= 2
    what = f"{selection}, oracle={oracle}"
    _check_hessian(model, loss_fn, X, y, params, what, oracle)
    _check_ggn(model, loss_fn, X, y, params, what, oracle)


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin, self.act = nn.Linear(width, width), nn.SiLU()

    def forward(self, z):
        return z + self.act(self.lin(z))


@pytest.mark.parametrize("loss", ["ce", "mse_sum"])
def test_frozen_tail_of_mixed_modules_against_dense(loss):
    """Tails with a frozen per-channel PReLU, Flatten, Linear, LayerNorm, a residual block and
    a frozen weight beside a selected bias, behind a convolution and a Linear stage."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),  # stage 0
        nn.PReLU(2),  # frozen: tail of stage 0
        nn.Flatten(),
        nn.Linear(8, 6),  # frozen
        nn.LayerNorm(6),  # frozen
        _Residual(6),  # frozen
        nn.Linear(6, 6),  # stage 1
        nn.SiLU(),
        nn.Linear(6, 6),  # frozen: tail of stage 1
        nn.Tanh(),
        nn.Linear(6, 3),  # stage 2 (bias only)
    ).to(f64)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.3, -0.4], dtype=f64))
        model[4].weight.add_(0.3 * torch.randn(6, dtype=f64))
    params = ["0.weight", "0.bias", "6.weight", "10.bias"]
    X = torch.randn(5, 1, 4, 4, dtype=f64)
    if loss == "ce":
        y, loss_fn = torch.tensor([0, 1, 2, 1, 0]), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(5, 3, dtype=f64), nn.MSELoss(reduction="sum")
    assert [s.has_tail for s in build_chain(model, params).stages] == [True, True, False]
    _check_hessian(model, loss_fn, X, y, params, f"mixed tail, {loss}")
    _check_ggn(model, loss_fn, X, y, params, f"mixed tail, {loss}")


class _Flops(TorchDispatchMode):
    """Floating-point operations of the matrix products run while active (torch's own
    counting rules, ``torch.utils.flop_counter``)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def _tail_passes(cls, d_in: int, h: int = 3, batch: int = 6) -> float:
    """How many passes over its frozen middle building ``cls`` costs: the flops of the model
    with 20 frozen layers minus those with 10, over the flops of 10 frozen layers applied once
    to the batch."""
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(batch, d_in, generator=gen, dtype=f64)
    y = torch.arange(batch) % 2
    flops = {}
    for L in (10, 20):
        torch.manual_seed(7)
        layers = [nn.Linear(d_in, h), nn.Tanh()]
        for _ in range(L):
            layers += [nn.Linear(h, h), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(h, 2)).to(f64)
        with _Flops() as counter:
            cls(
                model,
                nn.CrossEntropyLoss(),
                X,
                y,
                params=["0.weight", f"{2 * L + 2}.weight"],
                progress=False,
            )
        flops[L] = counter.total
    return (flops[20] - flops[10]) / (10 * 2 * batch * h * h)


def test_frozen_middle_costs_products_not_a_derivative_sweep():
    """The frozen middle (``h = 3`` wide) behind a stage with ``p = 16 h = 48`` parameters costs
    ``O(h)`` passes, whatever ``p``: its Jacobian (``h_out`` products) and its curvature
    (``h_u`` products), not ``O(p)`` derivative passes. Before: 106 passes for ``H`` (about
    ``2 p``), now 14; the Gauss-Newton matrix 6 before and now."""
    h = 3
    passes_H = _tail_passes(hessinv.ChainHessian, d_in=16, h=h)
    passes_G = _tail_passes(hessinv.ChainGGN, d_in=16, h=h)
    assert passes_H <= 4 * (h + h) + 4, passes_H  # 28, independent of p
    assert passes_G <= 2 * h + 4, passes_G
    # and it does not grow with p
    assert _tail_passes(hessinv.ChainHessian, d_in=32, h=h) == passes_H
