import pytest
import torch
from _bpm_helpers import (
    DTYPES,
    backward_error,
    gen,
    randn,
    random_sizes,
    random_tridiagonal,
    rel_err,
    rtol,
    unpivoted_block_lu_solve,
)

from block_partitioned_matrices import (
    BlockVector,
    Diagonal,
    Identity,
    LowerBidiagonal,
    SingularMatrixError,
    Tridiagonal,
    TridiagonalLU,
    UpperBidiagonal,
    Zero,
)


def _dense_reference(T: Tridiagonal) -> torch.Tensor:
    """Independent assembly of the dense matrix from the block lists."""
    m = T.block_sizes
    off = [0]
    for s in m:
        off.append(off[-1] + s)
    A = torch.zeros(off[-1], off[-1], dtype=T.dtype)

    def put(i, j, b):
        if isinstance(b, (Zero, Identity)):
            b = b.to_dense(dtype=T.dtype)
        A[off[i] : off[i + 1], off[j] : off[j + 1]] = b

    for i, d in enumerate(T.diagonal):
        put(i, i, d)
    for i in range(len(m) - 1):
        put(i + 1, i, T.lower[i])
        put(i, i + 1, T.upper[i])
    return A


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_ragged_against_dense(dtype):
    for seed in range(12):
        g = gen(seed)
        n = int(torch.randint(1, 9, (1,), generator=g))
        sizes = random_sizes(n, g, 1, 6)
        # no diagonal shift: diagonal blocks are random, often ill-conditioned
        T = random_tridiagonal(sizes, dtype, g)
        Ad = _dense_reference(T)
        N = sum(sizes)
        assert T.shape == (N, N) and T.block_sizes == tuple(sizes)
        torch.testing.assert_close(T.to_dense(), Ad, rtol=0, atol=0)
        if torch.linalg.cond(Ad.double()) > 1e4:
            continue
        k = int(torch.randint(1, 6, (1,), generator=g))
        b = randn(N, k, dtype=dtype, g=g)
        F = T.factorize()
        ref = torch.linalg.solve(Ad, b)
        tol = rtol(dtype) * float(torch.linalg.cond(Ad.double()))
        assert rel_err(F.solve(b), ref) < 10 * tol
        assert rel_err(T.solve(b), ref) < 10 * tol
        # 1-D rhs and BlockVector rhs reuse the same factorization
        x1 = F.solve(b[:, 0])
        assert x1.shape == (N,) and rel_err(x1, ref[:, 0]) < 10 * tol
        xv = F.solve(BlockVector.from_dense(b, sizes))
        assert isinstance(xv, BlockVector) and xv.sizes == tuple(sizes)
        assert rel_err(xv.to_dense(), ref) < 10 * tol
        xv1 = F.solve(BlockVector.from_dense(b[:, 0], sizes))
        assert xv1.ncols is None
        # products
        torch.testing.assert_close(T @ b, Ad @ b)
        torch.testing.assert_close((T @ BlockVector.from_dense(b, sizes)).to_dense(), Ad @ b)
        torch.testing.assert_close(T.T.to_dense(), Ad.T)
        # determinant
        sign, logabs = F.slogdet()
        rs, rl = torch.linalg.slogdet(Ad.double())
        assert float(sign) == float(rs)
        assert abs(float(logabs) - float(rl)) < (1e-10 if dtype == torch.float64 else 1e-3) * max(
            1.0, abs(float(rl))
        )


