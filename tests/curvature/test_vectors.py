"""Flat / dict / list parameter vectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessinv import flatten, unflatten


def test_round_trips():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4, bias=False))
    params = dict(model.named_parameters())
    flat = flatten(params)
    assert flat.shape == (6 + 2 + 8,)
    back = unflatten(flat, params)
    assert list(back) == list(params)
    for k in params:
        assert torch.equal(back[k], params[k].detach())
    as_list = unflatten(flat, list(params.values()))
    assert isinstance(as_list, list) and torch.equal(flatten(as_list), flat)
    assert torch.equal(flatten(unflatten(flat, model)), flat)
    shapes = unflatten(flat, [(2, 3), (2,), (4, 2)])
    assert [tuple(t.shape) for t in shapes] == [(2, 3), (2,), (4, 2)]


def test_errors():
    with pytest.raises(ValueError, match="expected"):
        unflatten(torch.zeros(5), {"w": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="like"):
        unflatten(torch.zeros(6), 6)
    with pytest.raises(ValueError, match="at least one"):
        flatten({})
