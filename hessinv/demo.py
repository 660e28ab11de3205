"""The main job: exact damped Newton direction of a tall-skinny network, checked against dense.

``python -m hessinv demo`` builds a deep, narrow tanh MLP with a cross-entropy
loss on random data, computes ``(H + eps I)^-1 g`` with the Riccati and the
paper's block-tridiagonal methods, with dense ``torch.func.hessian`` +
``torch.linalg.solve`` (while ``n`` is small enough) and with conjugate gradients,
and prints a table of times and relative errors.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .hessian import ChainHessian
from .reference import conjugate_gradient, dense_hessian

try:  # progress bars are a nicety, not a dependency
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def tall_skinny_mlp(depth, width, d_in, n_classes, dtype, device, seed=0):
    """``depth`` Linear layers with tanh between them, Xavier-scaled weights."""
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, n_classes))
    return nn.Sequential(*layers).to(dtype=dtype, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _minres(H, g, damping, rtol, maxiter):
    """MINRES (works on indefinite symmetric systems) on ``H + damping I`` via ``H.to_scipy()``."""
    from scipy.sparse.linalg import minres

    count = [0]
    op = H.to_scipy()
    x, info = minres(op, g.detach().cpu().numpy(), shift=-damping, rtol=rtol, maxiter=maxiter,
                     callback=lambda _: count.__setitem__(0, count[0] + 1))
    status = "converged" if info == 0 else "did NOT converge"
    return torch.as_tensor(x, dtype=g.dtype, device=g.device), f"{count[0]} iterations, {status}"


def run_demo(depth=16, width=16, batch=16, d_in=8, n_classes=4, damping=1e-2, device="cpu",
             dtype="float64", dense_limit=6000, cg_rtol=1e-8, seed=0, progress=True):
    """Run the comparison and return a list of result rows (dicts)."""
    device = torch.device(device)
    dt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    model = tall_skinny_mlp(depth, width, d_in, n_classes, dt, device, seed)
    X = torch.randn(batch, d_in, dtype=dt, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    steps = ["derivatives", "riccati", "tridiagonal", "cg", "minres", "dense"]
    bar = tqdm(total=len(steps), desc="demo", disable=not progress or tqdm is None)
    H = ChainHessian(model, loss_fn, X, y)
    n = H.num_params
    _, t_deriv = _timed(H.stage_derivatives, device)
    g = H.gradient()
    bar.update()
    rows = []

    def add(method, seconds, x, note=""):
        rows.append({"method": method, "seconds": seconds, "x": x, "note": note})

    F, t_fact = _timed(lambda: H.factorize(damping), device)
    x_ric, t_solve = _timed(lambda: F.solve(g), device)
    sign, logabsdet = F.logdet()
    pos, neg, _ = F.inertia()
    add("riccati (ours)", t_deriv + t_fact + t_solve, x_ric,
        f"logdet {float(logabsdet):.4g} (sign {int(sign):+d}), {neg} negative eigenvalues")
    bar.update()
    x_tri, t_tri = _timed(lambda: H.solve(g, damping=damping, method="tridiagonal"), device)
    add("tridiagonal (paper)", t_deriv + t_tri, x_tri)
    bar.update()
    cg, t_cg = _timed(
        lambda: conjugate_gradient(H.matvec, g, damping, rtol=cg_rtol, maxiter=20 * n), device
    )
    status = "converged" if cg.converged else "stopped: negative curvature or maxiter"
    add("CG on our Hv", t_deriv + t_cg, cg.x, f"{cg.iterations} iterations, {status}")
    bar.update()
    mr, t_mr = _timed(lambda: _minres(H, g, damping, cg_rtol, 20 * n), device)
    add("MINRES (scipy) on our Hv", t_deriv + t_mr, mr[0], mr[1])
    bar.update()
    reference = None
    if n <= dense_limit:
        def dense_solve():
            D = dense_hessian(model, loss_fn, X, y)
            return torch.linalg.solve(D + damping * torch.eye(n, dtype=dt, device=device), g)

        reference, t_dense = _timed(dense_solve, device)
        add("dense torch.func.hessian", t_dense, reference)
    bar.update()
    bar.close()
    ref = reference if reference is not None else x_ric
    for row in rows:
        x = row.pop("x")
        row["rel_error"] = float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))
        residual = H.matvec(x) + damping * x - g
        row["rel_residual"] = float(torch.linalg.norm(residual) / torch.linalg.norm(g))
    meta = {"n": n, "stages": len(H.stage_sizes), "reference": "dense" if reference is not None
            else "riccati (n above --dense-limit)", "derivatives_s": t_deriv}
    return rows, meta


def format_table(rows, meta, args) -> str:
    head = (
        f"tanh MLP: depth {args.depth}, width {args.width}, batch {args.batch}, "
        f"{meta['n']} parameters, damping {args.damping}, {args.dtype} on {args.device}\n"
        f"stage derivatives: {meta['derivatives_s']:.3f} s (included in every row but dense); "
        f"errors relative to the {meta['reference']} solution\n\n"
    )
    lines = ["| method | time (s) | rel. error | rel. residual | note |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['rel_error']:.1e} | "
            f"{r['rel_residual']:.1e} | {r['note']} |"
        )
    return head + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hessinv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="solve with a tall-skinny network and compare with dense")
    demo.add_argument("--depth", type=int, default=16)
    demo.add_argument("--width", type=int, default=16)
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--input", dest="d_in", type=int, default=8)
    demo.add_argument("--classes", type=int, default=4)
    demo.add_argument("--damping", type=float, default=1e-2)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    demo.add_argument("--dense-limit", type=int, default=6000,
                      help="skip the dense reference above this many parameters")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("depth", "width", "batch", "d_in", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('d_in', 'input')} must be at least 1")
    if args.classes < 2:
        parser.error("--classes must be at least 2")
    rows, meta = run_demo(args.depth, args.width, args.batch, args.d_in, args.classes,
                          args.damping, args.device, args.dtype, args.dense_limit, seed=args.seed)
    print(format_table(rows, meta, args))
    return 0
