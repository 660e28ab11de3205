"""The scripts in ``examples/`` in their small configurations: what they print and return."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
import torch
from _launch import launch
from torch import nn

import hessinv

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    """Import ``examples/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(
        f"hessinv_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_example_is_tested_and_documented():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    tested = sorted(
        name[len("test_") :]
        for name in globals()
        if name.startswith("test_") and (EXAMPLES / f"{name[len('test_') :]}.py").exists()
    )
    assert scripts == tested
    readme = (EXAMPLES / "README.md").read_text()
    for name in scripts:
        command = f"python examples/{name}.py"
        if name.startswith("distributed"):
            command = f"torchrun --nproc-per-node 2 examples/{name}.py"
        assert command in readme
        doc = load(name).__doc__
        assert command in doc and "--small" in doc


@pytest.mark.parametrize("synthetic", [False, True])
def test_train_damped_newton(capsys, synthetic):
    argv = ["--small"] + (["--synthetic"] if synthetic else [])
    result = load("train_damped_newton").main(argv)
    out = capsys.readouterr().out
    assert "| DampedNewton | 2 |" in out and "| Adam | 2 |" in out
    assert "| optimizer | time (s) | final train loss | final test acc. |" in out
    for name in ("DampedNewton", "Adam"):
        r = result[name]
        assert len(r["losses"]) == len(r["test_accuracy"]) == 2
        assert all(math.isfinite(v) for v in r["losses"])
        assert r["losses"][-1] < r["initial_loss"]
        assert r["lr"] == pytest.approx({"DampedNewton": 1.0, "Adam": 3e-3}[name] * 0.25)
    # exact Levenberg-Marquardt steps do much better than Adam per epoch, and than chance
    dn = result["DampedNewton"]
    assert dn["losses"][-1] < 0.7 * dn["initial_loss"]
    assert dn["losses"][-1] < result["Adam"]["losses"][-1]
    assert dn["test_accuracy"][-1] > 0.3


def test_sgd_preconditioned(capsys):
    result = load("sgd_preconditioned").main(["--small"])
    out = capsys.readouterr().out
    assert "check on one batch" in out and "| GGN-preconditioned SGD, every=10 |" in out
    assert result["dense_check"] < 1e-10  # precondition_() is the exact (G + lam I)^-1 grad
    initial = result["initial_train_loss"]
    sgd = result["SGD"]["train_loss"]
    for k in (1, 10):
        loss = result[f"GGN-preconditioned SGD, every={k}"]["train_loss"]
        assert math.isfinite(loss) and loss < 0.7 * initial and loss < sgd
    assert sgd < initial


def test_kfac_vs_exact(capsys):
    result = load("kfac_vs_exact").main(["--small"])
    out = capsys.readouterr().out
    assert "| 1e-03 | K-FAC, 1 MC sample, eig damping |" in out
    rows = result["rows"]
    assert len(rows) == 2 * 4
    for r in rows:
        assert all(math.isfinite(r[key]) for key in ("cos", "rel_err", "reduction_unit"))
        assert -1 - 1e-12 <= r["cos"] <= 1 + 1e-12
        if r["direction"].startswith("exact"):
            assert r["cos"] == pytest.approx(1.0) and r["rel_err"] == 0.0
        else:  # K-FAC is not exact for a deep net: a real error, reported
            assert 1e-3 < r["rel_err"] < 100
    # at a small lambda the exact direction's best step beats K-FAC's and the gradient's
    smallest = [r for r in rows if r["lambda"] == rows[0]["lambda"]]
    best = smallest[0]["reduction_best"]
    assert all(best >= r["reduction_best"] for r in smallest)
    assert best > result["gradient_reduction"] > 0


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kfac_is_exact_for_one_layer_and_one_sample(loss):
    """One Linear layer: its GGN is S (x) A exactly for MSE (any batch) and for one sample,
    so K-FAC with "eig" damping must equal the exact solve: checks the example's K-FAC."""
    kfac = load("kfac_vs_exact")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    B = 6 if loss == "mse" else 1
    X = torch.randn(B, 4, dtype=torch.float64)
    if loss == "mse":
        loss_fn, y = nn.MSELoss(), torch.randn(B, 3, dtype=torch.float64)
    else:
        loss_fn, y = nn.CrossEntropyLoss(), torch.tensor([2])
    G = hessinv.ChainGGN(model, loss_fn, X, y, progress=False)
    for lam in (1e-3, 1.0):
        exact = G.factorize(lam).solve(G.gradient())
        d = kfac.kfac_direction(model, X, y, loss_fn, lam, damping="eig")
        assert torch.allclose(d, exact, rtol=1e-9, atol=1e-12)
        factored = kfac.kfac_direction(model, X, y, loss_fn, lam, damping="factored")
        assert torch.isfinite(factored).all() and not torch.allclose(factored, exact)


def test_laplace_marginal_likelihood(capsys):
    result = load("laplace_marginal_likelihood").main(["--small"])
    out = capsys.readouterr().out
    assert "| x | sin(2x) | predictive mean | predictive std |" in out
    assert result["fd_error"] < 1e-5  # the exact gradient agrees with finite differences
    assert result["log_marglik_after"] > result["log_marglik_before"] + 10
    assert 0.05 < result["sigma"] < 0.2  # the data's noise is 0.1
    assert (result["prior_precision"] > 0).all()
    std, x = result["predictive_std"], result["x_test"]
    assert torch.isfinite(std).all()
    inside, outside = std[x.abs() <= 1].max(), std[x.abs() >= 4].min()
    assert outside > 2 * inside  # more uncertain away from the data in [-2, 2]


def _distributed(rank: int, world: int) -> None:
    out = load("distributed_curvature").main(["--small"])
    dp, pp = out["data parallel"], out["pipeline"]
    assert dp["samples per rank"] == (24, 24)
    for key in ("gradient", "G v", "logdet", "solve"):
        assert dp[key] <= 1e-12, key
    assert pp["solve"] <= 1e-12 and pp["logdet"] <= 1e-12 and pp["inertia equal"]
    assert pp["stages per rank"] == [2, 2]
    losses = out["damped newton losses"]
    assert losses[-1] < losses[0]


def test_distributed_curvature():
    """The example on two processes of a gloo group (forked; the test below uses torchrun)."""
    launch(2, _distributed)


def test_distributed_curvature_with_torchrun():
    """What the README says to run, as a user runs it."""
    script = str(EXAMPLES / "distributed_curvature.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [script, "--small"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## data parallel (2 ranks)" in done.stdout and "## pipeline (2 ranks)" in done.stdout
    assert "inertia equal: True" in done.stdout
