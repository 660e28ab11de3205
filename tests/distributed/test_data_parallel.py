"""Data-parallel curvature on 2 and 3 gloo processes against one process on the concatenated
batch (float64, random chains of the shared generator), and the failure cases."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist
from _chains import random_chain
from _launch import launch
from torch import nn

import hessinv
from hessinv.distributed import DataParallelGGN, DataParallelHessian, data_parallel
from hessinv.errors import DistributedError, MemoryBudgetError, SingularMatrixError

TOL = 1e-12  # relative, float64: sums over ranks differ from one sum by rounding only


def _shards(T: int, world: int, seed: int) -> list[int]:
    """Uneven positive shard sizes summing to ``T``."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, T), world - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, T], strict=True)]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / max(float(torch.linalg.norm(ref)), 1e-300))


def _cond(R, damping: float) -> float:
    e = torch.linalg.eigvalsh(R.dense()) + damping
    return float(e.abs().max() / e.abs().min().clamp_min(1e-300))


def _same_on_every_rank(x: torch.Tensor) -> None:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), "ranks got different results"


def _check_chain(rank: int, world: int, seed: int) -> None:
    rc = random_chain(seed, max_batch=9)
    T = rc.inputs.shape[0]
    sizes = _shards(T, world, seed)
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    where = f"{rc.description} | shards {sizes}"
    for cls, single in (
        (DataParallelHessian, hessinv.ChainHessian),
        (DataParallelGGN, hessinv.ChainGGN),
    ):
        kw = {"params": rc.params, "oracle": rc.oracle}
        C = cls(rc.model, rc.loss_fn, rc.inputs[rows], rc.targets[rows], **kw)
        R = single(rc.model, rc.loss_fn, rc.inputs, rc.targets, **kw)
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(R.num_params, 2, generator=gen, dtype=torch.float64)
        assert abs(float(C.loss - R.loss)) <= TOL * abs(float(R.loss)) + 1e-300, where
        checks = {
            "gradient": (C.gradient(), R.gradient()),
            "product": (C @ v, R @ v),
            "diagonal": (hessinv.flatten(C.diagonal()), hessinv.flatten(R.diagonal())),
            "trace": (C.trace().reshape(1), R.trace().reshape(1)),
            "diagonal block": (C.diagonal_blocks([0])[0], R.diagonal_blocks([0])[0]),
        }
        for name, (x, ref) in checks.items():
            assert _rel(x, ref) <= TOL, f"{cls.__name__} {name}: {_rel(x, ref):.2e}\n{where}"
            _same_on_every_rank(x)
        ritz, ref_ritz = C.spectrum_estimate(6), R.spectrum_estimate(6)
        scale = max(abs(ref_ritz[0]), abs(ref_ritz[1]), 1e-300)
        assert max(abs(a - b) for a, b in zip(ritz, ref_ritz, strict=True)) <= 1e-10 * scale
        try:
            ref_f = R.factorize(rc.damping)
        except SingularMatrixError:
            with pytest.raises(SingularMatrixError):
                C.factorize(rc.damping)
            continue
        F = C.factorize(rc.damping)
        assert F.inertia() == ref_f.inertia(), where
        # the union's factorization is one process's on the concatenated batch; the Gauss-Newton
        # matrix's distributed output space sums in another order: errors within the contract
        distributed = F.method == "output space (data parallel)"
        assert distributed or F.method == ref_f.method, where
        cond = _cond(R, rc.damping) if distributed else 1.0
        n = R.num_params
        assert abs(float(F.logdet()[1] - ref_f.logdet()[1])) <= TOL * n * cond * (
            1 + abs(float(ref_f.logdet()[1]))
        ), where
        assert float(F.logdet()[0]) == float(ref_f.logdet()[0])
        x = F.solve(v)
        assert F.backward_error <= 1e-12
        assert _rel(x, ref_f.solve(v)) <= 4 * TOL * cond + 1e-15, f"{cls.__name__} solve\n{where}"
        _same_on_every_rank(x)
        if cls is DataParallelGGN and C.output_space_or_none() is not None:
            e, ref_e = C.spectrum(), R.spectrum()
            assert float((e - ref_e).abs().max()) <= 10 * e.numel() * 2.2e-16 * float(
                ref_e.abs().max()
            ), where  # eigenvalues: absolute error about B r u ||G|| (ChainGGN.spectrum)
            _same_on_every_rank(e)


