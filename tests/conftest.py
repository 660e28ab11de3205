"""Shared test set-up. The helpers live beside this file: ``_chains.py`` (the random-chain
generator and the contract checker), ``_autograd_reference.py`` (dense references built with
autograd only), ``_dense_checks.py`` and ``_dense_curvature.py``; the tests mirror the
packages of ``hessinv`` (``network/``, ``derivatives/``, ``linalg/``, ``curvature/``,
``optim/``, ``tools/``), of ``block_partitioned_matrices`` (``bpm/``) and ``paper/``.

Tests marked ``slow`` (the long property sweeps) run with ``-m slow`` or with the
environment variable ``HESSINV_SLOW=1``; otherwise they are deselected.
"""

import os

import pytest
import torch


def pytest_configure(config):
    # One torch thread: the tests' matrices are small, and on a machine whose other core is
    # busy two OpenMP threads stall each other at every parallel region (seen here: a 20 x 20
    # Cholesky taking 3 ms instead of 10 us, the whole suite 10x slower under load).
    torch.set_num_threads(1)


def _slow_wanted(config) -> bool:
    expr = config.getoption("markexpr") or ""
    return os.environ.get("HESSINV_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


def pytest_collection_modifyitems(config, items):
    if _slow_wanted(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
