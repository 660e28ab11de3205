"""Per-stage derivative classes (docs/algorithm.md sections 2 and 8) against torch.func.

Tolerances: every quantity here is a short sum of products of O(1) numbers, so its
rounding error is a small multiple of the unit roundoff u = 2.2e-16 times the size of
the terms; 1e-12 relative to the largest entry leaves a factor ~5000 for that.
"""

from __future__ import annotations

import pytest
import torch
from _chains import ACTIVATIONS, make_problem
from torch import nn

import hessinv
from hessinv.derivatives import (
    GenericDerivatives,
    LinearDerivatives,
    loss_head,
)
from hessinv.network.chain import build_chain
from hessinv.network.dispatch import stage_derivatives

TOL = 1e-12


def _close(x, y, tol=TOL):
    scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
    return x.shape == y.shape and bool((x - y).abs().max() <= tol * scale) if y.numel() else True


def _stages(problem, oracle):
    return hessinv.ChainHessian(*problem, oracle=oracle).stage_derivatives()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [2, 7])  # below and above the input width + 1: compressed or not
def test_structured_equals_generic(activation, bias, batch):
    problem = make_problem(
        depth=3, width=5, batch=batch, activation=activation, bias=bias, loss="ce", seed=31
    )
    fast, slow = _stages(problem, "analytic"), _stages(problem, "generic")
    for l, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert isinstance(a, LinearDerivatives) and isinstance(b, GenericDerivatives)
        for name, x, y in zip(a.dense()._fields, a.dense(), b.dense(), strict=True):
            if y is None:
                assert x is None and l == 0
                continue
            assert _close(x, y), (l, name, float((x - y).abs().max()))
        if l:  # the products from the right, each class in its own basis Y
            M = torch.randn(4, a.batch * a.out_size, dtype=torch.float64)
            Dx, Dz = b.dense().Dx.reshape(-1, b.num_params), torch.block_diag(*b.dense().Dz)
            for d in (a, b):
                Y = d.Y(torch.eye(d.basis_size, dtype=torch.float64))
                assert _close(d.right_DxY(M), M @ Dx @ Y) and _close(d.right_Dz(M), M @ Dz)
                X, Z = d.right_DxY_Dz(M)  # the pairs that share work, against the singles
                assert _close(X, d.right_DxY(M)) and _close(Z, d.right_Dz(M))
                w = torch.randn(a.batch, a.out_size, 3, dtype=torch.float64)
                wx, wz = d.DxY_T_Dz_T(w)
                assert _close(wx, d.DxY_T(w)) and _close(wz, d.Dz_T(w))
                for k in (1, 3):  # the tangent passed on: one addmm for one vector
                    alpha = torch.randn(d.basis_size, k, dtype=torch.float64)
                    t = torch.randn(a.batch, a.in_size, k, dtype=torch.float64)
                    assert _close(d.DxY_Dz(alpha, t), d.DxY(alpha) + d.Dz(t))


