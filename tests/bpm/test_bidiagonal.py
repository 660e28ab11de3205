import pytest
import torch
from _bpm_helpers import DTYPES, gen, randn, rel_err, rtol

from block_partitioned_matrices import (
    BlockVector,
    Identity,
    LowerBidiagonal,
    SingularMatrixError,
    UpperBidiagonal,
    Zero,
)


def _dense_lower(D, L):
    rows = [d.shape[0] for d in D]
    cols = [d.shape[1] for d in D]
    out = torch.zeros(sum(rows), sum(cols), dtype=D[0].dtype)
    ro = [0]
    co = [0]
    for r, c in zip(rows, cols, strict=True):
        ro.append(ro[-1] + r)
        co.append(co[-1] + c)
    for i, d in enumerate(D):
        out[ro[i] : ro[i + 1], co[i] : co[i + 1]] = d
    for i, blk in enumerate(L):
        out[ro[i + 1] : ro[i + 2], co[i] : co[i + 1]] = blk
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_lower_upper_against_dense(dtype):
    g = gen(0)
    rows, cols = [2, 3, 1, 2], [1, 2, 3, 2]
    D = [randn(r, c, dtype=dtype, g=g) for r, c in zip(rows, cols, strict=True)]
    L = [randn(rows[i + 1], cols[i], dtype=dtype, g=g) for i in range(3)]
    A = LowerBidiagonal(D, L)
    Ad = _dense_lower(D, L)
    torch.testing.assert_close(A.to_dense(), Ad)
    assert A.row_sizes == tuple(rows) and A.col_sizes == tuple(cols) and A.shape == (8, 8)
    x = randn(8, 3, dtype=dtype, g=g)
    torch.testing.assert_close(A @ x, Ad @ x)
    torch.testing.assert_close(A @ x[:, 0], Ad @ x[:, 0])
    U = A.T
    assert isinstance(U, UpperBidiagonal)
    torch.testing.assert_close(U.to_dense(), Ad.T)
    torch.testing.assert_close(U @ x, Ad.T @ x)
    assert isinstance(U.T, LowerBidiagonal)
    torch.testing.assert_close(U.T.to_dense(), Ad)
    torch.testing.assert_close((2 * A).to_dense(), 2 * Ad)
    torch.testing.assert_close((-U).to_dense(), -Ad.T)
    assert A.block(0, 2).shape == (2, 3) and isinstance(A.block(0, 2), Zero)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit", [False, True])
def test_solve_against_dense(dtype, unit):
    for seed in range(5):
        g = gen(10 + seed)
        m = [int(s) for s in torch.randint(1, 5, (6,), generator=g)]
        D = (
            None
            if unit
            else [randn(k, k, dtype=dtype, g=g) + 3 * torch.eye(k, dtype=dtype) for k in m]
        )
        L = [randn(m[i + 1], m[i], dtype=dtype, g=g) * 0.5 for i in range(5)]
        A = LowerBidiagonal(D, L)
        assert A.unit_diagonal == unit and A.row_sizes == tuple(m)
        Ad = A.to_dense()
        N = sum(m)
        b = randn(N, 4, dtype=dtype, g=g)
        for M, Md in ((A, Ad), (A.T, Ad.T)):
            ref = torch.linalg.solve(Md, b)
            assert rel_err(M.solve(b), ref) < 100 * rtol(dtype)
            assert rel_err(M.solve(b[:, 1]), ref[:, 1]) < 100 * rtol(dtype)
            out = M.solve(BlockVector.from_dense(b, m))
            assert isinstance(out, BlockVector) and rel_err(out.to_dense(), ref) < 100 * rtol(dtype)


def test_unit_diagonal_sizes_and_identity_blocks():
    M = LowerBidiagonal(None, [], sizes=[3])
    assert M.shape == (3, 3)
    torch.testing.assert_close(M.to_dense(), torch.eye(3))
    U = UpperBidiagonal(None, [torch.ones(2, 3, dtype=torch.float64)])
    assert U.row_sizes == (2, 3) and U.diagonal[1].shape == (3, 3)
    ref = torch.eye(5, dtype=torch.float64)
    ref[:2, 2:] = 1
    torch.testing.assert_close(U.to_dense(), ref)
    A = LowerBidiagonal([Identity(2, 2.0), Identity(1, -1.0)], [torch.ones(1, 2)])
    b = torch.tensor([2.0, 4.0, 1.0])
    torch.testing.assert_close(A.solve(b), torch.linalg.solve(A.to_dense(), b))


def test_errors():
    with pytest.raises(ValueError, match="need 2 lower"):
        LowerBidiagonal([torch.eye(2)] * 3, [torch.ones(2, 2)])
    with pytest.raises(
        ValueError, match=r"lower\[0\] \(block \(1, 0\)\) has shape \(2, 2\); expected \(3, 2\)"
    ):
        LowerBidiagonal([torch.eye(2), torch.eye(3)], [torch.ones(2, 2)])
    with pytest.raises(ValueError, match=r"upper\[0\] \(block \(0, 1\)\)"):
        UpperBidiagonal([torch.eye(2), torch.eye(3)], [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="pass sizes"):
        LowerBidiagonal(None, [])
    with pytest.raises(ValueError, match="disagree"):
        LowerBidiagonal(None, [torch.ones(3, 2)], sizes=[2, 2])
    with pytest.raises(TypeError, match="lower must be a sequence"):
        LowerBidiagonal(None, torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"diagonal\[1\]"):
        UpperBidiagonal([torch.eye(2), 3.0], [torch.ones(2, 1)])
    with pytest.raises(ValueError, match="square"):
        LowerBidiagonal([torch.ones(2, 3)], []).solve(torch.ones(2))
    with pytest.raises(SingularMatrixError, match="block row 1"):
        LowerBidiagonal([torch.eye(2), torch.zeros(2, 2)], [torch.ones(2, 2)]).solve(torch.ones(4))
    with pytest.raises(SingularMatrixError, match="block row 0"):
        UpperBidiagonal([Zero(2, 2), torch.eye(2)], [torch.ones(2, 2)]).solve(torch.ones(4))
    with pytest.raises(ValueError, match=r"expected \(4,\) or \(4, k\)"):
        LowerBidiagonal(None, [torch.ones(2, 2)]).solve(torch.ones(5))
