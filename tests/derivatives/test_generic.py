"""The generic (``torch.func``) stage derivatives, docs/algorithm.md section 2: stages whose
parameter broadcasts over the batch (PReLU), the per-sample products with probes, the
verified per-sample ``Dx`` and the composition with a frozen tail.

References are independent of ``torch.func``: ``_autograd_reference`` (reverse-over-reverse
autograd of the whole model) for the chains, and per-sample ``torch.autograd.functional``
loops for single stages. Bounds: the chains go through the contract checker of
``_chains.check_hessian`` (its tolerances are derived from stated rounding bounds) and, for
the Gauss-Newton matrix, ``||G - G_ref||_2 <= 2 delta`` with ``delta`` the reference's own
rounding bound (``autograd_ggn``), plus ``_dense_checks.check_factorization``. A stage's
derivatives are short sums of products of O(1) numbers: ``1e-12`` relative to the largest
entry leaves a factor of several thousand over their rounding.
"""

from __future__ import annotations

import pytest
import torch
from _autograd_reference import UNIT_ROUNDOFF, autograd_ggn, autograd_hessian
from _chains import check_hessian, require_contract
from _dense_checks import check_factorization
from torch import nn
from torch.func import functional_call

import hessinv

f64 = torch.float64
TOL = 1e-12


def _close(x, y, tol=TOL) -> bool:
    scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
    return x.shape == y.shape and bool((x - y).abs().max() <= tol * scale)


def _prelu_weights(model: nn.Module, seed: int) -> nn.Module:
    """Every PReLU slope drawn from U(-0.5, 0.9), one per channel (the default 0.25 would make
    the channels of ``nn.PReLU(n)`` alike)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=f64) * 1.4 - 0.5)
    return model


def _prelu_case(name: str):
    """``(model, loss_fn, X, y)``: the issue's chain and PReLU with one slope and with one per
    channel, alone and in deeper chains. Batches equal to the feature count are the case where
    torch's per-sample rules for PReLU gave a wrong ``Dx`` without an error."""
    torch.manual_seed(11)
    gen = torch.Generator().manual_seed(12)
    ce = nn.CrossEntropyLoss()
    if name == "alone_one_slope":  # PReLU is the only stage (no input derivatives)
        model, X = nn.Sequential(nn.PReLU()), torch.randn(5, 6, generator=gen, dtype=f64)
        y, loss = torch.randn(5, 6, generator=gen, dtype=f64), nn.MSELoss()
    elif name == "alone_per_channel_batch_eq_width":
        model, X = nn.Sequential(nn.PReLU(6)), torch.randn(6, 6, generator=gen, dtype=f64)
        y, loss = torch.randn(6, 6, generator=gen, dtype=f64), nn.MSELoss(reduction="sum")
    elif name in ("issue_batch_5", "issue_batch_8"):
        B = 5 if name.endswith("5") else 8
        model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 3))
        X, y, loss = torch.randn(B, 4, generator=gen, dtype=f64), torch.arange(B) % 3, ce
    elif name == "deep_per_channel":
        model = nn.Sequential(
            nn.Linear(4, 6),
            nn.PReLU(6),
            nn.Linear(6, 6),
            nn.Tanh(),
            nn.Linear(6, 6),
            nn.PReLU(),
            nn.Linear(6, 3),
        )
        X, y, loss = torch.randn(6, 4, generator=gen, dtype=f64), torch.arange(6) % 3, ce
    elif name == "conv_per_channel":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.PReLU(2), nn.Flatten(), nn.Linear(8, 3))
        X, y, loss = torch.randn(5, 1, 4, 4, generator=gen, dtype=f64), torch.arange(5) % 3, ce
    else:
        raise KeyError(name)
    return _prelu_weights(model.to(f64), 13), loss, X, y


PRELU_CASES = [
    "alone_one_slope",
    "alone_per_channel_batch_eq_width",
    "issue_batch_5",
    "issue_batch_8",
    "deep_per_channel",
    "conv_per_channel",
]


