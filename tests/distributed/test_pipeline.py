"""Stage pipeline on 2 and 3 gloo processes against one process on the whole chain (float64,
random chains of the shared generator), and its failure cases."""

from __future__ import annotations

import pytest
import torch
from _chains import random_chain
from _launch import launch
from torch import nn

import hessinv
from hessinv.distributed import PipelineGGN, PipelineHessian, pipeline
from hessinv.distributed.pipeline import balanced_bounds
from hessinv.errors import DistributedError, SingularMatrixError

TOL = 1e-12


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / max(float(torch.linalg.norm(ref)), 1e-300))


def _check_chain(rank: int, world: int, seed: int) -> None:
    rc = random_chain(seed)
    kw = {"params": rc.params, "oracle": rc.oracle}
    for cls, single in ((PipelineHessian, hessinv.ChainHessian), (PipelineGGN, hessinv.ChainGGN)):
        R = single(rc.model, rc.loss_fn, rc.inputs, rc.targets, **kw)
        C = cls(rc.model, rc.loss_fn, rc.inputs, rc.targets, **kw)
        where = f"{cls.__name__} {rc.description} | bounds {C.bounds}"
        assert C.owned == range(C.bounds[rank], C.bounds[rank + 1])
        v = torch.randn(R.num_params, 2, generator=torch.Generator().manual_seed(seed)).double()
        assert abs(float(C.loss - R.loss)) <= TOL * abs(float(R.loss)) + 1e-300, where
        for name, x, ref in (
            ("gradient", C.gradient(), R.gradient()),
            ("product", C @ v, R @ v),
            ("diagonal", hessinv.flatten(C.diagonal()), hessinv.flatten(R.diagonal())),
        ):
            assert _rel(x, ref) <= TOL, f"{name}: {_rel(x, ref):.2e}\n{where}"
        try:
            ref_f = R.factorize(rc.damping, method="riccati")
        except SingularMatrixError:
            with pytest.raises(SingularMatrixError):
                C.factorize(rc.damping)
            continue
        F = C.factorize(rc.damping)
        assert F.inertia() == ref_f.inertia(), where
        sign, logdet = F.logdet()
        ref_sign, ref_logdet = ref_f.logdet()
        assert float(sign) == float(ref_sign)
        assert abs(float(logdet - ref_logdet)) <= TOL * (1 + abs(float(ref_logdet))), where
        x = F.solve(v)
        assert _rel(x, ref_f.solve(v)) <= 4 * TOL * max(1.0, _cond(R, rc.damping)), where
        assert F.backward_error <= 1e-12, where


def _cond(R, damping: float) -> float:
    e = torch.linalg.eigvalsh(R.dense()) + damping
    return float(e.abs().max() / e.abs().min().clamp_min(1e-300))


def _chains(rank: int, world: int, seeds: list[int]) -> None:
    for seed in seeds:
        _check_chain(rank, world, seed)


def _seeds(world: int, count: int) -> list[int]:
    out, seed = [], 0
    while len(out) < count:
        rc = random_chain(seed)
        if (
            len(
                hessinv.ChainGGN(
                    rc.model, rc.loss_fn, rc.inputs, rc.targets, params=rc.params
                ).stage_sizes
            )
            >= world
        ):
            out.append(seed)
        seed += 1
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_random_chains_match_one_process(world):
    launch(world, _chains, _seeds(world, 8 if world == 2 else 5))


def test_balanced_bounds():
    assert balanced_bounds([1, 1, 1, 1], 2) == (0, 2, 4)
    assert balanced_bounds([10, 1, 1, 1], 2) == (0, 1, 4)
    assert balanced_bounds([1, 1, 1, 10], 3) == (0, 1, 2, 4) or balanced_bounds(
        [1, 1, 1, 10], 3
    ) == (0, 2, 3, 4)
    b = balanced_bounds([1.0] * 7, 3)
    assert b[0] == 0 and b[-1] == 7 and all(x < y for x, y in zip(b, b[1:], strict=False))
    with pytest.raises(ValueError, match="at least 3 stages"):
        balanced_bounds([1, 1], 3)


