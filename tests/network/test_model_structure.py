"""Exact reproducers: model structures that once gave silent wrong answers (float64).

Each test builds one model, compares ``hessinv.ChainHessian`` with the reverse-over-reverse
autograd reference of ``_autograd_reference.py`` through ``_chains.check_hessian`` (all
tolerances derived there from stated bounds) or checks that an error arrives at
construction. Where a bug would hide behind a small difference, the test also shows that
the wrong answer is far outside the tolerance (the test can fail).
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import pytest
import torch
from _autograd_reference import (
    UNIT_ROUNDOFF,
    autograd_hessian,
    backward_error,
    evaluation_error_bound,
)
from _chains import check_hessian, require_contract
from torch import nn
from torch.nn import functional as F

import hessinv
import hessinv.errors

f64 = torch.float64


def _batch(seed, batch=5, d_in=3, classes=2):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, d_in, generator=gen, dtype=f64)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return X, y


def _assert_contract(make, ref, dampings=(1e-2, 1.0), what=""):
    for eps in dampings:
        report = check_hessian(make, ref, eps, description=f"{what} (eps={eps:g})", k=2)
        require_contract(report)


def _far_apart(A, B, ref) -> bool:
    """``||A - B||_2`` exceeds every tolerance used here (1e6 times the rounding bound)."""
    if A.shape != B.shape:
        return True
    return float(torch.linalg.matrix_norm(A - B, 2)) > 1e6 * evaluation_error_bound(ref)


# ----------------------------------------------------------------------------- 1. reuse


def test_one_activation_instance_used_twice():
    """``act`` at two places of one Sequential: H, gradient and loss of the real model."""
    torch.manual_seed(101)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2)).to(f64)
    X, y = _batch(101)
    loss_fn = nn.CrossEntropyLoss()
    ref = autograd_hessian(model, loss_fn, X, y)
    # Sanity: dropping the second use (what named_children() does) changes H a lot.
    dropped = nn.Sequential(model[0], act, model[2], model[4])
    assert _far_apart(autograd_hessian(dropped, loss_fn, X, y).hessian, ref.hessian, ref)
    _assert_contract(
        lambda: hessinv.ChainHessian(model, loss_fn, X, y), ref, what="Tanh instance used twice"
    )


def test_parameterised_module_used_twice_is_refused():
    """The same ``nn.Linear`` at two positions ties weights across stages: refuse, naming it."""
    torch.manual_seed(102)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(
        OrderedDict(
            first=nn.Linear(3, 4),
            act1=nn.Tanh(),
            hidden=shared,
            act2=nn.Tanh(),
            again=shared,
            out=nn.Linear(4, 2),
        )
    ).to(f64)
    X, y = _batch(102)
    with pytest.raises(ValueError) as info:
        hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    message = str(info.value)
    assert re.search(r"\b(hidden|again)\b", message), message
    assert re.search(r"tied|shared", message, re.IGNORECASE), message


# ----------------------------------------------------------------------------- 2. frozen


def _frozen_bias_model():
    torch.manual_seed(103)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(f64)
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([1.5, -2.0, 0.7, 1.1], dtype=f64))  # matters in forward
    return model


@pytest.mark.parametrize("how", ["requires_grad", "params_tensors", "params_names"])
def test_frozen_bias_with_trainable_weight(how):
    """H in (0.weight, 2.weight, 2.bias) only; the frozen 0.bias still enters the forward pass."""
    model = _frozen_bias_model()
    X, y = _batch(103)
    loss_fn = nn.CrossEntropyLoss()
    if how == "requires_grad":
        model[0].bias.requires_grad_(False)
        params = None
    elif how == "params_tensors":
        params = [model[0].weight, model[2].weight, model[2].bias]
    else:
        params = ["0.weight", "2.weight", "2.bias"]
    flags = [p.requires_grad for p in model.parameters()]
    ref = autograd_hessian(model, loss_fn, X, y, params=params)
    assert ref.names == ("0.weight", "2.weight", "2.bias")
    # Sanity: a forward pass without the frozen bias gives a different H.
    no_bias = copy.deepcopy(model)
    with torch.no_grad():
        no_bias[0].bias.zero_()
    assert _far_apart(
        autograd_hessian(no_bias, loss_fn, X, y, params=["0.weight", "2.weight", "2.bias"]).hessian,
        ref.hessian,
        ref,
    )

    def make():
        return hessinv.ChainHessian(model, loss_fn, X, y, params=params)

    _assert_contract(make, ref, what=f"frozen 0.bias via {how}")  # names checked there
    assert [p.requires_grad for p in model.parameters()] == flags  # the model is not touched


def test_params_subset_inside_one_module():
    """``params=`` may take the weight of a module but not its bias, and skip whole modules."""
    model = _frozen_bias_model()
    X, y = _batch(104)
    loss_fn = nn.MSELoss(reduction="sum")
    Y = torch.randn(5, 2, generator=torch.Generator().manual_seed(104), dtype=f64)
    params = ["2.bias", "0.weight"]  # order given does not matter: named_parameters() order
    ref = autograd_hessian(model, loss_fn, X, Y, params=params)
    assert ref.names == ("0.weight", "2.bias")
    _assert_contract(
        lambda: hessinv.ChainHessian(model, loss_fn, X, Y, params=params),
        ref,
        what="params=['2.bias', '0.weight']",
    )


# ----------------------------------------------------------------------------- 3. tied inside


class _TiedPair(nn.Module):
    """Two ``nn.Linear`` sharing one weight ``Parameter``: ``b(tanh(a(z)))`` with ``b.weight is
    a.weight``."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.weight = self.a.weight

    def forward(self, z):
        return self.b(torch.tanh(self.a(z)))


