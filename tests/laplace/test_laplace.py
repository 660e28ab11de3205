"""The Laplace approximation (docs/algorithm.md section 16) against an independent dense
reference in float64: ``J`` from ``torch.func.jacrev``, the dense posterior precision
``Pi = c J^T S J + diag(P)``, ``torch.linalg.slogdet`` and ``torch.linalg.inv``.

Bounds (float64, ``u = 2^-53``, ``L = n + B K`` the longest accumulation, ``cond =
cond(Pi)``; first-order perturbation of a matrix whose entries both sides compute to
``L u`` relative):

* log marginal likelihood: ``SAFETY L u (n cond + |log_lik| + scatter)``
  (``|d logdet Pi| <= n cond ||dPi|| / ||Pi||``);
* its gradient, per group ``g``: ``SAFETY L u cond^2 m_g`` with ``m_g`` the sum of the
  magnitudes of its three terms (``1/2 sum (Pi^-1)_jj``, ``n_g / (2 p_g)``,
  ``1/2 sum theta_j^2``): ``||d(Pi^-1)|| <= cond ||Pi^-1|| ||dPi|| / ||Pi||`` to first order,
  with one more ``cond`` for Woodbury's cancellation in ``1 - c q / p``;
* inverse diagonal and predictive covariance: ``SAFETY L u cond^2`` times the prior's
  ``1 / p`` (``J* P^-1 J*^T``), whose part the data remove;
* finite differences of the log marginal likelihood (central, step ``1e-4 p``): relative
  ``1e-6`` of the gradient's scale ``m_g``.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

import hessinv

SAFETY = 4.0
U = torch.finfo(torch.float64).eps / 2


# ----------------------------------------------------------------------------- problems
def make_model(depth: int, width: int, d_in: int, k: int, *, generic: bool, seed: int):
    """A tanh/relu MLP of ``depth`` Linear layers; ``generic`` puts a LayerNorm stage (a
    generic ``torch.func`` stage) and a bias-free Linear in."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    h = d_in
    for i in range(depth - 1):
        layers += [nn.Linear(h, width, bias=not (generic and i == 1)), nn.Tanh()]
        if generic and i == 0:
            layers.append(nn.LayerNorm(width))
        h = width
    layers.append(nn.Linear(h, k))
    return nn.Sequential(*layers).double()


