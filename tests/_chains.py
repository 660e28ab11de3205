"""Small random chains and their dense float64 references, shared by the tests."""

from __future__ import annotations

import math
import operator
import random
import traceback
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from _autograd_reference import (
    UNIT_ROUNDOFF,
    accumulation_length,
    autograd_hessian,
    backward_error,
    evaluation_error_bound,
    gradient_error_bound,
    loss_error_bound,
)
from torch import nn

import hessinv
import hessinv.errors
from hessinv.tools import problems

ACTIVATIONS = problems.ACTIVATIONS
Problem = problems.Problem


def make_mlp(
    depth, width, d_in=3, d_out=3, activation="tanh", bias=True, dtype=torch.float64, seed=0
):
    """``depth`` Linear layers (``depth - 1`` hidden of ``width``) with an activation after
    each, every parameter ``0.8 N(0, 1)`` (the shared builder, ``init="normal"``)."""
    return problems.mlp(
        depth,
        width,
        d_in,
        d_out,
        activation,
        bias=bias,
        init="normal",
        scale=0.8,
        dtype=dtype,
        seed=seed,
    )


def make_problem(
    depth=3,
    width=4,
    batch=5,
    activation="tanh",
    bias=True,
    loss="ce",
    d_in=3,
    d_out=3,
    dtype=torch.float64,
    seed=0,
) -> Problem:
    """A random chain, batch and loss (``"ce"``, ``"mse"`` or ``"mse_sum"``)."""
    return problems.make_problem(
        depth,
        width,
        batch,
        d_in=d_in,
        d_out=d_out,
        activation=activation,
        loss=loss,
        bias=bias,
        init="normal",
        scale=0.8,
        dtype=dtype,
        seed=seed,
    )


def dense_reference(problem: Problem) -> torch.Tensor:
    return hessinv.dense_hessian(problem.model, problem.loss_fn, problem.inputs, problem.targets)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def solve_tolerance(matrix: torch.Tensor) -> float:
    """Forward-error bound of a solve that meets the contract (docs/algorithm.md section 11).

    A backward error ``beta <= 1e-12`` gives a relative forward error of at most
    ``2 cond beta / (1 - cond beta)``; we allow ``4 cond 1e-12`` plus the dense reference's
    own ``cond n u`` and a floor.
    """
    cond = float(torch.linalg.cond(matrix))
    n = matrix.shape[0]
    return 4 * cond * 1e-12 + cond * n * 2.2e-16 + 1e-14


# ============================================================================ random chains
# One seeded generator for the property suite (tests/curvature/test_contract.py) and anyone else who
# wants varied chains: conv and residual stages, reused activation instances, in-place
# activations, frozen parameters and ``params=`` subsets, CE/MSE with mean and sum, any
# damping of DAMPINGS. ``random_chain(seed)`` is a pure function of ``seed``.

DAMPINGS = (-0.1, -1e-3, 1e-8, 1e-4, 1e-2, 0.3, 1.0)
CHAIN_ACTIVATIONS = ("relu", "leakyrelu", "tanh", "silu", "gelu", "sigmoid", "softplus")
_INPLACE_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
}


class Residual(nn.Module):
    """A residual stage ``z + act(lin(z))`` (goes through the library's generic path)."""

    def __init__(self, width: int, act: nn.Module):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = act

    def forward(self, z):
        return z + self.act(self.lin(z))


@dataclass
class RandomChain:
    """A chain, batch, loss, parameter selection and damping drawn by :func:`random_chain`."""

    seed: int
    model: nn.Sequential
    loss_fn: object
    inputs: torch.Tensor
    targets: torch.Tensor
    params: list | None
    damping: float
    oracle: str
    description: str

    def hessian(self):
        return hessinv.ChainHessian(
            self.model,
            self.loss_fn,
            self.inputs,
            self.targets,
            params=self.params,
            oracle=self.oracle,
        )

    def reference(self):
        return autograd_hessian(self.model, self.loss_fn, self.inputs, self.targets, self.params)


