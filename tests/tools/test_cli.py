"""The command lines' help, run as a user runs them: ``python -m hessinv demo --help``,
the ``hessinv`` console script, ``python -m paper --help``; and the demo without extras."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from hessinv.tools.demo import DemoConfig
from paper import EXPERIMENTS

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: markup that must not leak into plain-text help (reStructuredText / Markdown / Sphinx)
MARKUP = ("``", ":mod:", ":func:", ":class:", "**", ".. ")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _option_entries(help_text: str) -> dict[str, str]:
    """``{"--depth": "number of Linear layers (default: 16)", ...}`` from argparse help."""
    entries, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in entries.items()}


@pytest.fixture(scope="module")
def demo_help() -> str:
    result = _run("-m", "hessinv", "demo", "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_help_is_plain_text(demo_help):
    assert demo_help.startswith("usage: python -m hessinv demo")
    assert not [m for m in MARKUP if m in demo_help]
    assert "(H + eps I) x = g" in demo_help and "(G + eps I) x = g" in demo_help
    assert max(len(line) for line in demo_help.splitlines()) <= 80


def test_demo_help_lists_every_option_with_its_default(demo_help):
    entries = _option_entries(demo_help)
    usage = demo_help.split("\n\n")[0]
    options = set(re.findall(r"--[\w-]+", usage))
    assert len(options) >= 15 and options <= set(entries)
    for name in options:
        assert "(default:" in entries[name], entries[name]
    defaults = DemoConfig()
    for name, value in [
        ("--depth", defaults.depth),
        ("--width", defaults.width),
        ("--batch", defaults.batch),
        ("--damping", defaults.damping),
        ("--dense-limit", defaults.dense_limit),
        ("--seed", defaults.seed),
        ("--device", defaults.device),
        ("--dtype", defaults.dtype),
        ("--maxiter", defaults.maxiter),
        ("--threads", 1),
    ]:
        assert f"(default: {value})" in entries[name], entries[name]
    assert "(default: 1e-10 in float64, 1e-4 in float32)" in entries["--rtol"]


def test_console_script_runs_the_same_command_line():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^hessinv = "hessinv\.__main__:main"$', pyproject, re.MULTILINE)
    script = "import sys; from hessinv.__main__ import main; sys.exit(main())"
    result = _run("-c", script, "demo", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hessinv demo")


def test_hessinv_without_a_command_says_what_is_missing():
    result = _run("-m", "hessinv")
    assert result.returncode == 2
    assert "the following arguments are required: command" in result.stderr


def test_paper_help_is_plain_text_naming_every_experiment():
    result = _run("-m", "paper", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: python -m paper")
    assert not [m for m in MARKUP if m in text]
    assert max(len(line) for line in text.splitlines()) <= 80
    assert {"E1", "E2", "E3", "E4", "E5"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        line = re.search(rf"^  {name}  (.+)$", text, re.MULTILINE)
        assert line and len(line.group(1).split()) >= 4, f"{name} has no one-line summary"
    entries = _option_entries(text)
    for name in ("--quick", "--device", "--only", "--out", "--seed", "--threads"):
        assert "(default:" in entries[name], entries[name]
    assert "(default: cpu)" in entries["--device"] and "(default: 1)" in entries["--threads"]


def test_demo_runs_without_the_test_and_paper_extras():
    """``pip install hessinv`` only: matplotlib, sklearn, pytest, hypothesis cannot be imported."""
    script = """
import sys
for name in ("matplotlib", "sklearn", "pytest", "hypothesis"):
    sys.modules[name] = None  # importing it now raises ModuleNotFoundError
from hessinv.__main__ import main
sys.exit(main(["demo", "--depth", "2", "--width", "2", "--batch", "2", "--no-progress"]))
"""
    result = _run("-c", script)
    assert result.returncode == 0, result.stderr
    assert "When to use what" in result.stdout