@pytest.mark.parametrize("name", PRELU_CASES)
def test_prelu_hessian_against_dense(name):
    """The exact Hessian of chains with PReLU stages (one slope and per channel): products,
    gradient, loss, dense form, solves, logdet and inertia against reverse-over-reverse
    autograd. Before the fix every case raised ('Trying to set a forward gradient that has a
    different size', 'The size of tensor a (5) must match ...') or, with the batch equal to
    the width and PReLU alone, gave a wrong Hessian."""
    model, loss_fn, X, y = _prelu_case(name)
    ref = autograd_hessian(model, loss_fn, X, y)
    assert any(isinstance(m, nn.PReLU) for m in model.modules())

    def make():
        return hessinv.ChainHessian(model, loss_fn, X, y, progress=False)

    for eps in (1e-2, 1.0):
        require_contract(check_hessian(make, ref, eps, description=f"{name} eps={eps:g}", k=2))


@pytest.mark.parametrize("name", PRELU_CASES)
def test_prelu_ggn_against_dense(name):
    """The Gauss-Newton matrix of the same chains against ``J^T A J`` by autograd. Before the
    fix the three cases with the batch equal to a PReLU's width ran and were wrong, without
    an error: ``||G - G_ref||_2 / ||G_ref||_2`` = 1.5 (``alone_per_channel_batch_eq_width``),
    0.16 (``issue_batch_8``), 0.05 (``deep_per_channel``); the others raised."""
    model, loss_fn, X, y = _prelu_case(name)
    ref = autograd_ggn(model, loss_fn, X, y)
    G = hessinv.ChainGGN(model, loss_fn, X, y, progress=False)
    assert G.param_names == ref.names
    D = G.dense()
    norm = float(torch.linalg.matrix_norm(ref.ggn, 2))
    tol = 2 * ref.error + 64 * UNIT_ROUNDOFF * norm
    assert float(torch.linalg.matrix_norm(D - ref.ggn, 2)) <= tol, name
    V = torch.randn(G.num_params, 3, generator=torch.Generator().manual_seed(1), dtype=f64)
    assert float(torch.linalg.matrix_norm(G @ V - ref.ggn @ V, 2)) <= tol * float(
        torch.linalg.matrix_norm(V, 2)
    )
    grad_ref = autograd_hessian(model, loss_fn, X, y).gradient
    assert _close(G.gradient(), grad_ref)
    check_factorization(G, ref.ggn, 1e-2)


# ------------------------------------------------------------------ single stages