def make_data(model, likelihood: str, B: int, d_in: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(B, d_in, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, k, (B,), generator=g)
    else:
        with torch.no_grad():
            y = model(X) + 0.3 * torch.randn(B, k, generator=g, dtype=torch.float64)
    return X, y


class Dense:
    """The dense reference: ``J``, ``G = J^T S J`` (``S`` of the summed loss) and the
    posterior precision for a given per-entry ``P``."""

    def __init__(self, model, likelihood, X, y, sigma=1.0):
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        self.names = list(params)
        self.sizes = [p.numel() for p in params.values()]
        self.theta = torch.cat([p.reshape(-1) for p in params.values()])
        self.model, self.params, self.likelihood, self.sigma = model, params, likelihood, sigma
        self.X, self.y = X, y
        self.J = self.jacobian(X)
        out = model(X).detach()
        B, K = out.shape
        if likelihood == "classification":
            p = torch.softmax(out, 1)
            S = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
            self.log_lik = -nn.functional.cross_entropy(out, y, reduction="sum")
            self.c = 1.0
        else:
            S = torch.eye(B * K, dtype=torch.float64)
            sse = ((out - y) ** 2).sum()
            self.log_lik = -sse / (2 * sigma**2) - B * K * math.log(sigma * math.sqrt(2 * math.pi))
            self.c = 1.0 / sigma**2
        self.G = self.J.T @ S @ self.J  # the likelihood's GGN times 1 / c
        self.n = self.theta.numel()
        self.L = self.n + B * K

    def jacobian(self, X):
        def f(flat):
            ps, i = {}, 0
            for name, p in self.params.items():
                ps[name] = flat[i : i + p.numel()].reshape(p.shape)
                i += p.numel()
            return torch.func.functional_call(self.model, ps, (X,))

        J = torch.func.jacrev(f)(self.theta)
        return J.reshape(-1, self.theta.numel())

    def expand(self, P):
        P = torch.as_tensor(P, dtype=torch.float64)
        if P.numel() == 1:
            return P.reshape(()).expand(self.n).clone()
        if P.numel() == self.n:
            return P
        return torch.repeat_interleave(P, torch.tensor(self.sizes))

    def Pi(self, P):
        return self.c * self.G + torch.diag(self.expand(P))

    def lml(self, P):
        p = self.expand(P)
        sign, logdet = torch.linalg.slogdet(self.Pi(P))
        assert sign > 0
        return self.log_lik - 0.5 * (logdet - p.log().sum() + (p * self.theta**2).sum())

    def cond(self, P):
        ev = torch.linalg.eigvalsh(self.Pi(P))
        return float(ev[-1] / ev[0])

    def groups(self, P):
        P = torch.as_tensor(P, dtype=torch.float64)
        if P.numel() == 1:
            return [self.n]
        if P.numel() == self.n:
            return [1] * self.n
        return self.sizes

    def grad_terms(self, P):
        """The three terms of d LML / d p_g per group: (-1/2 sum diag Pi^-1, n_g/(2 p_g),
        -1/2 sum theta^2)."""
        p = self.expand(P)
        inv = torch.linalg.inv(self.Pi(P)).diagonal()
        sizes = self.groups(P)
        a = torch.stack([t.sum() for t in (-0.5 * inv).split(sizes)])
        b = torch.stack([t.sum() for t in (0.5 / p).split(sizes)])
        c = torch.stack([t.sum() for t in (-0.5 * self.theta**2).split(sizes)])
        return a, b, c


def prior(kind: str, la: hessinv.LaplaceGGN, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        return 0.7
    size = len(la.param_names) if kind == "layerwise" else la.num_params
    return torch.exp(torch.randn(size, generator=g, dtype=torch.float64))


CASES = [
    # (likelihood, depth, width, batch, classes, generic, seed)
    ("classification", 1, 3, 5, 3, False, 0),
    ("classification", 2, 4, 6, 3, False, 1),
    ("classification", 4, 3, 4, 2, True, 2),
    ("regression", 1, 3, 5, 1, False, 3),
    ("regression", 3, 4, 6, 2, True, 4),
    ("regression", 5, 3, 3, 2, False, 5),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0][:5]}-d{c[1]}-w{c[2]}-b{c[3]}")
def problem(request):
    likelihood, depth, width, B, k, generic, seed = request.param
    d_in = 3
    model = make_model(depth, width, d_in, k, generic=generic, seed=seed)
    X, y = make_data(model, likelihood, B, d_in, k, seed)
    sigma = 0.6 if likelihood == "regression" else 1.0
    la = hessinv.LaplaceGGN(model, likelihood, X, y, sigma_noise=sigma)
    ref = Dense(model, likelihood, X, y, sigma)
    assert la.param_names == tuple(ref.names)
    return model, X, y, la, ref


# ----------------------------------------------------------------------------- value
@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diagonal"])
def test_log_marginal_likelihood(problem, kind):
    _, _, _, la, ref = problem
    P = prior(kind, la, 7)
    got = la.log_marginal_likelihood(prior_precision=P)
    want = ref.lml(P)
    p = ref.expand(P)
    scale = ref.n * ref.cond(P) + abs(float(ref.log_lik)) + float((p * ref.theta**2).sum())
    assert abs(float(got - want)) <= SAFETY * ref.L * U * scale
    # its parts
    assert torch.allclose(la.log_likelihood(), ref.log_lik, rtol=1e-13, atol=0)
    logdet = torch.linalg.slogdet(ref.Pi(P))[1]
    assert abs(float(la.posterior_precision_logdet(P) - logdet)) <= SAFETY * ref.L * U * scale


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diagonal"])
def test_gradient_against_dense_and_finite_differences(problem, kind):
    _, _, _, la, ref = problem
    P = prior(kind, la, 8)
    g = la.log_marginal_likelihood_grad(prior_precision=P)
    assert torch.allclose(g.value, la.log_marginal_likelihood(prior_precision=P), rtol=1e-15)
    a, b, c = ref.grad_terms(P)
    want = a + b + c
    scale = a.abs() + b.abs() + c.abs()
    cond = ref.cond(P)
    err = (g.prior_precision.reshape(-1) - want).abs()
    assert bool((err <= SAFETY * ref.L * U * cond**2 * scale).all()), float((err / scale).max())
    assert g.prior_precision.shape == torch.as_tensor(P).shape
    # finite differences of our own value, central, in the few first groups
    Pt = torch.as_tensor(P, dtype=torch.float64).clone()
    for j in range(min(3, Pt.numel())):
        h = 1e-4 * float(Pt.reshape(-1)[j])
        up, down = Pt.clone().reshape(-1), Pt.clone().reshape(-1)
        up[j] += h
        down[j] -= h
        fd = (
            la.log_marginal_likelihood(up.reshape(Pt.shape))
            - la.log_marginal_likelihood(down.reshape(Pt.shape))
        ) / (2 * h)
        assert abs(float(fd - g.prior_precision.reshape(-1)[j])) <= 1e-6 * float(scale[j])


def test_sigma_noise_gradient(problem):
    _, _, _, la, ref = problem
    if la.likelihood != "regression":
        assert la.log_marginal_likelihood_grad().sigma_noise is None
        return
    g = la.log_marginal_likelihood_grad(prior_precision=0.9)
    s, h = float(la.sigma_noise), 1e-5
    fd = (
        la.log_marginal_likelihood(0.9, sigma_noise=s + h)
        - la.log_marginal_likelihood(0.9, sigma_noise=s - h)
    ) / (2 * h)
    assert abs(float(fd - g.sigma_noise)) <= 1e-6 * (abs(float(g.sigma_noise)) + ref.L / s)
    # and the value at another sigma against the dense reference
    other = Dense(ref.model, "regression", ref.X, ref.y, sigma=1.7)
    got = la.log_marginal_likelihood(0.9, sigma_noise=1.7)
    assert abs(float(got - other.lml(0.9))) <= SAFETY * ref.L * U * (
        ref.n * other.cond(0.9) + abs(float(other.log_lik))
    )


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diagonal"])
def test_inverse_diagonal(problem, kind):
    _, _, _, la, ref = problem
    P = prior(kind, la, 9)
    got = hessinv.flatten(la.inverse_diagonal(prior_precision=P))
    want = torch.linalg.inv(ref.Pi(P)).diagonal()
    p = ref.expand(P)
    tol = SAFETY * ref.L * U * ref.cond(P) ** 2 / p
    assert bool(((got - want).abs() <= tol).all())


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diagonal"])
def test_posterior_variance(problem, kind):
    model, X, _, la, ref = problem
    P = prior(kind, la, 10)
    Xt = torch.randn(4, X.shape[1], dtype=torch.float64)
    Jt = ref.jacobian(Xt)  # (B* K, n)
    K = la.n_outputs
    cov = Jt @ torch.linalg.inv(ref.Pi(P)) @ Jt.T
    tol = SAFETY * ref.L * U * ref.cond(P) ** 2 * float((Jt**2).sum(1).max() / ref.expand(P).min())
    joint = la.posterior_variance(Xt, joint=True, prior_precision=P)
    assert joint.shape == (4 * K, 4 * K)
    assert float((joint - cov).abs().max()) <= tol
    blocks = la.posterior_variance(Xt, prior_precision=P, batch_size=3)
    assert blocks.shape == (4, K, K)
    want = torch.stack([cov[i * K : (i + 1) * K, i * K : (i + 1) * K] for i in range(4)])
    assert float((blocks - want).abs().max()) <= tol
    if la.likelihood == "regression":
        noisy = la.posterior_variance(Xt, noise=True, prior_precision=P)
        eye = torch.eye(K, dtype=torch.float64)
        assert torch.allclose(noisy, blocks + la.sigma_noise**2 * eye, rtol=0, atol=tol)


# ----------------------------------------------------------------------------- the rest
def test_data_loader_and_subset_and_prior_mean():
    model = make_model(3, 4, 3, 3, generic=False, seed=11)
    X, y = make_data(model, "classification", 8, 3, 3, 11)
    loader = [(X[:5], y[:5]), (X[5:], y[5:])]
    a = hessinv.LaplaceGGN(model, "classification", data=loader, prior_precision=0.3)
    b = hessinv.LaplaceGGN(model, "classification", X, y, prior_precision=0.3)
    assert torch.allclose(a.log_marginal_likelihood(), b.log_marginal_likelihood(), rtol=1e-14)
    # a parameter subset: the dense reference with the others frozen
    model.get_submodule("2").weight.requires_grad_(False)
    mu = torch.full((b.num_params,), 0.1, dtype=torch.float64)
    try:
        sub = hessinv.LaplaceGGN(model, "classification", X, y)
        ref = Dense(model, "classification", X, y)
        P = torch.rand(len(sub.param_names), dtype=torch.float64) + 0.2
        assert torch.allclose(sub.log_marginal_likelihood(P), ref.lml(P), rtol=1e-12)
    finally:
        model.get_submodule("2").weight.requires_grad_(True)
    # the prior mean enters the scatter only
    ref = Dense(model, "classification", X, y)
    c = hessinv.LaplaceGGN(model, "classification", X, y, prior_mean=mu)
    P = 0.8
    shift = 0.5 * P * float((ref.theta**2).sum() - ((ref.theta - 0.1) ** 2).sum())
    assert math.isclose(
        float(c.log_marginal_likelihood(P)),
        float(ref.lml(P)) + shift,
        rel_tol=1e-12,
    )
    g0 = b.log_marginal_likelihood_grad(P).prior_precision
    g1 = c.log_marginal_likelihood_grad(P).prior_precision
    assert math.isclose(
        float(g1 - g0), 0.5 * float((ref.theta**2 - (ref.theta - 0.1) ** 2).sum()), rel_tol=1e-10
    )


@pytest.mark.parametrize("structure", ["scalar", "layerwise"])
def test_optimize_prior_precision(structure):
    model = make_model(2, 4, 3, 3, generic=False, seed=12)
    X, y = make_data(model, "classification", 10, 3, 3, 12)
    la = hessinv.LaplaceGGN(model, "classification", X, y)
    before = la.log_marginal_likelihood(1.0)
    P = la.optimize_prior_precision(structure, n_steps=150, lr=0.1)
    assert torch.equal(P, la.prior_precision)
    assert P.dim() == (0 if structure == "scalar" else 1)
    assert la.log_marginal_likelihood() > before
    g = la.log_marginal_likelihood_grad()
    # at a stationary point the gradient in log P is small against its terms
    assert float((g.prior_precision * P).abs().max()) < 1e-2 * float(la.num_params)
    if structure == "scalar":  # the eigenvalue fast path against the general gradient
        ref = Dense(model, "classification", X, y)
        a, b, c = ref.grad_terms(P)
        assert math.isclose(float(g.prior_precision), float(a + b + c), rel_tol=1e-8, abs_tol=1e-9)


def test_bad_input():
    model = make_model(2, 3, 3, 2, generic=False, seed=13)
    X, y = make_data(model, "classification", 5, 3, 2, 13)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        hessinv.LaplaceGGN(model, "poisson", X, y)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
            hessinv.LaplaceGGN(model, "classification", X, y, prior_precision=bad)
    la = hessinv.LaplaceGGN(model, "classification", X, y)
    with pytest.raises(ValueError, match="positive and finite"):
        la.log_marginal_likelihood(torch.tensor([1.0, 1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"a \(4,\) tensor \(one value per parameter tensor"):
        la.log_marginal_likelihood(torch.ones(3))
    with pytest.raises(ValueError, match="prior_mean must be"):
        la.prior_mean = torch.zeros(2)
    with pytest.raises(ValueError, match="sigma_noise must be 1 for classification"):
        hessinv.LaplaceGGN(model, "classification", X, y, sigma_noise=2.0)
    with pytest.raises(ValueError, match="for regression only"):
        la.log_marginal_likelihood(sigma_noise=2.0)
    with pytest.raises(ValueError, match="for regression only"):
        la.posterior_variance(X, noise=True)
    with pytest.raises(ValueError, match="class-index targets must lie in"):
        hessinv.LaplaceGGN(model, "classification", X, y + 5)
    with pytest.raises(ValueError, match="targets have shape"):
        hessinv.LaplaceGGN(model, "classification", X, y[:3])
    with pytest.raises(ValueError, match="shaped like the model's outputs"):
        hessinv.LaplaceGGN(model, "regression", X, torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_noise must be a positive"):
        hessinv.LaplaceGGN(
            model, "regression", X, torch.randn(5, 2, dtype=torch.float64), sigma_noise=0
        )
    with pytest.raises(ValueError, match="joint=True needs them all"):
        la.posterior_variance(X, joint=True, batch_size=2)
    with pytest.raises(ValueError, match="prior_structure must be one of"):
        la.optimize_prior_precision("kron")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="parameters changed since this LaplaceGGN was built"):
        la.posterior_variance(X)


def test_cached_factors_are_per_prior():
    """Interleaved calls at two priors give the values of separate calls."""
    model = make_model(3, 3, 3, 2, generic=True, seed=14)
    X, y = make_data(model, "regression", 6, 3, 2, 14)
    la = hessinv.LaplaceGGN(model, "regression", X, y, sigma_noise=0.5)
    P1 = torch.rand(len(la.param_names), dtype=torch.float64) + 0.5
    v1 = la.log_marginal_likelihood(P1)
    v2 = la.log_marginal_likelihood(2.0)
    v3 = la.log_marginal_likelihood(P1, sigma_noise=0.9)
    fresh = partial(hessinv.LaplaceGGN, model, "regression", X, y)
    assert torch.equal(v1, fresh(sigma_noise=0.5).log_marginal_likelihood(P1))
    assert torch.equal(v2, fresh(sigma_noise=0.5).log_marginal_likelihood(2.0))
    assert torch.allclose(v3, fresh(sigma_noise=0.9).log_marginal_likelihood(P1), rtol=1e-14)