def test_compression_is_taken_when_batch_is_below_width():
    problem = make_problem(depth=3, width=8, batch=3, seed=2)
    d = _stages(problem, "auto")[1]
    assert d.basis_size == 8 * 3 < d.num_params == 8 * 9
    assert d.complement is not None and d.complement.dim == 8 * 6
    wide_batch = make_problem(depth=3, width=4, batch=9, seed=2)
    assert _stages(wide_batch, "auto")[1].complement is None


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "duplicated_samples",
        "zero_input",
        "dead_relu",
        "frozen_bias",
        "weight_only",
        "bias_only",
    ],
)
def test_linear_basis_and_complement_identities(case):
    """Section 8: span(Y) holds range(Dxx) and range(Dx^T); the complement's closed forms."""
    gen = torch.Generator().manual_seed(7)
    B, h_in, h_out = 3, 6, 5
    z = torch.randn(B, h_in, generator=gen, dtype=torch.float64)
    b = torch.randn(B, h_out, generator=gen, dtype=torch.float64)
    W = torch.randn(h_out, h_in, generator=gen, dtype=torch.float64)
    c = torch.randn(h_out, generator=gen, dtype=torch.float64)
    act, wsel, bsel = nn.Tanh(), True, True
    if case == "duplicated_samples":
        z[1] = z[0]
    elif case == "zero_input":
        z[:, 2] = 0.0
    elif case == "dead_relu":
        act, c = nn.ReLU(), c - 10.0  # every unit dead: s' = s'' = 0
    elif case == "frozen_bias":
        bsel = False
    elif case == "weight_only":
        wsel, bsel = True, False
    elif case == "bias_only":
        wsel, bsel = False, True
    d = LinearDerivatives(
        W, c, (act,), z, b, weight_selected=wsel, bias_selected=bsel, has_input=True
    )
    p, N = d.num_params, d.basis_size
    eye_N = torch.eye(N, dtype=torch.float64)
    Y = d.Y(eye_N)  # (p, N)
    assert _close(Y.T @ Y, eye_N)
    assert _close(d.Y_T(Y), eye_N)
    dense = d.dense()
    Dx = dense.Dx.reshape(-1, p)
    Dzx = dense.Dzx.permute(1, 0, 2).reshape(p, -1)
    P = torch.eye(p, dtype=torch.float64) - Y @ Y.T
    assert _close(Dx @ P, torch.zeros_like(Dx))  # range(Dx^T) in span(Y)
    assert _close(dense.Dxx @ P, torch.zeros_like(dense.Dxx))  # range(Dxx) in span(Y)
    assert _close(d.DxY(eye_N).reshape(-1, N), Dx @ Y)
    w = torch.randn(B, h_out, 2, generator=gen, dtype=torch.float64)
    assert _close(d.DxY_T(w), Y.T @ Dx.T @ w.reshape(-1, 2))
    M = torch.randn(3, B * h_out, generator=gen, dtype=torch.float64)
    assert _close(d.right_DxY(M), M @ Dx @ Y)
    assert _close(d.right_Dz(M), M @ torch.block_diag(*dense.Dz))
    assert _close(d.Y_T_Dxx_Y(), Y.T @ dense.Dxx @ Y)
    assert _close(d.Y_T_Dzx(), Y.T @ Dzx)
    comp = d.complement
    if comp is None:
        assert N == p
        return
    assert comp.dim == p - N
    E = P @ Dzx  # the part of Dzx outside span(Y)
    assert _close(comp.gram(), E.T @ E)
    norm = float(comp.coupling_norm())
    assert abs(norm - float(torch.linalg.matrix_norm(E, 2))) <= 1e-12 * max(1.0, norm)
    t = torch.randn(B, h_in, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(p, 2, generator=gen, dtype=torch.float64)
    assert _close(comp.coupling(t), E @ t.reshape(-1, 2))
    assert _close(comp.coupling_T(v).reshape(-1, 2), E.T @ v)
    assert _close(comp.project(v), P @ v)
    Uc = comp.coupled(torch.eye(comp.coupled_dim, dtype=torch.float64))
    assert _close(Uc.T @ Uc, torch.eye(comp.coupled_dim, dtype=torch.float64))
    assert _close(Y.T @ Uc, torch.zeros(N, comp.coupled_dim, dtype=torch.float64))
    assert _close(comp.coupled_F(), Uc.T @ E)
    assert _close(Uc @ Uc.T @ E, E)  # U_c spans range(E): the rest are null directions
    assert int(torch.linalg.matrix_rank(E)) == comp.coupled_dim


def test_second_derivative_blocks_against_hessian_of_weighted_output():
    """Dxx, Dzx, Dzz are the Hessian blocks of b . f(z, x) (docs/algorithm.md section 2)."""
    torch.manual_seed(33)
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU()).double()
    stage = build_chain(model).stages[0]
    z = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn(2, 4, dtype=torch.float64)
    x = stage.flat_params()
    for oracle in ("analytic", "generic"):
        d = stage_derivatives(stage, x, z, b, has_input=True, oracle=oracle).dense()

        def phi(xx, zz):
            return (stage.apply(xx, zz) * b).sum()

        (Hxx, Hxz), (_, Hzz) = torch.func.hessian(phi, argnums=(0, 1))(x, z)
        assert _close(d.Dxx, Hxx)
        for i in range(2):
            assert _close(d.Dzx[i], Hxz[:, i, :])
            assert _close(d.Dzz[i], Hzz[i, :, i, :])
        assert _close(Hzz[0, :, 1, :], torch.zeros(3, 3, dtype=torch.float64))
        J = torch.func.jacrev(lambda xx: stage.apply(xx, z))(x)
        assert _close(d.Dx, J)


def test_gauss_newton_stages_have_no_second_order_terms():
    problem = make_problem(depth=3, width=4, batch=5, seed=3)
    for oracle in ("analytic", "generic"):
        for d in hessinv.ChainGGN(*problem, oracle=oracle).stage_derivatives():
            dense = d.dense()
            assert float(dense.Dxx.abs().max()) == 0.0
            if dense.Dzx is not None:
                assert float(dense.Dzx.abs().max()) == 0.0 and float(dense.Dzz.abs().max()) == 0.0


@pytest.mark.parametrize("loss", ["ce", "mse", "mse_sum"])
def test_loss_heads_analytic_equal_generic(loss):
    problem = make_problem(depth=1, batch=5, loss=loss, seed=34)
    out = problem.model(problem.inputs).detach()
    a = loss_head(problem.loss_fn, out, problem.targets, oracle="analytic")
    g = loss_head(problem.loss_fn, out, problem.targets, oracle="generic")
    for x, y in zip(a[:3], g[:3], strict=True):
        assert _close(x, y)
    for head in (a, g):  # factors are not unique: F^T F = S
        assert _close(head.factor.mT @ head.factor, head.hess)


