"""The user API: :class:`ChainHessian` and :class:`ChainGGN`, thin classes over
:class:`~hessinv.curvature.operator.CurvatureOperator`.

Both are exact symmetric operators on the selected parameters of a chain network,
built from one forward/backward derivative sweep at construction. They differ only in
the stages' second-order terms: the Hessian keeps ``Dxx``, ``Dzx``, ``Dzz`` (section 2),
the generalized Gauss-Newton matrix ``G = J^T H_loss J`` drops them (section 9), and has
an output space (section 14).
"""

from __future__ import annotations

import functools

import torch

from hessinv.curvature.operator import CurvatureOperator
from hessinv.curvature.output_space import OutputSpace

__all__ = ["ChainHessian", "ChainGGN"]


class ChainHessian(CurvatureOperator):
    """The exact Hessian of ``loss_fn(model(inputs), targets)`` in the model's parameters.

    The model is split into stages (docs/algorithm.md section 1); each stage's
    derivatives are computed once, at construction, and every operation below costs
    time linear in the number of stages. ``H`` is never formed unless :meth:`dense` is
    called.

    Args:
        model: ``nn.Sequential`` or a list of modules; every child with selected
            parameters starts a stage, the other children join the stage before.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar that is a sum (or mean)
            of per-sample terms, e.g. ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``.
        inputs: the batch ``(B, ...)`` (or a tuple/dict the first stage takes).
        targets: whatever ``loss_fn`` takes.
        data: instead of ``inputs, targets``: an iterable of ``(inputs, targets)`` batches
            (a ``DataLoader``), taken as one batch (see :mod:`hessinv.data`).
        params: the parameters to differentiate in (tensors or names from
            ``named_parameters()``); default: those with ``requires_grad``. The others are
            constants.
        oracle: ``"auto"`` (structured ``Linear`` stages and closed-form losses where they
            apply, ``torch.func`` otherwise), ``"generic"`` or ``"analytic"``.
        progress: ``None`` (default): progress bars on sweeps that take more than two
            seconds, only when stderr is a terminal; ``True`` always; ``False`` never.

    Everything (parameters, constants, inputs, targets) is read at construction; build a
    new object after an update.

    Example, checked against the dense Hessian of ``torch.func``:

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
    ...                       nn.Linear(5, 3)).double()
    >>> X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    >>> H = hessinv.ChainHessian(model, nn.CrossEntropyLoss(), X, y)
    >>> H.shape, H.stage_sizes
    ((73, 73), (25, 30, 18))
    >>> dense = hessinv.dense_hessian(model, nn.CrossEntropyLoss(), X, y)
    >>> v = torch.randn(73, dtype=torch.float64)
    >>> torch.allclose(H @ v, dense @ v, rtol=1e-12, atol=1e-14)
    True
    >>> x = H.solve(v, damping=0.1)
    >>> torch.allclose(x, torch.linalg.solve(dense + 0.1 * torch.eye(73, dtype=torch.float64), v))
    True
    """

    second_order = True