def test_weights_tied_inside_one_module():
    torch.manual_seed(105)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _TiedPair(4), nn.Tanh(), nn.Linear(4, 2)).to(
        f64
    )
    assert model[2].b.weight is model[2].a.weight
    X, y = _batch(105)
    loss_fn = nn.CrossEntropyLoss()
    ref = autograd_hessian(model, loss_fn, X, y)
    assert ref.names == (
        "0.weight",
        "0.bias",
        "2.a.weight",
        "2.a.bias",
        "2.b.bias",
        "4.weight",
        "4.bias",
    )
    # Sanity: untying (two independent copies of the same values) gives another H entirely.
    untied = copy.deepcopy(model)
    untied[2].b.weight = nn.Parameter(untied[2].a.weight.detach().clone())
    assert autograd_hessian(untied, loss_fn, X, y).hessian.shape != ref.hessian.shape
    _assert_contract(
        lambda: hessinv.ChainHessian(model, loss_fn, X, y),
        ref,
        what="weight tied inside one module",
    )


# ----------------------------------------------------------------------------- 4. in place


def test_inplace_activations():
    torch.manual_seed(106)
    model = nn.Sequential(
        nn.Linear(3, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 5),
        nn.SiLU(inplace=True),
        nn.Linear(5, 2),
    ).to(f64)
    X, y = _batch(106)
    X_before = X.clone()
    loss_fn = nn.CrossEntropyLoss()
    ref = autograd_hessian(model, loss_fn, X, y)
    _assert_contract(
        lambda: hessinv.ChainHessian(model, loss_fn, X, y),
        ref,
        what="ReLU(inplace=True), SiLU(inplace=True)",
    )
    assert torch.equal(X, X_before)


# ----------------------------------------------------------------------------- 5. refused early


class _InplaceShift(nn.Module):
    """Adds a parameter to its input *in place*, then a Linear: ``lin(z += shift)``.

    Eager autograd handles it; a ``torch.func`` transform over the parameters does not
    (it refuses to mutate a captured tensor).
    """

    def __init__(self, width):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(width))
        self.lin = nn.Linear(width, width)

    def forward(self, z):
        z.add_(self.shift)
        return self.lin(z)


