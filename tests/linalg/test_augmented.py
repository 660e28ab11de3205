"""The paper's augmented 3x3 block system (docs/algorithm.md section 4)."""

from __future__ import annotations

import pytest
import torch
from _chains import make_problem, relative_error

import hessinv
from hessinv.linalg.augmented import AugmentedSolver, augmented_grid, augmented_tridiagonal


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_schur_complement_of_grid_is_damped_hessian(depth):
    """Eliminating the tangents and adjoints from the 3x3 grid leaves exactly H + eps I."""
    problem = make_problem(depth=depth, width=3, batch=2, seed=depth)
    H = hessinv.ChainHessian(*problem)
    eps = 0.3
    K = augmented_grid(H.stage_derivatives(), H.loss_hessian_blocks(), eps).to_dense()
    n = H.num_params
    K11, K12, K21, K22 = K[:n, :n], K[:n, n:], K[n:, :n], K[n:, n:]
    schur = K11 - K12 @ torch.linalg.solve(K22, K21) if K22.numel() else K11
    dense = hessinv.dense_hessian(*problem) + eps * torch.eye(n, dtype=torch.float64)
    assert relative_error(schur, dense) < 1e-12
    if K22.numel():
        assert abs(float(torch.linalg.det(K22)) - 1.0) < 1e-10  # unit-determinant elimination


def test_blockwise_transpose_is_a_symmetric_permutation():
    problem = make_problem(depth=3, width=2, batch=2, seed=5)
    H = hessinv.ChainHessian(*problem)
    stages, S = H.stage_derivatives(), H.loss_hessian_blocks()
    grid = augmented_grid(stages, S, 0.1)
    tri = augmented_tridiagonal(stages, S, 0.1)
    G, T = grid.to_dense(), tri.to_dense()
    assert G.shape == T.shape
    # same multiset of entries, same determinant: a symmetric permutation of rows and columns
    assert torch.allclose(torch.sort(G.flatten()).values, torch.sort(T.flatten()).values)
    assert torch.allclose(torch.linalg.det(G), torch.linalg.det(T), rtol=1e-10)
    assert len(tri.block_sizes) == len(stages)


def test_grid_solve_matches_tridiagonal_solver():
    problem = make_problem(depth=4, width=3, batch=3, seed=6)
    H = hessinv.ChainHessian(*problem)
    stages, S = H.stage_derivatives(), H.loss_hessian_blocks()
    g = torch.randn(H.num_params, 2, dtype=torch.float64)
    grid = augmented_grid(stages, S, 0.05)
    rhs = torch.cat([g, torch.zeros(grid.shape[0] - H.num_params, 2, dtype=torch.float64)])
    via_grid = grid.solve(rhs)[: H.num_params]
    blocks = list(g.split(list(H.stage_sizes)))
    via_solver = torch.cat(AugmentedSolver(stages, S, 0.05).solve(blocks))
    assert relative_error(via_grid, via_solver) < 1e-12
    sign, logabsdet = AugmentedSolver(stages, S, 0.05).slogdet()
    ref = torch.linalg.slogdet(
        hessinv.dense_hessian(*problem) + 0.05 * torch.eye(H.num_params, dtype=torch.float64)
    )
    assert sign == ref[0] and abs(float(logabsdet - ref[1])) < 1e-9