def _chains(rank: int, world: int, seeds: list[int]) -> None:
    for seed in seeds:
        _check_chain(rank, world, seed)


def _seeds(world: int, count: int) -> list[int]:
    out, seed = [], 0
    while len(out) < count:
        if random_chain(seed, max_batch=9).inputs.shape[0] >= world:
            out.append(seed)
        seed += 1
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_random_chains_match_one_process_on_the_concatenated_batch(world):
    launch(world, _chains, _seeds(world, 10 if world == 2 else 6))


# ---------------------------------------------------------------------- global reductions
def _weighted_mean(rank: int, world: int) -> None:
    """Cross-entropy with class weights and ignore_index: the global mean divides by the
    weight sum over every rank's samples, not by a rank count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    X = torch.randn(11, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, -1, 1, 1, 0, 2, -1, 3])
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0]).double(), ignore_index=-1)
    sizes = [2, 9] if world == 2 else [2, 4, 5]
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    for oracle in ("auto", "generic"):
        C = DataParallelGGN(model, loss, X[rows], y[rows], oracle=oracle)
        R = hessinv.ChainGGN(model, loss, X, y, oracle=oracle)
        assert _rel(C.gradient(), R.gradient()) <= TOL
        assert _rel(C.dense(), R.dense()) <= TOL
        assert abs(float(C.loss - R.loss)) <= TOL * float(R.loss)


@pytest.mark.parametrize("world", [2, 3])
def test_weighted_mean_losses_reduce_over_the_global_batch(world):
    launch(world, _weighted_mean)


def _traffic(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    G = DataParallelGGN(model, nn.MSELoss(), X, y)
    n = G.num_params
    before = G.comm.traffic["product"]
    G @ torch.ones(n, 3, dtype=torch.float64)
    assert G.comm.traffic["product"] - before == 2 * (world - 1) * n * 3 * 8 // world
    head = G.comm.traffic[f"building {type(G).__name__} (the loss head)"]
    assert head == (world - 1) * 3 * (2 + 2) * 8  # outputs and targets, 3 rows of 2 each


def test_one_all_reduce_per_product_and_its_bytes():
    launch(3, _traffic)


# ---------------------------------------------------------------------- optimizers
def _optimizers(rank: int, world: int) -> None:
    sizes = [4, 9] if world == 2 else [3, 4, 6]
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])

    def problem():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        return model, torch.randn(13, 3, dtype=torch.float64), torch.randint(0, 3, (13,))

    for make in (
        lambda m, **kw: hessinv.DampedNewton(m, nn.CrossEntropyLoss(), curvature="ggn", **kw),
        lambda m, **kw: hessinv.TrustRegionNewton(m, nn.CrossEntropyLoss(), radius=0.5, **kw),
    ):
        model, X, y = problem()
        ref_model, _, _ = problem()
        opt = make(model, process_group=dist.group.WORLD)
        ref = make(ref_model)
        for _ in range(3):
            f, f_ref = opt.step(X[rows], y[rows]), ref.step(X, y)
            assert abs(f - f_ref) <= TOL * abs(f_ref)
        x, x_ref = (
            hessinv.flatten(dict(model.named_parameters())),
            hessinv.flatten(dict(ref_model.named_parameters())),
        )
        assert _rel(x.detach(), x_ref.detach()) <= 1e-11
        _same_on_every_rank(x.detach())
    # the preconditioner: same factorization on every rank, that of the union
    model, X, y = problem()
    P = hessinv.CurvaturePreconditioner(
        model, nn.CrossEntropyLoss(), damping=0.1, process_group=dist.group.WORLD
    )
    P.update(X[rows], y[rows])
    R = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y)
    g = R.gradient()
    assert _rel(P.factorization.solve(g), R.solve(g, 0.1)) <= TOL


@pytest.mark.parametrize("world", [2, 3])
def test_optimizers_step_as_one_process_on_the_union(world):
    launch(world, _optimizers)


# ---------------------------------------------------------------------- failures
def _small(width=4, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    return model, X, y


def _disagree(rank: int, world: int, what: str) -> None:
    model, X, y = _small(width=5 if (what == "structure" and rank == 1) else 4)
    if what == "values" and rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-6
    if what == "inputs" and rank == 1:
        X = torch.randn(4, 2, 3, dtype=torch.float64)
    start = time.monotonic()
    with pytest.raises(ValueError, match=what.replace("structure", "model structure")):
        DataParallelGGN(model, nn.CrossEntropyLoss(), X, y)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("what", ["structure", "values", "inputs"])
def test_ranks_that_disagree_are_refused_on_every_rank(what):
    launch(2, _disagree, what)


def _local_failure(rank: int, world: int) -> None:
    model, X, y = _small()
    if rank == 1:
        X[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            DataParallelHessian(model, nn.CrossEntropyLoss(), X, y)
    else:
        with pytest.raises(DistributedError, match=r"rank\(s\) \[1\] failed") as info:
            DataParallelHessian(model, nn.CrossEntropyLoss(), X, y)
        assert info.value.ranks == (1,)


def test_a_rank_that_fails_locally_stops_the_others_at_once():
    launch(2, _local_failure, timeout_s=60)


def _late_failure(rank: int, world: int) -> None:
    """A failure in the backward sweep on one rank only (after the loss head)."""
    model, X, y = _small()
    if rank == 1:
        real = data_parallel.CurvatureOperator.__init__

        def broken(self, *args, **kwargs):
            real(self, *args, **kwargs)
            raise RuntimeError("injected failure after the sweep")

        data_parallel.CurvatureOperator.__init__ = broken
        with pytest.raises(RuntimeError, match="injected"):
            DataParallelHessian(model, nn.CrossEntropyLoss(), X, y)
    else:
        with pytest.raises(DistributedError, match="after the derivative sweep"):
            DataParallelHessian(model, nn.CrossEntropyLoss(), X, y)


def test_a_failure_after_the_loss_head_is_reported_too():
    launch(2, _late_failure, timeout_s=60)


def _dead_rank(rank: int, world: int) -> None:
    model, X, y = _small()
    if rank == 1:
        os._exit(0)  # dies without a word
    with pytest.raises(DistributedError, match="a collective on rank 0"):
        DataParallelGGN(model, nn.CrossEntropyLoss(), X, y)


def test_a_rank_that_dies_gives_an_error_not_a_hang():
    launch(2, _dead_rank, timeout_s=5, deadline_s=60)


def _slow_rank(rank: int, world: int) -> None:
    model, X, y = _small()
    if rank == 1:
        time.sleep(3)
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(DistributedError, match="timeout"):
        DataParallelGGN(model, nn.CrossEntropyLoss(), X, y)
    assert time.monotonic() - start < 3


def test_a_rank_that_does_not_come_times_out_with_an_error():
    launch(2, _slow_rank, timeout_s=1, deadline_s=60)


def _union_memory(rank: int, world: int) -> None:
    model, X, y = _small()
    G = DataParallelGGN(model, nn.CrossEntropyLoss(), X, y)
    real = data_parallel.available_memory
    if rank == 1:
        data_parallel.available_memory = lambda device: 0
    for method in ("output", "riccati"):  # the distributed output space, the union
        with pytest.raises(MemoryBudgetError, match=r"rank\(s\) \[1\]"):
            G.factorize(0.1, method=method)
    data_parallel.available_memory = real
    G2 = DataParallelGGN(model, nn.CrossEntropyLoss(), X, y)
    with torch.no_grad():
        model[0].bias.add_(1.0)
    with pytest.raises(ValueError, match="changed"):  # the union reads the model again
        G2.factorize(0.1, method="riccati")
    G2.factorize(0.1)  # the distributed output space reads nothing: a snapshot


def test_the_union_is_refused_together_when_a_rank_lacks_memory_or_the_model_changed():
    launch(2, _union_memory)


def test_without_an_initialised_group_the_error_says_so():
    model, X, y = _small()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DataParallelGGN(model, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(TypeError, match="process_group"):
        hessinv.DampedNewton(model, nn.MSELoss(), curvature=lambda *a: None, process_group=1)
