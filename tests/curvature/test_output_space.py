"""The Gauss-Newton matrix through its output space (docs/algorithm.md section 14) against
an independent dense ``J^T A J`` (``_autograd_reference.autograd_ggn``: autograd only).

Bounds (float64, u = 2^-53; ``dG`` the reference's bound on ``||G_computed - G||``, ``K`` its
accumulation length, ``M = G + eps I``, ``cond = cond(M)``):

* solves: the contract's backward error ``<= 1e-12`` (reported, and measured against the
  dense ``M`` up to ``dG / ||M|| + K u``); forward error ``<= 2 SAFETY cond eta``;
* ``log|det|``: ``SAFETY n cond eta + K u sum |log|lambda||``; sign and inertia exact when
  ``min |lambda(M)| > 1e-10 ||M||`` (and ``> 10 dG``);
* inverse diagonal, entry ``j`` relative: ``SAFETY (B r u cond(K) q_j / (1 - q_j) +
  cond^2 (2 dG / ||M|| + K u))`` -- Woodbury's cancellation in ``1 - q_j`` (section 14) plus
  the first-order perturbation of ``M^-1`` by both evaluations' errors;
* eigenvalues: ``2 dG + SAFETY B r u ||G||`` absolutely (Weyl, backward-stable ``eigh``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _autograd_reference import UNIT_ROUNDOFF, autograd_ggn, backward_error
from _chains import random_chain
from torch import nn

import hessinv
from hessinv.errors import AccuracyWarning, MemoryBudgetError, SingularMatrixError
from hessinv.tools import problems

SAFETY = 2.0
BOUND = 1e-12
GAP = 1e-10


def _ggn(chain, **kw):
    return hessinv.ChainGGN(
        chain.model,
        chain.loss_fn,
        chain.inputs,
        chain.targets,
        params=chain.params,
        oracle=chain.oracle,
        **kw,
    )


def check_output_space(G: hessinv.ChainGGN, ref, damping: float, seed: int = 0) -> list[str]:
    """Everything the output-space route gives, against the dense reference; the list of
    violations (empty when all is within the bounds above)."""
    bad: list[str] = []
    D = ref.ggn
    n = D.shape[0]
    K = G.output_space().rows
    eye = torch.eye(n, dtype=torch.float64)
    M = D + damping * eye
    ev = torch.linalg.eigvalsh(M)
    norm_M, sigma_min = float(ev.abs().max()), float(ev.abs().min())
    cond = norm_M / sigma_min if sigma_min > 0 else math.inf
    acc = 2 * n * UNIT_ROUNDOFF + 2 * ref.error / max(norm_M, 1e-300)
    gap_ok = sigma_min > max(GAP * norm_M, 10 * ref.error)
    try:
        F = G.factorize(damping, method="output")
    except SingularMatrixError as err:
        if gap_ok:
            bad.append(f"SingularMatrixError with min |eig| {sigma_min:.2e}: {err}")
        elif "G + " not in str(err):
            bad.append(f"message does not name G: {err}")
        return bad
    if F.method not in ("output space", "riccati"):
        bad.append(f"method {F.method!r}")
    gen = torch.Generator().manual_seed(seed)
    for g in (torch.randn(n, 3, generator=gen, dtype=torch.float64), G.gradient()):
        if float(g.norm()) == 0:
            continue
        x = F.solve(g)
        eta = backward_error(M, x, g, norm_M)
        if not F.backward_error <= BOUND:
            bad.append(f"reported backward error {F.backward_error:.2e}")
        if not eta <= BOUND + acc:
            bad.append(f"measured backward error {eta:.2e} > {BOUND + acc:.2e}")
        c_eta = cond * (BOUND + acc)
        if c_eta < 0.5:
            ref_x = torch.linalg.solve(M, g)
            fwd = float(torch.linalg.norm(x - ref_x) / torch.linalg.norm(ref_x))
            if not fwd <= SAFETY * 2 * c_eta / (1 - c_eta):
                bad.append(f"forward error {fwd:.2e}, cond {cond:.2e}")
    if gap_ok:
        expected = (int((ev > 0).sum()), int((ev < 0).sum()), 0)
        if F.inertia() != expected:
            bad.append(f"inertia {F.inertia()} != {expected}")
        sign, logabsdet = F.logdet()
        c_eta = cond * (BOUND + acc)
        tol = (
            (SAFETY * n * c_eta / (1 - c_eta) if c_eta < 0.5 else math.inf)
            + ref.error * 0
            + 100 * UNIT_ROUNDOFF * float(torch.log(ev.abs()).abs().sum())
        )
        if float(sign) != (-1) ** expected[1]:
            bad.append(f"logdet sign {float(sign)}")
        want = float(torch.log(ev.abs()).sum())
        if not abs(float(logabsdet) - want) <= tol:
            bad.append(f"log|det| {float(logabsdet)!r} vs {want!r} (tol {tol:.1e})")
    if damping > 0 and gap_ok:
        inv = torch.linalg.inv(M).diagonal()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = hessinv.flatten(F.inverse_diagonal())
        warned = any(issubclass(w.category, AccuracyWarning) for w in caught)
        q = 1 - damping * inv
        e = torch.linalg.eigvalsh(G.output_space().gram())
        cond_K = (float(e.max()) + damping) / (max(float(e.min()), 0.0) + damping)
        lever = float((q / (1 - q)).abs().max())
        tol = SAFETY * (K * UNIT_ROUNDOFF * cond_K * max(lever, 1.0) + cond**2 * acc)
        rel = float(((got - inv) / inv).abs().max())
        if not rel <= tol:
            bad.append(f"inverse diagonal relative error {rel:.2e} > {tol:.2e}")
        if rel > 1e-8 and not warned:  # no silent loss of accuracy
            bad.append(f"inverse diagonal relative error {rel:.2e} without an AccuracyWarning")
    values = G.spectrum()
    m = min(n, K)
    top = torch.linalg.eigvalsh(D)[n - m :]
    tol = 2 * ref.error + SAFETY * K * UNIT_ROUNDOFF * float(top.abs().max() if m else 0)
    if values.shape != (m,) or not float((values - top).abs().max() if m else 0) <= tol:
        bad.append(f"spectrum off by {float((values - top).abs().max()):.2e} (tol {tol:.1e})")
    return bad


@pytest.mark.parametrize("seed", range(40))
def test_output_space_against_dense_ggn(seed):
    chain = random_chain(seed + 7000)
    ref = autograd_ggn(chain.model, chain.loss_fn, chain.inputs, chain.targets, chain.params)
    G = _ggn(chain)
    assert G.param_names == ref.names
    bad = check_output_space(G, ref, chain.damping, seed)
    assert not bad, chain.description + "\n  " + "\n  ".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
def test_output_space_property_sweep(block):
    failures = []
    for seed in range(block * 60, (block + 1) * 60):
        chain = random_chain(seed + 8000)
        ref = autograd_ggn(chain.model, chain.loss_fn, chain.inputs, chain.targets, chain.params)
        bad = check_output_space(_ggn(chain), ref, chain.damping, seed)
        if bad:
            failures.append(chain.description + "\n  " + "\n  ".join(bad))
    assert not failures, "\n".join(failures)


def _head_cases():
    gen = torch.Generator().manual_seed(5)
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    yb = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(6, 3, generator=gen, dtype=torch.float64), 1)
    return [
        ("ce_weight", nn.CrossEntropyLoss(weight=w), y),
        ("ce_smooth_sum", nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"), y),
        ("ce_weight_smooth", nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), y),
        ("ce_probabilities", nn.CrossEntropyLoss(), q),
        ("ce_ignore", nn.CrossEntropyLoss(ignore_index=1), y),
        ("bce_logits", nn.BCEWithLogitsLoss(pos_weight=w), yb),
        ("mse_sum", nn.MSELoss(reduction="sum"), yb),
        ("huber_generic", nn.HuberLoss(delta=0.5), yb),
    ]


@pytest.mark.parametrize(
    "name,loss_fn,targets", _head_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
@pytest.mark.parametrize("damping", [1e-4, 0.5])
def test_output_space_losses(name, loss_fn, targets, damping):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 3)
    ).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    ref = autograd_ggn(model, loss_fn, X, targets)
    G = hessinv.ChainGGN(model, loss_fn, X, targets)
    assert float((G.dense() - ref.ggn).abs().max()) <= 2 * ref.error + 1e-15
    bad = check_output_space(G, ref, damping)
    assert not bad, name + "\n  " + "\n  ".join(bad)


def test_nll_after_log_softmax_is_the_cross_entropy_ggn():
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    G = hessinv.ChainGGN(nn.Sequential(*lin, nn.LogSoftmax(dim=1)), nn.NLLLoss(), X, y)
    ref = autograd_ggn(lin, nn.CrossEntropyLoss(), X, y)
    assert float((G.dense() - ref.ggn).abs().max()) <= 2 * ref.error + 1e-15
    assert not check_output_space(G, ref, 1e-3)


def test_data_loader_and_parameter_subsets():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)
    ).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
    loader = [(X[:4], y[:4]), (X[4:], y[4:])]
    for params in (None, ["0.weight", "4.bias"], ["2.bias"], ["2.weight"]):
        G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), data=loader, params=params)
        ref = autograd_ggn(model, nn.CrossEntropyLoss(), X, y, params)
        assert G.param_names == ref.names
        bad = check_output_space(G, ref, 1e-3)
        assert not bad, (params, bad)


def test_float32_meets_its_bound():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y)
    F = G.factorize(1e-2, method="output")
    x = F.solve(G.gradient())
    assert x.dtype == torch.float32 and F.backward_error <= 1e-6
    G64 = hessinv.ChainGGN(model.double(), nn.CrossEntropyLoss(), X.double(), y)
    x64 = G64.solve(G64.gradient(), 1e-2)
    cond = float(
        torch.linalg.cond(G64.dense() + 1e-2 * torch.eye(G64.num_params, dtype=torch.float64))
    )
    assert float((x.double() - x64).norm() / x64.norm()) <= 4 * cond * 1e-6


def test_many_right_hand_sides_in_one_pass():
    chain = random_chain(11)
    G = _ggn(chain)
    F = G.factorize(0.1, method="output")
    V = torch.randn(G.num_params, 50, dtype=torch.float64)
    X = F.solve(V)
    cols = torch.stack([F.solve(V[:, j]) for j in range(0, 50, 7)], 1)
    assert float((X[:, ::7] - cols).abs().max()) <= 1e-12 * float(cols.abs().max())


def test_auto_route_and_memory():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y)
    est, cost = G.memory_estimate(), G.cost_estimate()
    assert {"output", "riccati", "dense", "tridiagonal"} <= set(est)
    assert set(cost) == {"output", "riccati", "dense"}
    F = G.factorize(1e-3)
    assert (
        F.method
        == {"output": "output space", "riccati": "riccati", "dense": "dense"}[
            min(cost, key=cost.get)
        ]
    )
    with pytest.raises(MemoryBudgetError, match=r"G \+ 0.001 I.*output: .*riccati: .*dense: "):
        G.factorize(1e-3, max_memory=1)
    H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    assert "output" not in H.memory_estimate() and "output" not in H.cost_estimate()
    with pytest.raises(ValueError, match="not available for ChainHessian"):
        H.factorize(1e-3, method="output")
    with pytest.raises(NotImplementedError, match="method='output'"):
        G.factorize(1e-3, method="riccati").inverse_diagonal()


def test_zero_damping_is_singular_and_names_G():
    chain = random_chain(3)
    G = _ggn(chain)
    assert G.num_params > G.output_space().rows
    with pytest.raises(SingularMatrixError, match=r"G \+ 0 I"):
        G.factorize(0.0, method="output")
    with pytest.raises(SingularMatrixError, match=r"G \+ 0 I"):
        G.factorize(0.0)


def test_tiny_damping_keeps_the_contract():
    """Woodbury loses log10(||U U^T|| / lam) digits; refinement restores them, and where it
    cannot the factorization hardens into the Riccati route (docs/algorithm.md section 14)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    G = hessinv.ChainGGN(model, nn.MSELoss(), X, y)
    ref = autograd_ggn(model, nn.MSELoss(), X, y)
    top = float(torch.linalg.eigvalsh(ref.ggn).max())
    gen = torch.Generator().manual_seed(0)
    methods = []
    for rel in (1e-6, 1e-10, 1e-13, 1e-15, 1e-16, 1e-17):
        F = G.factorize(rel * top, method="output")
        # in the range of U^T, where x is not dominated by the null directions' g / lam
        g = G @ torch.randn(G.num_params, 2, generator=gen, dtype=torch.float64)
        F.solve(g)
        assert F.backward_error <= BOUND, (rel, F.method, F.backward_error)
        methods.append(F.method)
        if rel == 1e-10:
            assert F.method == "output space" and F.refinement_steps >= 1
    # near u ||G||, refinement cannot, and the Riccati route takes over
    assert methods[-1].startswith("riccati"), methods


