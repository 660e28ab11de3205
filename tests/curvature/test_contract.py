"""The "no silent wrong answers" contract, on random chains, against a dense reference (float64).

For every chain of ``_chains.random_chain(seed)`` (conv and residual stages, reused and
in-place activations, frozen parameters and ``params=`` subsets, CE/MSE with mean and
sum, damping drawn from ``DAMPINGS``), ``_chains.check_contract`` runs the public API
of ``hessinv.ChainHessian`` and compares it with the reverse-over-reverse autograd
reference of ``_autograd_reference.py`` (not torch.func, not hessinv):

1. every solve has backward error ``<= 1e-12``: the reported ``F.backward_error`` and the
   one measured here against the dense matrix (consistent to a factor of 10);
2. ``logdet()`` and ``inertia()`` are exact where ``min |eig(H + eps I)| > 1e-10 ||H||``
   (cases below that gap are counted, not asserted);
3. the forward error is within ``2 cond eta / (1 - cond eta)`` (times a safety factor 2);

and loss, gradient and products agree with the reference within the float64 evaluation
bounds ``K u * scale`` (``_autograd_reference.evaluation_error_bound`` and friends: ``K``
counts the roundings along the network, the scale includes how much a confident softmax
head amplifies them).
Every tolerance is derived in ``_chains.check_contract``; none is tuned.

A failure prints the seed and the chain; ``random_chain(seed)`` rebuilds it, and
``python -m pytest "tests/curvature/test_contract.py::test_contract[17]"`` reruns one. Run with
``-s``
for the summary (max backward error, inertia comparisons, cases skipped for a small gap).
The 3,000-chain sweep is marked ``slow`` and only runs when asked for:
``python -m pytest tests/curvature/test_contract.py -m slow`` (or ``HESSINV_SLOW=1``).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from _autograd_reference import (
    UNIT_ROUNDOFF,
    autograd_hessian,
    evaluation_error_bound,
    gradient_error_bound,
    loss_error_bound,
    selected_parameters,
)
from _chains import (
    ACTIVATIONS,
    DAMPINGS,
    Residual,
    check_contract,
    make_mlp,
    random_chain,
    require_contract,
)
from torch import nn
from torch.func import functional_call

import hessinv
import hessinv.errors

DEFAULT_CHAINS = 300
SLOW_CHAINS = 3000
SLOW_BLOCK = 100

_SUMMARY = {
    "chains": 0,
    "solves": 0,
    "max_backward_error": 0.0,
    "max_reported_backward_error": 0.0,
    "max_product_error_ratio": 0.0,
    "max_forward_error_ratio": 0.0,
    "max_logdet_error_ratio": 0.0,
    "inertia_compared": 0,
    "inertia_disagreements": 0,
    "skipped_small_gap": 0,
    "singular_raised": 0,
    "accuracy_warnings": 0,
    "crashed": 0,
    "max_kappa": 1.0,
    "failed": [],
}


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    yield
    s = _SUMMARY
    if s["chains"]:
        print(
            f"\n[contract] {s['chains']} chains, {s['solves']} solves: max backward error "
            f"{s['max_backward_error']:.2e} (measured) / {s['max_reported_backward_error']:.2e} "
            f"(reported); inertia compared {s['inertia_compared']}, disagreements "
            f"{s['inertia_disagreements']}; skipped for a small gap {s['skipped_small_gap']}; "
            f"SingularMatrixError {s['singular_raised']}; AccuracyWarning "
            f"{s['accuracy_warnings']}; "
            f"crashed {s['crashed']}; "
            f"worst error/tolerance: products {s['max_product_error_ratio']:.2e}, forward "
            f"{s['max_forward_error_ratio']:.2e}, logdet {s['max_logdet_error_ratio']:.2e}; "
            f"max head kappa {s['max_kappa']:.2e}; "
            f"failed seeds {s['failed'][:20]}{' ...' if len(s['failed']) > 20 else ''}"
        )


def _record(seed, report) -> None:
    s = _SUMMARY
    s["chains"] += 1
    s["solves"] += len(report.backward_errors)
    s["max_backward_error"] = max([s["max_backward_error"], *report.backward_errors])
    s["max_reported_backward_error"] = max(
        [s["max_reported_backward_error"], *report.reported_backward_errors]
    )
    s["max_product_error_ratio"] = max(s["max_product_error_ratio"], report.product_error_ratio)
    s["max_forward_error_ratio"] = max(s["max_forward_error_ratio"], report.forward_error_ratio)
    s["max_logdet_error_ratio"] = max(s["max_logdet_error_ratio"], report.logdet_error_ratio)
    s["inertia_compared"] += report.inertia_compared
    s["inertia_disagreements"] += report.inertia_disagrees
    s["skipped_small_gap"] += report.small_gap
    s["singular_raised"] += report.singular_raised
    s["accuracy_warnings"] += report.accuracy_warnings
    s["crashed"] += report.crashed
    s["max_kappa"] = max(s["max_kappa"], report.kappa)
    if report.violations:
        s["failed"].append(seed)


def _run_chain(seed, method: str = "riccati") -> str | None:
    """Check chain ``seed`` on the route ``method``; the failure message (with seed and
    description) or None."""
    chain = random_chain(seed)
    try:
        report = check_contract(chain, method=method)
    except Exception as err:  # a crash is a failure of the chain too, with its description
        _SUMMARY["failed"].append(seed)
        return (
            f"{chain.description}\n  raised {type(err).__name__}: {err}\n"
            f"  reproduce: _chains.check_contract(_chains.random_chain({seed}))"
        )
    _record(seed, report)
    if report.violations:
        return (
            report.message()
            + f"\n  reproduce: _chains.check_contract(_chains.random_chain({seed}))"
        )
    return None


@pytest.mark.parametrize("seed", range(DEFAULT_CHAINS))
def test_contract(seed):
    message = _run_chain(seed)
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.mark.parametrize("seed", range(0, DEFAULT_CHAINS, 5))
def test_contract_dense_route(seed):
    """The dense route (docs/algorithm.md section 15) under the same contract."""
    message = _run_chain(seed, "dense")
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(SLOW_CHAINS // SLOW_BLOCK))
def test_contract_many(block):
    start = DEFAULT_CHAINS + block * SLOW_BLOCK
    messages = [m for seed in range(start, start + SLOW_BLOCK) if (m := _run_chain(seed))]
    if messages:
        pytest.fail(
            f"{len(messages)} of {SLOW_BLOCK} chains failed:\n" + "\n".join(messages[:5]),
            pytrace=False,
        )


# ----------------------------------------------------------------------------- the generator


def test_generator_is_reproducible_and_varied():
    """Same seed, same chain; and the default seeds cover every feature the suite promises."""
    a, b = random_chain(7), random_chain(7)
    assert a.description == b.description and torch.equal(a.inputs, b.inputs)
    assert all(
        torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )
    seen = {
        k: 0
        for k in (
            "conv",
            "residual",
            "reused",
            "inplace",
            "frozen",
            "params",
            "ce",
            "mse",
            "mean",
            "sum",
            "depth1",
            "depth8",
            "generic",
        )
    }
    dampings, activations, widths, batches = set(), set(), set(), set()
    for seed in range(DEFAULT_CHAINS):
        c = random_chain(seed)
        d = c.description
        mods = list(c.model)
        seen["conv"] += any(isinstance(m, nn.Conv2d) for m in mods)
        seen["residual"] += any(isinstance(m, Residual) for m in mods)
        seen["reused"] += "(reused)" in d
        seen["inplace"] += any(getattr(m, "inplace", False) for m in c.model.modules())
        seen["frozen"] += "frozen" in d and any(not p.requires_grad for p in c.model.parameters())
        seen["params"] += c.params is not None
        seen["ce"] += isinstance(c.loss_fn, nn.CrossEntropyLoss)
        seen["mse"] += isinstance(c.loss_fn, nn.MSELoss)
        seen[c.loss_fn.reduction] += 1
        n_stages = sum(1 for m in mods if list(m.parameters()))
        seen["depth1"] += n_stages == 1
        seen["depth8"] += n_stages == 8
        seen["generic"] += c.oracle == "generic"
        dampings.add(c.damping)
        activations |= {type(m).__name__ for m in c.model.modules() if not list(m.parameters())}
        widths |= {m.out_features for m in c.model.modules() if isinstance(m, nn.Linear)}
        batches.add(c.inputs.shape[0])
    assert all(v >= 5 for v in seen.values()), seen
    assert dampings == set(DAMPINGS)
    assert {"ReLU", "LeakyReLU", "Tanh", "SiLU", "GELU", "Sigmoid", "Softplus"} <= activations
    assert set(range(1, 11)) <= widths and batches == set(range(1, 9))
    # a reused instance really is the same object at two places of one Sequential
    reused = next(
        random_chain(s) for s in range(DEFAULT_CHAINS) if "(reused)" in random_chain(s).description
    )
    acts = [id(m) for m in reused.model.modules(remove_duplicate=False) if not list(m.parameters())]
    assert len(acts) > len(set(acts)), reused.description


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_torch_func_hessian_on_tanh_mlps(seed):
    """On plain tanh MLPs (where torch.func is right) both references agree to rounding."""
    rng = random.Random(seed)
    depth, width, batch = rng.randint(1, 4), rng.randint(2, 6), rng.randint(1, 6)
    model = make_mlp(depth, width, d_in=3, d_out=3, activation="tanh", seed=seed)
    X = torch.randn(batch, 3, dtype=torch.float64)
    for loss_fn, y in (
        (nn.CrossEntropyLoss(), torch.randint(0, 3, (batch,))),
        (nn.MSELoss(reduction="sum"), torch.randn(batch, 3, dtype=torch.float64)),
    ):
        ref = autograd_hessian(model, loss_fn, X, y)
        named = [(n, p) for n, p in model.named_parameters()]
        sizes = [p.numel() for _, p in named]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])

        def loss_of(theta, loss_fn=loss_fn, y=y, named=named, sizes=sizes):
            parts = theta.split(sizes)
            return loss_fn(
                functional_call(
                    model,
                    {n: t.reshape(p.shape) for (n, p), t in zip(named, parts, strict=True)},
                    (X,),
                ),
                y,
            )

        D = torch.func.hessian(loss_of)(flat)
        dH = evaluation_error_bound(ref)  # both are float64 evaluations: each within dH
        assert ref.names == tuple(n for n, _ in named)
        assert float(torch.linalg.matrix_norm(ref.hessian - D, 2)) <= 2 * dH
        # ||R - R^T||_2 <= 2 dH for the raw rows R, and ||.||_F <= sqrt(n) ||.||_2
        n = D.shape[0]
        assert ref.asymmetry * float(torch.linalg.matrix_norm(ref.hessian)) <= 2 * math.sqrt(n) * dH
        loss = loss_of(flat)
        grad = torch.func.grad(loss_of)(flat)
        assert abs(float(ref.loss - loss)) <= 2 * loss_error_bound(ref)
        assert float(torch.linalg.vector_norm(ref.gradient - grad)) <= 2 * gradient_error_bound(ref)


@pytest.mark.parametrize("seed", [3, 11, 40, 57, 88, 102])
def test_reference_batched_rows_equal_row_by_row(seed):
    """``is_grads_batched`` (vmap over the backward) gives the same rows as a plain loop."""
    chain = random_chain(seed, max_depth=4, max_width=5)
    a = autograd_hessian(chain.model, chain.loss_fn, chain.inputs, chain.targets, chain.params)
    b = autograd_hessian(
        chain.model, chain.loss_fn, chain.inputs, chain.targets, chain.params, batched=False
    )
    assert float(torch.linalg.matrix_norm(a.hessian - b.hessian, 2)) <= 2 * evaluation_error_bound(
        a
    ), chain.description


def test_reference_selection_is_a_principal_submatrix():
    """Frozen parameters and ``params=`` select rows and columns; the rest are constants."""
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    full = autograd_hessian(model, nn.CrossEntropyLoss(), X, y)
    assert full.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    keep = torch.cat([torch.arange(0, 12), torch.arange(16, 26)])  # without 0.bias
    sub = full.hessian[keep][:, keep]
    by_name = autograd_hessian(
        model, nn.CrossEntropyLoss(), X, y, params=["2.bias", "0.weight", "2.weight"]
    )
    by_tensor = autograd_hessian(
        model, nn.CrossEntropyLoss(), X, y, params=[model[0].weight, model[2].weight, model[2].bias]
    )
    model[0].bias.requires_grad_(False)
    frozen = autograd_hessian(model, nn.CrossEntropyLoss(), X, y)
    for ref in (by_name, by_tensor, frozen):
        assert ref.names == ("0.weight", "2.weight", "2.bias")
        assert torch.allclose(ref.hessian, sub, rtol=0, atol=1e-15 * float(sub.abs().max()))
        assert torch.allclose(ref.gradient, full.gradient[keep], rtol=0, atol=1e-15)
    assert [n for n, _ in selected_parameters(model)] == ["0.weight", "2.weight", "2.bias"]


# ----------------------------------------------------------------------------- the checker


class _DenseFactorization:
    """A correct dense ``factorize`` (LU + one refinement step), optionally broken on purpose."""

    def __init__(self, M, damping, breakage):
        self._M, self.damping, self._breakage = M, damping, breakage
        ev = torch.linalg.eigvalsh(M)
        if float(ev.abs().min()) <= M.shape[0] * UNIT_ROUNDOFF * float(ev.abs().max()):
            raise hessinv.errors.SingularMatrixError(f"H + {damping} I is singular", damping)
        self._ev = ev
        self._lu = torch.linalg.lu_factor(M)
        self.method, self.refinement_steps, self.backward_error = "dense", 0, 0.0

    def solve(self, g):
        G = g[:, None] if g.dim() == 1 else g
        X = torch.linalg.lu_solve(*self._lu, G)
        X = X + torch.linalg.lu_solve(*self._lu, G - self._M @ X)
        self.refinement_steps = 1
        num = torch.linalg.vector_norm(self._M @ X - G, dim=0)
        den = float(torch.linalg.matrix_norm(self._M, 2)) * torch.linalg.vector_norm(
            X, dim=0
        ) + torch.linalg.vector_norm(G, dim=0)
        self.backward_error = float((num / den).max())
        if self._breakage == "solve":
            X = X * (1 + 1e-8)
        if self._breakage == "report":  # a small solve error reported as rounding level
            X = X * (1 + 1e-11)
            self.backward_error = 1e-16
        return X[:, 0] if g.dim() == 1 else X

    def logdet(self):
        sign, logabsdet = torch.linalg.slogdet(self._M)
        if self._breakage == "logdet":
            logabsdet = logabsdet + 1e-6
        return sign, logabsdet

    def inertia(self):
        pos, neg = int((self._ev > 0).sum()), int((self._ev < 0).sum())
        if self._breakage == "inertia" and neg:
            pos, neg = pos + 1, neg - 1
        return pos, neg, 0

    @property
    def is_positive_definite(self):
        return self.inertia()[1] == 0


class _DenseHessian:
    """The public API of ``hessinv.ChainHessian`` from ``torch.autograd.functional.hessian``."""

    def __init__(self, chain, breakage=None):
        named = selected_parameters(chain.model, chain.params)
        chosen = {id(p) for _, p in named}
        consts = {n: p.detach() for n, p in chain.model.named_parameters() if id(p) not in chosen}
        sizes = [p.numel() for _, p in named]

        def loss_of(theta):
            parts = {
                n: t.reshape(p.shape) for (n, p), t in zip(named, theta.split(sizes), strict=True)
            }
            return chain.loss_fn(
                functional_call(chain.model, {**consts, **parts}, (chain.inputs.clone(),)),
                chain.targets,
            )

        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.param_names = tuple(n for n, _ in named)
        self.num_params = flat.numel()
        self._D = torch.autograd.functional.hessian(loss_of, flat, vectorize=True).detach()
        theta = flat.clone().requires_grad_(True)
        loss = loss_of(theta)
        self._grad = torch.autograd.grad(loss, theta)[0]
        self.loss = loss.detach()
        self._breakage = breakage
        if breakage == "hessian":  # one symmetric pair of entries off by 1e-9 ||H||
            i, j = 0, self.num_params - 1
            bump = 1e-9 * float(self._D.abs().max())
            self._D[i, j] += bump
            self._D[j, i] += bump if i != j else 0.0

    def gradient(self):
        return self._grad * (1 + 1e-9) if self._breakage == "gradient" else self._grad

    def matvec(self, v):
        return self._D @ v

    __matmul__ = matvec

    def dense(self):
        return self._D.clone()

    def factorize(self, damping, method="auto"):
        M = self._D + damping * torch.eye(self.num_params, dtype=torch.float64)
        return _DenseFactorization(M, damping, self._breakage)


_CHECKER_SEEDS = range(12)


def _small_chain(seed):
    return random_chain(seed, max_depth=4, max_width=6)


def test_checker_passes_a_correct_dense_implementation():
    """A right answer by other means (dense LU, ``torch.autograd.functional.hessian``) passes."""
    for seed in _CHECKER_SEEDS:
        report = check_contract(_small_chain(seed), make_hessian=_DenseHessian)
        require_contract(report)


@pytest.mark.parametrize(
    "breakage", ["hessian", "gradient", "solve", "report", "logdet", "inertia"]
)
def test_checker_catches_wrong_answers(breakage):
    """Each kind of silent wrong answer is reported on at least one chain (the checks can fail)."""
    caught = 0
    for seed in _CHECKER_SEEDS:
        report = check_contract(
            _small_chain(seed), make_hessian=lambda c: _DenseHessian(c, breakage)
        )
        caught += bool(report.violations)
    assert caught > 0, f"a broken {breakage} went unnoticed on all {len(_CHECKER_SEEDS)} chains"
    if breakage in ("hessian", "gradient", "solve"):
        # these are wrong on every chain, far outside every tolerance
        assert caught >= len(_CHECKER_SEEDS) - 2, (breakage, caught)


def test_activations_table_unchanged():
    """Other tests rely on ``ACTIVATIONS`` keys; the generator draws from the same table."""
    assert {"tanh", "sigmoid", "softplus", "gelu", "silu", "relu", "leakyrelu", "identity"} <= set(
        ACTIVATIONS
    )
    assert all(math.isfinite(d) for d in DAMPINGS)