def random_chain(
    seed: int, max_depth: int = 8, max_width: int = 10, max_batch: int = 8
) -> RandomChain:
    """The random chain number ``seed`` (float64): depth 1..max_depth parameterised stages."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    depth = rng.randint(1, max_depth)
    batch = rng.randint(1, max_batch)
    scale = round(rng.uniform(0.3, 1.5), 3)
    loss_kind = rng.choice(["ce", "mse"])
    reduction = rng.choice(["mean", "sum"])
    d_out = rng.randint(2, 5) if loss_kind == "ce" else rng.randint(1, 4)
    made: dict[str, list[nn.Module]] = {}  # activation instances made so far, by kind
    desc: list[str] = []

    def activation(allow_inplace: bool = True):
        kind = rng.choice(CHAIN_ACTIVATIONS)
        if made.get(kind) and rng.random() < 0.35:
            act = rng.choice(made[kind])
            return act, f"{kind}#{id_of[id(act)]}(reused)"
        if allow_inplace and kind in _INPLACE_ACTIVATIONS and rng.random() < 0.15:
            act, tag = _INPLACE_ACTIVATIONS[kind](), f"{kind}_"
        else:
            act, tag = ACTIVATIONS[kind](), kind
        made.setdefault(kind, []).append(act)
        id_of[id(act)] = len(id_of)
        return act, f"{tag}#{id_of[id(act)]}"

    id_of: dict[int, int] = {}
    layers: list[nn.Module] = []
    use_conv = depth >= 2 and rng.random() < 0.2
    if use_conv:
        channels, k = rng.choice([(1, 3), (2, 3), (1, 2)])
        inputs = torch.randn(batch, 1, 4, 4, generator=gen, dtype=torch.float64)
        act, tag = activation()
        layers += [nn.Conv2d(1, channels, k), act, nn.Flatten()]
        width = channels * (5 - k) ** 2
        desc += [f"x({batch},1,4,4)", f"Conv2d(1,{channels},{k})+{tag}+Flatten"]
        middle = depth - 2
    else:
        width = rng.randint(1, max_width)
        inputs = torch.randn(batch, width, generator=gen, dtype=torch.float64)
        desc.append(f"x({batch},{width})")
        middle = depth - 1
    for _ in range(middle):
        if rng.random() < 0.25:
            act, tag = activation()
            layers.append(Residual(width, act))
            desc.append(f"Residual({width},{tag})")
        else:
            new = rng.randint(1, max_width)
            bias = rng.random() < 0.85
            act, tag = activation()
            layers += [nn.Linear(width, new, bias=bias), act]
            desc.append(f"Linear({width},{new}{'' if bias else ',nobias'})+{tag}")
            width = new
    bias = rng.random() < 0.85
    layers.append(nn.Linear(width, d_out, bias=bias))
    desc.append(f"Linear({width},{d_out}{'' if bias else ',nobias'})")
    if loss_kind == "mse" and rng.random() < 0.2:
        act, tag = activation(allow_inplace=False)
        layers.append(act)
        desc[-1] += f"+{tag}"
    model = nn.Sequential(*layers).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * scale * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            else:
                fan_in = p[0].numel()
                p.copy_(
                    scale
                    / math.sqrt(fan_in)
                    * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                )
    if loss_kind == "ce":
        targets = torch.randint(0, d_out, (batch,), generator=gen)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        desc.append(f"CE({reduction})")
    else:
        targets = torch.randn(batch, d_out, generator=gen, dtype=torch.float64)
        loss_fn = nn.MSELoss(reduction=reduction)
        desc.append(f"MSE({reduction})")
    desc.append(f"scale {scale}")

    names = [n for n, _ in model.named_parameters()]
    params = None
    selection = rng.random()
    if selection < 0.3:  # freeze some parameters in place
        frozen = [n for n in names if rng.random() < 0.3]
        if len(frozen) == len(names):
            frozen.pop(rng.randrange(len(frozen)))
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        desc.append(f"frozen {frozen}")
    elif selection < 0.55:  # choose a subset with params=, by tensor and/or by name
        chosen = [n for n in names if rng.random() < 0.6] or [rng.choice(names)]
        how = rng.choice(["names", "tensors", "mixed"])
        lookup = dict(model.named_parameters())
        params = [
            n if how == "names" or (how == "mixed" and rng.random() < 0.5) else lookup[n]
            for n in chosen
        ]
        desc.append(f"params={chosen} (as {how})")
    damping = rng.choice(DAMPINGS)
    oracle = "generic" if rng.random() < 0.15 else "auto"
    desc += [f"eps={damping:g}", f"oracle={oracle}"]
    return RandomChain(
        seed,
        model,
        loss_fn,
        inputs,
        targets,
        params,
        damping,
        oracle,
        f"seed {seed}: " + " | ".join(desc),
    )


# ============================================================================ the contract
# (float64) 1. every solve has backward error <= 1e-12; 2. logdet and inertia exact where
# the smallest |eigenvalue| of H + eps I exceeds 1e-10 ||H||; 3. forward error within the
# cond-scaled bound. Checked against the independent double-backward reference.

CONTRACT_BACKWARD_ERROR = 1e-12
GAP = 1e-10
SAFETY = 2.0  # the one safety factor on first-order bounds below


@dataclass
class ContractReport:
    """What :func:`check_contract` measured on one chain, and what it found wrong."""

    description: str
    n: int = 0
    violations: list[str] = field(default_factory=list)
    backward_errors: list[float] = field(default_factory=list)  # ours, vs the reference
    reported_backward_errors: list[float] = field(default_factory=list)
    product_error_ratio: float = 0.0  # error / tolerance, worst
    forward_error_ratio: float = 0.0
    logdet_error_ratio: float = 0.0
    inertia_compared: bool = False
    inertia_disagrees: bool = False
    small_gap: bool = False
    singular_raised: bool = False
    accuracy_warnings: int = 0
    kappa: float = 1.0
    crashed: bool = False

    def fail(self, what: str) -> None:
        self.violations.append(what)

    def message(self) -> str:
        lines = "\n  ".join(self.violations)
        return f"{self.description}\n  n = {self.n}, head kappa = {self.kappa:.3g}\n  {lines}"


def _is_count(c) -> bool:
    try:
        operator.index(c)
    except TypeError:
        return False
    return True


def require_contract(report: ContractReport) -> None:
    """Fail the calling test with every violation listed (no assertion-rewriting noise)."""
    if report.violations:
        pytest.fail(report.message(), pytrace=False)


def check_contract(
    chain: RandomChain, *, make_hessian=None, method: str = "riccati"
) -> ContractReport:
    """Run the whole public API on ``chain`` and compare with the dense reference.

    ``make_hessian(chain)`` builds the object under test (default: ``chain.hessian()``,
    i.e. ``hessinv.ChainHessian``); the tests of the checker itself pass a fake.
    Nothing is asserted here: every breach of the contract is listed in the report.
    """
    make = chain.hessian if make_hessian is None else (lambda: make_hessian(chain))
    return check_hessian(
        make,
        chain.reference(),
        chain.damping,
        seed=chain.seed,
        description=chain.description + f" | method={method}",
        method=method,
    )


def check_hessian(
    make,
    ref,
    damping: float,
    *,
    seed: int = 0,
    description: str = "",
    k: int | None = None,
    method: str = "riccati",
) -> ContractReport:
    """The contract for the object ``make()`` against the reference ``ref`` at ``damping``.

    ``make`` is called inside (construction is part of what is checked); ``ref`` comes
    from ``_autograd_reference.autograd_hessian`` for the same model, loss, batch and
    parameter selection. ``seed`` seeds the right-hand sides; ``k`` fixes the number of
    columns of the block right-hand side (else 1-3, drawn).
    """
    errors = hessinv.errors
    report = ContractReport(description)
    D = ref.hessian
    n = report.n = D.shape[0]
    report.kappa = ref.kappa
    dH = evaluation_error_bound(ref)  # ||H_computed - H||_2 <= dH for any float64 code
    K = accumulation_length(ref)
    eye = torch.eye(n, dtype=torch.float64)
    ev_H = torch.linalg.eigvalsh(D)
    norm_H = float(ev_H.abs().max())
    eps = damping
    M = D + eps * eye
    ev = ev_H + eps
    norm_M = float(ev.abs().max())
    sigma_min = float(ev.abs().min())
    cond = norm_M / sigma_min if sigma_min > 0 else math.inf
    # Inertia and logdet are defined robustly only away from 0; the reference eigenvalues
    # themselves are within dH of the truth, so the gap must also exceed that.
    gap_ok = sigma_min > max(GAP * norm_H, 10 * dH)
    report.small_gap = not gap_ok
    gen = torch.Generator().manual_seed(seed)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            H = make()  # everything is read and the derivative sweep runs here
            if H.num_params != n or tuple(H.param_names) != ref.names:
                report.fail(
                    f"parameters: got {H.num_params} {tuple(H.param_names)}, expected {n} "
                    f"{ref.names}"
                )
                return report
            # ---- loss, gradient, products: both evaluations are within the bounds of the truth
            loss = H.loss
            tol_loss = 2 * loss_error_bound(ref)
            if not abs(float(loss) - float(ref.loss)) <= tol_loss:
                report.fail(
                    f"loss {float(loss)!r} vs reference {float(ref.loss)!r} (tol {tol_loss:.2e})"
                )
            g = H.gradient()
            err_g = float(torch.linalg.vector_norm(g - ref.gradient))
            tol_g = 2 * gradient_error_bound(ref)
            if not err_g <= tol_g:
                report.fail(
                    f"gradient error {err_g:.3e} > {tol_g:.3e} (= 2 K u sum_i kappa_i ||g_i||)"
                )
            V = torch.randn(n, 2, generator=gen, dtype=torch.float64)
            tol_prod = 2 * dH  # ||H_lib V - H_ref V|| <= 2 dH ||V||, per column
            dense = H.dense()
            err_dense = (
                float(torch.linalg.matrix_norm(dense - D, 2))
                if dense.shape == D.shape
                else math.inf
            )
            report.product_error_ratio = err_dense / (tol_prod + 1e-300)
            if not err_dense <= tol_prod:
                report.fail(
                    f"H.dense() error {err_dense:.3e} > 2 dH = {tol_prod:.3e} (||H|| = "
                    f"{norm_H:.3e})"
                )
            for got, v in ((H @ V, V), (H.matvec(V[:, 0]), V[:, 0])):
                if got.shape != v.shape:
                    report.fail(f"H @ v returned shape {tuple(got.shape)} for {tuple(v.shape)}")
                    continue
                err = torch.linalg.vector_norm((got - D @ v).reshape(n, -1), dim=0)
                scale = torch.linalg.vector_norm(v.reshape(n, -1), dim=0)
                ratio = float((err / (tol_prod * scale + 1e-300)).max())
                report.product_error_ratio = max(report.product_error_ratio, ratio)
                if not ratio <= 1:
                    report.fail(
                        f"H @ v error {float(err.max()):.3e} > 2 dH ||v|| = {tol_prod:.3e} ||v||"
                    )

            # ---- factorization
            try:
                F = H.factorize(eps, method=method)
            except errors.SingularMatrixError as err:
                report.singular_raised = True
                if gap_ok:
                    report.fail(
                        f"SingularMatrixError although min |eig(H + eps I)| = {sigma_min:.3e} "
                        f"> {GAP:g} ||H|| = {GAP * norm_H:.3e}: {err}"
                    )
                elif not ("H + " in str(err) and "singular" in str(err)):
                    report.fail(f"SingularMatrixError message does not name H + eps I: {err}")
                F = None
            if F is not None:
                # ---- solves: (n, k) and (n,)
                # The measured residual carries the reference's own error: with
                # ||H_ref - H|| <= dH, eta_measured <= eta + dH / ||M||, and the residual
                # itself is computed with error <= K u (||M|| ||x|| + ||g||).
                eta_allowed = CONTRACT_BACKWARD_ERROR + dH / norm_M + K * UNIT_ROUNDOFF
                floor = 2 * dH / norm_M + K * UNIT_ROUNDOFF
                nonzero_g = float(torch.linalg.vector_norm(ref.gradient)) > 0
                cols = int(torch.randint(1, 4, (), generator=gen)) if k is None else k
                rhs = [torch.randn(n, cols, generator=gen, dtype=torch.float64)]
                rhs.append(
                    ref.gradient.clone()
                    if nonzero_g
                    else torch.randn(n, generator=gen, dtype=torch.float64)
                )
                for G in rhs:
                    X = F.solve(G)
                    if X.shape != G.shape:
                        report.fail(f"solve returned shape {tuple(X.shape)} for {tuple(G.shape)}")
                        continue
                    eta = backward_error(M, X, G, norm_M)
                    report.backward_errors.append(eta)
                    reported = F.backward_error
                    steps = F.refinement_steps
                    if not (
                        isinstance(reported, float)
                        and isinstance(steps, int)
                        and isinstance(F.method, str)
                    ):
                        report.fail(
                            f"backward_error/refinement_steps/method types: {reported!r} {steps!r} "
                            f"{F.method!r}"
                        )
                        continue
                    report.reported_backward_errors.append(reported)
                    if not eta <= eta_allowed:
                        report.fail(
                            f"backward error {eta:.3e} (measured vs dense) > {eta_allowed:.3e}; "
                            f"reported {reported:.3e}, cond {cond:.3e}"
                        )
                    if not reported <= CONTRACT_BACKWARD_ERROR:
                        report.fail(
                            f"reported backward error {reported:.3e} > {CONTRACT_BACKWARD_ERROR:g}"
                        )
                    # The library reports an upper bound (a lower bound on ||H + eps I|| in its
                    # denominator, docs/algorithm.md section 11): it must never be low.
                    if not eta <= 10 * reported + floor:
                        report.fail(
                            f"reported backward error {reported:.3e} inconsistent with measured "
                            f"{eta:.3e} (factor 10, floor {floor:.1e})"
                        )
                    # Forward error: x solves (M + E) x = g + f with ||E|| <= eta_x ||M||,
                    # ||f|| <= eta_x ||g||, so ||x - x*|| / ||x*|| <= 2 cond eta_x / (1 - cond
                    # eta_x)
                    # (first order, Higham Thm 7.2). x_ref has its own measured backward error.
                    X_ref = torch.linalg.solve(M, G)
                    eta_ref = backward_error(M, X_ref, G, norm_M)
                    eta_x = CONTRACT_BACKWARD_ERROR + dH / norm_M
                    c_eta = cond * (eta_x + eta_ref)
                    if c_eta < 0.5:
                        tol_fwd = SAFETY * 2 * c_eta / (1 - c_eta)
                        Xc, Rc = X.reshape(n, -1), X_ref.reshape(n, -1)
                        fwd = float(
                            (
                                torch.linalg.vector_norm(Xc - Rc, dim=0)
                                / torch.linalg.vector_norm(Rc, dim=0).clamp_min(1e-300)
                            ).max()
                        )
                        report.forward_error_ratio = max(report.forward_error_ratio, fwd / tol_fwd)
                        if not fwd <= tol_fwd:
                            report.fail(
                                f"forward error {fwd:.3e} > {tol_fwd:.3e} (2 cond eta, cond "
                                f"{cond:.3e})"
                            )
                # ---- logdet, inertia: always available; exact when the gap allows
                sign, logabsdet = F.logdet()
                counts = F.inertia()
                pd = F.is_positive_definite
                if not (
                    isinstance(sign, torch.Tensor) and sign.dim() == 0 and logabsdet.dim() == 0
                ):
                    report.fail(f"logdet() must return 0-d tensors, got {sign!r}, {logabsdet!r}")
                if not (
                    len(counts) == 3 and all(_is_count(c) for c in counts) and sum(counts) == n
                ):
                    report.fail(f"inertia() = {counts!r} is not three integers summing to n = {n}")
                if gap_ok:
                    report.inertia_compared = True
                    expected = (int((ev > 0).sum()), int((ev < 0).sum()), 0)
                    if tuple(counts) != expected:
                        report.inertia_disagrees = True
                        report.fail(
                            f"inertia {tuple(counts)} != eigvalsh's {expected} "
                            f"(min |eig| {sigma_min:.3e}, ||H|| {norm_H:.3e})"
                        )
                    if bool(pd) != (expected[1] == 0):
                        report.fail(
                            f"is_positive_definite = {pd} but {expected[1]} negative eigenvalues"
                        )
                    ref_sign = (-1) ** expected[1]
                    ref_logdet = float(torch.log(ev.abs()).sum())
                    # A factorization with backward error eta_f gives log|det(M + E)|, and
                    # |log|det(M + E)| - log|det M|| <= n cond eta_f / (1 - cond eta_f); summing n
                    # logs adds <= K u sum |log|lambda||; eigvalsh's own error is inside K u in
                    # eta_f.
                    eta_f = CONTRACT_BACKWARD_ERROR + dH / norm_M + K * UNIT_ROUNDOFF
                    c_eta = cond * eta_f
                    tol_ld = (
                        SAFETY * n * c_eta / (1 - c_eta) if c_eta < 0.5 else math.inf
                    ) + K * UNIT_ROUNDOFF * float(torch.log(ev.abs()).abs().sum())
                    if float(sign) != ref_sign:
                        report.fail(f"logdet sign {float(sign)} != {ref_sign}")
                    report.logdet_error_ratio = abs(float(logabsdet) - ref_logdet) / tol_ld
                    if not abs(float(logabsdet) - ref_logdet) <= tol_ld:
                        report.fail(
                            f"log|det| {float(logabsdet)!r} vs {ref_logdet!r} (tol {tol_ld:.2e}, "
                            f"cond {cond:.2e})"
                        )
        except Exception as err:  # a crash is a violation too; keep what was found before it
            report.crashed = True
            trace = traceback.format_exc(limit=-3)
            report.fail(f"raised {type(err).__name__}: {err}\n{trace}")
    report.accuracy_warnings = sum(issubclass(w.category, errors.AccuracyWarning) for w in caught)
    return report
