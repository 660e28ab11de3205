"""Shared fixtures (the helpers themselves live in ``_chains.py``)."""

import pytest
import torch
from _chains import make_problem


@pytest.fixture
def problem_factory():
    return make_problem


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
