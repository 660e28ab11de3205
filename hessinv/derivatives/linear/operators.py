"""``nn.Linear`` followed by elementwise activations, in Kronecker form (docs/algorithm.md section
8).

For ``z_out[i] = act(W z_in[i] + c)`` write the selected parameters of the stage as one
``(h_out, m)`` matrix ``Theta`` whose columns are the weight's (when it is selected) and
then the bias (when it is selected), and stack the matching inputs as
``Zt = [Z_in, 1]`` (``(B, m)``). With ``s' = act'(u)``, ``s'' = act''(u)`` at the
pre-activation ``u`` (``(B, h_out)``), the adjoint ``b`` and ``beta = b s''``,
``gamma = b s'``:

* ``Dx v = s' * (Zt V^T)`` per sample, ``V`` the ``(h_out, m)`` matrix of ``v``;
* ``Dz t = s' * (W t)``;
* ``Dxx = sum_o e_o e_o^T (x) Zt^T diag(beta[:, o]) Zt``;
* ``Dzx[(o, m), (i, k)] = beta[i, o] W[o, k] Zt[i, m] + gamma[i, o] [m is input column k]``;
* ``Dzz_i = W^T diag(beta_i) W``.

Nothing of size ``p x p`` or ``B h_out x p`` is stored: only ``Zt``, ``s'``, ``beta``,
``gamma`` and ``W``, so a product costs ``O(B h_out m)`` per vector (Pearlmutter's cost).

The basis of the stage-wise factorization is ``Y = I_{h_out} (x) Q`` with ``Q`` (``m x r``)
an orthonormal basis of the row space of ``Zt``: ``range(Dxx)`` and ``range(Dx^T)`` lie in
``span(Y)``, so the factorization works with ``N = h_out r`` numbers per stage instead of
``p = h_out m`` (``r <= min(B, m)``). The rest,
:class:`~hessinv.derivatives.linear.complement.LinearComplement`, couples to
the stage input only through the ``gamma`` term of ``Dzx`` and is handled in closed form.

The package: ``kernels`` (batched per-sample products), ``forward`` (the forward-pass parts
of many stages at once), ``operators`` (this class), ``basis`` (the front terms in the
basis ``Y``), ``complement`` (the directions outside ``Y``). The hooks of the algorithms
that batch ``Linear`` stages sit next to those algorithms
(:mod:`hessinv.curvature.linear_hvp`, :mod:`hessinv.linalg.linear_terms`).
"""

from __future__ import annotations

import torch

from hessinv.derivatives.base import StageDerivatives
from hessinv.derivatives.linear.basis import linear_front_terms
from hessinv.derivatives.linear.forward import LinearForward, LinearInput, linear_forwards
from hessinv.derivatives.linear.kernels import apply_rows, gather_rows, left, left_add

__all__ = ["LinearDerivatives"]