@pytest.mark.parametrize("kind", ["smoothing", "weight", "ignore", "weight_ignore", "sum_ignore"])
def test_cross_entropy_variants_against_torch_func(kind):
    out = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2, 1])
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    loss_fn = {
        "smoothing": nn.CrossEntropyLoss(label_smoothing=0.1),
        "weight": nn.CrossEntropyLoss(weight=w),
        "ignore": nn.CrossEntropyLoss(ignore_index=2),
        "weight_ignore": nn.CrossEntropyLoss(weight=w, ignore_index=1),
        "sum_ignore": nn.CrossEntropyLoss(reduction="sum", ignore_index=0),
    }[kind]
    head = loss_head(loss_fn, out, y, oracle="analytic")
    assert _close(head.value, loss_fn(out, y))
    assert _close(head.grad, torch.func.grad(lambda o: loss_fn(o, y))(out))
    ref = torch.func.hessian(lambda o: loss_fn(o, y))(out)
    for i in range(5):
        assert _close(head.hess[i], ref[i, :, i, :])


def test_loss_head_errors():
    out = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([1, 1, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        loss_head(nn.CrossEntropyLoss(ignore_index=1), out, y)  # every target ignored
    with pytest.raises(ValueError, match="no closed form"):
        loss_head(nn.HuberLoss(), out, torch.randn(4, 3, dtype=torch.float64), oracle="analytic")
    with pytest.raises(ValueError, match="oracle"):
        loss_head(nn.CrossEntropyLoss(), out, y, oracle="fast")


def test_confident_classifier_with_label_smoothing_is_not_called_coupled():
    """The separability check's tolerance follows the rounding of the product itself."""
    out = torch.randn(6, 4, dtype=torch.float64) * 0.1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out[torch.arange(6), y] += 11.0  # p_max ~ 0.99997
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    head = loss_head(loss_fn, out, y, oracle="generic")
    ref = torch.func.hessian(lambda o: loss_fn(o, y))(out)
    for i in range(6):
        assert _close(head.hess[i], ref[i, :, i, :])
    with pytest.raises(ValueError, match="couples"):
        loss_head(lambda o, t: (o.sum(0) ** 2).sum() * 1e-6, out, y, oracle="generic")


def test_analytic_oracle_refuses_other_stages():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)).double()
    X = torch.randn(3, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not nn.Linear"):
        hessinv.ChainHessian(
            model, nn.MSELoss(), X, torch.randn(3, 2, dtype=torch.float64), oracle="analytic"
        )


@pytest.mark.parametrize(
    "weight_selected,bias_selected", [(True, True), (True, False), (False, True)]
)
def test_fused_product_equals_the_eight_separate_products(weight_selected, bias_selected):
    """The Linear hooks' four product steps (prepare, tangent, adjoint, finish) share
    subexpressions; the default hooks use the eight separate products."""
    from hessinv.curvature.hvp_hooks import HvpHooks
    from hessinv.curvature.linear_hvp import LinearHvp

    gen = torch.Generator().manual_seed(9)
    B, h_in, h_out, k = 4, 5, 3, 2
    args = [
        torch.randn(*s, generator=gen, dtype=torch.float64)
        for s in ((h_out, h_in), (h_out,), (B, h_in), (B, h_out))
    ]
    for has_input in (True, False):
        d = LinearDerivatives(
            args[0],
            args[1],
            (nn.SiLU(),),
            args[2],
            args[3],
            weight_selected=weight_selected,
            bias_selected=bias_selected,
            has_input=has_input,
        )
        v = torch.randn(d.num_params, k, generator=gen, dtype=torch.float64)
        t_prev = torch.randn(B, h_in, k, generator=gen, dtype=torch.float64) if has_input else None
        u = torch.randn(B, h_out, k, generator=gen, dtype=torch.float64)
        (prepared,) = LinearHvp.prepare([d], [v])
        t, cache = LinearHvp.tangent(d, prepared, t_prev)
        t_ref, cache_ref = HvpHooks.tangent(d, v, t_prev)
        assert _close(t, t_ref)
        partial, up = LinearHvp.adjoint(d, prepared, t_prev, u, cache)
        (hv,) = LinearHvp.finish([d], [prepared], [t_prev], [partial])
        hv_ref, up_ref = HvpHooks.adjoint(d, v, t_prev, u, cache_ref)
        assert _close(hv, hv_ref)
        assert (up is None and up_ref is None) or _close(up, up_ref)


def test_stack_is_a_view_exactly_when_the_blocks_are_consecutive():
    from hessinv.derivatives.linear.kernels import stack as _stack

    flat = torch.arange(24.0)
    blocks = list(flat.split([6, 6, 6, 6]))
    stacked = _stack([b.reshape(2, 3) for b in blocks[1:]])
    assert stacked.shape == (3, 2, 3) and stacked.data_ptr() == blocks[1].data_ptr()
    assert torch.equal(stacked, flat[6:].reshape(3, 2, 3))
    for parts in (
        [blocks[0], blocks[2]],
        [blocks[1], blocks[0]],
        [blocks[0], blocks[0]],
        [blocks[0], torch.arange(6.0, 12.0)],
    ):
        out = _stack(parts)  # not one after the other in one storage: a copy
        assert out.data_ptr() not in {p.data_ptr() for p in parts}
        assert torch.equal(out, torch.stack(parts))
    single = _stack([blocks[3]])
    assert single.shape == (1, 6) and single.data_ptr() == blocks[3].data_ptr()
