"""Smoke test of the paper experiments: one tiny configuration each, into a tmp dir."""

from __future__ import annotations

import csv

import pytest
import torch

pytest.importorskip("matplotlib")

from paper import e1_depth, e2_width_batch, e3_accuracy, e4_pearlmutter  # noqa: E402
from paper.common import Config, fit_loglog_slope, peak_memory  # noqa: E402


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _num(s):
    return None if s in ("", None) else float(s)


@pytest.fixture
def cfg(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Config(quick=True, device=torch.device("cpu"), outdir=tmp_path, seed=0)
    torch.set_num_threads(threads)


def test_e1_tiny(cfg):
    md = e1_depth.run(cfg, depths=[2, 3], width=3, batch=2, repeats=1)
    assert "E1" in md
    for stem in ("e1_depth", "e1_depth_raw", "e1_slopes"):
        assert (cfg.outdir / f"{stem}.csv").exists() and (cfg.outdir / f"{stem}.md").exists()
    assert (cfg.outdir / "e1_depth.png").stat().st_size > 0
    for row in _rows(cfg.outdir / "e1_depth_raw.csv"):
        assert _num(row["err_riccati"]) < 1e-10  # against the dense solve
        if row["err_cg"]:
            assert _num(row["err_cg"]) < 1e-5


def test_e2_tiny(cfg):
    e2_width_batch.run(
        cfg, depth=2, widths=[2, 3], batches=[2, 3], width_batch=2, batch_width=2, repeats=1
    )
    assert (cfg.outdir / "e2_width_batch.png").exists()
    rows = _rows(cfg.outdir / "e2_width_batch_raw.csv")
    assert len(rows) == 4
    assert all(_num(r["err_riccati"]) < 1e-10 for r in rows)


def test_e3_tiny(cfg):
    e3_accuracy.run(cfg, depth=3, width=3, batch=2, eps=[1e-3, 1.0])
    assert (cfg.outdir / "e3_accuracy.png").exists()
    rows = _rows(cfg.outdir / "e3_accuracy.csv")
    assert {r["net"] for r in rows} == {"tanh", "relu"}
    for r in rows:
        assert _num(r["err ric f64"]) < 1e-6
        assert _num(r["err ric f32"]) < 1e-1
        assert r["inertia ok"] == "True"


def test_e4_tiny(cfg):
    e4_pearlmutter.run(cfg, depths=[2, 3], ks=[1, 2], amortise_depth=2, repeats=1, width=3, batch=2)
    assert (cfg.outdir / "e4_pearlmutter.png").exists()
    for r in _rows(cfg.outdir / "e4_pearlmutter.csv"):
        assert _num(r["max rel err"]) < 1e-12
    for r in _rows(cfg.outdir / "e4_amortised.csv"):
        assert _num(r["block rel err"]) < 1e-12


def test_helpers():
    assert abs(fit_loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) - 2.0) < 1e-12
    mem = peak_memory(lambda: torch.ones(2_000_000, dtype=torch.float64).sum())
    if mem is not None:  # Linux: a forked child; 16 MB allocated
        assert 10e6 < mem < 40e6


def test_e6_tiny(cfg):
    from paper import e6_deep_training

    md = e6_deep_training.run(
        cfg,
        configs=[(3, 3)],
        activations=["tanh"],
        batch=8,
        precond_batch=12,
        refresh_every=2,
        first_order_budget_s=0.1,
        budget_s=0.2,
        max_steps=3,
        cg_iters=3,
        sgd_lrs=[0.01],
        adam_lrs=[0.01],
        psgd_lrs=[0.1],
    )
    assert "E6" in md
    for stem in ("e6_deep_training", "e6_winners", "e6_by_method", "e6_runs", "e6_init"):
        assert (cfg.outdir / f"{stem}.csv").exists() and (cfg.outdir / f"{stem}.md").exists()
    assert (cfg.outdir / "e6_curves.csv").exists()
    assert (cfg.outdir / "e6_deep_training.png").stat().st_size > 0
    rows = _rows(cfg.outdir / "e6_deep_training.csv")
    assert {r["method"] for r in rows} == set(e6_deep_training.METHODS)
    for r in rows:
        assert not r["status"].startswith("error"), r
        assert 1 <= int(r["steps"]) <= 3