class ChainGGN(CurvatureOperator):
    """The exact generalized Gauss-Newton matrix ``G = J^T H_loss J`` (docs/algorithm.md section 9).

    ``J`` is the Jacobian of the model outputs in the parameters and ``H_loss`` the
    Hessian of the loss in the outputs (split at the model output: an activation in the
    last stage belongs to ``J``). ``G`` has the chain structure of the Hessian with every
    stage's second-order terms dropped, so the same linear-time products, diagonal
    (BackPACK's ``DiagGGNExact``), factorization, logdet and solves apply; it is positive
    semi-definite for convex losses, so ``G + eps I`` (``eps > 0``) factors by Cholesky at
    every stage. ``G = U^T U`` has only ``B r`` rows (``r`` per sample, the loss factor's),
    so it also factors in output space (section 14): a ``B r x B r`` Gram matrix,
    linear in depth, which gives the inverse diagonal (:meth:`Factorization.inverse_diagonal`)
    and the spectrum (:meth:`spectrum`) too; ``method="auto"`` picks the cheaper route
    (section 15). Same constructor as :class:`ChainHessian`.

    >>> import torch
    >>> from torch import nn
    >>> import hessinv
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    >>> G = hessinv.ChainGGN(model, nn.CrossEntropyLoss(), X, y)
    >>> J = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)))(
    ...     dict(model.named_parameters()))
    >>> J = torch.cat([j.reshape(10, -1) for j in J.values()], 1)   # (B K, n)
    >>> p = torch.softmax(model(X), 1).detach()
    >>> S = torch.block_diag(*[(torch.diag(q) - torch.outer(q, q)) / 5 for q in p])
    >>> torch.allclose(G.dense(), J.T @ S @ J, atol=1e-14)
    True
    >>> G.factorize(1e-3).method       # the route chosen by cost: n = 26 is small
    'dense'
    >>> F = G.factorize(1e-3, method="output")   # B r = 5 rows: r = K - 1 for cross-entropy
    >>> F.method, F.is_positive_definite
    ('output space', True)
    >>> M = J.T @ S @ J + 1e-3 * torch.eye(26, dtype=torch.float64)
    >>> torch.allclose(F.solve(G.gradient()), torch.linalg.solve(M, G.gradient()))
    True
    >>> torch.allclose(hessinv.flatten(F.inverse_diagonal()), torch.linalg.inv(M).diagonal())
    True
    >>> torch.allclose(G.spectrum(), torch.linalg.eigvalsh(J.T @ S @ J)[-5:], atol=1e-14)
    True
    """

    second_order = False
    symbol = "G"
    routes = ("output", "riccati", "dense")

    @functools.cached_property
    def _space(self) -> OutputSpace | None:
        head = self._derivatives.head
        if head.factor is None:
            return None
        return OutputSpace(self.stage_derivatives(), head.factor, head.factor_exact)

    def output_space_or_none(self) -> OutputSpace | None:
        return self._space

    def output_space(self) -> OutputSpace:
        """``U = F J`` with ``G = U^T U`` (docs/algorithm.md section 14): ``B r`` rows, its
        Gram matrix ``U U^T`` kept once computed. Raises ``ValueError`` when the loss Hessian
        blocks are indefinite (a non-convex loss: no real factor ``F``)."""
        space = self.output_space_or_none()
        if space is None:
            raise ValueError(
                "the loss Hessian blocks have a negative eigenvalue, so G = J^T S J has no "
                "output-space factor U = S^(1/2) J; use method='riccati' or 'dense'"
            )
        return space

    def spectrum(self, eigenvectors: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The largest ``min(n, B r)`` eigenvalues of ``G``, ascending, exactly (the others
        are zero): the eigenvalues of the Gram matrix ``U U^T`` (docs/algorithm.md section 14).

        With ``eigenvectors=k > 0`` returns ``(values, vectors)``: also the unit eigenvectors
        of the ``k`` largest as an ``(n, k)`` tensor in ``param_names`` order,
        ``v_i = U^T q_i / sqrt(e_i)`` (one adjoint sweep with ``k`` columns). Eigenvalues have
        an absolute error of about ``B r u ||G||``.
        """
        if isinstance(eigenvectors, bool) or not isinstance(eigenvectors, int) or eigenvectors < 0:
            raise ValueError(f"eigenvectors must be an int >= 0, got {eigenvectors!r}")
        space = self.output_space()
        e, Q = space.eigh()
        m = min(self.num_params, space.rows)
        values = e[e.numel() - m :]
        if not eigenvectors:
            return values
        k = min(eigenvectors, m)
        top, q = values[m - k :], Q[:, Q.shape[1] - k :]
        scale = top.clamp_min(torch.finfo(top.dtype).tiny).sqrt()
        vectors = torch.cat(space.apply_T(q / scale)) if k else values.new_zeros(self.num_params, 0)
        return values, vectors
