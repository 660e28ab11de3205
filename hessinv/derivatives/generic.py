"""Any stage that acts on each sample independently, through ``torch.func`` (docs/algorithm.md
section 2).

Convolutions, residual blocks, normalisation layers in eval mode, custom modules: the
five derivatives are formed densely per sample with ``jacrev``/``jacfwd`` under ``vmap``
and stored as ``Dx (B, h_out, p)``, ``Dz (B, h_out, h_in)``, ``Dxx (p, p)``,
``Dzx (B, p, h_in)``, ``Dzz (B, h_in, h_in)``; the basis is ``Y = I``. Memory is
``O(B h p)`` per stage, so this is the path for narrow stages; wide ``nn.Linear`` stages
have :class:`~hessinv.derivatives.linear.LinearDerivatives`.
"""

from __future__ import annotations

import torch
from torch.func import jacfwd, jacrev, vmap
from torch.utils._pytree import tree_map

from hessinv.derivatives.base import DenseStage, StageDerivatives

__all__ = ["GenericDerivatives"]


def _unsqueeze(z):
    return tree_map(lambda t: t.unsqueeze(0), z)


class GenericDerivatives(StageDerivatives):
    """Dense per-sample derivatives of ``apply(x, z)`` (a stage's function) at ``(x, z)``.

    Args:
        apply: ``apply(x, z) -> z_out`` for flat parameters ``x`` and a batch ``z``
            (a tensor, or for a first stage any pytree of tensors with the batch first).
        x: flat parameters ``(p,)``.
        z: the stage input.
        b: the adjoint ``(B, h_out)``.
        has_input: False for the first stage (no ``Dz``, ``Dzx``, ``Dzz``).
        second_order: False for the Gauss-Newton matrix (second-order terms zero).
    """

    def __init__(self, apply, x, z, b, *, has_input: bool, second_order: bool = True):
        B = b.shape[0]

        def f(xx, zi):
            return apply(xx, _unsqueeze(zi)).reshape(-1)

        def phi(xx, zi, bi):
            return (f(xx, zi) * bi).sum()

        Dx = vmap(jacrev(f, argnums=0), in_dims=(None, 0))(x, z)  # (B, h_out, p)
        p = x.shape[0]
        h_out = Dx.shape[1]
        if second_order:
            # Dxx: Hessian in x of the b-weighted outputs of the whole batch
            Dxx = jacfwd(jacrev(lambda xx: (apply(xx, z).reshape(B, -1) * b).sum()))(x)
            Dxx = 0.5 * (Dxx + Dxx.T)
        else:
            Dxx = x.new_zeros(p, p)
        self._Dx, self._Dxx = Dx, Dxx
        self._Dz = self._Dzx = self._Dzz = None
        h_in = 0
        if has_input:
            Dz = vmap(jacrev(f, argnums=1), in_dims=(None, 0))(x, z).reshape(B, h_out, -1)
            h_in = Dz.shape[2]
            if second_order:
                grad_z = jacrev(phi, argnums=1)
                Dzx = vmap(jacfwd(grad_z, argnums=0), in_dims=(None, 0, 0))(x, z, b)
                Dzz = vmap(jacfwd(grad_z, argnums=1), in_dims=(None, 0, 0))(x, z, b)
                Dzx = Dzx.reshape(B, h_in, p).transpose(1, 2).contiguous()
                Dzz = Dzz.reshape(B, h_in, h_in)
                Dzz = 0.5 * (Dzz + Dzz.transpose(1, 2))
            else:
                Dzx, Dzz = x.new_zeros(B, p, h_in), x.new_zeros(B, h_in, h_in)
            self._Dz, self._Dzx, self._Dzz = Dz, Dzx, Dzz
        self.batch, self.in_size, self.out_size, self.num_params = B, h_in, h_out, p
        self.has_input = has_input
        self.dtype, self.device = x.dtype, x.device

    # ------------------------------------------------------------ products
    def Dx(self, v):
        return torch.einsum("bop,pk->bok", self._Dx, v)

    def Dx_T(self, w):
        return torch.einsum("bop,bok->pk", self._Dx, w)

    def Dz(self, t):
        return torch.bmm(self._Dz, t)

    def Dz_T(self, w):
        return torch.bmm(self._Dz.transpose(1, 2), w)

    def Dxx(self, v):
        return self._Dxx @ v

    def Dzx(self, t):
        return torch.einsum("bpi,bik->pk", self._Dzx, t)

    def Dzx_T(self, v):
        return torch.einsum("bpi,pk->bik", self._Dzx, v)

    def Dzz(self, t):
        return torch.bmm(self._Dzz, t)

    # ------------------------------------------------------------ dense and curvature
    def dense(self):
        return DenseStage(self._Dx, self._Dz, self._Dxx, self._Dzx, self._Dzz)

    def propagate_curvature(self, R):
        return self._Dzz + torch.einsum("boi,bop,bpj->bij", self._Dz, R, self._Dz)

    def diagonal(self, R):
        return torch.diagonal(self._Dxx) + torch.einsum("bop,boq,bqp->p", self._Dx, R, self._Dx)

    def diagonal_block(self, R):
        return self._Dxx + torch.einsum("bop,boq,bqr->pr", self._Dx, R, self._Dx)

    def Y_T_Dxx_Y(self):
        return self._Dxx

    def Y_T_Dzx(self):
        return self._Dzx.permute(1, 0, 2).reshape(self.num_params, -1)

    def Dzz_blocks(self):
        return self._Dzz