class LinearDerivatives(StageDerivatives):
    """Derivatives of ``act(W z + c)`` in Kronecker form (see the module docstring).

    Args:
        weight, bias: the module's current weight ``(h_out, h_in)`` and bias (or ``None``).
        acts: the elementwise activation modules that follow, in order.
        z: the stage input ``(B, h_in)``.
        b: the adjoint ``dL/dz_out`` ``(B, h_out)``.
        weight_selected, bias_selected: which of the two are parameters of ``H`` (the others
            are constants).
        has_input: False for the first stage (its input is data).
        second_order: False for the Gauss-Newton matrix (``Dxx = Dzx = Dzz = 0``).
        compress: use the row-space basis ``Y`` when ``Zt`` has rank below ``m``.

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(3, 2).double()
    >>> z, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> d = LinearDerivatives(lin.weight.detach(), lin.bias.detach(), (nn.Tanh(),), z, b,
    ...                       weight_selected=True, bias_selected=True, has_input=True)
    >>> d.num_params, d.basis_size  # rank(Zt) = 4 = m: no compression
    (8, 8)
    >>> v = torch.randn(8, 1, dtype=torch.float64)
    >>> torch.allclose(d.Dx(v)[:, :, 0], d.dense().Dx @ v[:, 0])
    True
    """

    def __init__(
        self,
        weight,
        bias,
        acts,
        z,
        b,
        *,
        weight_selected: bool,
        bias_selected: bool,
        has_input: bool,
        second_order: bool = True,
        compress: bool = True,
    ):
        item = LinearInput(weight, bias, tuple(acts), z, weight_selected, bias_selected)
        self._setup(linear_forwards([item], compress)[0], b, has_input, second_order)
        if self.Q is not None:
            from hessinv.derivatives.linear.complement import linear_complements

            linear_complements([self])

    @classmethod
    def from_forward(
        cls, forward: LinearForward, b: torch.Tensor, *, has_input: bool, second_order: bool = True
    ) -> LinearDerivatives:
        """The stage from its :class:`LinearForward` (see :func:`linear_forwards`) and adjoint."""
        self = cls.__new__(cls)
        self._setup(forward, b, has_input, second_order)
        return self

    def _setup(self, fwd: LinearForward, b, has_input, second_order):
        B, m = fwd.Zt.shape
        h_out, h_in = fwd.W.shape
        self.W, self.Zt, self.s1 = fwd.W, fwd.Zt, fwd.s1
        self.second_order = second_order
        if second_order:
            self.beta, self.gamma = b * fwd.s2, b * fwd.s1
        else:
            self.beta, self.gamma = torch.zeros_like(fwd.s1), torch.zeros_like(fwd.s1)
        # views the sweeps use at every stage, made once (each costs an operator per use):
        # W^T, and s' and beta with a trailing axis for the (B, h, k) layout
        self.WT, self.s1_col, self.beta_col = self.W.T, self.s1[:, :, None], self.beta[:, :, None]
        self.batch, self.out_size = B, h_out
        self.in_size = h_in if has_input else 0
        self.has_input = has_input
        self.weight_selected, self.bias_selected = fwd.weight_selected, fwd.bias_selected
        self.n_weight_cols = h_in if fwd.weight_selected else 0
        self.m = m
        self.num_params = h_out * m
        self.dtype, self.device = fwd.Zt.dtype, fwd.Zt.device
        # the row-space basis Q of Zt (section 8); Q = None means Q = I
        self.set_basis(fwd.Q, fwd.Zr)
        self.compressed = fwd.compressed  # False: rank not checked yet (Q = I meanwhile)
        self._complement = None  # set by linear_complements (the sweep or the constructor)

    # ------------------------------------------------------------ layout
    def to_matrix(self, v: torch.Tensor) -> torch.Tensor:
        """``(..., p, k)`` in parameter order (weight row-major, then bias) ->
        ``(..., h_out, m, k)`` (leading dimensions: stages stacked by the batched solve terms)."""
        h_out, k, lead = self.out_size, v.shape[-1], v.shape[:-2]
        nw = h_out * self.n_weight_cols
        parts = []
        if self.weight_selected:
            parts.append(v[..., :nw, :].reshape(*lead, h_out, self.n_weight_cols, k))
        if self.bias_selected:
            parts.append(v[..., nw:, :].reshape(*lead, h_out, 1, k))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def from_matrix(self, M: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`."""
        h_out, k, lead = M.shape[-3], M.shape[-1], M.shape[:-3]
        nw = self.n_weight_cols
        parts = []
        if self.weight_selected:
            parts.append(M[..., :nw, :].reshape(*lead, h_out * nw, k))
        if self.bias_selected:
            parts.append(M[..., nw:, :].reshape(*lead, h_out, k))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    # ------------------------------------------------------------ first order
    def Dx(self, v):
        return self.s1_col * apply_rows(self.Zt, self.to_matrix(v))

    def Dx_T(self, w):
        return self.from_matrix(gather_rows(self.Zt, self.s1_col * w))

    def Dz(self, t):
        return self.s1_col * left(self.W, t, self.WT)

    def Dz_T(self, w):
        return left(self.WT, self.s1_col * w, self.W)

    # ------------------------------------------------------------ second order
    def Dxx(self, v):
        T = apply_rows(self.Zt, self.to_matrix(v))
        return self.from_matrix(gather_rows(self.Zt, self.beta_col * T))

    def E(self, t):
        """``E t`` in matrix form ``(h_out, m, k)``: the ``gamma`` term of ``Dzx``."""
        B, i, k = t.shape
        Et = (self.gamma.T @ t.reshape(B, i * k)).reshape(-1, i, k)
        pad = self.m - self.n_weight_cols
        if pad:
            Et = torch.cat([Et, Et.new_zeros(Et.shape[0], pad, Et.shape[2])], dim=1)
        return Et

    def E_T(self, M):
        """``E^T`` of a matrix-form ``(h_out, m, k)``: ``(B, h_in, k)``."""
        o, nw, k = M.shape[0], self.n_weight_cols, M.shape[2]
        return (self.gamma @ M[:, :nw].reshape(o, nw * k)).reshape(-1, nw, k)

    def Dzx(self, t):
        out = gather_rows(self.Zt, self.beta_col * left(self.W, t, self.WT))
        if self.weight_selected:
            out = out + self.E(t)
        return self.from_matrix(out)

    def Dzx_T(self, v):
        M = self.to_matrix(v)
        out = left(self.WT, self.beta_col * apply_rows(self.Zt, M), self.W)
        if self.weight_selected:
            out = out + self.E_T(M)
        return out

    def Dzz(self, t):
        return left(self.WT, self.beta_col * left(self.W, t, self.WT), self.W)

    # ------------------------------------------------------------ curvature (section 6)
    def propagate_curvature(self, R):
        inner = self.s1[:, :, None] * R * self.s1[:, None, :] + torch.diag_embed(self.beta)
        return torch.einsum("oi,bop,pj->bij", self.W, inner, self.W)

    def diagonal(self, R):
        weight = self.beta + self.s1**2 * torch.diagonal(R, dim1=1, dim2=2)
        diag = torch.einsum("bo,bm->om", weight, self.Zt**2)
        return self.from_matrix(diag[:, :, None])[:, 0]

    def diagonal_block(self, R):
        K = self.s1[:, :, None] * R * self.s1[:, None, :] + torch.diag_embed(self.beta)
        h_out, m = self.out_size, self.m
        block = torch.einsum("bop,bm,bn->ompn", K, self.Zt, self.Zt).reshape(h_out * m, h_out * m)
        perm = self.from_matrix(torch.arange(h_out * m, device=self.device).reshape(h_out, m, 1))[
            :, 0
        ]
        return block[perm][:, perm]

    # ------------------------------------------------------------ basis (section 8)
    @property
    def basis_size(self):
        return self.out_size * self.r

    def set_basis(self, Q: torch.Tensor | None, Zr: torch.Tensor) -> None:
        """The row-space basis ``Q`` ``(m, r)`` of ``Zt`` (``None``: ``Q = I``) and
        ``Zr = Zt Q`` (section 8); ``compressed`` from then on."""
        self.Q, self.Zr = Q, Zr
        self.r = self.m if Q is None else Q.shape[1]
        self.compressed = True

    @property
    def complement(self):
        """The :class:`~hessinv.derivatives.linear.complement.LinearComplement` of a compressed
        stage (made with the stage: by its constructor, or for a whole chain at once by the
        sweep, :func:`~hessinv.derivatives.linear.complement.linear_complements`), else
        ``None``."""
        return self._complement

    def Y_T(self, v):
        M = self.to_matrix(v)
        if self.Q is not None:
            M = left(self.Q.T, M)
        return M.reshape(self.basis_size, v.shape[-1])

    def Y(self, alpha):
        A = alpha.reshape(self.out_size, self.r, alpha.shape[-1])
        if self.Q is not None:
            A = left(self.Q, A)
        return self.from_matrix(A)

    def DxY(self, alpha):
        A = alpha.reshape(self.out_size, self.r, alpha.shape[-1])
        return self.s1_col * apply_rows(self.Zr, A)

    def DxY_Dz(self, alpha, t):
        """``s' * (Zr A^T + t W^T)`` per sample, the second product accumulated into the first
        (one ``addmm`` for one vector)."""
        A = alpha.reshape(self.out_size, self.r, alpha.shape[-1])
        return self.s1_col * left_add(apply_rows(self.Zr, A), self.W, t, self.WT)

    def DxY_T(self, w):
        out = gather_rows(self.Zr, self.s1_col * w)
        return out.reshape(self.basis_size, w.shape[-1])

    def _right_scaled(self, M):
        """``M diag(s')`` as ``(c, B, h_out)``: what both products from the right start from."""
        return M.reshape(M.shape[0], self.batch, self.out_size) * self.s1

    def _right_DxY_of(self, R):
        return torch.matmul(R.transpose(1, 2), self.Zr).reshape(R.shape[0], self.basis_size)

    def _right_Dz_of(self, R):
        return (R @ self.W).reshape(R.shape[0], self.batch * self.W.shape[1])

    def right_DxY(self, M):
        return self._right_DxY_of(self._right_scaled(M))

    def right_Dz(self, M):
        return self._right_Dz_of(self._right_scaled(M))

    def right_DxY_Dz(self, M):
        """Both from one ``M diag(s')`` (one pass over ``M``)."""
        R = self._right_scaled(M)
        return self._right_DxY_of(R), (self._right_Dz_of(R) if self.has_input else None)

    def DxY_T_Dz_T(self, w):
        """Both from ``s' * w`` (one pass over ``w``)."""
        S = self.s1_col * w
        return (
            gather_rows(self.Zr, S).reshape(self.basis_size, w.shape[-1]),
            left(self.WT, S, self.W),
        )

    def Y_T_Dxx_Y(self):
        """From :func:`linear_front_terms` of this stage alone (one formula for both)."""
        return linear_front_terms([self])[0].Y_T_Dxx_Y

    def Y_T_Dzx(self):
        """From :func:`linear_front_terms` of this stage alone (one formula for both)."""
        if not self.has_input:
            return self.Zr.new_zeros(self.basis_size, 0)
        return linear_front_terms([self])[0].Y_T_Dzx
