"""The interface every stage's derivatives offer (docs/algorithm.md sections 2, 3, 5, 6, 8).

Notation for one stage ``z_out = f(z_in; x)`` of a chain, per sample ``i`` of a batch
of ``B``: ``x`` holds the stage's ``p`` selected parameters, ``z_in[i]`` has ``h_in``
numbers and ``z_out[i]`` has ``h_out`` (flattened row-major); ``b`` (``(B, h_out)``)
is the adjoint ``dL/dz_out`` from the backward pass.

==========  =====================================================  =====================
name        meaning                                                as an operator
==========  =====================================================  =====================
``Dx``      ``dz_out[i]/dx``                                       ``(p,k) -> (B,h_out,k)``
``Dz``      ``dz_out[i]/dz_in[i]`` (block-diagonal over samples)   ``(B,h_in,k) -> (B,h_out,k)``
``Dxx``     ``sum_i b[i] . d2 z_out[i]/dx2``                       ``(p,k) -> (p,k)``
``Dzx``     ``b[i] . d2 z_out[i]/(dx dz_in[i])`` (``p x B h_in``)  ``(B,h_in,k) -> (p,k)``
``Dzz``     ``b[i] . d2 z_out[i]/dz_in[i]2`` (block-diagonal)      ``(B,h_in,k) -> (B,h_in,k)``
==========  =====================================================  =====================

plus the transposes ``Dx_T``, ``Dz_T``, ``Dzx_T``. The first stage of a chain has no
``Dz``, ``Dzx``, ``Dzz`` (its input is fixed data): ``has_input`` is False there.
For the Gauss-Newton matrix (section 9) the second-order terms are zero.

The stage-wise factorization (section 5) works in a *basis* ``Y`` (``p x N``, orthonormal
columns) of the stage's parameter space that contains ``range(Dxx)`` and ``range(Dx^T)``
(section 8). For a generic stage ``Y = I``. For a wide ``Linear`` stage it is much smaller
than ``p``, and the directions outside it are described by :class:`Complement`.
Everything the factorization needs is expressed through ``Y``:
``Y_T``, ``Y``, ``DxY`` (``= Dx Y``), ``DxY_T``, ``Y_T_Dxx_Y`` and ``Y_T_Dzx``, and the
products from the right ``right_DxY`` (``M Dx Y``) and ``right_Dz`` (``M Dz``); the pairs
``right_DxY_Dz`` and ``DxY_T_Dz_T`` let a class share the work of two products.

Sweeps over many stages (section 13): each algorithm keeps, next to it, hooks per
derivative class (:class:`Hooks`, dispatched by :func:`by_class`) that do the parts not
depending on its recursions for many stages of a class at once: products
(:mod:`hessinv.curvature.hvp_hooks`), factorization and solves
(:mod:`hessinv.linalg.stage_terms`). The defaults go stage by stage through this
interface; ``Linear`` stages batch the stages of one shape.
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "StageDerivatives",
    "DenseStage",
    "Complement",
    "FrontTerms",
    "block_diagonal",
    "by_class",
    "Hooks",
    "quiet_forward_ad",
]


class FrontTerms(NamedTuple):
    """The parts of a stage's front that do not depend on the state ``V`` (docs/algorithm.md
    sections 5, 13): ``Y_T_Dxx_Y`` ``(N, N)``, ``Y_T_Dzx`` ``(N, B h_in)`` and ``Dzz`` per
    sample ``(B, h_in, h_in)`` (the last two ``None`` for a first stage). The factorization
    adds them to the products with ``V``."""

    Y_T_Dxx_Y: torch.Tensor
    Y_T_Dzx: torch.Tensor | None
    Dzz: torch.Tensor | None

    @staticmethod
    def stored_bytes(d: StageDerivatives) -> int:
        """Their size for stage ``d`` (to bound how many stages are made at once)."""
        N, a_in = d.basis_size, d.batch * d.in_size
        return (N * N + N * a_in + d.batch * d.in_size**2) * d.dtype.itemsize


class DenseStage(NamedTuple):
    """Dense per-sample forms of the five derivatives (for small problems and checks).

    Shapes: ``Dx (B, h_out, p)``, ``Dz (B, h_out, h_in)``, ``Dxx (p, p)``,
    ``Dzx (B, p, h_in)``, ``Dzz (B, h_in, h_in)``; the last three input terms are ``None``
    for a first stage.
    """

    Dx: torch.Tensor
    Dz: torch.Tensor | None
    Dxx: torch.Tensor
    Dzx: torch.Tensor | None
    Dzz: torch.Tensor | None


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """Dense ``(B h, B w)`` matrix from ``B`` blocks ``(B, h, w)``."""
    B, h, w = blocks.shape
    out = blocks.new_zeros(B, h, B, w)
    idx = torch.arange(B, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(B * h, B * w)


@contextlib.contextmanager
def quiet_forward_ad():
    """Our forward-mode ``torch.func`` calls without the one warning they trigger: the first
    forward-mode call loads torch's decompositions, which call the deprecated
    ``torch.jit.script`` (a ``DeprecationWarning`` that is torch's, not the user's). Exactly
    that warning is silenced, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        yield


