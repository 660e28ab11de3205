"""Loss heads at confident predictions against mpmath (docs/algorithm.md section 2.1).

A trained classifier puts ``p_y = 1 - 1e-15`` on its class. The head's gradient, blocks and
factor are then products of accurately computed numbers (``log p`` with ``log1p``, ``1 - p``
with ``expm1``), so every *entry* has a relative error of a few unit roundoffs, however
small it is. Tolerance: ``TOL = 64 u`` entrywise, relative to each exact entry (the entries
are sums of at most K + 2 products of O(1)-accurate factors). With label smoothing the
target-class gradient is a genuine difference of two exact numbers: checked normwise.
"""

from __future__ import annotations

import mpmath
import pytest
import torch
from torch import nn

import hessinv
from hessinv.derivatives import loss_head

mpmath.mp.dps = 700  # 1 - p for p = 1 - 1e-300, and products of such numbers
U = torch.finfo(torch.float64).eps
TOL = 64 * U
SUBNORMAL = 1e-320
#: smallest class probability of the confident samples (down to the smallest normal numbers)
P_SMALL = [1e-2, 1e-8, 1e-15, 1e-17, 1e-30, 1e-100, 1e-300]


def _entrywise(x: torch.Tensor, exact, tol=TOL) -> None:
    """Every entry of ``x`` within ``tol`` of the mpmath value, relative to that value
    (an exact zero must come out as a zero, or below ``tol`` times the row's largest entry)."""
    flat = x.reshape(-1).tolist()
    ex = [exact] if not isinstance(exact, list) else _flatten(exact)
    assert len(flat) == len(ex)
    scale = max(abs(e) for e in ex)
    for got, want in zip(flat, ex, strict=True):
        if want == 0:
            assert abs(got) <= tol * scale, (got, want)
        else:  # below the normal range only an absolute error of a few ulps of the subnormals
            assert abs(mpmath.mpf(got) - want) <= tol * abs(want) + SUBNORMAL, (got, float(want))


def _flatten(nested):
    out = []
    for item in nested:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _logits(p_small: float, K: int) -> list:
    """Logits whose softmax puts about ``1 - (K-1) p_small`` on class 0, rounded to float64
    (the reference then works from exactly the numbers the head gets)."""
    a = -mpmath.log(p_small)
    return [mpmath.mpf(float(v)) for v in [0] + [-a - mpmath.mpf(j) / 7 for j in range(K - 1)]]


def _softmax(o):
    e = [mpmath.exp(v) for v in o]
    s = mpmath.fsum(e)
    return [v / s for v in e]


def _ce_exact(rows, coeffs, total):
    """mpmath value, gradient and blocks of ``-sum_i a_i . log softmax(o_i) / total``."""
    value, grads, blocks = mpmath.mpf(0), [], []
    for o, a in zip(rows, coeffs, strict=True):
        p = _softmax(o)
        A = mpmath.fsum(a)
        value -= mpmath.fsum(ak * mpmath.log(pk) for ak, pk in zip(a, p, strict=True))
        grads.append([(A * pk - ak) / total for pk, ak in zip(p, a, strict=True)])
        blocks.append(
            [
                [A * ((pk if j == k else 0) - pk * pj) / total for j, pj in enumerate(p)]
                for k, pk in enumerate(p)
            ]
        )
    return value / total, grads, blocks


def _tensor(rows):
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64)


@pytest.mark.parametrize("p_small", P_SMALL)
@pytest.mark.parametrize("variant", ["plain", "weight", "ignore_sum", "flipped"])
def test_cross_entropy_confident_entrywise(p_small, variant):
    K = 3
    rows = [
        _logits(p_small, K),
        _logits(0.3, K),
        [mpmath.mpf(float(v / 3)) for v in _logits(p_small, K)],
    ]
    y = [0, 1, 0]
    if variant == "flipped":  # a confident wrong prediction: the target has p ~ p_small
        y = [2, 1, 1]
    w = [mpmath.mpf(1)] * K
    loss_fn = nn.CrossEntropyLoss()
    if variant == "weight":
        w = [mpmath.mpf(v) for v in ("0.5", "2", "1.25")]
        loss_fn = nn.CrossEntropyLoss(
            weight=torch.tensor([float(v) for v in w], dtype=torch.float64)
        )
    keep = [1, 1, 1]
    if variant == "ignore_sum":
        loss_fn = nn.CrossEntropyLoss(reduction="sum", ignore_index=1)
        keep = [1, 0, 1]
    coeffs = [[w[yi] * keep[i] * (1 if k == yi else 0) for k in range(K)] for i, yi in enumerate(y)]
    total = 1 if variant == "ignore_sum" else mpmath.fsum(w[yi] * keep[i] for i, yi in enumerate(y))
    value, grads, blocks = _ce_exact(rows, coeffs, total)
    head = loss_head(loss_fn, _tensor(rows), torch.tensor(y))
    _entrywise(head.grad, grads)
    _entrywise(head.hess, blocks)
    _entrywise(head.factor.mT @ head.factor, blocks, tol=4 * TOL)
    assert abs(float(head.value) - float(value)) <= TOL * abs(float(value))


