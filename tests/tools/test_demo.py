"""The demo (``python -m hessinv demo``) on tiny problems: its rows, its verdict, its options."""

from __future__ import annotations

import re

import pytest
import torch

import hessinv
from hessinv.__main__ import main
from hessinv.tools.demo import (
    DemoConfig,
    Facts,
    Part,
    Row,
    format_report,
    make_problem,
    run_demo,
    verdict,
)

TINY = DemoConfig(depth=4, width=4, batch=3, d_in=3, n_classes=3, progress=False)
EXACT, CG, SCIPY_CG = (
    "exact (riccati, ours)",
    "CG (hessinv) on our products",
    "CG (scipy) on our products",
)
MINRES, DENSE = "MINRES (scipy) on our products", "dense torch.func.hessian + solve"


@pytest.fixture(scope="module")
def report():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield run_demo(TINY)
    finally:
        torch.set_num_threads(threads)


def _rows(part: Part) -> dict[str, Row]:
    """The rows by method, the exact factorization's under ``EXACT`` whatever its route (the
    demo names the route ``method="auto"`` took: ``exact (dense, ours)`` for a tiny problem)."""
    out = {}
    for row in part.rows:
        exact = row.method.startswith("exact (") and "tridiagonal" not in row.method
        out[EXACT if exact else row.method] = row
    return out


def _dense_damped(cfg: DemoConfig) -> torch.Tensor:
    """``H + eps I`` of the demo's problem, from ``torch.func.hessian``."""
    p = make_problem(cfg)
    D = hessinv.dense_hessian(p.model, p.loss_fn, p.inputs, p.targets)
    return D + cfg.damping * torch.eye(D.shape[0], dtype=D.dtype)


def test_indefinite_part_exact_solve_agrees_with_dense(report):
    part = report.parts[0]
    rows = _rows(part)
    assert list(rows) == [EXACT, CG, MINRES, DENSE]
    assert part.reference == "dense solve" and rows[DENSE].is_reference
    assert rows[EXACT].rel_error < 1e-10
    assert rows[EXACT].rel_residual < 1e-12
    assert part.facts.backward_error < 1e-12


def test_indefinite_part_reports_the_exact_logdet_and_inertia(report):
    facts = report.parts[0].facts
    A = _dense_damped(TINY)
    eigenvalues = torch.linalg.eigvalsh(A)
    assert facts.inertia == (int((eigenvalues > 0).sum()), int((eigenvalues < 0).sum()), 0)
    assert facts.inertia[1] > 0, "the tiny problem should be indefinite"
    sign, logabsdet = torch.linalg.slogdet(A)
    assert facts.sign == int(sign)
    assert facts.logabsdet == pytest.approx(float(logabsdet), rel=1e-10)


def test_cg_stops_on_the_indefinite_system(report):
    row = _rows(report.parts[0])[CG]
    assert row.status == "stopped: negative curvature"
    assert row.rel_residual > 1e-3


def test_cg_converges_on_the_positive_definite_system(report):
    part = report.parts[1]
    rows = _rows(part)
    assert list(rows) == [EXACT, CG, SCIPY_CG] and rows[EXACT].is_reference
    assert part.facts.inertia == (report.num_params, 0, 0)
    assert rows[EXACT].rel_residual < 1e-12
    for name in (CG, SCIPY_CG):
        assert rows[name].status.startswith("converged")
        assert rows[name].rel_residual <= TINY.target
        assert rows[name].rel_error < 1e-8
        assert rows[name].products < report.num_params


def test_report_prints_tables_facts_and_verdict(report):
    text = format_report(report)
    assert re.search(r"\| exact \((dense|riccati|output space), ours\) \|", text)
    for piece in (
        f"| {CG} |",
        f"| {DENSE} |",
        "log|det(H + 0.01 I)|",
        "log|det(G + 0.01 I)|",
        "inertia:",
        "backward error",
        "When to use what",
        "-> use",
    ):
        assert piece in text, piece


def _part(*rows: Row) -> Part:
    facts = Facts(1, 0.0, (3, 0, 0), 1e-15, 0, "riccati")
    return Part("t", "G", "G + 0.1 I", 0.0, "exact solve", list(rows), facts)


def test_verdict_picks_the_fastest_row_that_reached_the_target():
    part = _part(
        Row(EXACT, "exact", 1.0, "ok", rel_residual=1e-14),
        Row(CG, "iterative", 0.1, "stopped: negative curvature", products=2, rel_residual=0.5),
        Row(MINRES, "iterative", 5.0, "converged", products=900, rel_residual=1e-11),
    )
    lines = verdict(part, 1e-10)
    assert lines[0].startswith("G + 0.1 I: fastest") and EXACT in lines[0]
    assert MINRES in lines[1] and "5.0x slower" in lines[1]
    assert CG in lines[2] and "did not reach it" in lines[2] and "2 products" in lines[2]
    assert "G.factorize(eps)" in lines[-1]


def test_verdict_recommends_cg_when_cg_wins():
    part = _part(
        Row(EXACT, "exact", 1.0, "ok", rel_residual=1e-14),
        Row(CG, "iterative", 0.25, "converged", products=5, rel_residual=1e-11),
    )
    lines = verdict(part, 1e-10)
    assert CG in lines[0] and "4.0x slower" in lines[1]
    assert "conjugate_gradient(G.matvec, g, eps)" in lines[-1]


def test_verdict_when_nothing_reached_the_target():
    part = _part(Row(CG, "iterative", 0.1, "stopped", products=1, rel_residual=0.5))
    assert verdict(part, 1e-10) == ["G + 0.1 I: no method reached a relative residual <= 1e-10"]


def test_cli_prints_the_report(capsys):
    argv = [
        "demo",
        "--depth",
        "3",
        "--width",
        "3",
        "--batch",
        "2",
        "--dense-limit",
        "10",
        "--no-progress",
        "--tridiagonal",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| exact \((dense|riccati|output space), ours\) \| ", out)
    assert "| exact (tridiagonal, paper) |" in out
    assert "errors relative to the exact solve (n > --dense-limit 10)" in out
    assert DENSE not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depth", "0"], "argument --depth: must be at least 1, got 0"),
        (["--width", "two"], "argument --width: expected an integer, got 'two'"),
        (["--classes", "1"], "argument --classes: must be at least 2, got 1"),
        (["--damping", "0"], "argument --damping: must be a finite number > 0, got 0"),
        (["--damping", "inf"], "argument --damping: must be a finite number > 0, got inf"),
        (["--rtol", "1"], "argument --rtol: must be below 1, got 1"),
        (["--dense-limit", "-1"], "argument --dense-limit: must be at least 0, got -1"),
        (["--device", "gpu0"], "argument --device: 'gpu0' is not a torch device"),
        (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--dtype", "float32", "--rtol", "1e-9"], "--rtol 1e-09 is below what float32 can reach"),
    ],
)
def test_cli_rejects_bad_options(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: hessinv demo" in err