def test_e6_psgd_is_sgd_on_the_exact_solve(cfg):
    """PSGD-GGN (CurvaturePreconditioner + torch.optim.SGD) takes the steps
    ``x <- x - lr (G_big + eps I)^-1 g_minibatch``, ``eps = rel tr(G_big) / n``, with ``G_big``
    rebuilt every ``refresh_every`` steps on the next batch of its own stream."""
    from torch import nn

    import hessinv
    from paper import e6_deep_training as e6
    from paper.common import Batches

    data = e6.load_data("cpu")
    n = data[0].shape[0]
    loss_fn = nn.CrossEntropyLoss()
    model, ref = (e6.make_model(3, 4, "tanh", 0, "cpu") for _ in range(2))
    psgd = e6.PreconditionedSGD(model, loss_fn, 0.1, 0.5, 2, Batches(n, 12, 2000, "cpu"), data)
    big, small = Batches(n, 12, 2000, "cpu"), Batches(n, 8, 1000, "cpu")
    params = list(ref.parameters())
    for k in range(5):
        idx = small.next()
        X, y = data[0][idx], data[1][idx]
        if k % 2 == 0:
            j = big.next()
            G = hessinv.ChainGGN(ref, loss_fn, data[0][j], data[1][j], progress=False)
            F = G.factorize(0.5 * float(G.trace()) / G.num_params)
        g = torch.cat([q.reshape(-1) for q in torch.autograd.grad(loss_fn(ref(X), y), params)])
        step = F.solve(g)
        with torch.no_grad():
            for p, d in zip(params, step.split([q.numel() for q in params]), strict=True):
                p.sub_(0.1 * d.view_as(p))
        psgd.step(X, y)
    assert psgd.refreshes == 3 and psgd.eps == pytest.approx(F.damping, rel=1e-12)
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-13)


def test_e7_tiny(cfg):
    from paper import e7_least_squares as e7

    md = e7.run(
        cfg,
        tasks=[
            dict(e7._SINES2D, n_train=12, n_test=8, depth=3, width=4),
            dict(name="diabetes", kind="diabetes", depth=2, width=3),
        ],
        budget_s=5.0,
        sweep_budget_s=5.0,
        max_steps=3,
        adam_lrs=[0.01],
        sweep=[(2, 3), (3, 4)],
        lbfgs_iters_per_call=1,
    )
    assert "E7" in md
    for stem in (
        "e7_least_squares",
        "e7_verdict",
        "e7_thresholds",
        "e7_runs",
        "e7_sweep",
        "e7_sweep_summary",
    ):
        assert (cfg.outdir / f"{stem}.csv").exists() and (cfg.outdir / f"{stem}.md").exists()
    assert (cfg.outdir / "e7_curves.csv").exists()
    for png in ("e7_least_squares.png", "e7_sweep.png"):
        assert (cfg.outdir / png).stat().st_size > 0
    rows = _rows(cfg.outdir / "e7_least_squares.csv")
    assert {r["method"] for r in rows} == set(e7.METHODS)
    for r in rows:
        assert r["status"] == "ok", r
        assert 1 <= int(r["steps"]) <= 3
        assert _num(r["train loss"]) < _num(r["init train loss"])
        if r["method"] in ("LM-dense", "LM-dense-JJt"):  # the same iterates as LM-exact
            assert "agree with LM-exact's" in r["note"]
    lm = {
        (r["task"], r["method"]): _num(r["train loss"])
        for r in rows
        if r["method"] in e7.LM_METHODS
    }
    for task in {t for t, _ in lm}:
        ref = lm[(task, "LM-exact")]
        for m in ("LM-dense", "LM-dense-JJt"):
            assert abs(lm[(task, m)] - ref) <= 1e-8 * ref
    assert len(_rows(cfg.outdir / "e7_sweep.csv")) == 2 * len(e7.METHODS)


def test_e7_dense_lm_matches_hessinv_step(cfg):
    """One LM step of the dense baselines equals hessinv.DampedNewton's (same rule, same G)."""
    from torch import nn

    import hessinv
    from paper import e7_least_squares as e7

    task = dict(name="t", kind="synthetic", d_in=2, d_out=2, n_train=10, n_test=4, freq=1.0)
    X, y, _, _ = e7.load_task(task, 0, "cpu")
    st = e7.settings(cfg)
    ref = e7.make_model(2, 3, 4, 2, 0, "cpu")
    hessinv.DampedNewton(
        ref,
        nn.MSELoss(),
        damping=st["lm_damping"],
        damping_down=st["lm_damping_down"],
        damping_up=st["lm_damping_up"],
        max_tries=st["lm_max_tries"],
        curvature="ggn",
    ).step(X, y)
    for mode in ("normal", "woodbury"):
        model = e7.make_model(2, 3, 4, 2, 0, "cpu")
        e7.DenseLM(model, st, mode).step(X, y)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), mode


def test_e6_digits_check_tiny(tmp_path, capsys):
    """The digits check runs every method for a few steps, writes its JSON lines and their
    table."""
    from paper import e6_digits_check as check

    out = tmp_path / "runs.jsonl"
    argv = ["--depth", "3", "--width", "4", "--batch", "8", "--steps", "2", "--out", str(out)]
    assert check.main(argv + ["--methods", *check.METHODS]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(check.METHODS)
    assert check.main(["--table", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in check.METHODS)