# ---------------------------------------------------------------------- what moves
def _traffic(rank: int, world: int) -> None:
    """Messages of the sizes the module docstring states: ``B h k`` per product message."""
    torch.manual_seed(0)
    B, h, k = 5, 6, 3
    model = nn.Sequential(
        nn.Linear(4, h),
        nn.Tanh(),
        nn.Linear(h, h),
        nn.Tanh(),
        nn.Linear(h, h),
        nn.Tanh(),
        nn.Linear(h, 2),
    ).double()
    X, y = torch.randn(B, 4).double(), torch.randint(0, 2, (B,))
    C = PipelineGGN(model, nn.CrossEntropyLoss(), X, y, bounds=[0, 2, 4])
    n = C.num_params
    header = (4 + 64) * 8
    before = C.comm.traffic["product"]
    C @ torch.ones(n, k, dtype=torch.float64)
    sent = C.comm.traffic["product"] - before
    # one message each way (header + B h k numbers), then one sum of n k numbers and the
    # four status numbers
    assert sent == header + B * h * k * 8 + 2 * (world - 1) * (4 + n * k) * 8 // world
    F = C.factorize(0.1)
    msg = C.comm.traffic["factorization of G + 0.1 I"]
    # rank 1 sends the state V (B h x B h) backward; rank 0 sends nothing but the totals
    sums = 2 * (world - 1) * (4 + 5) * 8 // world
    assert msg == (header + (B * h) ** 2 * 8 if rank == 1 else 0) + sums
    assert F.memory()["factors"] > 0


def test_messages_have_the_stated_sizes():
    launch(2, _traffic)


# ---------------------------------------------------------------------- failures
def _singular(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    X, y = torch.randn(2, 3).double(), torch.randint(0, 2, (2,))
    C = PipelineHessian(model.double(), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(SingularMatrixError, match="singular"):
        C.factorize(0.0)
    assert C.factorize(0.1).inertia()[2] == 0  # the pipeline still works afterwards


def test_a_singular_matrix_raises_on_every_rank():
    launch(2, _singular)


def _local_failure(rank: int, world: int, where: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    bad = 1

    def broken(*args, **kwargs):
        raise RuntimeError(f"injected failure in {where}")

    if rank == bad:
        name = {"sweep": "backward_sweep", "forward": "forward_pass", "product": "ProductSweep"}
        setattr(pipeline, name[where], broken)
    expected = RuntimeError if rank == bad else DistributedError
    match = "injected" if rank == bad else f"rank {bad} failed"
    if where in ("sweep", "forward"):
        with pytest.raises(expected, match=match):
            PipelineHessian(model.double(), nn.CrossEntropyLoss(), X, y)
        return
    C = PipelineHessian(model.double(), nn.CrossEntropyLoss(), X, y)
    with pytest.raises(expected, match=match):
        C @ torch.ones(C.num_params, dtype=torch.float64)
    C2 = None
    if rank == bad:
        pipeline.ProductSweep = hessinv.curvature.products.ProductSweep
    C2 = C @ torch.ones(C.num_params, dtype=torch.float64)  # the next call works again
    assert C2.shape == (C.num_params,)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("where", ["forward", "sweep", "product"])
def test_a_rank_that_fails_stops_every_rank_without_a_hang(world, where):
    launch(world, _local_failure, where, timeout_s=60, deadline_s=60)


def _bad_bounds(rank: int, world: int) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="bounds must be 3 increasing"):
        PipelineGGN(model, nn.CrossEntropyLoss(), X, y, bounds=[0, 2, 2])
    if rank == 1:
        X = X + 1.0  # every rank must pass the same batch
    with pytest.raises(ValueError, match=r"inputs \(rank 0 differs from rank\(s\) \[1\]\)"):
        PipelineGGN(model, nn.CrossEntropyLoss(), X, y)


def test_bad_bounds_and_different_batches_are_refused_on_every_rank():
    launch(2, _bad_bounds)