def _functional(module: nn.Module):
    """``(apply(x, z), x)`` of a module with every parameter in the flat vector ``x``."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    x = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def apply(xx, zz):
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = xx[offset : offset + s.numel()].reshape(s)
            offset += s.numel()
        return functional_call(module, params, (zz,))

    return apply, x


def _loop_reference(apply, x, z, b):
    """``(Dx, Dz, Dxx, Dzx, Dzz)`` one sample at a time by ``torch.autograd.functional``
    (no torch.func): the per-sample definitions of docs/algorithm.md section 2."""
    B = z.shape[0]
    Dx, Dz, Dzx, Dzz = [], [], [], []
    for i in range(B):
        zi = z[i : i + 1]

        def f(xx, zz):
            return apply(xx, zz).reshape(-1)

        def phi(xx, zz, i=i):
            return (f(xx, zz) * b[i]).sum()

        jx, jz = torch.autograd.functional.jacobian(f, (x, zi))
        (_, hxz), (_, hzz) = torch.autograd.functional.hessian(phi, (x, zi))
        Dx.append(jx)
        Dz.append(jz.reshape(jx.shape[0], -1))
        Dzx.append(hxz.reshape(x.shape[0], -1))
        Dzz.append(hzz.reshape(zi.numel(), zi.numel()))
    Dxx = torch.autograd.functional.hessian(lambda xx: (apply(xx, z).reshape(B, -1) * b).sum(), x)
    return torch.stack(Dx), torch.stack(Dz), Dxx, torch.stack(Dzx), torch.stack(Dzz)


def _assert_matches(d, ref, has_input=True, second_order=True):
    dense = d.dense()
    for k, (got, want) in enumerate(zip(dense, ref, strict=True)):
        if k in (1, 3, 4) and not has_input:
            assert got is None
            continue
        if k >= 2 and not second_order:
            want = torch.zeros_like(want)
        assert _close(got.reshape(want.shape), want), (
            dense._fields[k],
            float((got - want).abs().max()),
        )


def _frozen(module: nn.Module) -> nn.Module:
    return _prelu_weights(module.to(f64), 21).requires_grad_(False)


def test_per_sample_jacobian_and_hessian_with_probes():
    """``per_sample_jacobian`` in both directions (reverse with output probes, forward with
    input probes) and ``per_sample_hessian`` against per-sample autograd loops, through a
    frozen PReLU with the batch equal to the feature count."""
    gen = torch.Generator().manual_seed(3)
    narrow = _frozen(nn.Sequential(nn.Linear(6, 4), nn.PReLU(4), nn.Tanh()))  # reverse
    wide = _frozen(nn.Sequential(nn.Linear(2, 12), nn.PReLU(12), nn.Softplus()))  # forward
    for fn, z in (
        (narrow, torch.randn(4, 6, generator=gen, dtype=f64)),
        (wide, torch.randn(5, 2, generator=gen, dtype=f64)),
    ):
        _check_probes(fn, z, torch.randn(z.shape[0], fn(z).shape[1], generator=gen, dtype=f64))


def _check_probes(fn, z, b):
    from hessinv.derivatives.generic import per_sample_hessian, per_sample_jacobian

    B, h_in, h_out = z.shape[0], z.shape[1], b.shape[1]
    J = per_sample_jacobian(fn, z, h_out)
    H = per_sample_hessian(lambda zz: (fn(zz) * b).sum(), z)
    for i in range(B):
        zi = z[i : i + 1]
        Ji = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), zi)
        Hi = torch.autograd.functional.hessian(lambda t, i=i: (fn(t)[0] * b[i]).sum(), zi)
        assert _close(J[i], Ji.reshape(h_out, h_in))
        assert _close(H[i], Hi.reshape(h_in, h_in))


@pytest.mark.parametrize("has_input", [True, False])
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("stage", ["prelu_per_channel", "linear_prelu", "conv_padded", "residual"])
def test_stage_derivatives_against_per_sample_loops(stage, has_input, second_order):
    """All five derivatives of single stages against the per-sample loops; the batch equals
    the feature count (8), where torch's per-sample PReLU rules are silently wrong. Covers
    ``Dx`` by forward mode (``p <= h_out``: PReLU, the padded convolution) and by the
    verified per-sample reverse mode (``p > h_out``)."""
    from hessinv.derivatives import GenericDerivatives

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(8, 8), nn.SiLU()

        def forward(self, z):
            return z + self.act(self.lin(z))

    gen = torch.Generator().manual_seed(5)
    module, shape = {
        "prelu_per_channel": (nn.PReLU(8), (8,)),
        "linear_prelu": (nn.Sequential(nn.Linear(8, 8), nn.PReLU()), (8,)),
        "conv_padded": (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.PReLU(2)), (1, 2, 4)),
        "residual": (Residual(), (8,)),
    }[stage]
    module = _prelu_weights(module.to(f64), 6)
    apply, x = _functional(module)
    z = torch.randn(8, *shape, generator=gen, dtype=f64)
    h_out = apply(x, z)[0].numel()
    b = torch.randn(8, h_out, generator=gen, dtype=f64)
    d = GenericDerivatives(apply, x, z, b, has_input=has_input, second_order=second_order)
    _assert_matches(d, _loop_reference(apply, x, z, b), has_input, second_order)


def test_forward_mode_dx_in_chunks_equals_one_chunk(monkeypatch):
    """``Dx`` by forward mode in chunks of columns (bounded memory) is the same matrix."""
    import hessinv.derivatives.generic as generic

    module = _prelu_weights(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.PReLU(3)).to(f64), 7)
    apply, x = _functional(module)  # p = 33 <= h_out = 48: forward mode
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(4, 1, 4, 4, generator=gen, dtype=f64)
    b = torch.randn(4, 48, generator=gen, dtype=f64)
    one = generic.GenericDerivatives(apply, x, z, b, has_input=True).dense()
    monkeypatch.setattr(generic, "_DX_CHUNK_BYTES", 8 * 5 * 4 * 48)  # chunks of 5 columns
    chunked = generic.GenericDerivatives(apply, x, z, b, has_input=True).dense()
    assert torch.equal(one.Dx, chunked.Dx)
    _assert_matches(
        generic.GenericDerivatives(apply, x, z, b, has_input=True), _loop_reference(apply, x, z, b)
    )


@pytest.mark.parametrize("corrupt", ["permute_samples", "scale_one_entry", "unavailable"])
def test_a_wrong_per_sample_dx_is_caught(monkeypatch, corrupt):
    """The per-sample reverse-mode ``Dx`` (``vmap`` over samples) is kept only after it
    agrees with one reverse-mode product of the whole batch: a ``Dx`` with its samples
    swapped (what a wrong batching rule can give), one entry off by 1e-6 relative, or none
    (torch raised under the ``vmap``) all end in the forward-mode ``Dx``, and the result is
    right."""
    import hessinv.derivatives.generic as generic

    torch.manual_seed(9)
    module = nn.Sequential(nn.Linear(6, 4), nn.Tanh()).to(f64)
    apply, x = _functional(module)  # p = 28 > h_out = 4: per-sample reverse mode first
    z, b = torch.randn(5, 6, dtype=f64), torch.randn(5, 4, dtype=f64)
    real = generic._per_sample_rows
    calls = []

    def wrong(*args):
        calls.append(corrupt)
        if corrupt == "unavailable":
            return None
        Dx = real(*args).clone()
        if corrupt == "permute_samples":
            return Dx.roll(1, dims=0)
        Dx[2, 1, 3] *= 1 + 1e-6
        return Dx

    monkeypatch.setattr(generic, "_per_sample_rows", wrong)
    d = generic.GenericDerivatives(apply, x, z, b, has_input=True)
    assert calls == [corrupt]
    _assert_matches(d, _loop_reference(apply, x, z, b))
    monkeypatch.setattr(generic, "_per_sample_rows", real)  # and a right one is kept
    Dx = real(apply, x, z)
    assert generic._rows_agree(Dx, lambda xx: apply(xx, z), x)

    def branching(xx, zz):  # Python control flow on values: torch.func's vmap raises
        return apply(xx, zz) if float(zz.sum()) > -1e9 else -apply(xx, zz)

    assert real(branching, x, z) is None


@pytest.mark.parametrize("has_input", [True, False])
@pytest.mark.parametrize("second_order", [True, False])
def test_frozen_tail_composition_equals_the_whole_stage(has_input, second_order):
    """``GenericDerivatives(g, tail=F)`` (the tail differentiated through its input only and
    composed by the chain rule) against the per-sample loops of ``F(g(z; x))``: a head with
    per-channel PReLU and a frozen tail with PReLU, LayerNorm, SiLU and a change of width."""
    from hessinv.derivatives import GenericDerivatives

    torch.manual_seed(10)
    head_module = _prelu_weights(nn.Sequential(nn.Linear(5, 6), nn.PReLU(6)).to(f64), 14)
    tail = _frozen(
        nn.Sequential(nn.Linear(6, 6), nn.PReLU(6), nn.LayerNorm(6), nn.SiLU(), nn.Linear(6, 3))
    )
    head, x = _functional(head_module)

    def whole(xx, zz):
        return tail(head(xx, zz))

    z, b = torch.randn(6, 5, dtype=f64), torch.randn(6, 3, dtype=f64)
    d = GenericDerivatives(head, x, z, b, has_input=has_input, second_order=second_order, tail=tail)
    _assert_matches(d, _loop_reference(whole, x, z, b), has_input, second_order)
