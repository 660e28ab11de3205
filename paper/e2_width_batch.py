"""E2: cost against width h and batch size B at fixed depth.

Claim: at fixed depth the paper's block-tridiagonal solve costs, per stage, a block LU
of blocks of size ``p + 2a`` (``p = h^2 + h`` parameters, ``a = B h`` activations), so
its time per stage grows like the cube of that size: like ``h^6`` in the width and
``B^3`` in the batch once ``a`` dominates. The Riccati solve only factors ``p x p``
and ``a x a``-sized pieces, with the ``a x a`` ones block-diagonal over samples, so it
grows far more slowly in ``B``; the ratio tridiagonal / Riccati shows the gap.
"""

from __future__ import annotations

import torch

from .common import (
    DTYPE,
    Budget,
    Config,
    fit_loglog_slope,
    loglog_figure,
    make_problem,
    memory_method,
    new_figure,
    progress,
    save_figure,
    write_table,
)
from .e1_depth import METHODS, measure_point


def settings(cfg: Config) -> dict:
    if cfg.quick:
        return dict(
            depth=8,
            widths=[4, 8, 16, 32],
            width_batch=8,
            batches=[4, 8, 16, 32, 64],
            batch_width=8,
            n_classes=4,
            dense_max_n=1200,
            max_s=3.0,
            mem_cap=1.5e9,
            cg_maxiter=2000,
            repeats=3,
            memory=False,
        )
    return dict(
        depth=32,
        widths=[4, 8, 16, 32, 64],
        width_batch=16,
        batches=[4, 8, 16, 32, 64, 128],
        batch_width=16,
        n_classes=10,
        dense_max_n=6000,
        max_s=60.0,
        mem_cap=8e9,
        cg_maxiter=20000,
        repeats=5,
        memory=True,
    )


def _sweep(cfg, st, sizes, label):
    budget = Budget(st["max_s"])
    rows = []
    for h, B in progress(sizes, f"E2 {label}"):
        prob = make_problem(
            st["depth"],
            h,
            B,
            n_classes=st["n_classes"],
            dtype=DTYPE,
            device=cfg.device,
            seed=cfg.seed,
        )
        r = measure_point(prob, st, budget, cfg.device, memory=st["memory"])
        p, a = h * h + h, B * h
        row = {"sweep": label, "h": h, "B": B, "p": p, "a": a, "p+2a": p + 2 * a}
        row.update(r)
        rows.append(row)
    return rows, budget.notes()


def run(cfg: Config, **overrides) -> str:
    """Run E2; ``overrides`` replace entries of :func:`settings`."""
    st = {**settings(cfg), **overrides}
    outdir = cfg.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    L = st["depth"]
    w_rows, w_notes = _sweep(cfg, st, [(h, st["width_batch"]) for h in st["widths"]], "width")
    b_rows, b_notes = _sweep(cfg, st, [(st["batch_width"], B) for B in st["batches"]], "batch")

    def per_layer(rows, m):
        return [None if r.get(f"t_{m}") is None else r[f"t_{m}"] / L for r in rows]

    fig, axes = new_figure(3, width=16.0)
    loglog_figure(
        axes[0],
        [r["h"] for r in w_rows],
        {m: per_layer(w_rows, m) for m in METHODS},
        tail=3,
        xlabel="width h",
        ylabel="seconds per stage",
        title=f"vs width (B={st['width_batch']}, L={L})",
    )
    loglog_figure(
        axes[1],
        [r["B"] for r in b_rows],
        {m: per_layer(b_rows, m) for m in METHODS},
        tail=3,
        xlabel="batch B",
        ylabel="seconds per stage",
        title=f"vs batch (h={st['batch_width']}, L={L})",
    )
    both = w_rows + b_rows
    order = sorted(range(len(both)), key=lambda i: both[i]["p+2a"])
    xs = [both[i]["p+2a"] for i in order]
    loglog_figure(
        axes[2],
        xs,
        {
            f"{m} (both sweeps)": [per_layer(both, m)[i] for i in order]
            for m in ("tridiagonal", "riccati")
        },
        tail=4,
        xlabel="block size p + 2a of the augmented system",
        ylabel="seconds per stage",
        title="per-stage cost against the augmented block size",
    )
    save_figure(fig, outdir / "e2_width_batch.png")

    table = []
    for r in both:
        t = {k: r[k] for k in ("sweep", "h", "B", "p", "a", "p+2a", "n")}
        for m in METHODS:
            t[f"{m} ms/stage"] = None if r.get(f"t_{m}") is None else 1e3 * r[f"t_{m}"] / L
        tri, ric = r.get("t_tridiagonal"), r.get("t_riccati")
        t["tridiag/riccati"] = tri / ric if tri and ric else None
        t["cg iters"] = r.get("cg_iters")
        if st["memory"]:
            for m in ("riccati", "tridiagonal"):
                mem = r.get(f"mem_{m}")
                t[f"{m} MB"] = None if mem is None else mem / 1e6
        t["err riccati"] = r.get("err_riccati")
        t["err tridiag"] = r.get("err_tridiagonal")
        table.append(t)
    md = write_table(
        table,
        outdir,
        "e2_width_batch",
        f"E2: cost per stage against width and batch (L={L}, float64, {cfg.device})",
    )
    write_table(both, outdir, "e2_width_batch_raw", "E2 raw measurements")
    slopes = []
    for label, rows, key, notes in (
        ("width h", w_rows, "h", w_notes),
        ("batch B", b_rows, "B", b_notes),
    ):
        for m in ("matvec", "riccati", "tridiagonal"):
            slopes.append(
                {
                    "against": label,
                    "method": m,
                    "slope": fit_loglog_slope([r[key] for r in rows], per_layer(rows, m), tail=3),
                    "note": notes.get(m, ""),
                }
            )
    for m in ("riccati", "tridiagonal"):
        slopes.append(
            {
                "against": "p+2a (both)",
                "method": m,
                "slope": fit_loglog_slope(xs, [per_layer(both, m)[i] for i in order], tail=4),
                "note": "",
            }
        )
    md += "\n" + write_table(
        slopes,
        outdir,
        "e2_slopes",
        "E2: fitted log-log slopes (3 largest sizes per sweep, 4 largest blocks)",
    )
    if st["memory"]:
        md += f"\nmemory: {memory_method(cfg.device)}.\n"
    return md
