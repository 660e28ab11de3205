"""Splitting models into stages (docs/algorithm.md section 1)."""

from __future__ import annotations

import pytest
import torch
from _chains import make_problem
from torch import nn

import hessinv
from hessinv.network.chain import build_chain


def test_stages_prefix_and_names():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Linear(3, 3, bias=False),
        nn.Linear(3, 2),
        nn.Tanh(),
    ).eval()
    chain = build_chain(model)
    assert len(chain.prefix) == 1
    assert [len(s.modules) for s in chain.stages] == [3, 1, 2]
    assert chain.param_names == tuple(n for n, _ in model.named_parameters())
    assert [s.num_params for s in chain.stages] == [15, 9, 8]


def test_list_of_modules_and_frozen_parameters():
    first = nn.Linear(2, 2)
    first.bias.requires_grad_(False)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    chain = build_chain([first, nn.Tanh(), frozen, nn.Linear(2, 1)])
    assert [s.param_names for s in chain.stages] == [("0.weight",), ("3.weight", "3.bias")]
    # frozen modules are parameter-free here; stages hold snapshots (copies) of the modules
    assert (
        type(chain.stages[0].modules[-1]) is nn.Linear and chain.stages[0].modules[-1] is not frozen
    )
    assert torch.equal(chain.stages[0].modules[-1].weight, frozen.weight)


def test_stage_apply_matches_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2))
    chain = build_chain(model)
    z = torch.randn(5, 3)
    out = z
    for s in chain.stages:
        out = s.apply(s.flat_params(), out)
    assert torch.allclose(out, model(z))
    x = chain.stages[0].flat_params()
    split = chain.stages[0].split_params(x)
    assert torch.equal(split["weight"], model[0].weight.detach())


def test_errors():
    with pytest.raises(TypeError, match="Sequential"):
        build_chain(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Sequential"):
        build_chain([nn.Linear(2, 2), "tanh"])
    with pytest.raises(ValueError, match="no selected"):
        build_chain(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="training mode"):
        build_chain(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="shared"):
        build_chain([shared, nn.Sequential(shared)])
    with pytest.raises(ValueError, match="couples"):
        build_chain(nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1)))


def test_frozen_parameters_do_not_record_autograd_graphs():
    """Snapshots hold no parameter that requires grad: a frozen weight (``params=`` subset or
    ``requires_grad=False``) is a constant, so nothing computed from it carries a graph."""
    model, loss_fn, X, y = make_problem(depth=3, width=4, batch=5, seed=3)
    model[2].bias.requires_grad_(False)  # frozen, and another stage only partly selected
    H = hessinv.ChainHessian(model, loss_fn, X, y, params=["0.weight", "4.weight", "4.bias"])
    assert all(
        not p.requires_grad for s in H.chain.stages for m in s.modules for p in m.parameters()
    )
    tensors = [
        v for d in H.stage_derivatives() for v in vars(d).values() if isinstance(v, torch.Tensor)
    ]
    assert tensors and not any(t.requires_grad for t in tensors)
    assert not H.factorize(0.1, progress=False).logdet()[1].requires_grad
    assert model[0].weight.requires_grad  # the user's model is untouched


class _Scaled(nn.Module):
    """A module whose state includes a plain tensor attribute (not a parameter or buffer)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = torch.tensor([2.0, 3.0])

    def forward(self, z):
        return self.lin(z) * self.scale


class _CustomCopy(nn.Linear):
    """A module that customises its deep copy (counted here): it must be honoured."""

    copies = 0

    def __deepcopy__(self, memo):
        type(self).copies += 1
        out = type(self)(self.in_features, self.out_features).to(self.weight.dtype)
        out.load_state_dict(self.state_dict())
        return out


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(3, 2),
        nn.ReLU(inplace=True),
        nn.LayerNorm(3),
        nn.LeakyReLU(0.3),
        nn.Sequential(nn.Linear(3, 3)),
        _Scaled(),
        _CustomCopy(3, 2),
    ],
)
def test_snapshots_are_independent_frozen_copies(module):
    """A stage holds what ``copy.deepcopy`` would give (made directly for plain modules),
    frozen and out of place: later changes to the model or its hooks do not reach it."""
    from hessinv.network.chain import _plain_copy, _snapshot

    snap = _snapshot(module)
    plain = _plain_copy(module)
    plain_kinds = not module._modules and not isinstance(module, (_Scaled, _CustomCopy))
    assert (plain is not None) == plain_kinds
    if isinstance(module, _CustomCopy):
        assert _CustomCopy.copies == 1
    assert type(snap) is type(module) and snap is not module
    assert not any(p.requires_grad for p in snap.parameters())
    assert not any(getattr(m, "inplace", False) for m in snap.modules())
    assert getattr(module, "inplace", False) == isinstance(module, nn.ReLU)  # the model's own
    z = torch.randn(4, 2 if isinstance(module, _Scaled) else 3)
    before = snap(z.clone())
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    module.register_forward_hook(lambda m, args, out: out * 0)
    assert torch.equal(snap(z.clone()), before)
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(module.parameters(), snap.parameters(), strict=True)
    )


def test_flat_params_one_vector_and_dtype_errors():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    chain = build_chain(model)
    flat = chain.flat_params()
    assert torch.equal(flat, torch.cat([s.flat_params() for s in chain.stages]))
    model[2].bias.data = model[2].bias.data.float()  # would be promoted silently by a cat
    with pytest.raises(TypeError, match=r"parameter 2\.bias .*float32"):
        build_chain(model).flat_params()
    model[2].bias = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"2\.bias has non-floating"):
        build_chain(model, params=["0.weight", "2.bias"]).flat_params()


def test_forward_hooks_are_part_of_the_function():
    """A forward hook that changes a module's output changes the Hessian: such a stage is
    applied through its modules and differentiated generically, never by the structured
    ``Linear`` formulas (which would silently leave the hook out). Checked against dense."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].register_forward_hook(lambda m, args, out: 2.0 * out + out**2)
    model[1].register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    H = hessinv.ChainHessian(model, nn.MSELoss(), X, y, progress=False)
    D = hessinv.dense_hessian(model, nn.MSELoss(), X, y)
    assert type(H.stage_derivatives()[0]).__name__ == "GenericDerivatives"
    assert float((H.dense() - D).abs().max()) <= 1e-12 * float(D.abs().max())