def test_spectrum_and_eigenvectors():
    chain = random_chain(21)
    G = _ggn(chain)
    ref = autograd_ggn(chain.model, chain.loss_fn, chain.inputs, chain.targets, chain.params)
    values, vectors = G.spectrum(eigenvectors=3)
    assert vectors.shape == (G.num_params, 3)
    top = values[-3:]
    resid = ref.ggn @ vectors - vectors * top
    assert float(resid.abs().max()) <= 1e-11 * float(top.max())
    assert float((vectors.T @ vectors - torch.eye(3, dtype=torch.float64)).abs().max()) <= 1e-10
    with pytest.raises(ValueError, match="eigenvectors"):
        G.spectrum(eigenvectors=-1)


def test_gram_blocks_and_solve_on_a_larger_batch():
    """B r >= 256: the Gram terms of Linear stages are accumulated in block rows up to the
    diagonal and mirrored (docs/algorithm.md section 14); against ``U U^T`` from the dense
    Jacobian and the loss factor, and the solve against dense."""
    from hessinv.curvature import output_space

    p = problems.make_problem(4, 12, 40, d_in=5, d_out=10, init="fan_in", seed=3)
    G = hessinv.ChainGGN(*p)
    space = G.output_space()
    assert space.rows >= output_space.GRAM_BLOCKS_FROM
    names = G.param_names
    params = dict(p.model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def outputs(theta):
        parts = dict(
            zip(
                names,
                [t.reshape(sh) for t, sh in zip(theta.split(sizes), shapes, strict=True)],
                strict=True,
            )
        )
        return torch.func.functional_call(p.model, parts, (p.inputs,))

    J = torch.func.jacrev(outputs)(flat)  # (B, K, n)
    U = torch.einsum("brk,bkn->brn", space.factor, J).reshape(space.rows, -1)
    ref = U @ U.T
    assert float((space.gram() - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    ggn = autograd_ggn(*p)
    bad = check_output_space(G, ggn, 1e-3)
    assert not bad, bad


@pytest.mark.parametrize("damping", [1e-8, 1e-6, -1e-8])
def test_logdet_with_more_rows_than_parameters(damping):
    """B r = 18 > n = 9: U U^T has 9 eigenvalues that are zero exactly and at rounding level
    in floating point, each adding ~ eps / lam to log det K (1e-7 at lam = 1e-8, found by the
    slow sweep, seeds 8167 and 8325). G itself is well conditioned, so the dense logdet is
    accurate to rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3)).double()
    X, y = 1.5 * torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    G = hessinv.ChainGGN(model, nn.MSELoss(reduction="sum"), X, y, progress=False)
    assert G.output_space().rows > G.num_params
    M = G.dense() + damping * torch.eye(G.num_params, dtype=torch.float64)
    want_sign, want = torch.linalg.slogdet(M)
    sign, got = G.factorize(damping, method="output").logdet()
    assert float(sign) == float(want_sign)
    assert abs(float(got) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
