"""How far is K-FAC from the exact damped Gauss-Newton direction ``(G + lam I)^-1 g``?

What it shows: ``hessinv.ChainGGN(model, loss_fn, X, y).factorize(lam).solve(g)`` gives the
exact damped Gauss-Newton direction of a batch, so an approximation such as K-FAC can be
measured against it, not against another approximation. K-FAC is written here in a few lines
for the ``Linear`` layers of an MLP (weights and bias together, ``W~ = [W | b]``):

* per layer, ``A = E[a~ a~^T]`` over the batch (``a~ = [a; 1]``, the layer's input) and
  ``S = sum_n sum_c g_nc g_nc^T``, where ``g_nc`` is column ``c`` of an output-space factor
  ``L_n`` of the loss Hessian (``L_n L_n^T = d^2 loss / d f_n^2``, mean reduction included)
  backpropagated to the layer's output. The factors are exact (``L_n = (diag(sqrt p) -
  p sqrt(p)^T) / sqrt(B)`` for cross-entropy: the exact GGN per sample, "K-FAC with the true
  Fisher") or Monte-Carlo (one label sampled from the model per sample, ``(p - e_y) /
  sqrt(B)``: the usual K-FAC). Then the layer's GGN block is approximated by ``S (x) A``
  (row-major ``vec`` of ``W~``);
* the damped direction, two conventions:

  - "eig": the exact inverse of the damped Kronecker block, ``(S (x) A + lam I)^-1 vec(grad)``
    from the eigendecompositions ``S = Q_S D_S Q_S^T``, ``A = Q_A D_A Q_A^T``:
    ``Q_S [(Q_S^T grad Q_A) / (d_S d_A^T + lam)] Q_A^T`` -- same ``lam`` as the exact solve;
  - "factored": Martens & Grosse's factored Tikhonov damping,
    ``(S + sqrt(lam) / pi I)^-1 grad (A + pi sqrt(lam) I)^-1`` with
    ``pi = sqrt((tr A / dim A) / (tr S / dim S))``.

For each ``lam`` it prints, per direction ``d``: the cosine with the exact direction, the
relative error ``||d - d_exact|| / ||d_exact||``, and the reduction of the local quadratic
model ``m(s) = g^T s + 1/2 s^T G s`` (undamped, exact ``G``) at ``s = -d`` and at the best
multiple of ``-d`` (``(g^T d)^2 / (2 d^T G d)``). The exact direction minimizes the *damped*
model ``m(s) + lam/2 ||s||^2``, so at a large ``lam`` another direction can reduce the undamped
``m`` more at ``s = -d``; at the best multiple, and as ``lam -> 0``, the exact direction is the
one K-FAC is aiming for. All in float64.

Problem: a depth-6, width-32 tanh MLP (10 classes, cross-entropy) on a synthetic batch of 128
samples (labels of a random teacher network), after a short Adam warm-up so that the
parameters are not at initialization.

Run it (about 10 s on one CPU core)::

    python examples/kfac_vs_exact.py
    python examples/kfac_vs_exact.py --small            # for the tests
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import hessinv

DT = torch.float64


def make_mlp(d_in: int, width: int, depth: int, d_out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [d_in] + [width] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


# ----------------------------------------------------------------------------------- K-FAC
def output_factors(logits: torch.Tensor, loss: str, mc_samples: int, generator) -> torch.Tensor:
    """``L`` ``(B, K, r)`` with ``L_n L_n^T`` the Hessian of the (mean-reduced) loss in the
    outputs of sample ``n`` -- exactly (``mc_samples=0``) or in expectation (Monte Carlo)."""
    B, K = logits.shape
    if loss == "mse":  # nn.MSELoss(): mean over B K entries, Hessian 2 / (B K) I
        if mc_samples == 0:
            L = torch.eye(K, dtype=DT).expand(B, K, K)
        else:
            L = torch.randn(B, K, mc_samples, generator=generator, dtype=DT) / math.sqrt(mc_samples)
        return L * math.sqrt(2 / (B * K))
    p = torch.softmax(logits, 1)  # cross-entropy: Hessian (diag(p) - p p^T) / B
    if mc_samples == 0:
        sq = p.sqrt()
        L = torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]
    else:
        labels = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        onehot = nn.functional.one_hot(labels, K).to(DT).transpose(1, 2)  # (B, K, m)
        L = (p[:, :, None] - onehot) / math.sqrt(mc_samples)
    return L / math.sqrt(B)


def kfac_factors(model, X, loss: str, mc_samples: int = 0, generator=None):
    """Per ``Linear`` layer: ``A`` ``(in+1, in+1)`` and ``S`` ``(out, out)``."""
    inputs, outputs, h = [], [], X
    for module in model:
        if isinstance(module, nn.Linear):
            inputs.append(torch.cat([h, torch.ones_like(h[:, :1])], 1).detach())
            h = module(h)
            outputs.append(h)
        else:
            h = module(h)
    L = output_factors(h.detach(), loss, mc_samples, generator)
    A = [a.T @ a / X.shape[0] for a in inputs]
    S = [torch.zeros(z.shape[1], z.shape[1], dtype=DT) for z in outputs]
    for c in range(L.shape[2]):  # backpropagate each column of the factor to every layer
        grads = torch.autograd.grad(h, outputs, grad_outputs=L[:, :, c], retain_graph=True)
        for Sl, gl in zip(S, grads, strict=True):
            Sl += gl.T @ gl
    return A, S


def kfac_direction(model, X, y, loss_fn, lam: float, damping: str = "eig", mc_samples=0, seed=0):
    """The K-FAC direction (flat, in ``model.named_parameters()`` order, as hessinv's)."""
    loss = "mse" if isinstance(loss_fn, nn.MSELoss) else "ce"
    generator = torch.Generator().manual_seed(seed)
    A, S = kfac_factors(model, X, loss, mc_samples, generator)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(
        loss_fn(model(X), y), [p for m in layers for p in (m.weight, m.bias)]
    )
    pieces = []
    for i, (Al, Sl) in enumerate(zip(A, S, strict=True)):
        grad = torch.cat([grads[2 * i], grads[2 * i + 1][:, None]], 1)  # [grad_W | grad_b]
        if damping == "eig":  # (S (x) A + lam I)^-1 vec(grad), exactly
            dA, QA = torch.linalg.eigh(Al)
            dS, QS = torch.linalg.eigh(Sl)
            D = QS @ ((QS.T @ grad @ QA) / (dS[:, None] * dA[None, :] + lam)) @ QA.T
        else:  # factored Tikhonov damping with Martens & Grosse's pi
            pi = math.sqrt((Al.trace() / Al.shape[0]) / (Sl.trace() / Sl.shape[0]))
            eye_A, eye_S = torch.eye(Al.shape[0], dtype=DT), torch.eye(Sl.shape[0], dtype=DT)
            left = torch.linalg.solve(Sl + math.sqrt(lam) / pi * eye_S, grad)
            D = torch.linalg.solve(Al + pi * math.sqrt(lam) * eye_A, left.T).T
        pieces += [D[:, :-1].reshape(-1), D[:, -1]]  # weight (row-major), then bias
    return torch.cat(pieces)


# ----------------------------------------------------------------------------------- compare
def compare(d, d_exact, g, G) -> dict:
    """Cosine and relative error against ``d_exact``; reductions of ``m`` at ``-d``."""
    gd, dGd = float(g @ d), float(d @ G.matvec(d))
    return {
        "cos": float(d @ d_exact / (d.norm() * d_exact.norm())),
        "rel_err": float((d - d_exact).norm() / d_exact.norm()),
        "reduction_unit": gd - 0.5 * dGd,
        "reduction_best": gd * gd / (2 * dGd) if dGd > 0 else math.inf,
    }


def make_problem(args):
    g = torch.Generator().manual_seed(args.seed)
    X = torch.randn(args.batch, args.d_in, generator=g, dtype=DT)
    teacher = make_mlp(args.d_in, args.width, 3, args.classes, args.seed + 1)
    with torch.no_grad():
        logits = 3 * teacher(X)
    if args.loss == "mse":
        loss_fn, y = nn.MSELoss(), logits
    else:
        loss_fn, y = nn.CrossEntropyLoss(), logits.argmax(1)
    model = make_mlp(args.d_in, args.width, args.depth, args.classes, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.warmup):  # move away from initialization
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    return model, loss_fn, X, y


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--d-in", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--loss", choices=["ce", "mse"], default="ce")
    parser.add_argument("--warmup", type=int, default=100, help="Adam steps before comparing")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny configuration (CI)")
    args = parser.parse_args(argv)
    if args.small:
        args.depth, args.width, args.d_in, args.classes, args.batch = 3, 6, 4, 3, 16
        args.warmup, args.lambdas = 20, [1e-3, 1e-1]
    torch.set_num_threads(1)

    model, loss_fn, X, y = make_problem(args)
    G = hessinv.ChainGGN(model, loss_fn, X, y, progress=False)  # exact GGN of the batch
    g = G.gradient()
    print(
        f"tanh MLP depth {args.depth}, width {args.width}, {args.loss} loss, batch {args.batch}: "
        f"n = {G.num_params} parameters; loss {float(G.loss):.4f}, tr(G)/n = "
        f"{float(G.trace()) / G.num_params:.2e}"
    )
    gradient = compare(g, g, g, G)["reduction_best"]  # gradient descent, best step: for scale
    print(f"reduction of m by the gradient direction with its best step: {gradient:.3e}\n")

    directions = {
        "K-FAC, exact factors, eig damping": {"damping": "eig"},
        "K-FAC, exact factors, factored damping": {"damping": "factored"},
        "K-FAC, 1 MC sample, eig damping": {"damping": "eig", "mc_samples": 1},
    }
    print("| lambda | direction | cos vs exact | rel. error | m reduction at -d | at best -t d |")
    print("|---:|---|---:|---:|---:|---:|")
    rows = []
    for lam in args.lambdas:
        exact = G.factorize(lam).solve(g)  # (G + lam I)^-1 g, exact, linear in depth
        found = {"exact (G + lam I)^-1 g": compare(exact, exact, g, G)}
        for name, kw in directions.items():
            d = kfac_direction(model, X, y, loss_fn, lam, seed=args.seed, **kw)
            found[name] = compare(d, exact, g, G)
        for name, r in found.items():
            rows.append({"lambda": lam, "direction": name, **r})
            print(
                f"| {lam:.0e} | {name} | {r['cos']:.4f} | {r['rel_err']:.2e} | "
                f"{r['reduction_unit']:.3e} | {r['reduction_best']:.3e} |"
            )
    return {"rows": rows, "gradient_reduction": gradient, "n": G.num_params}


if __name__ == "__main__":
    main()
