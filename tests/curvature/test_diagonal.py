"""Exact diagonal and diagonal blocks (docs/algorithm.md section 6) against the dense Hessian."""

from __future__ import annotations

import random

import pytest
import torch
from _chains import ACTIVATIONS, make_problem

import hessinv


@pytest.mark.parametrize("seed", range(8))
def test_diagonal_and_blocks(seed):
    rng = random.Random(seed)
    problem = make_problem(
        depth=rng.randint(1, 7),
        width=rng.randint(1, 5),
        batch=rng.randint(1, 6),
        activation=rng.choice(sorted(ACTIVATIONS)),
        bias=rng.random() < 0.7,
        loss=rng.choice(["ce", "mse", "mse_sum"]),
        seed=seed,
    )
    H = hessinv.ChainHessian(*problem)
    D = hessinv.dense_hessian(*problem)
    scale = float(D.abs().max())
    diag = H.diagonal()
    assert list(diag) == list(H.param_names)
    for (name, p), (dname, d) in zip(problem.model.named_parameters(), diag.items(), strict=True):
        assert name == dname and d.shape == p.shape
    assert torch.allclose(hessinv.flatten(diag), torch.diagonal(D), rtol=0, atol=1e-13 * scale)
    offset = 0
    for block, p in zip(H.diagonal_blocks(), H.stage_sizes, strict=True):
        ref = D[offset : offset + p, offset : offset + p]
        assert torch.allclose(block, ref, rtol=0, atol=1e-13 * scale)
        offset += p
