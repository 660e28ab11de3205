"""The README's code runs, its links stay inside the repository, and its claims about which
models are accepted hold (against dense)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import hessinv

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_links_point_inside_the_repository():
    targets = LINK.findall(README)
    assert targets, "the README has no links: the pattern is wrong"
    for target in targets:
        assert "://" not in target and not target.startswith("/"), target
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target


def test_code_blocks_run():
    blocks = _python_blocks(README)
    assert len(blocks) == 2, "the tour and the training loop"
    scope: dict = {}
    exec(compile(blocks[0], "README.md: tour", "exec"), scope)
    H, G, FG = scope["H"], scope["G"], scope["FG"]
    assert FG.method == "output space" and FG.backward_error <= 1e-12
    assert G.output_space().rows == G.spectrum().numel() == 96  # the comments' count
    n = H.num_params
    assert scope["H3"].num_params == 16 * 8 + 16 * 4  # the two weights only
    # the loop: a few batches of the tour's data, torch imported as the tour did
    X, y = scope["X"], scope["y"]
    scope["batches"] = [(X[:16], y[:16]), (X[16:], y[16:])]
    exec(compile(blocks[1], "README.md: training loop", "exec"), scope)
    assert scope["opt"].last_step["method"] in ("output space", "riccati", "dense")
    assert scope["P"].refreshes == 1 and G.num_params == n


def _against_dense(model, X, y) -> float:
    loss = nn.CrossEntropyLoss()
    H = hessinv.ChainHessian(model, loss, X, y, progress=False)
    D = hessinv.dense_hessian(model, loss, X, y)
    M = H @ torch.eye(H.num_params, dtype=torch.float64)
    return float((M - D).norm() / D.norm())


class _DoubleInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)


class _ScaleInputInPlace(nn.Module):
    """Owns a parameter and multiplies its own input by it in place."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), 1.5, dtype=torch.float64))

    def forward(self, x):
        return x.mul_(self.scale)


@pytest.mark.parametrize("after", ["relu_inplace", "parameter_free_mul_"])
def test_in_place_after_a_stages_first_module_is_accepted_and_exact(after):
    torch.manual_seed(0)
    act = nn.ReLU(inplace=True) if after == "relu_inplace" else _DoubleInPlace()
    model = nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    assert _against_dense(model, X, y) <= 1e3 * torch.finfo(torch.float64).eps


def test_a_stage_that_modifies_its_own_input_in_place_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _ScaleInputInPlace(4), nn.Linear(4, 2))
    model = model.double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="modifies its input in place"):
        hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y, progress=False)