@pytest.mark.parametrize("p_small", [1e-8, 1e-17, 1e-300])
def test_cross_entropy_smoothing_and_probability_targets(p_small):
    K, s = 4, 0.1
    rows = [_logits(p_small, K), _logits(0.2, K)]
    w = [mpmath.mpf(v) for v in ("0.5", "2", "1.25", "1")]
    weight = torch.tensor([float(v) for v in w], dtype=torch.float64)
    y = [0, 3]
    coeffs = [
        [w[yi] * (1 - mpmath.mpf(s)) * (k == yi) + mpmath.mpf(s) / K * w[k] for k in range(K)]
        for yi in y
    ]
    value, grads, blocks = _ce_exact(rows, coeffs, mpmath.fsum(w[yi] for yi in y))
    head = loss_head(
        nn.CrossEntropyLoss(weight=weight, label_smoothing=s), _tensor(rows), torch.tensor(y)
    )
    _entrywise(head.hess, blocks)
    g = torch.tensor([[float(v) for v in r] for r in grads], dtype=torch.float64)
    assert float((head.grad - g).abs().max()) <= TOL * float(g.abs().max())
    # probability targets (the mean divides by B)
    q = [
        [mpmath.mpf(1) - 3 * mpmath.mpf("1e-3")] + [mpmath.mpf("1e-3")] * 3,
        [mpmath.mpf(1) / 4] * 4,
    ]
    coeffs = [
        [w[k] * ((1 - mpmath.mpf(s)) * qi[k] + mpmath.mpf(s) / K) for k in range(K)] for qi in q
    ]
    value, grads, blocks = _ce_exact(rows, coeffs, 2)
    head = loss_head(
        nn.CrossEntropyLoss(weight=weight, label_smoothing=s), _tensor(rows), _tensor(q)
    )
    _entrywise(head.hess, blocks)
    g = torch.tensor([[float(v) for v in r] for r in grads], dtype=torch.float64)
    assert float((head.grad - g).abs().max()) <= TOL * float(g.abs().max())
    assert abs(float(head.value) - float(value)) <= TOL * abs(float(value))