def _small_model(seed=107):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(f64)


def test_loss_without_reduction_is_refused_at_construction():
    X, y = _batch(107, classes=3)
    with pytest.raises((ValueError, TypeError), match=r"(?i)scalar|reduction"):
        hessinv.ChainHessian(_small_model(), nn.CrossEntropyLoss(reduction="none"), X, y)


def test_loss_coupling_the_samples_is_refused_at_construction():
    X, _ = _batch(108)
    Y = torch.randn(5, 3, generator=torch.Generator().manual_seed(108), dtype=f64)
    with pytest.raises(ValueError, match=r"(?i)coupl"):
        hessinv.ChainHessian(_small_model(), lambda o, t: ((o - t).sum(0) ** 2).sum(), X, Y)


def test_inplace_on_input_module_refused_at_construction():
    """A stage that writes into its input would corrupt the stored stage inputs the
    derivatives are taken at: refused when the chain is built, with a message that names
    the stage and says what to write instead (docs/algorithm.md section 1)."""
    torch.manual_seed(109)
    model = nn.Sequential(
        OrderedDict(
            first=nn.Linear(3, 4),
            shift=_InplaceShift(4),
            act=nn.Tanh(),
            out=nn.Linear(4, 2),
        )
    ).to(f64)
    X, y = _batch(109)
    X_before = X.clone()
    with pytest.raises(
        ValueError,
        match=r"stage 1 \(shift\.shift.*modifies its input in place.*"
        r"z = z \+",
    ):
        hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    assert torch.equal(X, X_before)  # the caller's data untouched


# ----------------------------------------------------------------------------- 6. staleness


def _mutate(what, model, X, y):
    with torch.no_grad():
        if what == "frozen_weight":
            model[2].weight.mul_(-1.5).add_(0.3)
        elif what == "trainable_weight":
            model[0].weight.mul_(-1.5).add_(0.3)
        elif what == "inputs":
            X.mul_(-2.0).add_(1.0)
        elif y.dtype.is_floating_point:
            y.mul_(-3.0).add_(1.0)
        else:
            y.copy_((y + 1) % 3)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("what", ["frozen_weight", "trainable_weight", "inputs", "targets"])
def test_snapshot_at_construction(what, loss):
    """Mutating the model, inputs or targets in place after construction changes nothing."""
    torch.manual_seed(110)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(f64)
    model[2].weight.requires_grad_(False)
    X, y = _batch(110, classes=3)
    if loss == "mse":
        y = torch.randn(5, 3, generator=torch.Generator().manual_seed(110), dtype=f64)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    before = autograd_hessian(model, loss_fn, X, y)
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    _mutate(what, model, X, y)  # right after construction, before any query
    after = autograd_hessian(model, loss_fn, X, y)
    assert (
        _far_apart(after.hessian, before.hessian, before)
        or abs(float(after.loss - before.loss)) > 1e-3
    )  # the mutation matters
    report = check_hessian(lambda: H, before, 0.1, description=f"mutated {what} ({loss})", k=2)
    require_contract(report)


# ----------------------------------------------------------------------------- 7. NaN loss


def test_nan_loss_all_targets_ignored():
    X, _ = _batch(111, classes=3)
    y = torch.full((5,), -100)  # every target is ignore_index: mean over no samples = NaN
    with pytest.raises(ValueError, match="NaN"):
        hessinv.ChainHessian(_small_model(), nn.CrossEntropyLoss(), X, y)


