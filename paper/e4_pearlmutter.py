"""E4: our Hessian-vector product against Pearlmutter's forward-over-reverse HVP.

Claim: the product computed from the stored stage derivatives (docs/algorithm.md section 3)
is the same exact Hessian-vector product that ``torch.func`` computes by
forward-mode differentiation of the gradient (agreement to rounding), at a cost linear
in depth for both. Computing the stage derivatives costs a few products; after that
each further product is cheaper than a Pearlmutter product, and k products done as one
``(n, k)`` block share the per-stage work.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, jvp, vmap

from .common import (
    Config,
    fit_loglog_slope,
    loglog_figure,
    make_problem,
    median_time,
    new_figure,
    progress,
    save_figure,
    synchronize,
    write_table,
)


def settings(cfg: Config) -> dict:
    if cfg.quick:
        return dict(
            depths=[8, 32, 128],
            width=8,
            batch=8,
            n_classes=4,
            ks=[1, 10, 100],
            amortise_depth=32,
            repeats=3,
            n_vectors=3,
        )
    return dict(
        depths=[8, 32, 128, 512],
        width=16,
        batch=16,
        n_classes=10,
        ks=[1, 10, 100],
        amortise_depth=128,
        repeats=5,
        n_vectors=5,
    )


def pearlmutter_hvp(prob):
    """``v -> H v`` by forward-over-reverse (``jvp`` of ``grad``) on the flat parameters."""
    named = [(k, p) for k, p in prob.model.named_parameters()]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(flat):
        params = {
            k: t.reshape(s) for (k, _), t, s in zip(named, flat.split(sizes), shapes, strict=True)
        }
        return prob.loss_fn(functional_call(prob.model, params, (prob.X,)), prob.y)

    grad_fn = grad(loss_of)

    def hvp(v):
        return jvp(grad_fn, (theta,), (v,))[1]

    return hvp


def _rel(x, ref) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def run(cfg: Config, **overrides) -> str:
    """Run E4; ``overrides`` replace entries of :func:`settings`."""
    st = {**settings(cfg), **overrides}
    outdir = cfg.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    dev = cfg.device
    gen = torch.Generator().manual_seed(cfg.seed)

    def problem(L):
        return make_problem(
            L, st["width"], st["batch"], n_classes=st["n_classes"], device=dev, seed=cfg.seed
        )

    # --- per-product error and time against depth
    rows = []
    for L in progress(st["depths"], "E4 depth"):
        prob = problem(L)
        H = prob.hessian()
        n = H.num_params
        hvp = pearlmutter_hvp(prob)
        V = torch.randn(n, st["n_vectors"], generator=gen, dtype=torch.float64).to(dev)
        errs = [_rel(H.matvec(V[:, j]), hvp(V[:, j])) for j in range(V.shape[1])]
        v = V[:, 0]
        t_deriv = median_time(
            lambda prob=prob: prob.hessian().stage_derivatives(), repeats=st["repeats"], device=dev
        )
        t_ours = median_time(lambda H=H, v=v: H.matvec(v), repeats=st["repeats"], device=dev)
        t_pm = median_time(lambda hvp=hvp, v=v: hvp(v), repeats=st["repeats"], device=dev)
        rows.append(
            {
                "L": L,
                "n": n,
                "max rel err": max(errs),
                "pearlmutter ms": 1e3 * t_pm,
                "ours ms (given derivatives)": 1e3 * t_ours,
                "derivatives ms": 1e3 * t_deriv,
                "pearlmutter / ours": t_pm / t_ours,
                "break-even k": t_deriv / max(t_pm - t_ours, 1e-12) if t_pm > t_ours else None,
            }
        )

    # --- amortised cost of k products at one depth
    prob = problem(st["amortise_depth"])
    n = prob.num_params
    hvp = pearlmutter_hvp(prob)
    hvp_block = vmap(hvp, in_dims=1, out_dims=1)
    am_rows = []
    for k in progress(st["ks"], "E4 k"):
        V = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dev)

        def ours_loop(V=V, k=k):
            H = prob.hessian()
            return [H.matvec(V[:, j]) for j in range(k)]

        def ours_block(V=V):
            return prob.hessian().matvec(V)

        def pm_loop(V=V, k=k):
            return [hvp(V[:, j]) for j in range(k)]

        def pm_block(V=V):
            return hvp_block(V)

        row = {"L": st["amortise_depth"], "n": n, "k": k}
        for name, fn in (
            ("ours loop", ours_loop),
            ("ours (n,k) block", ours_block),
            ("pearlmutter loop", pm_loop),
            ("pearlmutter vmap", pm_block),
        ):
            t = median_time(fn, repeats=st["repeats"], device=dev, budget_s=20.0)
            row[f"{name} ms/product"] = 1e3 * t / k
        ours = ours_block()
        ref = pm_block()
        row["block rel err"] = _rel(ours, ref)
        am_rows.append(row)

    # --- figure
    fig, (ax1, ax2) = new_figure(2)
    depths = [r["L"] for r in rows]
    loglog_figure(
        ax1,
        depths,
        {
            "pearlmutter (jvp of grad)": [r["pearlmutter ms"] / 1e3 for r in rows],
            "matvec (given derivatives)": [r["ours ms (given derivatives)"] / 1e3 for r in rows],
            "derivatives (once)": [r["derivatives ms"] / 1e3 for r in rows],
        },
        tail=3,
        xlabel="depth L",
        ylabel="seconds per product",
        title=f"one HVP, width {st['width']}, batch {st['batch']}, float64",
    )
    ks = [r["k"] for r in am_rows]
    for name, style in (
        ("ours loop", "g-o"),
        ("ours (n,k) block", "g--s"),
        ("pearlmutter loop", "r-o"),
        ("pearlmutter vmap", "r--s"),
    ):
        ax2.loglog(
            ks,
            [r[f"{name} ms/product"] / 1e3 for r in am_rows],
            style,
            label=name + (" (incl. derivatives)" if name.startswith("ours") else ""),
        )
    ax2.set_xlabel("k products sharing one model state")
    ax2.set_ylabel("seconds per product (amortised)")
    ax2.set_title(f"amortised, L={st['amortise_depth']}, n={n}", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    save_figure(fig, outdir / "e4_pearlmutter.png")
    synchronize(dev)

    md = write_table(
        rows,
        outdir,
        "e4_pearlmutter",
        f"E4: one Hessian-vector product, ours vs Pearlmutter ({dev}, float64)",
    )
    md += "\n" + write_table(
        am_rows,
        outdir,
        "e4_amortised",
        "E4: amortised time per product for k products (ours includes computing the derivatives)",
    )
    slope_pm = fit_loglog_slope(depths, [r["pearlmutter ms"] for r in rows])
    slope_ours = fit_loglog_slope(depths, [r["ours ms (given derivatives)"] for r in rows])
    md += f"\nlog-log slopes in depth: pearlmutter {slope_pm:.2f}, ours {slope_ours:.2f}.\n"
    return md