@pytest.mark.parametrize("p_small", P_SMALL)
def test_bce_with_logits_confident_entrywise(p_small):
    a = float(-mpmath.log(p_small))
    o = torch.tensor([[a, -a], [0.3, -a / 2]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    pw = torch.tensor([2.0, 0.5], dtype=torch.float64)
    wt = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    head = loss_head(nn.BCEWithLogitsLoss(weight=wt, pos_weight=pw), o, y)
    grads, blocks = [], []
    for i in range(2):
        g_row, d_row = [], []
        for k in range(2):
            ok, yk, pk, wk = (
                mpmath.mpf(o[i, k].item()),
                y[i, k].item(),
                pw[k].item(),
                wt[0, k].item(),
            )
            sp, sn = 1 / (1 + mpmath.exp(-ok)), 1 / (1 + mpmath.exp(ok))
            g_row.append(wk * (-pk * yk * sn + (1 - yk) * sp) / 4)
            d_row.append(wk * (pk * yk + 1 - yk) * sp * sn / 4)
        grads.append(g_row)
        blocks.append([[d_row[0], 0], [0, d_row[1]]])
    _entrywise(head.grad, grads)
    _entrywise(head.hess, blocks)
    _entrywise(head.factor.mT @ head.factor, blocks, tol=4 * TOL)


@pytest.mark.parametrize("a", [16.0, 18.5, 30.0, 345.0])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_confident_softmax_inertia(a, curvature):
    """The fuzz's case: H = G = p0 p1 [[1, -1], [-1, 1]]; with eps = 0.2 p0 p1 the damped
    matrix is positive definite (condition 11). The head used to give G_00 = 0 from
    ``p0 - p0^2`` and an inertia (1, 1, 0)."""
    model = nn.Sequential(nn.Linear(1, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[a], [-a]], dtype=torch.float64))
    X, y = torch.ones(1, 1, dtype=torch.float64), torch.tensor([0])
    cls = hessinv.ChainHessian if curvature == "hessian" else hessinv.ChainGGN
    M = cls(model, nn.CrossEntropyLoss(), X, y)
    p1 = 1 / (1 + mpmath.exp(2 * a))
    c = (1 - p1) * p1
    exact = [[c, -c], [-c, c]]
    _entrywise(M.dense(), exact)
    _entrywise(M.gradient(), [-p1, p1])
    eps = float(0.2 * c)
    F = M.factorize(eps, method="riccati")
    assert F.inertia() == (2, 0, 0) and F.is_positive_definite
    sign, logabsdet = F.logdet()
    assert float(sign) == 1.0
    want = mpmath.log(mpmath.mpf(eps) * (2 * c + mpmath.mpf(eps)))
    assert abs(float(logabsdet) - float(want)) <= 1e-12 * abs(float(want))


@pytest.mark.parametrize("p_small", [1e-3, 1e-17, 1e-300])
def test_log_softmax_nll_and_sigmoid_bce_fold_into_the_loss(p_small):
    """LogSoftmax + NLLLoss and Sigmoid + BCELoss are the same functions as cross-entropy and
    BCE with logits; their Hessians come out of the closed forms, accurate where the
    activations' own derivatives cancel."""
    a = float(-mpmath.log(p_small)) / 2
    X = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    lin = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[a], [-a]], dtype=torch.float64))
    y = torch.tensor([0, 0])
    H = hessinv.ChainHessian(nn.Sequential(lin, nn.LogSoftmax(dim=1)), nn.NLLLoss(), X, y)
    ref = hessinv.ChainHessian(nn.Sequential(lin), nn.CrossEntropyLoss(), X, y)
    assert torch.equal(H.dense(), ref.dense()) and torch.equal(H.gradient(), ref.gradient())
    rows = [[mpmath.mpf(a) * x, -mpmath.mpf(a) * x] for x in (1, mpmath.mpf("0.5"))]
    exact = mpmath.mpf(0)
    for r, x in zip(rows, (1, mpmath.mpf("0.5")), strict=True):
        p = _softmax(r)
        exact += p[0] * p[1] * x * x / 2
    assert abs(mpmath.mpf(H.dense()[0, 0].item()) - exact) <= TOL * exact
    # the same model under the Gauss-Newton matrix: the logistic one, not zero
    G = hessinv.ChainGGN(nn.Sequential(lin, nn.LogSoftmax(dim=1)), nn.NLLLoss(), X, y)
    assert torch.equal(G.dense(), ref.dense())
    yb = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    Hb = hessinv.ChainHessian(nn.Sequential(lin, nn.Sigmoid()), nn.BCELoss(), X, yb)
    refb = hessinv.ChainHessian(nn.Sequential(lin), nn.BCEWithLogitsLoss(), X, yb)
    assert torch.equal(Hb.dense(), refb.dense())


def test_folded_losses_match_autograd_at_moderate_logits():
    """Away from saturation the fold changes nothing: the dense autograd Hessian of the
    original model and loss agrees to rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(dim=1)
    ).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for loss_fn in (nn.NLLLoss(), nn.NLLLoss(weight=w, reduction="sum")):
        H = hessinv.ChainHessian(model, loss_fn, X, y)
        D = hessinv.dense_hessian(model, loss_fn, X, y)
        assert float((H.dense() - D).abs().max()) <= 1e-13 * float(D.abs().max())
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Sigmoid()).double()
    yb = torch.rand(5, 2, dtype=torch.float64)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    H = hessinv.ChainHessian(model, nn.BCELoss(weight=w), X, yb).dense()
    D = hessinv.dense_hessian(model[:-1], nn.BCEWithLogitsLoss(weight=w), X, yb)
    assert float((H - D).abs().max()) <= 1e-13 * float(D.abs().max())
    # torch's own double backward of BCELoss adds 1e-12 to a denominator (relative error
    # 7.6e-12 in sigmoid(o) sigmoid(-o) at o = 0.3): the fold is the more accurate one
    D = hessinv.dense_hessian(model, nn.BCELoss(weight=w), X, yb)
    assert float((H - D).abs().max()) <= 1e-10 * float(D.abs().max())
