"""Host-device synchronisations (hessinv.tools.syncs): counted, and not growing with depth where
the algorithm does not need them (docs/algorithm.md section 13).

These are counts of scalar reads, exact on any device, not timings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessinv
from hessinv.linalg import riccati
from hessinv.tools.syncs import HostSyncCounter


def test_counter_counts_scalar_reads_and_nothing_else():
    with HostSyncCounter() as syncs:
        x = torch.arange(6.0).reshape(2, 3)
        y = (x @ x.T).exp()  # kernels only
        assert bool(y.sum() > 0) and float(y[0, 0] - y[0, 0]) == 0.0
        assert len(y.diagonal().tolist()) == 2  # one transfer
    assert syncs.count == 3 and sum(syncs.sites.values()) == 3
    assert all(site.startswith(__file__) for site in syncs.sites)


def _mlp(depth, width=8, batch=32, seed=0):
    """tanh MLP whose stage inputs have rank min(batch, width + 1) (no collapse)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [4] + [width] * (depth - 1) + [3]
    layers = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        lin = nn.Linear(d_in, d_out).double()
        with torch.no_grad():
            lin.weight.copy_(
                torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * 1.5 / d_in**0.5
            )
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    X = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=gen)
    return model, X, y


def _counts(depth, batch):
    """Host reads of: building the Hessian, factorizing the Gauss-Newton matrix (positive
    definite fronts), a second solve with the kept factorization."""
    model, X, y = _mlp(depth, batch=batch)
    with HostSyncCounter() as build:
        H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y, progress=False)
    compressed = [d.complement is not None for d in H.stage_derivatives()[1:-1]]
    assert all(compressed) if batch < 8 else not any(compressed)  # the premise
    G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y, progress=False)
    with HostSyncCounter() as factor:
        F = G.factorize(0.1, method="riccati", progress=False)
    assert F.method == "riccati"
    g = torch.randn(G.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    F.solve(g)  # the first solve pays for the one-off norm estimate
    with HostSyncCounter() as solve:
        F.solve(g)
    assert F.refinement_steps == 0
    return build.count, factor.count, solve.count


@pytest.mark.parametrize("batch", [32, 4])  # full basis; compressed stages (section 8)
def test_construction_and_solve_read_the_host_a_fixed_number_of_times(batch):
    shallow, deep = _counts(4, batch), _counts(24, batch)
    assert deep[0] == shallow[0]  # the derivative sweep: batched over stages
    assert deep[2] == shallow[2]  # a solve with a kept factorization
    # the factorization (Cholesky fronts): its pivot test and its growth test per stage
    assert deep[1] - shallow[1] == 2 * (24 - 4)


@pytest.mark.parametrize("speculative", [False, True])
def test_front_host_reads(speculative):
    """A Cholesky front reads its pivot test, then its growth test (``speculative``: both at
    once); a Bunch-Kaufman front the failed Cholesky's test, its pivot layout and its own two
    tests at once; the inertias stay on the device and are read once at the end. The root
    front has no growth test. Same factors either way."""
    from collections import Counter

    model, X, y = _mlp(12)
    H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y, progress=False)
    stages, S = H.stage_derivatives(), H.loss_hessian_blocks()
    with HostSyncCounter() as syncs:
        rf = riccati.riccati_factorize(stages, S, 1e-3, speculative=speculative, progress=False)
    kinds = Counter(f.front.kind for f in rf.factors)
    assert kinds["ldl"] >= 2 and kinds["eigen"] == 0 and rf.inertia[1] > 0  # the premise
    root_cholesky = rf.factors[0].front.kind == "cholesky"
    per_cholesky = 1 if speculative else 2
    assert syncs.count == (
        per_cholesky * kinds["cholesky"] - (per_cholesky - 1) * root_cholesky + 3 * kinds["ldl"] + 1
    )
    reference = riccati.riccati_factorize(
        stages, S, 1e-3, speculative=not speculative, progress=False
    )
    assert (rf.inertia, rf.n_delayed) == (reference.inertia, reference.n_delayed)
    assert torch.equal(rf.logabsdet, reference.logabsdet)


def test_factorization_checked_in_runs_reads_once_per_run():
    """``check_every = k`` (the default on CUDA): a positive definite factorization reads the
    host once per run of k stages instead of twice per stage."""
    reads = {}
    for depth in (4, 24):
        model, X, y = _mlp(depth)
        G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y, progress=False)
        stages, S = G.stage_derivatives(), G.loss_hessian_blocks()
        with HostSyncCounter() as syncs:
            rf = riccati.riccati_factorize(stages, S, 0.1, check_every=6, progress=False)
        assert rf.inertia == (G.num_params, 0, 0)
        reads[depth] = syncs.count
    assert reads[24] - reads[4] == 4 - 1  # runs over stages 24..2: 23 stages in 4 runs of 6


def test_runs_are_used_where_fronts_are_expected_definite():
    from types import SimpleNamespace

    from hessinv.curvature.solvers import _run_length
    from hessinv.settings import RUN_LENGTH

    def curvature(second_order, device):
        return SimpleNamespace(second_order=second_order, device=torch.device(device))

    assert _run_length(curvature(False, "cuda"), 0.1) == RUN_LENGTH > 1  # GGN, eps > 0, GPU
    assert _run_length(curvature(False, "cuda"), 0.0) == 1  # G may be singular
    assert _run_length(curvature(True, "cuda"), 0.1) == 1  # the Hessian: often indefinite
    assert _run_length(curvature(False, "cpu"), 0.1) == 1  # reads are free on a CPU


def test_kernel_counter_leaves_out_views_and_allocations():
    from hessinv.tools.syncs import KernelCounter

    x = torch.randn(4, 3)
    with KernelCounter() as kernels:
        y = x.reshape(-1)[3:].view(3, 3).T  # views only
        torch.empty(5)
        z = (y @ y).sum()
    assert kernels.count == 2 and dict(kernels.ops) == {"mm": 1, "sum": 1}
    assert float(z) == float((y @ y).sum())


#: operators per stage (kernel launches on a GPU) of a Linear stage, at most: measured
#: 12 / 44 / 16 / 5 with torch 2.13 (docs/algorithm.md section 13); the bounds leave room
#: for another torch's decompositions, not for a per-stage step that could be batched
PER_STAGE = {"build": 14, "factorization": 50, "solve": 19, "product": 6}


def _kernels(depth, batch):
    from hessinv.tools.syncs import KernelCounter

    model, X, y = _mlp(depth, batch=batch)
    with KernelCounter() as build:
        hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y, progress=False)
    G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y, progress=False)
    with KernelCounter() as factor:
        F = G.factorize(0.1, method="riccati", progress=False)
    g = torch.randn(G.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    F.solve(g)
    with KernelCounter() as solve:
        F.solve(g)
    with KernelCounter() as product:
        G @ g
    return {"build": build, "factorization": factor, "solve": solve, "product": product}


@pytest.mark.parametrize("batch", [32, 4])  # full basis; compressed stages (section 8)
def test_operators_per_stage(batch):
    """The per-stage work of each phase is a fixed, small number of operators; the derivative
    sweep makes no SVD per stage (the bases of compressed stages come from one batched SVD per
    shape, section 13)."""
    shallow, deep = _kernels(4, batch), _kernels(24, batch)
    per_stage = {k: (deep[k].count - shallow[k].count) / 20 for k in PER_STAGE}
    assert all(per_stage[k] <= PER_STAGE[k] for k in PER_STAGE), per_stage
    assert deep["build"].ops["_linalg_svd"] == shallow["build"].ops["_linalg_svd"]
