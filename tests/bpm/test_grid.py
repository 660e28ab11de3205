import pytest
import torch
from _bpm_helpers import DTYPES, gen, randn, rel_err, rtol

from block_partitioned_matrices import (
    BlockGrid,
    BlockGridLU,
    BlockVector,
    Diagonal,
    Identity,
    LowerBidiagonal,
    Tridiagonal,
    UpperBidiagonal,
    Zero,
    blockwise_transpose,
    blockwise_transpose_vector,
    inverse_blockwise_transpose_vector,
)


def paper_system(p, a, dtype=torch.float64, seed=0, eps=0.5):
    """The 3x3 block system of docs/algorithm.md section 4 with random stage derivatives.

    Unknowns x_l (p_l), y_l (a_l), z_l (a_l), l = 1..n.
    """
    g = gen(seed)
    n = len(p)
    r = lambda *s: randn(*s, dtype=dtype, g=g)  # noqa: E731

    def sym(k):
        X = r(k, k)
        return X + X.T

    A = [sym(p[l]) + eps * torch.eye(p[l], dtype=dtype) for l in range(n)]
    Dx = [r(a[l], p[l]) for l in range(n)]
    Dz = [None] + [r(a[l], a[l - 1]) * 0.7 for l in range(1, n)]  # Dz_l: a_l x a_{l-1}
    C = [None] + [r(p[l], a[l - 1]) for l in range(1, n)]  # C_l: p_l x a_{l-1}
    Q = [None] + [sym(a[l - 1]) for l in range(1, n)]  # Q_l: a_{l-1} x a_{l-1}
    M = LowerBidiagonal(None, [-Dz[l + 1] for l in range(n - 1)], sizes=a)
    G = BlockGrid(
        [
            [
                Diagonal(A),
                LowerBidiagonal(
                    [Zero(p[l], a[l]) for l in range(n)], [C[l + 1] for l in range(n - 1)]
                ),
                Diagonal([d.T for d in Dx]),
            ],
            [Diagonal([-d for d in Dx]), M, Zero(sum(a), sum(a))],
            [
                UpperBidiagonal(
                    [Zero(a[l], p[l]) for l in range(n)], [-C[l + 1].T for l in range(n - 1)]
                ),
                Diagonal([-Q[l + 1] for l in range(n - 1)] + [Zero(a[-1], a[-1])]),
                M.T,
            ],
        ]
    )
    return G


