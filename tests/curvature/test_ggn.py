"""The generalized Gauss-Newton matrix (docs/algorithm.md section 9) against dense ``J^T S J``.

The reference is built independently of the library: ``J`` by ``torch.func.jacrev`` of the
model outputs in the selected parameters, ``S`` by ``torch.func.hessian`` of the loss in
the outputs. Bounds as in ``_dense_checks.py``.
"""

from __future__ import annotations

import pytest
import torch
from _dense_checks import check_factorization
from torch import nn
from torch.func import functional_call, hessian, jacrev

import hessinv


def dense_ggn(model, loss_fn, X, y):
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out = model(X).detach()
    J = jacrev(lambda p: functional_call(model, p, (X,)))(named)
    m = out.numel()
    J = torch.cat([j.reshape(m, -1) for j in J.values()], dim=1)
    S = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ S @ J


def _models():
    gen = torch.Generator().manual_seed(0)

    def init(model, scale=0.7):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
        return model

    yield (
        "tanh",
        init(
            nn.Sequential(
                nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
            ).double()
        ),
        6,
    )
    yield (
        "relu_wide",
        init(
            nn.Sequential(
                nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
            ).double()
        ),
        3,
    )
    yield (
        "sigmoid_output",
        init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid()).double()),
        5,
    )
    yield (
        "conv",
        init(
            nn.Sequential(
                nn.Unflatten(1, (1, 2, 2)),
                nn.Conv2d(1, 2, 2),
                nn.Flatten(),
                nn.Tanh(),
                nn.Linear(2, 3),
            ).double()
        ),
        4,
    )


@pytest.mark.parametrize(
    "name,model,batch", list(_models()), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_against_dense(name, model, batch, loss):
    gen = torch.Generator().manual_seed(1)
    d_in = 4 if name == "conv" else 3
    X = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
    if loss == "ce":
        y, loss_fn = torch.randint(0, 3, (batch,), generator=gen), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(batch, 3, generator=gen, dtype=torch.float64), nn.MSELoss()
    G = hessinv.ChainGGN(model, loss_fn, X, y)
    D = dense_ggn(model, loss_fn, X, y)
    scale = float(D.abs().max())
    assert float((G.dense() - D).abs().max()) <= 1e-13 * scale
    assert float((hessinv.flatten(G.diagonal()) - D.diagonal()).abs().max()) <= 1e-13 * scale
    offset = 0
    for block, p in zip(G.diagonal_blocks(), G.stage_sizes, strict=True):
        assert (
            float((block - D[offset : offset + p, offset : offset + p]).abs().max())
            <= 1e-13 * scale
        )
        offset += p
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    assert torch.allclose(
        G.gradient(), H.gradient(), rtol=0, atol=1e-15 * float(H.gradient().abs().max())
    )
    assert float(G.loss) == float(H.loss)
    for eps in (1e-6, 1e-2, 1.0):
        F = check_factorization(G, D, eps)
        assert F.n_delayed == 0  # positive definite fronts: Cholesky everywhere
        assert all(f.front.kind == "cholesky" for f in F._factors.factors)
    sign, _ = G.factorize(1e-3).logdet()
    assert float(sign) == 1.0


# BackPACK's hooks fire on module outputs (no input requires grad): torch says so, not we
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_ggn_diagonal_matches_backpack_diag_ggn_exact():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 3)
    ).double()
    X = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    ours = hessinv.ChainGGN(model, loss_fn, X, y).diagonal()
    backpack.extend(model)
    lossfunc = backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(DiagGGNExact()):
        lossfunc(model(X), y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.diag_ggn_exact, rtol=1e-12, atol=1e-15), name


def test_ggn_with_data_loader_and_parameter_subset():
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (9,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    G = hessinv.ChainGGN(model, loss_fn, data=batches, params=["0.weight", "2.bias"])
    D = dense_ggn(model, loss_fn, X, y)
    keep = torch.cat([torch.arange(0, 12), torch.tensor([12 + 4 + 8, 12 + 4 + 9])])
    assert float((G.dense() - D[keep][:, keep]).abs().max()) <= 1e-13 * float(D.abs().max())


def test_riccati_route_of_g_is_sized_with_the_bases():
    """The Gauss-Newton sweep leaves the Linear stages' bases unchecked (its output space
    needs none); the Riccati route must be sized with them, as it runs: a wide stage
    (width 48, batch 4) fits where its uncompressed front would not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 3)
    ).double()
    X, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    loss = nn.CrossEntropyLoss()
    H = hessinv.ChainHessian(model, loss, X, y, progress=False)
    G = hessinv.ChainGGN(model, loss, X, y, progress=False)
    need = H.memory_estimate()["riccati"]  # the same stages, fronts and factors
    F = G.factorize(1e-3, method="riccati", max_memory=int(1.2 * need))
    assert F.method.startswith("riccati")
    assert G.memory_estimate()["riccati"] == need
    dense = G.dense() + 1e-3 * torch.eye(G.num_params, dtype=torch.float64)
    g = G.gradient()
    assert torch.allclose(F.solve(g), torch.linalg.solve(dense, g), rtol=1e-9, atol=1e-12)
    assert F.backward_error <= 1e-12