def test_many_rhs_float64_tight():
    g = gen(100)
    sizes = [3, 7, 2, 5, 4, 6, 1, 3]
    T = random_tridiagonal(sizes, torch.float64, g, shift=6.0)
    Ad = T.to_dense()
    assert torch.linalg.cond(Ad) < 100
    b = randn(sum(sizes), 50, g=g)
    assert rel_err(T.solve(b), torch.linalg.solve(Ad, b)) < 1e-13


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_identity_blocks(dtype):
    g = gen(7)
    D = [Identity(2, 3.0), randn(3, 3, dtype=dtype, g=g), Zero(2, 2), randn(1, 1, dtype=dtype, g=g)]
    L = [Zero(3, 2), randn(2, 3, dtype=dtype, g=g), randn(1, 2, dtype=dtype, g=g)]
    U = [Zero(2, 3), randn(3, 2, dtype=dtype, g=g), randn(2, 1, dtype=dtype, g=g)]
    T = Tridiagonal(D, L, U)
    assert T.dtype == dtype
    Ad = _dense_reference(T)
    torch.testing.assert_close(T.to_dense(), Ad, rtol=0, atol=0)
    b = randn(8, 3, dtype=dtype, g=g)
    torch.testing.assert_close(T @ b, Ad @ b)
    tol = rtol(dtype) * float(torch.linalg.cond(Ad.double()))
    assert rel_err(T.solve(b), torch.linalg.solve(Ad, b)) < 10 * tol
    torch.testing.assert_close((T + T).to_dense(), 2 * Ad)
    torch.testing.assert_close((T - 0.5 * T).to_dense(), 0.5 * Ad)
    torch.testing.assert_close((-T).to_dense(), -Ad)
    # adding other banded structures
    Dg = Diagonal([Identity(m) for m in T.block_sizes])
    torch.testing.assert_close((T + Dg).to_dense(), Ad + torch.eye(8, dtype=dtype))
    Lb = LowerBidiagonal(None, [torch.ones(s, dtype=dtype) for s in [(3, 2), (2, 3), (1, 2)]])
    torch.testing.assert_close((T - Lb).to_dense(), Ad - Lb.to_dense())
    Ub = UpperBidiagonal(None, [torch.ones(s, dtype=dtype) for s in [(2, 3), (3, 2), (2, 1)]])
    torch.testing.assert_close(Tridiagonal.from_banded(Ub).to_dense(), Ub.to_dense())