def by_class(
    stages: Sequence[StageDerivatives], batched: Callable[[type], Callable], *columns
) -> list:
    """``batched(cls)(stages of that class, *columns)`` for each derivative class among the
    ``stages`` (an algorithm's hooks for that class: it may batch its stages), with the
    per-stage arguments (the list ``columns``; other arguments are passed as they are)
    split alike; the results in stage order."""
    groups: dict[type, list[int]] = {}
    for i, d in enumerate(stages):
        groups.setdefault(type(d), []).append(i)
    out: list = [None] * len(stages)
    for cls, idx in groups.items():
        picked = [[col[i] for i in idx] if isinstance(col, list) else col for col in columns]
        for i, r in zip(idx, batched(cls)([stages[i] for i in idx], *picked), strict=True):
            out[i] = r
    return out


class Hooks(dict):
    """An algorithm's hooks per derivative class: ``hooks(cls)`` is the entry of the nearest
    class in ``cls``'s MRO (so a subclass inherits its parent's hooks)."""

    def __call__(self, cls: type):
        for k in cls.__mro__:
            if k in self:
                return self[k]
        raise KeyError(f"no hooks for {cls.__name__}")


class Complement(ABC):
    """The parameter directions of a stage outside its basis ``Y`` (docs/algorithm.md section 8).

    On them ``Dx`` and ``Dxx`` vanish, so the stage's Schur complement ``G`` is
    ``eps I`` there. Their only coupling is to the stage input, through the part ``E``
    of ``Dzx`` that leaves ``span(Y)``: ``Dzx t = Y (...) + (I - Y Y^T) E t``. The
    complement splits into the *coupled* directions ``U_c`` (an orthonormal basis of
    ``range((I - Y Y^T) E)``) and the *null* directions, exact null vectors of ``H``.
    """

    dim: int  #: ``p - N``
    coupled_dim: int  #: ``rank((I - Y Y^T) E)``

    @abstractmethod
    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``(I - Y Y^T) v`` for ``v`` of shape ``(p, k)``."""

    @abstractmethod
    def coupling(self, t: torch.Tensor) -> torch.Tensor:
        """``(I - Y Y^T) E t`` ``(p, k)`` for ``t`` of shape ``(B, h_in, k)``."""

    @abstractmethod
    def coupling_T(self, v: torch.Tensor) -> torch.Tensor:
        """``E^T (I - Y Y^T) v`` ``(B, h_in, k)`` for ``v`` of shape ``(p, k)``."""

    def coupling_T_of_projected(self, pv: torch.Tensor) -> torch.Tensor:
        """``E^T pv`` for ``pv = project(v)``: equal to ``coupling_T(v)`` (the projector is
        idempotent), without projecting again."""
        return self.coupling_T(pv)

    @abstractmethod
    def gram(self) -> torch.Tensor:
        """``E^T (I - Y Y^T) E`` as a dense ``(B h_in, B h_in)`` matrix."""

    def subtract_gram_(self, Q: torch.Tensor, scale: float) -> torch.Tensor:
        """``Q <- Q - scale E^T (I - Y Y^T) E`` in place (``Q`` ``(B h_in, B h_in)``)."""
        return Q.sub_(self.gram(), alpha=scale)

    @abstractmethod
    def coupling_norm(self) -> torch.Tensor:
        """``||(I - Y Y^T) E||_2`` (a 0-d tensor, on the device: read in batches)."""

    @abstractmethod
    def coupled_T(self, v: torch.Tensor) -> torch.Tensor:
        """``U_c^T v`` ``(coupled_dim, k)``."""

    @abstractmethod
    def coupled(self, w: torch.Tensor) -> torch.Tensor:
        """``U_c w`` ``(p, k)``."""

    @abstractmethod
    def coupled_F(self) -> torch.Tensor:
        """``U_c^T E`` as a dense ``(coupled_dim, B h_in)`` matrix."""


class StageDerivatives(ABC):
    """Derivatives of one stage at one batch, as operators (shapes in the module docstring).

    Subclasses implement the products; the dense forms, the basis operations with
    ``Y = I`` and the section-6 curvature recursion have defaults here built on them.
    """

    batch: int
    in_size: int  #: ``h_in`` (0 for a first stage)
    out_size: int  #: ``h_out``
    num_params: int  #: ``p``
    has_input: bool
    dtype: torch.dtype
    device: torch.device

    # ------------------------------------------------------------ first order
    @abstractmethod
    def Dx(self, v: torch.Tensor) -> torch.Tensor:
        """``Dx v``: ``(p, k) -> (B, h_out, k)``."""

    @abstractmethod
    def Dx_T(self, w: torch.Tensor) -> torch.Tensor:
        """``Dx^T w``: ``(B, h_out, k) -> (p, k)`` (summed over samples)."""

    @abstractmethod
    def Dz(self, t: torch.Tensor) -> torch.Tensor:
        """``Dz t``: ``(B, h_in, k) -> (B, h_out, k)``."""

    @abstractmethod
    def Dz_T(self, w: torch.Tensor) -> torch.Tensor:
        """``Dz^T w``: ``(B, h_out, k) -> (B, h_in, k)``."""

    # ------------------------------------------------------------ second order
    @abstractmethod
    def Dxx(self, v: torch.Tensor) -> torch.Tensor:
        """``Dxx v``: ``(p, k) -> (p, k)``."""

    @abstractmethod
    def Dzx(self, t: torch.Tensor) -> torch.Tensor:
        """``Dzx t``: ``(B, h_in, k) -> (p, k)`` (summed over samples)."""

    @abstractmethod
    def Dzx_T(self, v: torch.Tensor) -> torch.Tensor:
        """``Dzx^T v``: ``(p, k) -> (B, h_in, k)``."""

    @abstractmethod
    def Dzz(self, t: torch.Tensor) -> torch.Tensor:
        """``Dzz t``: ``(B, h_in, k) -> (B, h_in, k)``."""

    # ------------------------------------------------------------ dense forms
    def _eye_columns(self, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.eye(n, dtype=self.dtype, device=self.device).reshape(*shape, n)

    def dense(self) -> DenseStage:
        """All five derivatives as dense per-sample tensors (see :class:`DenseStage`).

        Built from products with identity columns; costs ``O(p)`` products, so it is for
        small stages and for checking the structured products.
        """
        B, p, h_in = self.batch, self.num_params, self.in_size
        eye_p = self._eye_columns(p, (p,))
        Dx = self.Dx(eye_p)  # (B, h_out, p)
        Dxx = self.Dxx(eye_p)
        if not self.has_input:
            return DenseStage(Dx, None, Dxx, None, None)
        # per-sample blocks: probe all samples at once with the same input coordinate
        probe = self._eye_columns(h_in, (1, h_in)).expand(B, h_in, h_in)
        Dz = self.Dz(probe)  # (B, h_out, h_in)
        Dzz = self.Dzz(probe)  # (B, h_in, h_in)
        Dzx = self.Dzx_T(eye_p).permute(0, 2, 1)  # (B, p, h_in)
        return DenseStage(Dx, Dz, Dxx, Dzx.contiguous(), Dzz)

    # ------------------------------------------------------------ curvature (section 6)
    def propagate_curvature(self, R: torch.Tensor) -> torch.Tensor:
        """``Dzz + Dz^T R Dz`` per sample, for per-sample curvature blocks ``R`` ``(B, h_out,
        h_out)``."""
        h_in = self.in_size
        probe = self._eye_columns(h_in, (1, h_in)).expand(self.batch, h_in, h_in)
        JR = self.Dz_T(R @ self.Dz(probe))
        return self.Dzz(probe) + JR

    def diagonal(self, R: torch.Tensor) -> torch.Tensor:
        """``diag(Dxx + Dx^T R Dx)`` ``(p,)`` for per-sample output curvature ``R``."""
        return torch.diagonal(self.diagonal_block(R)).clone()

    def diagonal_block(self, R: torch.Tensor) -> torch.Tensor:
        """``Dxx + Dx^T R Dx`` ``(p, p)`` for per-sample output curvature ``R``."""
        eye_p = self._eye_columns(self.num_params, (self.num_params,))
        return self.Dxx(eye_p) + self.Dx_T(R @ self.Dx(eye_p))

    # ------------------------------------------------------------ basis (section 8)
    @property
    def basis_size(self) -> int:
        """``N``, the number of columns of ``Y``."""
        return self.num_params

    @property
    def complement(self) -> Complement | None:
        """The directions outside ``span(Y)``, or ``None`` when ``Y = I``."""
        return None

    def Y_T(self, v: torch.Tensor) -> torch.Tensor:
        """``Y^T v``: ``(p, k) -> (N, k)``."""
        return v

    def Y(self, alpha: torch.Tensor) -> torch.Tensor:
        """``Y alpha``: ``(N, k) -> (p, k)``."""
        return alpha

    def DxY(self, alpha: torch.Tensor) -> torch.Tensor:
        """``Dx Y alpha``: ``(N, k) -> (B, h_out, k)``."""
        return self.Dx(alpha)

    def DxY_Dz(self, alpha: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``Dx Y alpha + Dz t``: ``(N, k), (B, h_in, k) -> (B, h_out, k)`` (the tangent a
        stage passes on); a class may share the work of the two products."""
        return self.DxY(alpha) + self.Dz(t)

    def DxY_T(self, w: torch.Tensor) -> torch.Tensor:
        """``(Dx Y)^T w``: ``(B, h_out, k) -> (N, k)``."""
        return self.Dx_T(w)

    def right_DxY(self, M: torch.Tensor) -> torch.Tensor:
        """``M Dx Y`` for ``M`` ``(c, B h_out)``: ``(c, N)`` (a product from the right, so
        that ``(Dx Y)^T V Dx Y`` needs no transposed copy of ``V Dx Y``)."""
        c = M.shape[0]
        return self.DxY_T(M.T.reshape(self.batch, self.out_size, c)).T

    def right_Dz(self, M: torch.Tensor) -> torch.Tensor:
        """``M Dz`` for ``M`` ``(c, B h_out)``: ``(c, B h_in)``."""
        c = M.shape[0]
        return self.Dz_T(M.T.reshape(self.batch, self.out_size, c)).reshape(-1, c).T

    def right_DxY_Dz(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(M Dx Y, M Dz)`` (the second ``None`` for a first stage); a class may share
        their subexpressions."""
        return self.right_DxY(M), (self.right_Dz(M) if self.has_input else None)

    def DxY_T_Dz_T(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((Dx Y)^T w, Dz^T w)`` for ``w`` ``(B, h_out, k)``, new tensors (the
        factorization updates the second in place); a class may share their subexpressions."""
        return self.DxY_T(w), self.Dz_T(w)

    def Y_T_Dxx_Y(self) -> torch.Tensor:
        """``Y^T Dxx Y`` ``(N, N)``."""
        return self.Dxx(self._eye_columns(self.num_params, (self.num_params,)))

    def Y_T_Dzx(self) -> torch.Tensor:
        """``Y^T Dzx`` as a dense ``(N, B h_in)`` matrix."""
        eye = self._eye_columns(self.basis_size, (self.basis_size,))
        return self.Dzx_T(self.Y(eye)).reshape(self.batch * self.in_size, self.basis_size).T

    def Dzz_blocks(self) -> torch.Tensor:
        """``Dzz`` per sample, ``(B, h_in, h_in)`` (the diagonal blocks of the dense
        ``(B h_in, B h_in)`` matrix: :func:`block_diagonal` of them)."""
        h_in = self.in_size
        probe = self._eye_columns(h_in, (1, h_in)).expand(self.batch, h_in, h_in)
        return self.Dzz(probe)

    def stored_bytes(self) -> int:
        """Bytes held by this object's tensors (for memory estimates); two views of the same
        memory (``W`` and the ``W.T`` kept for the sweeps) are counted once."""
        regions = {
            (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel()): v.numel()
            * v.element_size()
            for v in vars(self).values()
            if isinstance(v, torch.Tensor)
        }
        return sum(regions.values())