def test_nan_loss_log_of_negative_output():
    model = _small_model()
    with torch.no_grad():
        model[2].weight.mul_(0.01)
        model[2].bias.fill_(-10.0)  # every output < 0, so log(output) is NaN
    X, _ = _batch(112)
    Y = torch.zeros(5, 3, dtype=f64)
    assert bool((model(X) < 0).all())
    with pytest.raises(ValueError, match="NaN"):
        hessinv.ChainHessian(model, lambda o, t: F.mse_loss(torch.log(o), t), X, Y)


# ----------------------------------------------------------------------------- 8. confident CE


def _confident_classifier(target_p=0.99997):
    """Scale the last layer so that the least confident sample has ``p_max = target_p``."""
    torch.manual_seed(113)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(f64)
    X, _ = _batch(113, batch=6, classes=3)
    base = [p.detach().clone() for p in model[2].parameters()]

    def least_confident(s):
        with torch.no_grad():
            for p, b in zip(model[2].parameters(), base, strict=True):
                p.copy_(s * b)
            return float(torch.softmax(model(X), -1).max(-1).values.min())

    lo, hi = 1.0, 1.0
    while least_confident(hi) < target_p:
        hi *= 2
    for _ in range(100):  # bisection on the scale (p_max increases with it)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if least_confident(mid) < target_p else (lo, mid)
    least_confident(hi)
    y = model(X).argmax(-1).detach()  # confident and right
    return model, X, y


@pytest.mark.parametrize("smoothing", [0.1, 0.0])
def test_label_smoothing_confident_classifier_is_not_refused(smoothing):
    model, X, y = _confident_classifier()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    p_max = torch.softmax(model(X).detach(), -1).max(-1).values
    assert 0.99996 < float(p_max.min()) < 0.99998
    ref = autograd_hessian(model, loss_fn, X, y)
    # kappa_curvature_i = 1 / (1 - p_max,i) ~ 3e4 for the least confident sample enters the
    # tolerances (see head_condition; the other samples are more confident still).
    assert 1e4 < float(ref.kappa_curvature.min()) < 1e5
    try:
        H = hessinv.ChainHessian(model, loss_fn, X, y)
    except ValueError as err:
        pytest.fail(f"confident classifier refused at construction: {err}")
    _assert_contract(lambda: H, ref, what=f"confident CE, label_smoothing={smoothing}")


# ----------------------------------------------------------------------------- 9. the issue


