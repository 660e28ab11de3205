"""E3: accuracy of the exact solves against a float64 dense solve.

Claim: both exact solves (Riccati and the paper's block-tridiagonal) agree with
``torch.linalg.solve`` on the dense float64 Hessian to near machine precision times
the condition number, for damping from 1e-6 to 10, including the indefinite case
(small eps), where CG breaks down; in float32 the error grows with the condition
number like any float32 solve. The inertia read off the Riccati factorization
(Haynsworth) equals the eigenvalue counts of the dense matrix. Checked on a tanh and
on a ReLU network.
"""

from __future__ import annotations

import math
import warnings

import torch

import hessinv

from .common import Config, make_problem, new_figure, progress, save_figure, write_table


def settings(cfg: Config) -> dict:
    if cfg.quick:
        return dict(
            depth=6,
            width=6,
            batch=8,
            n_classes=3,
            eps=[1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0],
            cg_factor=3,
            activations=["tanh", "relu"],
        )
    return dict(
        depth=12,
        width=8,
        batch=16,
        n_classes=4,
        eps=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0],
        cg_factor=10,
        activations=["tanh", "relu"],
    )


def _rel(x, ref) -> float:
    x = x.to(ref.dtype)
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def _cg_trace(matvec, b, eps, x_ref, target, maxiter):
    """CG from zero, tracking the error against ``x_ref``.

    Returns ``(iterations to reach error <= target or None, best error, status)``;
    status is ``"ok"``, ``"negative curvature"`` or ``"maxiter"``.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    best = 1.0
    for it in range(1, maxiter + 1):
        Ap = matvec(p) + eps * p
        curv = p @ Ap
        if curv <= 0:
            return None, best, f"negative curvature at it {it}"
        alpha = rr / curv
        x = x + alpha * p
        r = r - alpha * Ap
        err = _rel(x, x_ref)
        best = min(best, err)
        if err <= target:
            return it, best, "ok"
        rr_new = r @ r
        if rr_new == 0:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return None, best, "maxiter"


def _solve(H, g, eps, method):
    """``(x, warned)``: the solve (``None`` if it raised) and whether it warned that its
    accuracy could not be certified (``hessinv.AccuracyWarning``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hessinv.AccuracyWarning)
        try:
            x = H.solve(g, damping=eps, method=method)
        except Exception:  # report as missing, keep going
            x = None
    return x, any(issubclass(w.category, hessinv.AccuracyWarning) for w in caught)


def measure(cfg: Config, st: dict, activation: str) -> list[dict]:
    prob = make_problem(
        st["depth"],
        st["width"],
        st["batch"],
        n_classes=st["n_classes"],
        activation=activation,
        device=cfg.device,
        seed=cfg.seed,
    )
    H = prob.hessian()
    n = H.num_params
    D = hessinv.dense_hessian(prob.model, prob.loss_fn, prob.X, prob.y)
    evals = torch.linalg.eigvalsh(D)
    g = H.gradient()
    prob32 = make_problem(
        st["depth"],
        st["width"],
        st["batch"],
        n_classes=st["n_classes"],
        activation=activation,
        device=cfg.device,
        seed=cfg.seed,
        dtype=torch.float32,
    )
    H32 = prob32.hessian()
    g32 = g.float()
    rows = []
    # plus one positive definite but ill-conditioned shift: just above -lambda_min
    lam_min = float(evals[0])
    eps_list = sorted(set(st["eps"]) | ({-lam_min + 1e-3} if lam_min < 0 else set()))
    for eps in eps_list:
        shifted = evals + eps
        tol = n * float(shifted.abs().max()) * torch.finfo(torch.float64).eps
        counts = (int((shifted > tol).sum()), int((shifted < -tol).sum()))
        cond = float(shifted.abs().max() / shifted.abs().min())
        A = D + eps * torch.eye(n, dtype=D.dtype, device=D.device)
        x_ref = torch.linalg.solve(A, g)
        row = {
            "net": activation,
            "n": n,
            "eps": eps,
            "cond": cond,
            "neg eigs (eigvalsh)": counts[1],
        }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                inertia = H.factorize(eps, method="riccati").inertia()
            row["neg eigs (inertia)"] = inertia[1]
            row["inertia ok"] = inertia[0] == counts[0] and inertia[1] == counts[1]
        except RuntimeError:
            row["neg eigs (inertia)"], row["inertia ok"] = None, None
        row["dense resid"] = _rel(A @ x_ref, g)
        warned = []
        for method, short in (("riccati", "ric"), ("tridiagonal", "tri")):
            x64, w64 = _solve(H, g, eps, method)
            x32, w32 = _solve(H32, g32, eps, method)
            row[f"err {short} f64"] = None if x64 is None else _rel(x64, x_ref)
            row[f"err {short} f32"] = None if x32 is None else _rel(x32, x_ref)
            warned += [f"{short} f64"] * w64 + [f"{short} f32"] * w32
        row["accuracy warnings"] = ", ".join(warned) or "-"
        target = max(row["err ric f64"] or 0.0, 1e-12)
        its, best, status = _cg_trace(H.matvec, g, eps, x_ref, target, st["cg_factor"] * n)
        row["cg iters to same err"] = its
        row["cg best err"] = best
        row["cg status"] = status
        rows.append(row)
    return rows


def run(cfg: Config, **overrides) -> str:
    """Run E3; ``overrides`` replace entries of :func:`settings` (e.g. ``depth=3``)."""
    st = {**settings(cfg), **overrides}
    outdir = cfg.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for act in progress(st["activations"], "E3 accuracy"):
        rows.extend(measure(cfg, st, act))

    fig, axes = new_figure(len(st["activations"]))
    for ax, act in zip(axes, st["activations"], strict=True):
        rs = [r for r in rows if r["net"] == act]
        eps = [r["eps"] for r in rs]
        series = {
            "riccati float64": [r["err ric f64"] for r in rs],
            "tridiagonal float64": [r["err tri f64"] for r in rs],
            "riccati float32": [r["err ric f32"] for r in rs],
            "tridiagonal float32": [r["err tri f32"] for r in rs],
            "cg best float64": [r["cg best err"] for r in rs],
            "1e-16 x cond": [1e-16 * r["cond"] for r in rs],
        }
        styles = {
            "riccati float64": ("tab:green", "s", "-"),
            "tridiagonal float64": ("tab:orange", "^", "-"),
            "riccati float32": ("tab:green", "s", ":"),
            "tridiagonal float32": ("tab:orange", "^", ":"),
            "cg best float64": ("tab:purple", "v", "--"),
            "1e-16 x cond": ("gray", "", "-"),
        }
        for name, ys in series.items():
            pts = [
                (e, y)
                for e, y in zip(eps, ys, strict=True)
                if y is not None and y > 0 and math.isfinite(y)
            ]
            if pts:
                c, m, ls = styles[name]
                ax.loglog(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    color=c,
                    marker=m or None,
                    linestyle=ls,
                    label=name,
                    alpha=0.4 if name.startswith("1e-16") else 1.0,
                )
        n, L = rs[0]["n"], st["depth"]
        ax.set_title(f"{act} MLP, L={L}, n={n}: error vs float64 dense solve", fontsize=10)
        ax.set_xlabel("damping eps")
        ax.set_ylabel("relative error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, outdir / "e3_accuracy.png")
    md = write_table(
        rows,
        outdir,
        "e3_accuracy",
        f"E3: relative error vs a float64 dense solve (L={st['depth']}, width "
        f"{st['width']}, batch {st['batch']}, rhs = gradient)",
    )
    return md