def _perm(parts):
    """Index taking grid order (g, i) to interleaved order (i, g)."""
    off, starts = 0, []
    for sizes in parts:
        s = []
        for m in sizes:
            s.append(off)
            off += m
        starts.append(s)
    n = len(parts[0])
    return torch.cat(
        [
            torch.arange(starts[g][i], starts[g][i] + parts[g][i])
            for i in range(n)
            for g in range(len(parts))
        ]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_paper_system_solve_and_transpose(dtype):
    for seed in range(4):
        g = gen(seed + 50)
        n = int(torch.randint(1, 6, (1,), generator=g))
        p = [int(s) for s in torch.randint(1, 5, (n,), generator=g)]
        a = [int(s) for s in torch.randint(1, 4, (n,), generator=g)]
        G = paper_system(p, a, dtype, seed)
        N = sum(p) + 2 * sum(a)
        assert G.shape == (N, N) and G.grid_shape == (3, 3)
        Gd = G.to_dense()
        assert Gd.dtype == dtype
        # blockwise transpose == permuted dense matrix, round trip of the permutation
        T = blockwise_transpose(G)
        assert isinstance(T, Tridiagonal) and T.block_sizes == tuple(
            p[i] + 2 * a[i] for i in range(n)
        )
        perm = _perm([p, a, a])
        torch.testing.assert_close(T.to_dense(), Gd[perm][:, perm], rtol=0, atol=0)
        # products
        x = randn(N, 3, dtype=dtype, g=g)
        torch.testing.assert_close(G @ x, Gd @ x)
        torch.testing.assert_close(G.T.to_dense(), Gd.T)
        torch.testing.assert_close(G.T @ x, Gd.T @ x)
        # solves, all rhs kinds
        cond = float(torch.linalg.cond(Gd.double()))
        if cond > 1e6:
            continue
        tol = 10 * rtol(dtype) * cond
        b = randn(N, 4, dtype=dtype, g=g)
        ref = torch.linalg.solve(Gd, b)
        F = G.factorize()
        assert isinstance(F, BlockGridLU)
        assert rel_err(F.solve(b), ref) < tol
        assert rel_err(G.solve(b[:, 0]), ref[:, 0]) < tol
        coarse = F.solve(BlockVector.from_dense(b, G.row_sizes))
        assert isinstance(coarse, BlockVector) and coarse.sizes == G.col_sizes
        assert rel_err(coarse.to_dense(), ref) < tol
        fine = F.solve(BlockVector.from_dense(b[:, 1], p + a + a))
        assert fine.sizes == tuple(p + a + a) and fine.ncols is None
        assert rel_err(fine.to_dense(), ref[:, 1]) < tol


def test_paper_system_float64_tight():
    G = paper_system([3, 2, 4, 3], [2, 3, 2, 2], seed=11, eps=2.0)
    Gd = G.to_dense()
    cond = float(torch.linalg.cond(Gd))
    b = randn(Gd.shape[0], 5, g=gen(1))
    assert rel_err(G.solve(b), torch.linalg.solve(Gd, b)) < 1e-14 * max(cond, 1.0)


def test_vector_round_trip():
    g = gen(3)
    for r, n in ((3, 4), (2, 1), (1, 5), (4, 3)):
        sizes = [int(s) for s in torch.randint(0, 4, (r * n,), generator=g)]
        v = BlockVector([randn(s, 2, g=g) for s in sizes])
        w = blockwise_transpose_vector(v, r)
        assert w.sizes == tuple(sizes[gi * n + i] for i in range(n) for gi in range(r))
        back = inverse_blockwise_transpose_vector(w, r)
        assert back.sizes == v.sizes
        assert all(torch.equal(x, y) for x, y in zip(back, v, strict=True))
        # the inverse is the transpose with the roles of r and n swapped
        assert blockwise_transpose_vector(w, n).sizes == v.sizes
        assert torch.equal(
            inverse_blockwise_transpose_vector(blockwise_transpose_vector(v, r), r).to_dense(),
            v.to_dense(),
        )
    with pytest.raises(ValueError, match="dividing"):
        blockwise_transpose_vector(BlockVector([torch.ones(1)] * 5), 2)
    with pytest.raises(TypeError, match="BlockVector"):
        blockwise_transpose_vector(torch.ones(5), 5)


def test_identity_zero_entries_and_tridiagonal_entries():
    g = gen(4)
    m = [2, 3, 1]
    T = Tridiagonal(
        [randn(k, k, g=g) for k in m],
        [randn(m[i + 1], m[i], g=g) for i in range(2)],
        [randn(m[i], m[i + 1], g=g) for i in range(2)],
    )
    # KKT-like [[T, I], [I, 0]]: Identity entries take their sizes from T
    G = BlockGrid([[T, Identity(6)], [Identity(6, -1.0), Zero(6, 6)]])
    Gd = G.to_dense()
    Tt = blockwise_transpose(G)
    assert Tt.block_sizes == (4, 6, 2)
    perm = _perm([m, m])
    torch.testing.assert_close(Tt.to_dense(), Gd[perm][:, perm], rtol=0, atol=0)
    b = randn(12, g=g)
    assert rel_err(G.solve(b), torch.linalg.solve(Gd, b)) < 1e-12 * float(torch.linalg.cond(Gd))
    # 1x1 grid of a bidiagonal matrix
    U = UpperBidiagonal(
        [randn(k, k, g=g) + 3 * torch.eye(k, dtype=torch.float64) for k in m],
        [randn(m[i], m[i + 1], g=g) for i in range(2)],
    )
    G1 = BlockGrid([[U]])
    torch.testing.assert_close(G1.solve(b[:6]), torch.linalg.solve(U.to_dense(), b[:6]))
    # a general grid with a dense leaf entry: products work, the transpose does not
    H = BlockGrid(
        [[torch.eye(2, dtype=torch.float64), Zero(2, 3)], [randn(3, 2, g=g), Identity(3)]]
    )
    x = randn(5, g=g)
    torch.testing.assert_close(H @ x, H.to_dense() @ x)
    bv = H @ BlockVector.from_dense(x, [2, 3])
    assert bv.sizes == (2, 3)
    with pytest.raises(TypeError, match="block-banded"):
        blockwise_transpose(H)


def test_errors():
    D2 = Diagonal([torch.eye(2)] * 2)
    D3 = Diagonal([torch.eye(2)] * 3)
    with pytest.raises(ValueError, match=r"entry \(0, 1\) has shape \(6, 6\); expected \(4, 6\)"):
        BlockGrid([[D2, D3]])
    with pytest.raises(ValueError, match="row 1 has 1 blocks"):
        BlockGrid([[D2, D2], [D2]])
    with pytest.raises(TypeError, match="non-empty list"):
        BlockGrid([])
    with pytest.raises(TypeError, match="mixed dtypes"):
        BlockGrid([[D2, Diagonal([torch.eye(2, dtype=torch.float64)] * 2)]])
    # same total size, different number of block rows
    D4 = Diagonal([torch.eye(1)] * 4)
    with pytest.raises(ValueError, match="block rows"):
        blockwise_transpose(BlockGrid([[D2, D4]]))
    # same n, different partitions in one grid column
    Dr = Diagonal([torch.eye(1), torch.eye(3)])
    with pytest.raises(ValueError, match="block sizes"):
        blockwise_transpose(BlockGrid([[D2], [Dr]]))
    # non-square merged blocks
    R = Diagonal([torch.ones(1, 3), torch.ones(3, 1)])
    with pytest.raises(ValueError, match="non-square"):
        blockwise_transpose(BlockGrid([[R]]))
    with pytest.raises(ValueError, match="cannot infer"):
        blockwise_transpose(BlockGrid([[D2, Zero(4, 2)], [Zero(2, 4), Zero(2, 2)]]))
    G = BlockGrid([[D2]])
    with pytest.raises(ValueError, match="expected"):
        G.solve(BlockVector([torch.ones(3), torch.ones(1)]))
    with pytest.raises(ValueError, match=r"expected \(4,\) or \(4, k\)"):
        G.solve(torch.ones(5))
    with pytest.raises(TypeError, match="BlockGridLU is created"):
        BlockGridLU()