def _issue_example():
    """The accuracy example of the issue, made concrete.

    ``torch.manual_seed(72)``, then in this order: the model
    ``nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 2))`` (default init) cast to
    float64 and every parameter multiplied by 0.3; ``X = torch.randn(4, 4)`` (float64);
    ``y = torch.randint(0, 2, (4,))``. Loss: ``nn.CrossEntropyLoss()``; eps = 1e-8.
    """
    torch.manual_seed(72)
    model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 2)).to(f64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    X = torch.randn(4, 4, dtype=f64)
    y = torch.randint(0, 2, (4,))
    return model, nn.CrossEntropyLoss(), X, y


def test_issue_accuracy_example():
    model, loss_fn, X, y = _issue_example()
    eps = 1e-8
    ref = autograd_hessian(model, loss_fn, X, y)
    n = ref.hessian.shape[0]
    ev = torch.linalg.eigvalsh(ref.hessian) + eps
    norm_H = float((ev - eps).abs().max())
    # Precondition (checked, not assumed): the gap is far above 1e-10 ||H||, so inertia and
    # logdet sign are determined; cond is ~7e7 (10 exact null directions of the softmax
    # layer sit at eps).
    assert float(ev.abs().min()) > 1e-10 * norm_H
    cond = float(ev.abs().max() / ev.abs().min())
    assert 1e7 < cond < 1e9
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    F_ = H.factorize(eps)
    g = H.gradient()
    x = F_.solve(g)
    M = ref.hessian + eps * torch.eye(n, dtype=f64)
    norm_M = float(torch.linalg.matrix_norm(M, 2))
    # Backward error measured against H_ref, which is within dH of H:
    # eta <= 1e-12 + dH / ||M|| (+ K u for computing the residual itself).
    eta_bound = 1e-12 + evaluation_error_bound(ref) / norm_M
    eta = backward_error(M, x, g, norm_M)
    assert eta <= eta_bound + ref.accumulation * UNIT_ROUNDOFF, eta
    assert F_.backward_error <= 1e-12
    # Forward error: both x and x_ref (LU) solve nearby systems, so
    # ||x - x_ref|| / ||x_ref|| <= 2 cond (eta_bound + eta_ref) / (1 - cond (...)), times a
    # safety factor 2; with cond ~ 7e7 that is ~6e-4 here.
    x_ref = torch.linalg.solve(M, g)
    c_eta = cond * (eta_bound + backward_error(M, x_ref, g, norm_M))
    assert c_eta < 0.5
    rel = float(torch.linalg.vector_norm(x - x_ref) / torch.linalg.vector_norm(x_ref))
    assert rel <= 2 * 2 * c_eta / (1 - c_eta), (rel, cond)
    expected = (int((ev > 0).sum()), int((ev < 0).sum()), 0)
    assert F_.inertia() == expected
    sign, _ = F_.logdet()
    assert float(sign) == (-1) ** expected[1]
    # and the whole contract at this eps, on two random right-hand sides too
    report = check_hessian(lambda: H, ref, eps, description="issue example", k=2)
    require_contract(report)


# ----------------------------------------------------------------------------- 10. singular


def _softmax_null_space():
    """CE is invariant under adding ``t * 1`` to the last bias, for every ``t``.

    So ``L(theta + t e) = L(theta)`` with ``e`` = the ones vector on ``out.bias``, hence
    ``H e = 0`` exactly: ``H + 0 I`` is singular.
    """
    model = _small_model(114)
    X, y = _batch(114, classes=3)
    return model, nn.CrossEntropyLoss(), X, y, "2.bias"


def _dead_relu_unit():
    """A hidden ReLU unit that is off for every sample (its bias is -100).

    Its incoming weights and bias and its outgoing weights never change the loss (the
    ReLU output and derivative are exactly 0), so their rows of ``H`` are exactly 0.
    """
    torch.manual_seed(115)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(f64)
    with torch.no_grad():
        model[0].bias[1] = -100.0
    X, _ = _batch(115)
    Y = torch.randn(5, 2, generator=torch.Generator().manual_seed(115), dtype=f64)
    return model, nn.MSELoss(), X, Y, "0.bias"


@pytest.mark.parametrize(
    "build", [_softmax_null_space, _dead_relu_unit], ids=["softmax", "dead_relu"]
)
def test_exactly_singular_is_refused(build):
    model, loss_fn, X, y, name = build()
    ref = autograd_hessian(model, loss_fn, X, y)
    offsets, start = {}, 0
    for n_, p in model.named_parameters():
        offsets[n_] = (start, start + p.numel())
        start += p.numel()
    e = torch.zeros(ref.hessian.shape[0], dtype=f64)
    a, b = offsets[name]
    if build is _softmax_null_space:
        e[a:b] = 1.0
    else:
        e[a + 1] = 1.0  # the dead unit's bias
    norm_H = float(torch.linalg.matrix_norm(ref.hessian, 2))
    assert (
        float(torch.linalg.vector_norm(ref.hessian @ e)) <= 1e-14 * norm_H
    )  # the proof, numerically
    H = hessinv.ChainHessian(model, loss_fn, X, y)
    assert hessinv.SingularMatrixError is hessinv.errors.SingularMatrixError
    with pytest.raises(hessinv.SingularMatrixError) as info:
        H.factorize(0.0)
    message = str(info.value)
    assert "H + " in message and "singular" in message, message
    # a damping that lifts the null space is fine
    report = check_hessian(lambda: H, ref, 1e-2, description=f"{build.__name__}, eps=1e-2", k=1)
    require_contract(report)
