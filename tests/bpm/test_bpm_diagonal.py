"""Tests of block_partitioned_matrices.diagonal (named test_bpm_diagonal.py:
tests/curvature/test_diagonal.py
belongs to hessinv's exact Hessian diagonal)."""

import pytest
import torch
from _bpm_helpers import DTYPES, gen, randn, rel_err, rtol

from block_partitioned_matrices import BlockVector, Diagonal, Identity, SingularMatrixError, Zero


def _ragged(dtype, g):
    return Diagonal(
        [
            randn(2, 3, dtype=dtype, g=g),
            Zero(1, 2),
            Identity(2, -1.5),
            randn(3, 1, dtype=dtype, g=g),
        ]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_rectangular_against_dense(dtype):
    g = gen(0)
    A = _ragged(dtype, g)
    assert A.shape == (8, 8) and A.row_sizes == (2, 1, 2, 3) and A.col_sizes == (3, 2, 2, 1)
    Ad = A.to_dense()
    assert Ad.dtype == dtype
    assert torch.equal(Ad[:2, :3], A.blocks[0])
    assert torch.equal(Ad[3:5, 5:7], -1.5 * torch.eye(2, dtype=dtype))
    assert Ad[:2, 3:].abs().sum() == 0 and Ad[2].abs().sum() == 0
    for shape in ((8,), (8, 5)):
        x = randn(*shape, dtype=dtype, g=g)
        torch.testing.assert_close(A @ x, Ad @ x)
        bv = A @ BlockVector.from_dense(x, A.col_sizes)
        assert isinstance(bv, BlockVector) and bv.sizes == A.row_sizes
        torch.testing.assert_close(bv.to_dense(), Ad @ x)
    torch.testing.assert_close(A.T.to_dense(), Ad.T)
    torch.testing.assert_close((A + A).to_dense(), 2 * Ad)
    torch.testing.assert_close((A - 3 * A).to_dense(), -2 * Ad)
    torch.testing.assert_close((-A).to_dense(), -Ad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched(dtype):
    g = gen(1)
    t = randn(5, 3, 3, dtype=dtype, g=g) + 3 * torch.eye(3, dtype=dtype)
    A = Diagonal.from_batched(t)
    assert A.batched is t and A.shape == (15, 15) and len(A.blocks) == 5
    Ad = torch.block_diag(*t)
    torch.testing.assert_close(A.to_dense(), Ad)
    b = randn(15, 7, dtype=dtype, g=g)
    torch.testing.assert_close(A @ b, Ad @ b)
    x = A.solve(b)
    assert rel_err(x, torch.linalg.solve(Ad, b)) < 10 * rtol(dtype)
    assert rel_err(A.solve(b[:, 0]), torch.linalg.solve(Ad, b[:, 0])) < 10 * rtol(dtype)
    torch.testing.assert_close(A.T.to_dense(), Ad.T)
    S = A + A
    assert S.batched is not None
    torch.testing.assert_close(S.to_dense(), 2 * Ad)
    torch.testing.assert_close((A * 2).batched, 2 * t)
    # list form with equal shapes gives the same answers
    L = Diagonal(list(t.unbind(0)))
    assert rel_err(L.solve(b), x) < rtol(dtype)
    # rectangular batched matmul
    R = Diagonal.from_batched(randn(4, 2, 3, dtype=dtype, g=g))
    y = randn(12, dtype=dtype, g=g)
    torch.testing.assert_close(R @ y, R.to_dense() @ y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_solve_mixed_leaves(dtype):
    g = gen(2)
    A = Diagonal(
        [
            randn(3, 3, dtype=dtype, g=g) + 4 * torch.eye(3, dtype=dtype),
            Identity(2, 0.5),
            randn(1, 1, dtype=dtype, g=g) + 2,
        ]
    )
    b = randn(6, 4, dtype=dtype, g=g)
    ref = torch.linalg.solve(A.to_dense(), b)
    assert rel_err(A.solve(b), ref) < 10 * rtol(dtype)
    out = A.solve(BlockVector.from_dense(b, [3, 2, 1]))
    assert isinstance(out, BlockVector)
    assert rel_err(out.to_dense(), ref) < 10 * rtol(dtype)


def test_errors():
    g = gen(3)
    with pytest.raises(ValueError, match=r"\(n, r, c\)"):
        Diagonal(torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least one"):
        Diagonal([])
    with pytest.raises(TypeError, match="block 1"):
        Diagonal([torch.ones(1, 1), "x"])
    with pytest.raises(TypeError, match="mixed dtypes"):
        Diagonal([torch.ones(1, 1), torch.ones(1, 1, dtype=torch.float64)])
    A = Diagonal([randn(2, 2, g=g), randn(3, 3, g=g)])
    with pytest.raises(ValueError, match=r"expected \(5,\) or \(5, k\)"):
        A.solve(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected \(5,\) or \(5, k\)"):
        A @ torch.ones(6, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        A.solve(torch.ones(5, dtype=torch.float32))
    with pytest.raises(ValueError, match="block sizes"):
        A.solve(
            BlockVector([torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
        )
    with pytest.raises(ValueError, match="square"):
        Diagonal([torch.ones(2, 3)]).solve(torch.ones(2))
    with pytest.raises(ValueError, match="block shapes must match"):
        A + Diagonal([randn(3, 3, g=g), randn(2, 2, g=g)])
    with pytest.raises(SingularMatrixError, match="block 1"):
        Diagonal([torch.eye(2), torch.zeros(2, 2)]).solve(torch.ones(4))
    with pytest.raises(SingularMatrixError, match="block 1"):
        Diagonal([torch.eye(2), Zero(2, 2)]).solve(torch.ones(4))
    with pytest.raises(SingularMatrixError, match="block 0"):
        Diagonal([torch.zeros(2, 2), torch.eye(3)]).solve(torch.ones(5))
