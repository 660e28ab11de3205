"""Stage-wise (Riccati) factorization: solve, logdet, inertia, fallback (docs/algorithm.md section
5)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from _chains import ACTIVATIONS, make_problem, random_chain, relative_error, solve_tolerance

import hessinv
from hessinv.linalg import riccati


def _dense(problem):
    return hessinv.dense_hessian(*problem)


def _eig_counts(M):
    ev = torch.linalg.eigvalsh(M)
    return int((ev > 0).sum()), int((ev < 0).sum()), 0


@pytest.mark.parametrize("seed", range(6))
def test_logdet_inertia_solve_against_dense(seed):
    rng = random.Random(seed)
    problem = make_problem(
        depth=rng.randint(2, 6),
        width=rng.randint(2, 5),
        batch=rng.randint(1, 5),
        activation=rng.choice(sorted(ACTIVATIONS)),
        loss=rng.choice(["ce", "mse", "mse_sum"]),
        seed=seed,
    )
    H = hessinv.ChainHessian(*problem)
    D = _dense(problem)
    n = H.num_params
    indefinite = bool(torch.linalg.eigvalsh(D).min() < -1e-3)
    for eps in (1e-4, 1e-2, 1.0, 10.0, float(torch.linalg.eigvalsh(D).min().abs()) + 0.5):
        M = D + eps * torch.eye(n, dtype=torch.float64)
        F = H.factorize(eps, method="riccati")
        sign, logabsdet = F.logdet()
        ref_sign, ref_logabsdet = torch.linalg.slogdet(M)
        assert sign == ref_sign
        # First order, log|det(M + E)| - log|det M| = tr(M^-1 E) <= n cond ||E|| / ||M||, and
        # the factorization is exact for some ||E|| <= beta ||M|| (beta = F.certificate,
        # measured); the dense slogdet carries its own n cond u. Factor 10 for the first order.
        cond = float(torch.linalg.cond(M))
        beta = F.certificate
        tol = 10 * n * cond * (beta + 2.2e-16)
        assert abs(float(logabsdet - ref_logabsdet)) < tol
        assert F.inertia() == _eig_counts(M)
        assert F.is_positive_definite == (F.inertia()[1] == 0)
        if eps == 1e-4 and indefinite:
            assert F.inertia()[1] > 0
        g = torch.randn(n, 3, dtype=torch.float64)
        ref = torch.linalg.solve(M, g)
        assert relative_error(F.solve(g), ref) < solve_tolerance(M)
        # Without refinement: forward error <= 2 cond beta (beta measured for this solve), plus
        # the dense reference's cond n u; factor 2 for the first-order bound.
        x0 = F.solve(g, refine=0)
        assert relative_error(x0, ref) < 4 * cond * F.backward_error + 2 * cond * n * 2.2e-16


def test_spectrum_slicing_with_negative_damping():
    problem = make_problem(depth=4, width=4, batch=4, seed=21)
    H = hessinv.ChainHessian(*problem)
    ev = torch.linalg.eigvalsh(_dense(problem))
    for sigma in (-0.5, -0.01, 0.01, 0.3, 2.0):  # 0 is exactly singular (softmax)
        below = int((ev < sigma).sum())
        assert H.factorize(-sigma, method="riccati").inertia()[1] == below


def test_multi_rhs_and_reuse():
    problem = make_problem(depth=5, width=4, batch=3, loss="mse", seed=22)
    H = hessinv.ChainHessian(*problem)
    F = H.factorize(0.1, method="riccati")
    G = torch.randn(H.num_params, 6, dtype=torch.float64)
    X = F.solve(G)
    M = _dense(problem) + 0.1 * torch.eye(H.num_params, dtype=torch.float64)
    tol = solve_tolerance(M)  # columns may take different refinement steps alone
    for j in range(6):
        assert relative_error(F.solve(G[:, j]), X[:, j]) < 2 * tol
    assert relative_error(X, torch.linalg.solve(M, G)) < tol


@pytest.mark.parametrize("eps", [1e-4, 1e-2, 1.0, 10.0])
def test_riccati_agrees_with_tridiagonal(eps):
    problem = make_problem(depth=6, width=3, batch=4, activation="silu", seed=23)
    H = hessinv.ChainHessian(*problem)
    g = torch.randn(H.num_params, 2, dtype=torch.float64)
    ric, tri = H.factorize(eps, method="riccati"), H.factorize(eps, method="tridiagonal")
    assert torch.allclose(torch.stack(ric.logdet()), torch.stack(tri.logdet()), rtol=1e-10)
    a = H.solve(g, damping=eps, method="riccati")
    b = H.solve(g, damping=eps, method="tridiagonal")
    M = _dense(problem) + eps * torch.eye(H.num_params, dtype=torch.float64)
    assert relative_error(a, b) < 2 * solve_tolerance(M)


def test_singular_last_schur_complement_is_handled_by_delayed_pivots():
    """G_L = H_LL + eps I singular while H + eps I is not: pivots are delayed, inertia stays
    exact."""
    problem = make_problem(depth=2, width=3, batch=6, loss="mse", seed=24)
    H = hessinv.ChainHessian(*problem)
    H_LL = H.diagonal_blocks([1])[0]  # G_L = H_LL + eps I (section 5, V_{L+1} = S)
    eps = -float(torch.linalg.eigvalsh(H_LL)[-1])  # makes G_L singular
    D = _dense(problem)
    M = D + eps * torch.eye(H.num_params, dtype=torch.float64)
    assert float(torch.linalg.svdvals(M).min()) > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F = H.factorize(eps, method="riccati")
        g = torch.randn(H.num_params, dtype=torch.float64)
        x = F.solve(g)
        assert F.inertia() == _eig_counts(M)
    assert F.n_delayed > 0 and "delayed" in F.method
    assert relative_error(x, torch.linalg.solve(M, g)) < solve_tolerance(M)
    assert F.backward_error <= 1e-12
    sign, logabsdet = F.logdet()
    ref_sign, ref_logabsdet = torch.linalg.slogdet(M)
    assert sign == ref_sign and abs(float(logabsdet - ref_logabsdet)) < 1e-9


def test_front_kinds_and_bad_damping():
    problem = make_problem(depth=3, width=4, batch=3, seed=25)
    H = hessinv.ChainHessian(*problem)
    assert H.factorize(100.0).is_positive_definite
    F = H.factorize(1e-3, method="riccati")
    assert not F.is_positive_definite
    assert {f.front.kind for f in F._factors.factors} <= {"cholesky", "ldl", "eigen"}
    with pytest.raises(TypeError):
        H.factorize("big")
    with pytest.raises(ValueError):
        H.factorize(float("nan"))


def test_positive_definite_shift_brackets_smallest_eigenvalue():
    problem = make_problem(depth=4, width=4, batch=4, seed=26)
    H = hessinv.ChainHessian(*problem)
    lam_min = float(torch.linalg.eigvalsh(_dense(problem))[0])
    assert lam_min < 0
    for damping in (0.0, 1e-2):
        s = H.positive_definite_shift(damping, rel_tol=1e-3)
        assert -lam_min <= damping + s <= -lam_min + 1e-3 * abs(lam_min) + 1e-12
    assert H.positive_definite_shift(-lam_min + 0.1) == 0.0
    with pytest.raises(ValueError):
        H.positive_definite_shift(rel_tol=2.0)


def test_checking_in_runs_gives_the_same_factors(monkeypatch):
    """``check_every > 1`` (docs/algorithm.md section 13): runs of Cholesky fronts tested on
    the device, redone stage by stage when a test fails, and ``speculative`` fronts (both
    tests read at once) give exactly the factors of stage-by-stage checking -- on random
    chains, definite and indefinite."""
    runs = {True: 0, False: 0}
    optimistic_chunk = riccati._optimistic_chunk

    def counted(*args):
        done = optimistic_chunk(*args)
        runs[done is not None] += 1
        return done

    monkeypatch.setattr(riccati, "_optimistic_chunk", counted)
    for seed in range(40):
        chain = random_chain(seed, max_depth=12)
        H = hessinv.ChainHessian(
            chain.model,
            chain.loss_fn,
            chain.inputs,
            chain.targets,
            params=chain.params,
            oracle=chain.oracle,
            progress=False,
        )
        stages, S = H.stage_derivatives(), H.loss_hessian_blocks()
        g = [torch.randn(d.num_params, 2, dtype=torch.float64) for d in stages]
        for eps in (1e-8, 1e-2, 1.0, -0.1):
            outcome = []
            for check_every, speculative in ((1, False), (3, False), (1, True)):
                try:
                    rf = riccati.riccati_factorize(
                        stages,
                        S,
                        eps,
                        check_every=check_every,
                        speculative=speculative,
                        progress=False,
                    )
                except hessinv.SingularMatrixError as err:
                    outcome.append(str(err))
                    continue
                outcome.append(
                    (
                        rf.inertia,
                        float(rf.sign),
                        float(rf.logabsdet),
                        rf.n_delayed,
                        riccati.riccati_solve(stages, rf, g),
                    )
                )
            a = outcome[0]
            for b in outcome[1:]:
                assert type(a) is type(b), (seed, eps)
                if isinstance(a, str):
                    assert a == b
                    continue
                assert a[:4] == b[:4], (seed, eps)
                assert all(torch.equal(x, y) for x, y in zip(a[4], b[4], strict=True)), (seed, eps)
    assert runs[True] > 20 and runs[False] > 5  # both paths were taken


def test_symmetrize_in_place_is_exactly_symmetric():
    from hessinv.linalg.fronts import symmetrize_

    for n in (0, 1, 2, 7):
        M = torch.randn(n, n, dtype=torch.float64)
        expected = (M + M.T) / 2
        out = symmetrize_(M)
        assert out.data_ptr() == M.data_ptr() and torch.equal(out, out.T)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("a", [5, 383, 384, 700, 1030])  # one, two and four blocks
def test_symmetric_product_equals_the_full_product(a):
    from hessinv.linalg.fronts import symmetric_product

    gen = torch.Generator().manual_seed(a)
    A = torch.randn(37, a, dtype=torch.float64, generator=gen)
    D = torch.randn(37, 37, dtype=torch.float64, generator=gen)
    for B in (A, (D + D.T) @ A):
        full = A.T @ B
        out = symmetric_product(A, B)
        bound = 37 * 2.2e-16 * float((A.abs().T @ B.abs()).max())
        assert float((out - full).abs().max()) <= bound
