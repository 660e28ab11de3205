"""The Laplace approximation with the exact Gauss-Newton matrix (docs/algorithm.md section 16).

At trained parameters ``theta*`` the Laplace approximation of a network's posterior is the
Gaussian ``N(theta*, Pi^-1)`` with posterior precision ``Pi = c G + P``: ``G`` the
generalized Gauss-Newton matrix of the summed loss (:class:`~hessinv.ChainGGN`), ``P`` the
diagonal prior precision and ``c`` the likelihood's scale (1 for classification,
``1 / (2 sigma^2)`` for regression, where ``G`` is that of the summed squared error, ``2 J^T
J``; so ``c G = J^T J / sigma^2``). Everything reduces to the ``B r x B r`` matrix

    K = I + c U P^-1 U^T          (G = U^T U, section 14; U P^-1 U^T from the output space),

so the log marginal likelihood, its gradient in the prior precision, the inverse diagonal
and the predictive covariance cost time linear in depth and never form ``G``, ``J`` or
anything ``n x n``. :class:`LaplaceGGN` is the entry point; its values are laplace-torch's
(``Laplace(..., hessian_structure="full")`` with its default GGN backend) to rounding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from hessinv.curvature.hessian import ChainGGN
from hessinv.curvature.output_space import OutputSpace
from hessinv.curvature.solvers import woodbury_diagonal_error
from hessinv.derivatives import LinearDerivatives
from hessinv.errors import AccuracyWarning
from hessinv.network.checks import positive, positive_int
from hessinv.network.data import resolve_batch

__all__ = ["LaplaceGGN", "MarginalLikelihoodGrad", "LIKELIHOODS", "PRIOR_STRUCTURES"]

#: the likelihoods :class:`LaplaceGGN` takes (laplace-torch's names)
LIKELIHOODS = ("classification", "regression")
#: the prior precisions it takes: one value, one per parameter tensor, one per parameter entry
PRIOR_STRUCTURES = ("scalar", "layerwise", "diagonal")


class MarginalLikelihoodGrad(NamedTuple):
    """What :meth:`LaplaceGGN.log_marginal_likelihood_grad` returns.

    value: the log marginal likelihood (0-d).
    prior_precision: its gradient in the prior precision, shaped like the prior precision
        (0-d, ``(T,)`` for one value per parameter tensor, ``(n,)`` per entry).
    sigma_noise: its derivative in ``sigma_noise`` (0-d; ``None`` for classification).
    """

    value: torch.Tensor
    prior_precision: torch.Tensor
    sigma_noise: torch.Tensor | None


class _Posterior(NamedTuple):
    """The factors at one ``(P, sigma)``: ``K = I + CA``, ``CA = c U P^-1 U^T``."""

    key: tuple[str, torch.Tensor, float]
    structure: str
    p: torch.Tensor  # the prior precision as given: 0-d, (T,) or (n,)
    c: float  # the likelihood's scale
    weights: list[torch.Tensor] | None  # per-stage P^-1 weights (None: scalar, 1 / p)
    CA: torch.Tensor  # c U P^-1 U^T, (B r, B r)
    chol: torch.Tensor  # the Cholesky factor of K
    logdet_K: torch.Tensor


def _forward(model: nn.Module | Sequence[nn.Module], inputs: Any) -> torch.Tensor:
    if isinstance(model, nn.Module):
        return model(inputs)
    z = inputs
    for module in model:
        z = module(z)
    return z


def _first_leaf(inputs: Any) -> torch.Tensor:
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise TypeError("inputs must be a tensor or a tuple/dict of tensors with the batch first")
    return leaves[0]


class LaplaceGGN:
    """The Laplace approximation at ``theta*`` with the exact Gauss-Newton matrix as Hessian
    (docs/algorithm.md section 16), laplace-torch's full Laplace in time linear in depth.

    Posterior precision ``Pi = c G + P`` (``G`` of the summed loss; ``c G = J^T J / sigma^2``
    for regression, ``c = 1`` for classification), and the log marginal likelihood

        log p(D) ~ log_lik - 1/2 (logdet(Pi) - logdet(P) + (theta* - mu)^T P (theta* - mu)),

    ``log_lik = -sum CE`` (classification) or ``-SSE / (2 sigma^2) - N K log(sigma sqrt(2 pi))``
    (regression), ``mu`` the prior mean (``0`` by default), exactly laplace-torch's
    ``log_marginal_likelihood``. ``logdet(Pi) - logdet(P) = logdet(K)``,
    ``K = I + c U P^-1 U^T`` (``B r x B r``; Sylvester), from one (weighted) Gram matrix of
    the output space and a Cholesky factorization.

    Args:
        model: ``nn.Sequential`` (or a list of modules) at the trained parameters; see
            :class:`~hessinv.ChainHessian`. Read at construction.
        likelihood: ``"classification"`` (cross-entropy on the model's logits ``(B, K)``,
            targets class indices ``(B,)`` or probabilities ``(B, K)``) or ``"regression"``
            (Gaussian with standard deviation ``sigma_noise``; targets shaped like the
            outputs).
        inputs, targets: the whole training set as one batch; or ``data=`` an iterable of
            ``(inputs, targets)`` batches (a ``DataLoader``), taken as one.
        prior_precision: ``P``: a positive number, a ``(T,)`` tensor with one value per
            parameter tensor (laplace-torch's layerwise prior; ``T = len(param_names)``, in
            that order) or an ``(n,)`` tensor with one value per parameter entry.
        sigma_noise: the regression noise's standard deviation (must be 1 for classification).
        prior_mean: ``mu``, a number or an ``(n,)`` tensor.
        params, oracle, progress: as for :class:`~hessinv.ChainGGN`.

    Every method takes ``prior_precision=`` and ``sigma_noise=`` to evaluate at other values
    without changing the object's (laplace-torch's methods overwrite them); the factors of
    the last ``(P, sigma)`` are kept, so the log marginal likelihood, its gradient, the
    inverse diagonal and the predictive covariance at one ``(P, sigma)`` share them. The
    values are not differentiable by autograd (a ``prior_precision`` that requires grad is
    read as a number): the gradients are :meth:`log_marginal_likelihood_grad`. Costs:
    a scalar ``P`` reuses the Gram matrix ``U U^T`` of the output space (computed once); a
    layerwise or diagonal ``P`` computes ``U P^-1 U^T`` anew (section 16), linear in depth.

    Example, checked against the dense formula:

    >>> import math, torch
    >>> from torch import nn
    >>> import hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    >>> la = hessinv.LaplaceGGN(model, "classification", X, y, prior_precision=0.5)
    >>> G, theta = la.ggn.dense(), la.theta            # dense: only for this check
    >>> Pi = G + 0.5 * torch.eye(26, dtype=torch.float64)
    >>> ref = -la.ggn.loss - 0.5 * (torch.logdet(Pi) - 26 * math.log(0.5) + 0.5 * theta @ theta)
    >>> torch.allclose(la.log_marginal_likelihood(), ref, rtol=1e-12)
    True
    >>> g = la.log_marginal_likelihood_grad()          # d/dP: -1/2 tr(Pi^-1) + n/(2P) - |theta|^2/2
    >>> ref_g = -0.5 * torch.linalg.inv(Pi).trace() + 26 - 0.5 * theta @ theta
    >>> torch.allclose(g.prior_precision, ref_g, rtol=1e-10)
    True
    >>> P = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)  # one per parameter tensor
    >>> la.log_marginal_likelihood(prior_precision=P).shape, la.prior_precision.item()
    (torch.Size([]), 0.5)
    >>> V = la.posterior_variance(X[:2])                # (2, K, K): J(x) Pi^-1 J(x)^T per sample
    >>> V.shape
    torch.Size([2, 2, 2])
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        likelihood: str,
        inputs: Any = None,
        targets: Any = None,
        *,
        data: Iterable[Any] | None = None,
        prior_precision: float | torch.Tensor = 1.0,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        params: Sequence[str | torch.Tensor] | None = None,
        oracle: str = "auto",
        progress: bool | None = None,
    ) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r} (cross-entropy "
                "on logits for 'classification', a Gaussian with sigma_noise for 'regression')"
            )
        self.likelihood = likelihood
        inputs, targets = resolve_batch(inputs, targets, data, progress)
        targets = self._check_targets(model, inputs, targets)
        loss_fn: Callable[..., torch.Tensor] = (
            nn.CrossEntropyLoss(reduction="sum")
            if likelihood == "classification"
            else nn.MSELoss(reduction="sum")
        )
        #: the Gauss-Newton matrix of the summed loss (cross-entropy, or the squared error)
        self.ggn = ChainGGN(
            model, loss_fn, inputs, targets, params=params, oracle=oracle, progress=progress
        )
        self._space: OutputSpace = self.ggn.output_space()
        self._model, self._params, self._oracle = model, params, oracle
        #: ``theta*``, the flat ``(n,)`` parameters the approximation is taken at
        self.theta = self.ggn.chain.flat_params()
        self.n_data = self._space.batch
        self.n_outputs = self._space.outputs
        self._sizes = [int(s.numel()) for s in self.ggn.layout.shapes]
        self._cache: _Posterior | None = None
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self.prior_mean = prior_mean

    # ------------------------------------------------------------------ checks
    def _check_targets(self, model: Any, inputs: Any, targets: Any) -> torch.Tensor:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        B = _first_leaf(inputs).shape[0]
        if targets.dim() == 0 or targets.shape[0] != B:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)} but the inputs hold {B} samples"
            )
        with torch.no_grad():
            out = _forward(model, tree_map(lambda t: t[:1], inputs))
        if self.likelihood == "classification":
            if out.dim() != 2:
                raise ValueError(
                    f"classification needs logits of shape (B, K); the model gives "
                    f"{tuple(out.shape[1:])} per sample"
                )
            K = out.shape[1]
            if targets.dtype.is_floating_point:
                if tuple(targets.shape) != (B, K):
                    raise ValueError(
                        f"probability targets must have shape ({B}, {K}), got "
                        f"{tuple(targets.shape)}"
                    )
                return targets.to(out.dtype)
            if targets.dim() != 1:
                raise ValueError(
                    f"class-index targets must have shape ({B},), got {tuple(targets.shape)}"
                )
            if bool((targets < 0).any()) or bool((targets >= K).any()):
                raise ValueError(
                    f"class-index targets must lie in [0, {K}), the model's {K} logits"
                )
            return targets
        if not targets.dtype.is_floating_point:
            raise TypeError(f"regression targets must be floating point, got {targets.dtype}")
        if targets.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"regression targets must be shaped like the model's outputs, ({B}, "
                f"{', '.join(map(str, out.shape[1:]))}); got {tuple(targets.shape)}"
            )
        return targets.to(out.dtype)

    @property
    def num_params(self) -> int:
        """``n``, the number of parameters of the posterior."""
        return self.ggn.num_params

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameter tensors, in the order of a layerwise prior precision."""
        return self.ggn.param_names

    @property
    def prior_precision(self) -> torch.Tensor:
        """``P``: 0-d, ``(T,)`` (one per parameter tensor) or ``(n,)``, positive."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | torch.Tensor) -> None:
        self._prior_precision = self._check_prior(value)[0]

    @property
    def sigma_noise(self) -> torch.Tensor:
        """The regression noise's standard deviation (0-d; 1 for classification)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | torch.Tensor) -> None:
        sigma = positive(value, "sigma_noise")
        if self.likelihood == "classification" and sigma != 1.0:
            raise ValueError(
                f"sigma_noise must be 1 for classification (got {sigma}): it is the noise of the "
                "regression likelihood"
            )
        self._sigma_noise = torch.tensor(sigma, dtype=self.ggn.dtype, device=self.ggn.device)

    @property
    def prior_mean(self) -> torch.Tensor:
        """``mu``: 0-d or ``(n,)``."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | torch.Tensor) -> None:
        mu = torch.as_tensor(value, dtype=self.ggn.dtype, device=self.ggn.device)
        if mu.numel() == 1:
            mu = mu.reshape(())
        elif tuple(mu.shape) != (self.num_params,):
            raise ValueError(
                f"prior_mean must be a number or an ({self.num_params},) tensor, got shape "
                f"{tuple(mu.shape)}"
            )
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("prior_mean must be finite")
        self._prior_mean = mu

    def _check_prior(self, value: Any) -> tuple[torch.Tensor, str]:
        """``(P, structure)`` for a prior precision, or a ``ValueError`` naming what is wrong."""
        if isinstance(value, bool):
            raise TypeError("prior_precision must be a number or a tensor, got bool")
        try:
            P = torch.as_tensor(value, dtype=self.ggn.dtype, device=self.ggn.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"prior_precision must be a number or a tensor, got {type(value).__name__}"
            ) from err
        n, T = self.num_params, len(self._sizes)
        if P.numel() == 1:
            P, structure = P.reshape(()), "scalar"
        elif tuple(P.shape) == (n,):
            structure = "diagonal"
        elif tuple(P.shape) == (T,):
            structure = "layerwise"
        else:
            raise ValueError(
                f"prior_precision must be a number, a ({T},) tensor (one value per parameter "
                f"tensor, in the order of param_names) or an ({n},) tensor (one per parameter "
                f"entry); got shape {tuple(P.shape)}"
            )
        if not bool(torch.isfinite(P).all()) or not bool((P > 0).all()):
            raise ValueError(
                f"prior_precision must be positive and finite; got {structure} values with "
                f"minimum {float(P.min()):g} and maximum {float(P.max()):g}"
            )
        return P.detach(), structure

    # ------------------------------------------------------------------ the factors
    def _scale(self, sigma: torch.Tensor) -> float:
        """``c``: ``Pi = c G + P``."""
        return 1.0 if self.likelihood == "classification" else 0.5 / float(sigma) ** 2

    def _sigma(self, sigma_noise: float | torch.Tensor | None) -> torch.Tensor:
        if sigma_noise is None:
            return self._sigma_noise
        if self.likelihood == "classification":
            raise ValueError("sigma_noise can be changed for regression only")
        return torch.tensor(
            positive(sigma_noise, "sigma_noise"), dtype=self.ggn.dtype, device=self.ggn.device
        )

    def _expand(self, P: torch.Tensor, structure: str) -> torch.Tensor:
        """``P`` as one value per parameter entry, ``(n,)``."""
        if structure == "scalar":
            return P.expand(self.num_params)
        if structure == "layerwise":
            sizes = torch.tensor(self._sizes, device=P.device)
            return torch.repeat_interleave(P, sizes)
        return P

    def _stage_weights(self, P: torch.Tensor, structure: str) -> list[torch.Tensor] | None:
        """``P^-1`` per stage for :meth:`OutputSpace.weighted_gram`: ``None`` for a scalar
        (the plain Gram matrix over ``p``); per input column for a ``Linear`` stage under a
        layerwise prior (constant over output units); else per entry."""
        if structure == "scalar":
            return None
        inv = self._expand(P, structure).reciprocal()
        out = []
        for d, w in zip(self._space.stages, inv.split(list(self.ggn.stage_sizes)), strict=True):
            if structure == "layerwise" and isinstance(d, LinearDerivatives):
                w = d.to_matrix(w[:, None])[0, :, 0]  # (m,): the first output unit's row
            out.append(w)
        return out

    def _posterior(
        self, prior_precision: Any = None, sigma_noise: float | torch.Tensor | None = None
    ) -> _Posterior:
        P, structure = (
            (self._prior_precision, self._structure_of(self._prior_precision))
            if prior_precision is None
            else self._check_prior(prior_precision)
        )
        c = self._scale(self._sigma(sigma_noise))
        hit = self._cache
        if (
            hit is not None
            and hit.key[0] == structure
            and hit.key[2] == c
            and torch.equal(hit.key[1], P)
        ):
            return hit
        weights = self._stage_weights(P, structure)
        if weights is None:
            CA = self._space.gram() * (c / P)
        else:
            CA = self._space.weighted_gram(weights).mul_(c)
        K = CA.clone()
        K.diagonal().add_(1.0)
        chol, info = torch.linalg.cholesky_ex(K)
        if int(info):  # K >= I: only NaN or overflow gets here
            raise ValueError(
                "I + c U P^-1 U^T is not positive definite: the Gram matrix holds NaN or Inf"
            )
        logdet_K = 2 * torch.log(chol.diagonal()).sum()
        post = _Posterior((structure, P, c), structure, P, c, weights, CA, chol, logdet_K)
        self._cache = post
        return post

    def _structure_of(self, P: torch.Tensor) -> str:
        if P.dim() == 0:
            return "scalar"
        return "diagonal" if P.shape[0] == self.num_params else "layerwise"

    # ------------------------------------------------------------------ marginal likelihood
    def log_likelihood(self, sigma_noise: float | torch.Tensor | None = None) -> torch.Tensor:
        """``log p(D | theta*)`` (0-d): ``-sum CE``, or ``-SSE / (2 sigma^2) - N K log(sigma
        sqrt(2 pi))`` for regression (laplace-torch's ``log_likelihood``)."""
        if self.likelihood == "classification":
            return -self.ggn.loss
        sigma = self._sigma(sigma_noise)
        N, K = self.n_data, self.n_outputs
        return -self.ggn.loss / (2 * sigma**2) - N * K * torch.log(sigma * math.sqrt(2 * math.pi))

    def _scatter(self, p: torch.Tensor) -> torch.Tensor:
        delta = self.theta - self._prior_mean
        return (p * delta * delta).sum()

    def posterior_precision_logdet(
        self, prior_precision: Any = None, sigma_noise: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logdet(Pi) = logdet(K) + sum_j log p_j`` (0-d; section 16)."""
        post = self._posterior(prior_precision, sigma_noise)
        return post.logdet_K + torch.log(self._expand(post.p, post.structure)).sum()

    def log_marginal_likelihood(
        self, prior_precision: Any = None, sigma_noise: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``log_lik - 1/2 (logdet(K) + (theta* - mu)^T P (theta* - mu))`` (0-d), with
        ``logdet(K) = logdet(Pi) - logdet(P)``: laplace-torch's ``log_marginal_likelihood``
        of the full GGN Laplace (section 16). Cost with a kept Gram matrix (scalar ``P``):
        ``(B r)^3 / 3``; otherwise one weighted Gram matrix first, linear in depth."""
        post = self._posterior(prior_precision, sigma_noise)
        p = self._expand(post.p, post.structure)
        sigma = self._sigma(sigma_noise)
        return self.log_likelihood(sigma) - 0.5 * (post.logdet_K + self._scatter(p))

    def _q(self, post: _Posterior) -> torch.Tensor:
        """``q = diag(U^T K^-1 U)`` ``(n,)``, one sweep (section 14's inverse diagonal)."""
        Kinv = torch.cholesky_inverse(post.chol)
        return torch.cat(self._space.diag_quadratic(Kinv))

    def _q_sums(self, X: torch.Tensor) -> torch.Tensor:
        """An ``(n,)`` vector with the sums of ``q = diag(U^T X U)`` over every parameter
        tensor: a ``Linear`` stage's column sums (over output units) put in its first output
        unit's row (each tensor of the stage is a set of whole columns), ``q`` elsewhere."""
        out = []
        for d, s in zip(self._space.stages, self._space.diag_quadratic_sums(X), strict=True):
            if isinstance(d, LinearDerivatives):
                E = s.new_zeros(d.out_size, d.m, 1)
                E[0, :, 0] = s
                s = d.from_matrix(E)[:, 0]
            out.append(s)
        return torch.cat(out)

    def log_marginal_likelihood_grad(
        self, prior_precision: Any = None, sigma_noise: float | torch.Tensor | None = None
    ) -> MarginalLikelihoodGrad:
        """The log marginal likelihood and its gradients (section 16).

        In the prior precision, for the entries ``j`` of a group ``g`` sharing one value
        ``p_g`` (all ``n`` for a scalar, a parameter tensor for a layerwise prior, one entry
        for a diagonal one), from ``d/dp_j = -1/2 (Pi^-1)_jj + 1/(2 p_j) - 1/2 delta_j^2`` and
        ``(Pi^-1)_jj = (1 - c q_j / p_j) / p_j``, ``q = diag(U^T K^-1 U)``:

            d log p(D) / d p_g = c / (2 p_g^2) sum_{j in g} q_j - 1/2 sum_{j in g} delta_j^2

        (``delta = theta* - mu``; the ``1/p`` terms cancel exactly, so nothing cancels in
        rounding). For a scalar ``p``, ``sum_j q_j = tr(K^-1 U U^T)`` needs no sweep; otherwise
        ``q`` costs one sweep like the inverse diagonal. For regression also
        ``d/d sigma = SSE / sigma^3 - N K / sigma + tr(K^-1 (K - I)) / sigma``.
        """
        post = self._posterior(prior_precision, sigma_noise)
        sigma = self._sigma(sigma_noise)
        p, c = post.p, post.c
        delta2 = (self.theta - self._prior_mean) ** 2
        Kinv = torch.cholesky_inverse(post.chol)
        trace_KinvCA = (Kinv * post.CA).sum()  # tr(K^-1 c U P^-1 U^T)
        if post.structure == "scalar":
            # sum_j q_j = tr(K^-1 U U^T) = (p / c) tr(K^-1 CA)
            grad = trace_KinvCA / (2 * p) - 0.5 * delta2.sum()
        else:
            if post.structure == "layerwise":
                sums = torch.stack([t.sum() for t in self._q_sums(Kinv).split(self._sizes)])
                d2 = torch.stack([t.sum() for t in delta2.split(self._sizes)])
            else:
                sums, d2 = torch.cat(self._space.diag_quadratic(Kinv)), delta2
            grad = c / (2 * p * p) * sums - 0.5 * d2
        value = self.log_likelihood(sigma) - 0.5 * (
            post.logdet_K + self._scatter(self._expand(p, post.structure))
        )
        dsigma = None
        if self.likelihood == "regression":
            N, K = self.n_data, self.n_outputs
            dsigma = self.ggn.loss / sigma**3 - N * K / sigma + trace_KinvCA / sigma
        return MarginalLikelihoodGrad(value, grad, dsigma)

    # ------------------------------------------------------------------ posterior
    def inverse_diagonal(
        self, prior_precision: Any = None, sigma_noise: float | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``diag(Pi^-1)``, the posterior variances, as ``{name: tensor shaped like the
        parameter}``: ``(1 - c q_j / p_j) / p_j`` with ``q = diag(U^T K^-1 U)`` (section 16).

        Entry ``j`` has a relative error of about ``u cond(K) t_j / (1 - t_j)``,
        ``t_j = c q_j / p_j`` (Woodbury's cancellation when the data determine the parameter
        far better than the prior); an :class:`~hessinv.errors.AccuracyWarning` names it above
        ``1e-8`` (float64; ``1e-3`` float32).
        """
        post = self._posterior(prior_precision, sigma_noise)
        p = self._expand(post.p, post.structure)
        t = post.c * self._q(post) / p
        cond = 1.0 + float(post.CA.diagonal().sum())  # >= ||K|| ||K^-1|| (K >= I)
        estimate, limit = woodbury_diagonal_error(t, cond)
        if estimate > limit:
            warnings.warn(
                f"inverse_diagonal of the posterior precision: relative error up to about "
                f"{estimate:.0e} (Woodbury's 1 - c q / p cancels where the data determine a "
                "parameter much better than the prior)",
                AccuracyWarning,
                stacklevel=2,
            )
        diag = (1 - t) / p
        return self.ggn.layout.from_blocks([diag[:, None]], ("dict",))

    def _test_space(self, inputs: Any) -> OutputSpace:
        """The output space of ``J(x*)`` (``B* K`` rows, factor ``I``) of the same chain."""
        with torch.no_grad():
            out = _forward(self._model, inputs)
        test = ChainGGN(
            self._model,
            nn.MSELoss(reduction="sum"),
            inputs,
            torch.zeros_like(out),
            params=self._params,
            oracle=self._oracle,
            progress=False,
        )
        if test.param_names != self.param_names or not torch.equal(
            test.chain.flat_params(), self.theta
        ):
            raise ValueError(
                "the model's parameters changed since this LaplaceGGN was built (it is the "
                "approximation at the parameters it read then); build a new LaplaceGGN"
            )
        B, K = out.shape[0], out[0].numel()
        eye = torch.eye(K, dtype=self.ggn.dtype, device=self.ggn.device).expand(B, K, K)
        return OutputSpace(test.stage_derivatives(), eye)

    def posterior_variance(
        self,
        inputs: Any,
        *,
        joint: bool = False,
        noise: bool = False,
        batch_size: int | None = None,
        prior_precision: Any = None,
        sigma_noise: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The predictive covariance of the linearized model, ``J(x*) Pi^-1 J(x*)^T``
        (laplace-torch's ``functional_variance``; section 16).

        ``inputs``: a test batch ``(B*, ...)``. Returns ``(B*, K, K)``, one output
        covariance per sample, or with ``joint=True`` the ``(B* K, B* K)`` covariance of all
        outputs (sample-major). ``noise=True`` (regression) adds ``sigma^2 I``, the
        observation noise of the predictive. ``batch_size``: test samples per pass
        (not with ``joint``). Never forms ``J``:

            J* Pi^-1 J*^T = J* P^-1 J*^T - c C^T K^-1 C,      C = U P^-1 J*^T  (B r x B* K),

        the cross Gram matrix of the training and test output spaces (for a ``Linear``
        stage ``(D D*^T) * (Zt P^-1 Zt*^T (x) 1 1^T)``), linear in depth. The subtraction
        loses about ``log10(||J* P^-1 J*^T|| / ||J* Pi^-1 J*^T||)`` digits where the data
        shrink the prior's variance by that much.
        """
        if noise and self.likelihood != "regression":
            raise ValueError("noise=True adds sigma_noise^2 I, for regression only")
        if batch_size is not None:
            positive_int(batch_size, "batch_size")
            if joint:
                raise ValueError("batch_size splits the test samples; joint=True needs them all")
        post = self._posterior(prior_precision, sigma_noise)
        B = _first_leaf(inputs).shape[0]
        step = B if batch_size is None else batch_size
        parts = []
        for start in range(0, B, step):
            chunk = tree_map(lambda t, s=slice(start, start + step): t[s], inputs)
            parts.append(self._predictive(post, self._test_space(chunk), joint))
        cov = parts[0] if len(parts) == 1 else torch.cat(parts)
        if noise:
            sigma2 = self._sigma(sigma_noise) ** 2
            cov = cov + sigma2 * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return cov

    def _predictive(self, post: _Posterior, test: OutputSpace, joint: bool) -> torch.Tensor:
        scale = 1.0 / post.p if post.weights is None else 1.0
        C = self._space.cross_gram(test, post.weights) * scale  # U P^-1 J*^T
        Y = torch.linalg.solve_triangular(post.chol, C, upper=False)  # L^-1 C
        if joint:
            prior = test.cross_gram(test, post.weights) * scale
            cov = prior - post.c * (Y.T @ Y)
            return (cov + cov.T) / 2
        prior = test.gram_blocks(post.weights) * scale  # (B*, K, K)
        Yt = Y.reshape(Y.shape[0], test.batch, test.rank_rows)
        cov = prior - post.c * torch.einsum("rtc,rtd->tcd", Yt, Yt)
        return (cov + cov.transpose(1, 2)) / 2

    # ------------------------------------------------------------------ tuning
    def optimize_prior_precision(
        self,
        prior_structure: str = "scalar",
        init_prior_prec: float | torch.Tensor = 1.0,
        n_steps: int = 100,
        lr: float = 0.1,
    ) -> torch.Tensor:
        """Maximize the log marginal likelihood in the prior precision by Adam on ``log P``,
        as laplace-torch's ``optimize_prior_precision(method="marglik")`` (same defaults), with
        the exact gradient of :meth:`log_marginal_likelihood_grad`; sets and returns
        :attr:`prior_precision`.

        ``prior_structure``: ``"scalar"``, ``"layerwise"`` or ``"diagonal"``, the shape
        ``init_prior_prec`` is broadcast to when it is a number (a tensor keeps its own).
        A scalar prior costs one eigendecomposition of the kept Gram matrix, then ``O(B r)``
        per step; the others one weighted Gram matrix and one sweep per step.
        """
        if prior_structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"prior_structure must be one of {PRIOR_STRUCTURES}, got {prior_structure!r}"
            )
        positive_int(n_steps, "n_steps")
        positive(lr, "lr")
        init, structure = self._check_prior(init_prior_prec)
        if structure == "scalar" and prior_structure != "scalar":
            size = len(self._sizes) if prior_structure == "layerwise" else self.num_params
            init, structure = init.expand(size).clone(), prior_structure
        log_p = init.log().clone()
        opt = torch.optim.Adam([log_p], lr=lr)
        if structure == "scalar":
            e = self._space.eigh()[0].clamp_min(0)  # the Gram matrix's eigenvalues
            c = self._scale(self._sigma_noise)
            d2 = ((self.theta - self._prior_mean) ** 2).sum()
        for _ in range(n_steps):
            p = log_p.detach().exp()
            if structure == "scalar":
                grad = c / (2 * p * p) * (e / (1 + c * e / p)).sum() - 0.5 * d2
            else:
                grad = self.log_marginal_likelihood_grad(p).prior_precision
            log_p.grad = -(grad * p)  # ascent in log P
            opt.step()
        self.prior_precision = log_p.detach().exp()
        return self.prior_precision

    def __repr__(self) -> str:
        structure = self._structure_of(self._prior_precision)
        return (
            f"LaplaceGGN({self.likelihood!r}, n={self.num_params}, data={self.n_data}, "
            f"outputs={self.n_outputs}, prior_precision: {structure})"
        )
