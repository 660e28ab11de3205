"""Tune a network's prior precision and noise by the exact Laplace marginal likelihood.

What it shows: after training, ``hessinv.LaplaceGGN(model, "regression", X, y, ...)`` is the
Laplace approximation with the *full, exact* Gauss-Newton matrix (laplace-torch's
``hessian_structure="full"``), at a cost linear in depth that never forms ``G`` (it works with
the ``N x N`` output-space Gram matrix). Its ``log_marginal_likelihood_grad`` returns the log
marginal likelihood and its exact gradients in the prior precision (one value per parameter
tensor here: a "layerwise" prior) and in the noise ``sigma``, so both can be tuned jointly by
gradient ascent (Adam on their logs, as laplace-torch does); the gradient is first checked
against central finite differences. Then ``posterior_variance(X_test, noise=True)`` gives the
predictive variance of the linearized model: small where there was data, larger away from it.

Problem: 1-D regression of ``sin(2x)`` plus noise (standard deviation 0.1) from 128 points in
``[-2, 2]``; a depth-4, width-32 tanh MLP, trained to convergence with exact
Levenberg-Marquardt steps (``hessinv.optim.DampedNewton(curvature="ggn")``), float64.

Run it (about 15 s on one CPU core)::

    python examples/laplace_marginal_likelihood.py
    python examples/laplace_marginal_likelihood.py --small      # for the tests

It prints the training loss, the finite-difference check, the log marginal likelihood before
and after tuning with the tuned values, and a table of the predictive mean and standard
deviation on a grid that extends beyond the data.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import hessinv
from hessinv.optim import DampedNewton

DT = torch.float64


def make_mlp(width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [1] + [width] * (depth - 1) + [1]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


def make_data(n: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = 4 * torch.rand(n, 1, generator=g, dtype=DT) - 2
    y = torch.sin(2 * X) + noise * torch.randn(n, 1, generator=g, dtype=DT)
    return X, y


def log_mll_and_grad(la, log_p, log_sigma):
    """The log marginal likelihood and its gradient in ``(log P, log sigma)``."""
    p, sigma = log_p.exp(), log_sigma.exp()
    r = la.log_marginal_likelihood_grad(prior_precision=p, sigma_noise=sigma)
    return r.value, r.prior_precision * p, r.sigma_noise * sigma  # chain rule for the logs


def finite_difference_check(la, log_p, log_sigma, h: float = 1e-5) -> float:
    """Largest relative error of the exact gradient against central differences."""
    _, grad_p, grad_s = log_mll_and_grad(la, log_p, log_sigma)
    exact = torch.cat([grad_p.reshape(-1), grad_s.reshape(1)])
    x0 = torch.cat([log_p.reshape(-1), log_sigma.reshape(1)])

    def value(x):
        p = x[:-1].exp().reshape(log_p.shape)
        return float(la.log_marginal_likelihood(prior_precision=p, sigma_noise=float(x[-1].exp())))

    fd = torch.stack(
        [
            torch.tensor((value(x0 + h * e) - value(x0 - h * e)) / (2 * h), dtype=DT)
            for e in torch.eye(x0.numel(), dtype=DT)
        ]
    )
    return float(((fd - exact).abs() / exact.abs().clamp_min(1e-8)).max())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="training points")
    parser.add_argument("--noise", type=float, default=0.1, help="the data's noise std")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=300, help="full-batch LM steps")
    parser.add_argument("--tune-steps", type=int, default=300, help="Adam steps on the marglik")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny configuration (CI)")
    args = parser.parse_args(argv)
    if args.small:
        args.n, args.depth, args.width, args.train_steps, args.tune_steps = 32, 3, 8, 40, 100
    torch.set_num_threads(1)

    # 1. train (full batch: exact Levenberg-Marquardt steps on the Gauss-Newton matrix)
    X, y = make_data(args.n, args.noise, args.seed)
    model = make_mlp(args.width, args.depth, args.seed)
    opt = DampedNewton(model, nn.MSELoss(), damping=1e-2, curvature="ggn")
    for _ in range(args.train_steps):
        opt.step(X, y)
    with torch.no_grad():
        train_loss = float(nn.MSELoss()(model(X), y))
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{args.n} points, tanh MLP depth {args.depth}, width {args.width}: {n} parameters; "
        f"after {args.train_steps} Levenberg-Marquardt steps the training MSE is {train_loss:.2e} "
        f"(rms {math.sqrt(train_loss):.3f}; the data's noise is {args.noise})"
    )

    # 2. the Laplace approximation at the trained parameters, and its marginal likelihood
    la = hessinv.LaplaceGGN(model, "regression", X, y, prior_precision=1.0, sigma_noise=1.0)
    T = len(la.param_names)  # a layerwise prior: one precision per parameter tensor
    log_p = torch.zeros(T, dtype=DT, requires_grad=True)  # P = 1
    log_sigma = torch.zeros((), dtype=DT, requires_grad=True)  # sigma = 1
    # the check at a point where every P and sigma differ from 1 (so the chain rule counts)
    probe_p, probe_sigma = torch.linspace(-1.0, 1.0, T, dtype=DT), torch.tensor(math.log(0.3))
    fd_error = finite_difference_check(la, probe_p, probe_sigma.to(DT))
    print(
        f"exact gradient of the log marginal likelihood in (log P, log sigma), {T + 1} "
        f"entries, at P = e^-1 ... e^1, sigma = 0.3: largest relative difference to central "
        f"differences {fd_error:.1e}"
    )

    # 3. tune P (layerwise) and sigma: gradient ascent on the log marginal likelihood
    before = float(log_mll_and_grad(la, log_p.detach(), log_sigma.detach())[0])
    adam = torch.optim.Adam([log_p, log_sigma], lr=0.1)
    for _ in range(args.tune_steps):
        _, grad_p, grad_s = log_mll_and_grad(la, log_p.detach(), log_sigma.detach())
        log_p.grad, log_sigma.grad = -grad_p, -grad_s  # Adam minimizes: ascend the marglik
        adam.step()
    P, sigma = log_p.detach().exp(), float(log_sigma.detach().exp())
    after = float(la.log_marginal_likelihood(prior_precision=P, sigma_noise=sigma))
    print(
        f"log marginal likelihood: {before:.2f} at P = 1, sigma = 1 -> {after:.2f} after "
        f"{args.tune_steps} Adam steps: sigma = {sigma:.4f}, P per tensor = "
        + ", ".join(f"{name} {v:.3g}" for name, v in zip(la.param_names, P.tolist(), strict=True))
    )

    # 4. the predictive of the linearized model, in and beyond the data's range [-2, 2]
    X_test = torch.linspace(-4, 4, 9, dtype=DT)[:, None]
    var = la.posterior_variance(X_test, noise=True, prior_precision=P, sigma_noise=sigma)
    std = var[:, 0, 0].sqrt()
    with torch.no_grad():
        mean = model(X_test)[:, 0]
    print("\n| x | sin(2x) | predictive mean | predictive std |")
    print("|---:|---:|---:|---:|")
    for x, m, s in zip(X_test[:, 0].tolist(), mean.tolist(), std.tolist(), strict=True):
        print(f"| {x:+.0f} | {math.sin(2 * x):+.3f} | {m:+.3f} | {s:.3f} |")
    return {
        "train_loss": train_loss,
        "fd_error": fd_error,
        "log_marglik_before": before,
        "log_marglik_after": after,
        "sigma": sigma,
        "prior_precision": P,
        "x_test": X_test[:, 0],
        "predictive_std": std,
    }


if __name__ == "__main__":
    main()
