"""Wide Linear stages: the compressed factorization of docs/algorithm.md section 8 against dense.

Batch below the input width + 1 takes the compressed path (asserted); batch above it the
dense-basis path; mixed structured and generic chains; rank-deficient inputs; eps from
1e-8 to negative. Bounds are in ``_dense_checks.py``.
"""

from __future__ import annotations

import pytest
import torch
from _dense_checks import check_factorization
from torch import nn

import hessinv
from hessinv.derivatives import GenericDerivatives, LinearDerivatives

EPS = (1e-8, 1e-3, 1.0, -0.3)


def _model(width, depth=3, d_in=3, d_out=3, act=nn.Tanh, bias=True, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width, bias=bias), act()]
        d = width
    layers.append(nn.Linear(d, d_out, bias=bias))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen, dtype=torch.float64)
                * scale
                / max(1, p.shape[-1]) ** 0.5
            )
    return model


def _data(batch, d_in=3, d_out=3, loss="ce", seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
    if loss == "ce":
        return X, torch.randint(0, d_out, (batch,), generator=gen), nn.CrossEntropyLoss()
    return X, torch.randn(batch, d_out, generator=gen, dtype=torch.float64), nn.MSELoss()


def _check_all(model, loss_fn, X, y, eps_values=EPS):
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    D = hessinv.dense_hessian(model, loss_fn, X, y)
    scale = float(D.abs().max())
    V = torch.randn(
        H.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    assert float((H @ V - D @ V).abs().max()) <= 1e-12 * scale * float(V.abs().max()) * 10
    diag = hessinv.flatten(H.diagonal())
    assert float((diag - D.diagonal()).abs().max()) <= 1e-13 * scale
    assert abs(float(H.trace() - D.trace())) <= 1e-12 * scale * H.num_params
    for eps in eps_values:
        check_factorization(H, D, eps)
    return H


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bias", [True, False])
def test_compressed_path_is_taken_and_exact(loss, bias):
    X, y, loss_fn = _data(batch=3, loss=loss)
    H = _check_all(_model(width=8, bias=bias), loss_fn, X, y)
    hidden = H.stage_derivatives()[1]
    assert isinstance(hidden, LinearDerivatives)
    assert hidden.complement is not None and hidden.basis_size == 8 * 3 < hidden.num_params


def test_batch_above_width_uses_the_full_basis():
    X, y, loss_fn = _data(batch=12)
    H = _check_all(_model(width=5), loss_fn, X, y)
    assert all(d.complement is None for d in H.stage_derivatives())


@pytest.mark.parametrize("case", ["duplicated", "zero_column", "dead_relu"])
def test_rank_deficient_inputs(case):
    X, y, loss_fn = _data(batch=4)
    act = nn.ReLU if case == "dead_relu" else nn.Tanh
    model = _model(width=7, act=act, seed=3)
    if case == "duplicated":
        X[2] = X[0]
    elif case == "zero_column":
        X[:, 1] = 0.0
    else:
        with torch.no_grad():
            model[0].bias[:3] -= 50.0  # three dead units in the first hidden layer
    H = _check_all(model, loss_fn, X, y)
    assert H.stage_derivatives()[0].r < 4 or case != "duplicated"


def test_mixed_structured_and_generic_stages():
    class Residual(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.lin = nn.Linear(h, h)

        def forward(self, z):
            return z + torch.tanh(self.lin(z))

    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.Tanh(), Residual(6), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 3)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    X, y, loss_fn = _data(batch=3, seed=2)
    H = _check_all(model, loss_fn, X, y)
    kinds = [type(d) for d in H.stage_derivatives()]
    assert kinds == [LinearDerivatives, GenericDerivatives, LinearDerivatives, LinearDerivatives]
    assert H.stage_derivatives()[2].complement is not None


def test_zero_damping_on_a_wide_layer_names_the_null_space():
    X, y, loss_fn = _data(batch=2)
    H = hessinv.ChainHessian(_model(width=6), loss_fn, X, y)
    with pytest.raises(
        hessinv.SingularMatrixError, match="null space of dimension at least"
    ) as err:
        H.factorize(0.0, method="riccati")
    D = hessinv.dense_hessian(_model(width=6), loss_fn, X, y)
    nullity = int((torch.linalg.eigvalsh(D).abs() <= 1e-10 * float(D.abs().max())).sum())
    assert err.value.nullity is not None and 0 < err.value.nullity <= nullity


def test_float32_wide_layers_stay_on_the_riccati_path():
    X, y, loss_fn = _data(batch=4)
    model = _model(width=24, seed=6)
    H64 = hessinv.ChainHessian(model, loss_fn, X, y)
    H32 = hessinv.ChainHessian(model.float(), loss_fn, X.float(), y)
    g = torch.randn(H64.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for eps in (1e-1, 1.0):
        F32 = H32.factorize(eps)
        x32 = F32.solve(g.float())
        x64 = H64.factorize(eps).solve(g)
        assert F32.method.startswith("riccati")
        assert F32.backward_error <= 1e-6
        M = hessinv.dense_hessian(model.double(), loss_fn, X, y) + eps * torch.eye(
            H64.num_params, dtype=torch.float64
        )
        cond = float(torch.linalg.cond(M))
        # float32 contract: backward error <= 1e-6, so the float32 solve is within ~2 cond 1e-6
        # of its own problem, whose weights differ from the float64 ones by the float32
        # rounding u32 = 6e-8 (another ~cond u32 |H| relative): allow 10 cond (1e-6 + u32)
        assert float(torch.linalg.norm(x32.double() - x64) / torch.linalg.norm(x64)) <= (
            10 * cond * (1e-6 + 6e-8)
        )
        assert F32.inertia() == H64.factorize(eps).inertia()
        model.float()


def test_memory_estimate_and_refusal():
    X, y, loss_fn = _data(batch=3)
    H = hessinv.ChainHessian(_model(width=8), loss_fn, X, y)
    est = H.memory_estimate()
    assert set(est) == {"derivatives", "riccati", "tridiagonal", "dense"}
    assert 0 < est["riccati"] < est["tridiagonal"]
    with pytest.raises(hessinv.MemoryBudgetError, match="max_memory") as err:
        H.factorize(0.1, max_memory=1000)
    assert err.value.required == est["riccati"] and err.value.available == 1000
    H.factorize(0.1, max_memory=est["riccati"])  # fits exactly


def test_diagonal_blocks_of_chosen_stages():
    X, y, loss_fn = _data(batch=3)
    model = _model(width=6)
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    D = hessinv.dense_hessian(model, loss_fn, X, y)
    (block,) = H.diagonal_blocks([1])
    start = H.stage_sizes[0]
    ref = D[start : start + H.stage_sizes[1], start : start + H.stage_sizes[1]]
    assert float((block - ref).abs().max()) <= 1e-13 * float(D.abs().max())
    with pytest.raises(ValueError, match="stage indices"):
        H.diagonal_blocks([7])
    with pytest.raises(hessinv.MemoryBudgetError):
        H.diagonal_blocks(max_memory=10)


def test_complement_basis_has_exactly_m_minus_r_columns():
    """Regression (property suite seed 1740): a bias-free last stage with r = m - 1 once got a
    rounding-level singular vector counted as a coupled complement direction."""
    from _chains import check_contract, random_chain, require_contract

    chain = random_chain(1740)
    require_contract(check_contract(chain))
    H = chain.hessian()
    for d in H.stage_derivatives():
        comp = getattr(d, "complement", None)
        if comp is not None and d.weight_selected and d.has_input:
            assert comp.Pc.shape[1] == d.m - d.r


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_solve_terms_equal_the_stage_by_stage_ones(bias, k):
    """``LinearTerms.rhs_terms`` / ``controls`` stack the stages of one shape
    (docs/algorithm.md section 13); the default hooks go stage by stage through the
    per-stage operators. Same numbers, up to rounding, on stages of several ranks."""
    from hessinv.linalg.linear_terms import LinearTerms
    from hessinv.linalg.stage_terms import StageTerms

    X, y, loss_fn = _data(batch=4, seed=6)
    X[3] = X[1]  # the first stage's Zt of rank 3: one more shape group
    H = hessinv.ChainHessian(_model(width=9, depth=6, bias=bias, seed=7), loss_fn, X, y)
    stages = H.stage_derivatives()
    assert sum(d.complement is not None for d in stages) >= 4
    gen = torch.Generator().manual_seed(8)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    closed = [d.complement is not None for d in stages]
    g = [rand(d.num_params, k) for d in stages]
    alpha = [rand(d.basis_size, k) for d in stages]
    t_prev = [rand(d.batch, d.in_size, k) if d.has_input else None for d in stages]
    eps = 0.3
    batched = LinearTerms.rhs_terms(stages, closed, g)
    single = StageTerms.rhs_terms(stages, closed, g)

    def close(a, b):
        return float((a - b).abs().max()) <= 1e-13 * max(1.0, float(b.abs().max()))

    for d, bt, st, gl in zip(stages, batched, single, g, strict=True):
        assert close(bt.Y_T_g, st.Y_T_g)
        assert (bt.coupling_T is None) == (st.coupling_T is None)
        if st.coupling_T is not None:
            assert close(bt.coupling_T, st.coupling_T)
            assert close(st.coupling_T, d.complement.coupling_T(gl))
    for d in stages:  # the Gram term subtracted in place, without forming it
        if d.complement is not None and d.has_input:
            a = d.batch * d.in_size
            Q = rand(a, a)
            expected = Q - 0.7 * d.complement.gram()
            assert close(d.complement.subtract_gram_(Q, 0.7), expected)
    v_batched = LinearTerms.controls(stages, closed, alpha, t_prev, batched, eps)
    v_single = StageTerms.controls(stages, closed, alpha, t_prev, single, eps)
    for a, b in zip(v_batched, v_single, strict=True):
        assert a.shape == b.shape and close(a, b)


@pytest.mark.parametrize("params", ["all", "bias", "weight"])
@pytest.mark.parametrize("batch", [4, 40])  # compressed stages of two ranks; full bases
def test_batched_front_terms_equal_the_stage_by_stage_ones(batch, params):
    """``LinearTerms.front_terms`` stacks the stages of one shape (docs/algorithm.md
    section 13); the default hooks make each stage's terms alone (``Y_T_Dxx_Y`` and
    ``Y_T_Dzx``: the same formula for one stage, checked against dense in test_derivatives;
    ``Dzz_blocks`` from the ``Dzz`` operator). Same numbers up to rounding, and the
    factorization is unchanged when every stage is made alone."""
    from hessinv.linalg import riccati
    from hessinv.linalg.linear_terms import LinearTerms
    from hessinv.linalg.stage_terms import StageTerms

    X, y, loss_fn = _data(batch=batch, seed=6)
    X[3] = X[1]  # the first stage's Zt one rank lower: one more shape group
    model = _model(width=9, depth=6, seed=7)
    chosen = (
        None if params == "all" else [n for n, _ in model.named_parameters() if n.endswith(params)]
    )
    H = hessinv.ChainHessian(model, loss_fn, X, y, params=chosen)
    stages = H.stage_derivatives()
    batched = LinearTerms.front_terms(stages)
    single = StageTerms.front_terms(stages)

    def close(a, b):
        return float((a - b).abs().max()) <= 1e-13 * max(1.0, float(b.abs().max()))

    for d, bt, st in zip(stages, batched, single, strict=True):
        assert close(bt.Y_T_Dxx_Y, st.Y_T_Dxx_Y)
        assert (bt.Y_T_Dzx is None) == (st.Y_T_Dzx is None) == (not d.has_input)
        if d.has_input:
            assert close(bt.Y_T_Dzx, st.Y_T_Dzx) and close(bt.Dzz, st.Dzz)
    S = H.loss_hessian_blocks()
    F = riccati.riccati_factorize(stages, S, 0.05, progress=False)
    old = riccati.TERMS_STAGES
    riccati.TERMS_STAGES = 1
    try:
        F1 = riccati.riccati_factorize(stages, S, 0.05, progress=False)
    finally:
        riccati.TERMS_STAGES = old
    assert F.inertia == F1.inertia
    assert abs(float(F.logabsdet - F1.logabsdet)) <= 1e-12 * abs(float(F1.logabsdet))


@pytest.mark.parametrize("limit", [0, None])
def test_stages_batched_or_alone_in_the_products_and_solves(monkeypatch, limit):
    """Stages above ``BATCH_PARAMS`` parameters go through the batched steps of the products
    and solves one by one (docs/algorithm.md section 13); ``limit = 0`` sends every stage
    that way. Both against dense."""
    from hessinv.derivatives.linear import kernels

    if limit is not None:
        monkeypatch.setattr(kernels, "BATCH_PARAMS", limit)
    X, y, loss_fn = _data(batch=3, seed=3)
    _check_all(_model(width=8, depth=5, seed=2), loss_fn, X, y, eps_values=(1e-3, -0.3))