def test_single_block():
    A = torch.tensor([[0.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    T = Tridiagonal([A], [], [])
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(T.solve(b), torch.linalg.solve(A, b))


def _nearly_singular_blocks(delta: float, n: int = 8, m: int = 4, seed: int = 5):
    """Diagonal blocks ~ delta (nearly zero), off-diagonal blocks orthogonal: the whole
    matrix is well conditioned, but unpivoted block LU divides by the tiny D_1."""
    g = gen(seed)
    Q = lambda: torch.linalg.qr(randn(m, m, g=g))[0]  # noqa: E731
    D = [delta * randn(m, m, g=g) for _ in range(n)]
    L = [Q() for _ in range(n - 1)]
    U = [Q() for _ in range(n - 1)]
    return D, L, U


def test_pivoting_beats_unpivoted_block_lu():
    D, L, U = _nearly_singular_blocks(1e-9)
    T = Tridiagonal(D, L, U)
    Ad = T.to_dense()
    assert float(torch.linalg.cond(Ad)) < 1e3  # the matrix itself is harmless
    assert min(float(torch.linalg.cond(d)) for d in D) > 1.0  # sanity
    g = gen(9)
    b = randn(Ad.shape[0], 3, g=g)
    x_dense = torch.linalg.solve(Ad, b)
    x_ours = T.solve(b)
    x_nopiv = unpivoted_block_lu_solve(D, L, U, b)
    be_dense = backward_error(Ad, x_dense, b)
    be_ours = backward_error(Ad, x_ours, b)
    be_nopiv = backward_error(Ad, x_nopiv, b)
    assert be_dense < 1e-15
    assert be_ours < 100 * be_dense + 1e-16
    assert be_nopiv > 1e5 * be_dense  # unpivoted block LU loses >= 5 digits here
    assert rel_err(x_ours, x_dense) < 1e-12


def test_exactly_singular_diagonal_blocks():
    # D_k = 0 exactly: unpivoted block LU cannot even start; the matrix is invertible
    D, L, U = _nearly_singular_blocks(0.0, n=6, m=3)
    T = Tridiagonal(D, L, U)
    Ad = T.to_dense()
    b = randn(Ad.shape[0], g=gen(1))
    with pytest.raises(RuntimeError):  # torch.linalg.LinAlgError: S_1 = D_1 = 0
        unpivoted_block_lu_solve(D, L, U, b)
    x = T.solve(b)
    x_dense = torch.linalg.solve(Ad, b)
    assert backward_error(Ad, x, b) < 100 * backward_error(Ad, x_dense, b) + 1e-16
    assert rel_err(x, x_dense) < 1e-12
    # also with Zero leaves on the diagonal and float32
    T32 = Tridiagonal([Zero(3, 3)] * 6, [q.float() for q in L], [q.float() for q in U])
    x32 = T32.solve(b.float())
    assert rel_err(x32.double(), x_dense) < 1e-4


@pytest.mark.parametrize("where", [0, 2, 4])
def test_singular_raises(where):
    g = gen(3)
    sizes = [2, 3, 2, 4, 2]
    T = random_tridiagonal(sizes, torch.float64, g)
    D, L, U = list(T.diagonal), list(T.lower), list(T.upper)
    # zero out block row `where` entirely -> exactly singular
    D[where] = torch.zeros_like(D[where])
    if where > 0:
        L[where - 1] = torch.zeros_like(L[where - 1])
    if where < len(sizes) - 1:
        U[where] = Zero(*U[where].shape)
    S = Tridiagonal(D, L, U)
    with pytest.raises(SingularMatrixError, match="block row"):
        S.factorize()
    with pytest.raises(ValueError):
        S.solve(torch.ones(13, dtype=torch.float64))


def test_factorization_immutable_and_reusable():
    T = random_tridiagonal([2, 3, 2], torch.float64, gen(4), shift=4.0)
    F = T.factorize()
    assert isinstance(F, TridiagonalLU) and F.shape == (7, 7) and F.block_sizes == (2, 3, 2)
    assert F.dtype == torch.float64 and F.nbytes > 0
    with pytest.raises(AttributeError):
        F._lu = ()
    with pytest.raises(TypeError):
        TridiagonalLU()
    b1, b2 = torch.ones(7, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64)
    x = F.solve(torch.stack([b1, b2], 1))
    torch.testing.assert_close(x[:, 0], F.solve(b1))
    torch.testing.assert_close(x[:, 1], F.solve(b2))


def test_errors():
    e = torch.eye(2)
    with pytest.raises(ValueError, match="at least one"):
        Tridiagonal([], [], [])
    with pytest.raises(ValueError, match="needs 1 lower and 1 upper"):
        Tridiagonal([e, e], [], [e])
    with pytest.raises(ValueError, match=r"diagonal\[1\] has shape \(2, 3\)"):
        Tridiagonal([e, torch.ones(2, 3)], [e], [e])
    with pytest.raises(
        ValueError, match=r"lower\[0\] \(block \(1, 0\)\) has shape \(2, 2\); expected \(3, 2\)"
    ):
        Tridiagonal([e, torch.eye(3)], [e], [torch.ones(2, 3)])
    with pytest.raises(ValueError, match=r"upper\[0\] \(block \(0, 1\)\)"):
        Tridiagonal([e, torch.eye(3)], [torch.ones(3, 2)], [e])
    with pytest.raises(TypeError, match=r"lower\[0\]"):
        Tridiagonal([e, e], [[1.0]], [e])
    with pytest.raises(TypeError, match="upper must be a sequence"):
        Tridiagonal([e, e], [e], e)
    with pytest.raises(TypeError, match="mixed dtypes"):
        Tridiagonal([e, e.double()], [e], [e])
    T = Tridiagonal([e, e], [e], [e * 0.5])
    with pytest.raises(ValueError, match=r"expected \(4,\) or \(4, k\)"):
        T.solve(torch.ones(5))
    with pytest.raises(ValueError, match=r"expected \(4,\) or \(4, k\)"):
        T.solve(torch.ones(4, 2, 2))
    with pytest.raises(TypeError, match="dtype"):
        T.solve(torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="BlockVector"):
        T.solve([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="block sizes"):
        T.solve(BlockVector([torch.ones(1), torch.ones(3)]))
    with pytest.raises(ValueError, match="cannot combine"):
        T + Tridiagonal([torch.eye(3), torch.eye(1)], [torch.ones(1, 3)], [torch.ones(3, 1)])
    with pytest.raises(TypeError, match="floating-point"):
        Tridiagonal([torch.eye(2, dtype=torch.int64)], [], []).factorize()
