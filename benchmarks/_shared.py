"""Pieces the benchmark scripts share: fresh child processes, memory readings, the load
average, and results files whose ``## `` sections are refreshed one part at a time.

Imported by the scripts beside it (``python benchmarks/bench_X.py`` puts this folder on
``sys.path``), never by the library.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_ram_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo``."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def run_child(script: str, kind: str, spec: dict, timeout: float, env=None) -> dict:
    """Run ``script --worker kind spec`` in a fresh interpreter (environment ``env``, default
    this one's) and return the JSON of its last output line; ``{"error": ...}`` (the last
    line of its stderr) if it fails or times out."""
    command = [sys.executable, script, "--worker", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def splice(old: str, sections: dict[str, str], headings: dict[str, str]) -> str:
    """Replace the sections of ``old`` (split at its ``## `` headings) that were rerun.

    ``sections`` maps a part to its new markdown, ``headings`` a part to the first words of
    its heading; a part never written before is appended. This lets ``--parts X --out``
    refresh one table without rerunning the rest."""
    chunks = old.split("\n## ")
    head, body = chunks[0], ["## " + c for c in chunks[1:]]
    for part, text in sections.items():
        text = text.strip("\n")
        hits = [i for i, c in enumerate(body) if c.startswith(headings[part])]
        if hits:
            body[hits[0]] = text
        else:
            body.append(text)
    return "\n\n".join([head.strip("\n")] + [c.strip("\n") for c in body]) + "\n"
