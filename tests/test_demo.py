"""The README's main job (``python -m hessinv demo``) on a small problem."""

from __future__ import annotations

import pytest

from hessinv.demo import main, run_demo


def test_run_demo_rows_are_accurate():
    rows, meta = run_demo(depth=4, width=4, batch=3, d_in=3, n_classes=3, progress=False)
    assert meta["reference"] == "dense"
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"riccati (ours)", "tridiagonal (paper)", "CG on our Hv",
                              "MINRES (scipy) on our Hv", "dense torch.func.hessian"}
    for name in ("riccati (ours)", "tridiagonal (paper)"):
        assert by_method[name]["rel_error"] < 1e-10
        assert by_method[name]["rel_residual"] < 1e-12


def test_cli_prints_table(capsys):
    assert main(["demo", "--depth", "3", "--width", "3", "--batch", "2", "--dense-limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "| riccati (ours) |" in out and "riccati (n above --dense-limit)" in out


def test_cli_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        main(["demo", "--depth", "0"])
