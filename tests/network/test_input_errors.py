"""Clear errors at construction for inputs hessinv cannot take (docs/algorithm.md section 1):
a BackPACK-extended model, a ``Dataset`` (single samples) given as ``data=``, half-precision
models, and one sample without its batch dimension. Each error names the cause and what to
do instead; the fixed inputs then work (checked against the dense Hessian)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessinv

f64 = torch.float64
CURVATURES = [hessinv.ChainHessian, hessinv.ChainGGN]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(f64)


def _batch(n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=f64)
    return X, torch.arange(n) % 3, torch.randn(n, 3, generator=gen, dtype=f64)


@pytest.mark.parametrize("cls", CURVATURES)
def test_backpack_extended_model_is_refused_naming_the_module(cls):
    """``backpack.extend`` registers hooks whose autograd functions torch.func cannot run
    (before: RuntimeError 'autograd.Function ... must override the setup_context
    staticmethod'); the error names the module and says to pass the model without the
    extension. The copy made before ``extend`` works; so does the model once BackPACK's
    hooks are removed (the hooks are the marker, not BackPACK's flag)."""
    backpack = pytest.importorskip("backpack")
    from backpack.context import CTX

    X, y, _ = _batch()
    plain = _model()
    before = copy.deepcopy(plain)
    extended = backpack.extend(plain)
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) is extended by BackPACK"):
        cls(extended, nn.CrossEntropyLoss(), X, y, progress=False)
    with pytest.raises(ValueError, match=r"without the extension.*before backpack\.extend"):
        cls(extended, nn.CrossEntropyLoss(), X, y, progress=False)
    inner = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 3))).to(f64)
    backpack.extend(inner[1])  # only a nested child: its full name is given
    with pytest.raises(ValueError, match=r"module '1\.0' \(Tanh\) is extended by BackPACK"):
        cls(inner, nn.CrossEntropyLoss(), X, y, progress=False)
    C = cls(before, nn.CrossEntropyLoss(), X, y, progress=False)
    assert C.num_params == sum(p.numel() for p in before.parameters())
    if cls is hessinv.ChainHessian:
        D = hessinv.dense_hessian(before, nn.CrossEntropyLoss(), X, y)
        assert float((C.dense() - D).abs().max()) <= 1e-12 * float(D.abs().max())
    CTX.remove_hooks()
    assert getattr(extended[0], "_backpack_extend", False)  # the flag stays, the hooks went
    cls(extended, nn.CrossEntropyLoss(), X, y, progress=False)


@pytest.mark.parametrize("cls", CURVATURES)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_dataset_as_data_is_refused_with_the_dataloader_to_use(cls, loss):
    """``data=`` a ``Dataset`` (per-sample pairs, no batch dimension) failed inside torch
    (CE: 'zero-dimensional tensor ... cannot be concatenated'; MSE: 'mat1 and mat2 shapes
    cannot be multiplied'; one sample: 'every stage must keep the batch dimension (4)
    first'). Now: the Dataset itself is refused (TypeError), and so are pairs without a
    shared batch dimension from any iterable (ValueError), both naming
    ``DataLoader(dataset, batch_size=...)``; which then equals the one-batch Hessian."""
    model = _model()
    X, y_ce, y_mse = _batch()
    y, loss_fn = (y_ce, nn.CrossEntropyLoss()) if loss == "ce" else (y_mse, nn.MSELoss())
    dataset = TensorDataset(X, y)
    hint = r"DataLoader\(dataset, batch_size=\.\.\.\)"
    with pytest.raises(TypeError, match=rf"data= is a TensorDataset.*{hint}"):
        cls(model, loss_fn, data=dataset, progress=False)
    for pairs in (list(dataset), list(dataset)[:1], iter(dataset)):
        with pytest.raises(ValueError, match=rf"batch 0 of data= .*single sample.*{hint}"):
            cls(model, loss_fn, data=pairs, progress=False)
    C = cls(model, loss_fn, data=DataLoader(dataset, batch_size=4), progress=False)
    one = cls(model, loss_fn, X, y, progress=False)
    assert float((C.dense() - one.dense()).abs().max()) <= 1e-13 * float(one.dense().abs().max())


@pytest.mark.parametrize("cls", CURVATURES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_are_refused(cls, dtype):
    """float16 and bfloat16 reached ``torch.linalg.svd`` ('"linalg_svd_cpu" not implemented
    for 'Half''); now refused at construction, naming the dtype and the conversion."""
    X, y, _ = _batch()
    model = _model().to(dtype)
    name = str(dtype).replace(".", r"\.")
    with pytest.raises(TypeError, match=rf"parameter 0\.weight is {name}.*float32 or float64"):
        cls(model, nn.CrossEntropyLoss(), X.to(dtype), y, progress=False)
    with pytest.raises(TypeError, match=r"model\.float\(\)"):
        cls(model, nn.CrossEntropyLoss(), X.to(dtype), y, params=["2.bias"], progress=False)
    C = cls(model.float(), nn.CrossEntropyLoss(), X.float(), y, progress=False)
    assert C.dtype == torch.float32


@pytest.mark.parametrize(
    "case", ["linear_stage", "generic_stage_keeps_the_size", "conv_single_image"]
)
def test_one_sample_without_batch_dimension_says_so(case):
    """One sample without its batch dimension (an item of a Dataset) made hessinv take its
    first feature size for the batch size: 'every stage must keep the batch dimension (4)
    first' for a stage that does keep it, or a torch.func error. Now the message says the
    inputs look like one sample and how to add the batch dimension."""
    torch.manual_seed(3)
    if case == "linear_stage":
        model, x, y = _model(), torch.randn(4, dtype=f64), torch.randn(3, dtype=f64)
        loss_fn = nn.MSELoss()
    elif case == "generic_stage_keeps_the_size":  # (4,) -> (4,): the size is kept
        model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2)).to(f64)
        x, y, loss_fn = torch.randn(4, dtype=f64), torch.randn(2, dtype=f64), nn.MSELoss()
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).to(f64)
        x, y, loss_fn = torch.randn(1, 4, 4, dtype=f64), torch.tensor(1), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"one sample without its batch dimension.*unsqueeze\(0\)"):
        hessinv.ChainHessian(model, loss_fn, x, y, progress=False)
    H = hessinv.ChainHessian(model, loss_fn, x.unsqueeze(0), y.unsqueeze(0), progress=False)
    D = hessinv.dense_hessian(model, loss_fn, x.unsqueeze(0), y.unsqueeze(0))
    assert float((H.dense() - D).abs().max()) <= 1e-12 * float(D.abs().max())
