"""Shared helpers for the block_partitioned_matrices tests (random blocks, error measures)."""

from __future__ import annotations

import torch

from block_partitioned_matrices import Tridiagonal

DTYPES = (torch.float32, torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, g=None) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def rtol(dtype) -> float:
    """Relative tolerance for well-conditioned problems."""
    return 1e-12 if dtype == torch.float64 else 2e-5


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / max(float(torch.linalg.norm(ref)), 1e-300))


def backward_error(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise backward error ||A x - b|| / (||A|| ||x|| + ||b||) (Frobenius)."""
    A, x, b = A.double(), x.double(), b.double()
    r = torch.linalg.norm(A @ x - b)
    return float(r / (torch.linalg.norm(A) * torch.linalg.norm(x) + torch.linalg.norm(b)))


def random_sizes(n: int, g, lo: int = 1, hi: int = 5) -> list[int]:
    return [int(s) for s in torch.randint(lo, hi + 1, (n,), generator=g)]


def random_tridiagonal(sizes, dtype=torch.float64, g=None, shift: float = 0.0) -> Tridiagonal:
    """Random dense-block Tridiagonal; ``shift`` adds ``shift * I`` to each diagonal block."""
    n = len(sizes)
    D = [randn(m, m, dtype=dtype, g=g) + shift * torch.eye(m, dtype=dtype) for m in sizes]
    L = [randn(sizes[i + 1], sizes[i], dtype=dtype, g=g) for i in range(n - 1)]
    U = [randn(sizes[i], sizes[i + 1], dtype=dtype, g=g) for i in range(n - 1)]
    return Tridiagonal(D, L, U)


def unpivoted_block_lu_solve(D, L, U, b: torch.Tensor) -> torch.Tensor:
    """Reference block LU WITHOUT pivoting across blocks (the paper's plain block LU).

    S_1 = D_1, S_{k+1} = D_{k+1} - L_k S_k^{-1} U_k; forward/back substitution.
    """
    n = len(D)
    sizes = [d.shape[0] for d in D]
    bs = list(torch.split(b, sizes))
    S = [D[0]]
    y = [bs[0]]
    for k in range(n - 1):
        S.append(D[k + 1] - L[k] @ torch.linalg.solve(S[k], U[k]))
        y.append(bs[k + 1] - L[k] @ torch.linalg.solve(S[k], y[k]))
    x = [None] * n
    x[-1] = torch.linalg.solve(S[-1], y[-1])
    for k in range(n - 2, -1, -1):
        x[k] = torch.linalg.solve(S[k], y[k] - U[k] @ x[k + 1])
    return torch.cat(x)
