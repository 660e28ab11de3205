"""The Gauss-Newton matrix through its output-space factor (docs/algorithm.md section 14).

``G = J^T S J`` with ``S = blockdiag(F_i^T F_i)`` (the loss head's factor, section 2.1) is
``G = U^T U`` for ``U = F J``: one row per sample ``i`` and factor row ``c``, ``B r`` rows
in all (``r = K`` outputs for the built-in losses). Its rank across any cut of the chain is
at most ``B r``, so everything about ``G + lam I`` reduces to the ``B r x B r`` Gram matrix

    A = U U^T = sum_l U_l U_l^T          (U_l: the columns of stage l)

and two linear-time sweeps: ``U v`` (a forward tangent sweep, then ``F``) and ``U^T w``
(``F^T``, then a backward adjoint sweep). :class:`OutputSpace` holds them.

``U_l U_l^T`` comes from the pullbacks ``M_l = (F dz_L/dz_l)^T`` (``(B, h_l, r)`` per sample,
``M_L = F^T``, ``M_{l-1} = Dz_l^T M_l``), never from ``J``:

* ``nn.Linear`` + elementwise activations (``z_out = act(W z + c)``), with ``d_ic = s'_i *
  M_l[i, :, c]`` and ``Zt = [Z, 1]`` (the selected columns):
  ``(U_l U_l^T)[(i, c), (j, d)] = (d_ic . d_jd) (Zt_i . Zt_j)``, a Hadamard product of two
  Gram matrices, ``O((B r)^2 h_out + B^2 m)``;
* any other stage: its dense per-sample ``Dx`` gives ``U_l = M_l^T Dx`` row by row.

The per-class parts are plain functions dispatched on the derivative class
(:func:`add_stage_gram_`, :func:`stage_diag_quadratic`).

Weighted and cross Gram matrices (docs/algorithm.md section 16, for the Laplace
approximation): ``U W U^T`` for a diagonal ``W`` over the parameters
(:meth:`OutputSpace.weighted_gram`), ``U_a W U_b^T`` between the output spaces of one chain
at two batches (:func:`stage_cross_gram`) and the per-sample diagonal blocks of ``U W U^T``
(:func:`stage_gram_blocks`). A stage's weight is a flat ``(p_l,)`` tensor (one weight per
parameter entry) or, for a ``Linear`` stage, an ``(m,)`` tensor, one weight per input column
``m`` (weight columns, then the bias) shared by every output unit: then
``(D_a D_b^T) * (Zt_a diag(w) Zt_b^T (x) 1 1^T)`` is still a Hadamard product of two Gram
matrices. Per-entry weights of a ``Linear`` stage cost ``O(B^2 h_out m + (B r)^2 h_out)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from hessinv.derivatives import GenericDerivatives, LinearDerivatives, StageDerivatives
from hessinv.settings import DIAGONAL_CHUNK_BYTES

__all__ = [
    "OutputSpace",
    "add_stage_gram_",
    "stage_diag_quadratic",
    "stage_cross_gram",
    "stage_gram_blocks",
    "stage_diag_quadratic_sums",
    "stage_gram_factors",
    "gram_from_factors",
]


# ---------------------------------------------------------------------- per-class parts
def _dense_Dx(d: StageDerivatives) -> torch.Tensor:
    """``Dx`` per sample ``(B, h_out, p)``: stored by the generic class, else from products
    with identity columns (``p`` of them)."""
    if isinstance(d, GenericDerivatives):
        return d.dense().Dx
    eye = torch.eye(d.num_params, dtype=d.dtype, device=d.device)
    return d.Dx(eye)


def _stage_rows(d: StageDerivatives, M: torch.Tensor) -> torch.Tensor:
    """``U_l`` as a dense ``(B r, p)`` matrix: row ``(i, c)`` is ``M[i, :, c]^T Dx_i``."""
    B, _, r = M.shape
    return torch.einsum("bor,bop->brp", M, _dense_Dx(d)).reshape(B * r, -1)


@functools.singledispatch
def add_stage_gram_(
    d: StageDerivatives,
    M: torch.Tensor,
    A: torch.Tensor,
    work: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> None:
    """``A += U_l U_l^T`` (``(B r, B r)``), at least on and below the diagonal, for the stage's
    pullback ``M`` ``(B, h_out, r)``; ``work`` is a ``(B r, B r)`` buffer the caller keeps (a
    new ``(B r)^2`` tensor per stage costs its page faults). With ``weight`` (see the module
    docstring): ``A += U_l diag(weight) U_l^T``."""
    rows = _stage_rows(d, M)
    A.addmm_(rows if weight is None else rows * weight, rows.T)


def _scaled_pullback(d: LinearDerivatives, M: torch.Tensor) -> torch.Tensor:
    """``D[i, o, c] = s'_i[o] M[i, o, c]``: the pullback to the pre-activation."""
    return d.s1[:, :, None] * M


#: the Gram matrix of a ``Linear`` stage is accumulated in this many block rows of samples,
#: each only up to the diagonal (the matrix is symmetric: 5/8 of the work for 4), from this
#: many rows on
GRAM_BLOCKS, GRAM_BLOCKS_FROM = 4, 256


@add_stage_gram_.register
def _(
    d: LinearDerivatives,
    M: torch.Tensor,
    A: torch.Tensor,
    work: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> None:
    """``(D D^T) * (Zt Zt^T (x) 1 1^T)`` on and below the diagonal blocks: ``D D^T`` into
    ``work``, then one pass over ``A`` (an ``addcmul_`` with the input Gram matrix broadcast
    over the factor rows). The caller mirrors the lower triangle. A column ``weight``
    ``(m,)`` gives ``Zt diag(weight) Zt^T``; per-entry weights go through
    :func:`stage_cross_gram`."""
    if weight is not None and weight.numel() != d.m:
        A.add_(stage_cross_gram(d, M, d, M, weight))
        return
    B, h, r = M.shape
    D = _scaled_pullback(d, M).transpose(1, 2).reshape(B * r, h)
    DT = D.T
    Zw = d.Zt if weight is None else d.Zt * weight
    Z = Zw @ d.Zt.T  # (B, B): Zt_i . Zt_j over the selected columns (weighted)
    nb = GRAM_BLOCKS if B * r >= GRAM_BLOCKS_FROM else 1
    edges = [round(i * B / nb) for i in range(nb + 1)]
    flat = work.view(-1)
    for a in range(nb):
        s, e = edges[a], edges[a + 1]
        w = flat[: (e - s) * r * e * r].view((e - s) * r, e * r)
        torch.mm(D[s * r : e * r], DT[:, : e * r], out=w)
        A[s * r : e * r, : e * r].view(e - s, r, e, r).addcmul_(
            w.view(e - s, r, e, r), Z[s:e, None, :e, None]
        )


@functools.singledispatch
def stage_diag_quadratic(d: StageDerivatives, M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``diag(U_l^T X U_l)`` ``(p,)`` for a symmetric ``X`` ``(B r, B r)``."""
    rows = _stage_rows(d, M)
    return ((X @ rows) * rows).sum(0)


@stage_diag_quadratic.register
def _(d: LinearDerivatives, M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Entry ``(o, m)`` of the stage's ``(h_out, m)`` parameter matrix:
    ``sum_{i,j} Zt[i,m] Zt[j,m] T[i,j,o]`` with ``T[i,j,o] = sum_{c,d} D[i,o,c] X[(i,c),(j,d)]
    D[j,o,d]``; chunks of output units keep the ``(B, r, B, chunk)`` intermediate small.
    Cost ``O(B^2 r^2 h_out + B^2 h_out m)``."""
    B, h, r = M.shape
    D = _scaled_pullback(d, M)
    X4 = X.view(B, r, B, r)
    Zt = d.Zt
    per_unit = max(B * r * B, B * Zt.shape[1]) * D.element_size()
    chunk = max(1, min(h, DIAGONAL_CHUNK_BYTES // max(per_unit, 1)))
    out = []
    for start in range(0, h, chunk):
        Dc = D[:, start : start + chunk]  # (B, oc, r)
        Y = torch.einsum("icjd,jod->icjo", X4, Dc)
        T = torch.einsum("ioc,icjo->oij", Dc, Y)  # (oc, B, B)
        out.append(torch.einsum("oij,jm,im->om", T, Zt, Zt))
    diag = torch.cat(out)  # (h_out, m)
    return d.from_matrix(diag[:, :, None])[:, 0]


@functools.singledispatch
def stage_cross_gram(
    d: StageDerivatives,
    M: torch.Tensor,
    d_other: StageDerivatives,
    M_other: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``U_l diag(weight) U'_l^T`` ``(B r, B' r')``: the stage's part of the cross Gram matrix
    of two output spaces of one chain (``d``, ``M`` at one batch, ``d_other``, ``M_other`` at
    another; docs/algorithm.md section 16). Generic stages: from the dense rows."""
    rows, rows_other = _stage_rows(d, M), _stage_rows(d_other, M_other)
    return (rows if weight is None else rows * weight) @ rows_other.T


@stage_cross_gram.register
def _(
    d: LinearDerivatives,
    M: torch.Tensor,
    d_other: StageDerivatives,
    M_other: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(D D'^T) * (Zt diag(w) Zt'^T (x) 1 1^T)`` for column weights ``w`` ``(m,)`` (or none);
    per-entry weights ``W`` (``(h_out, m)`` in matrix form): entry ``((i, c), (j, d))`` is
    ``sum_o D[i,o,c] D'[j,o,d] T[o,i,j]`` with ``T[o,i,j] = sum_m Zt[i,m] W[o,m] Zt'[j,m]``,
    ``O(B B' (r r' + m) h_out)`` in chunks of output units."""
    assert isinstance(d_other, LinearDerivatives)
    B, h, r = M.shape
    Bo, ro = M_other.shape[0], M_other.shape[2]
    D, Do = _scaled_pullback(d, M), _scaled_pullback(d_other, M_other)
    if weight is None or weight.numel() == d.m:
        Zw = d.Zt if weight is None else d.Zt * weight
        Z = Zw @ d_other.Zt.T  # (B, B')
        DD = D.transpose(1, 2).reshape(B * r, h) @ Do.transpose(1, 2).reshape(Bo * ro, h).T
        return (DD.view(B, r, Bo, ro) * Z[:, None, :, None]).view(B * r, Bo * ro)
    W = d.to_matrix(weight.reshape(-1, 1))[:, :, 0]  # (h_out, m)
    per_unit = max(B * r * Bo, B * Bo) * D.element_size()
    chunk = max(1, min(h, DIAGONAL_CHUNK_BYTES // max(per_unit, 1)))
    out = D.new_zeros(B, r, Bo, ro)
    for start in range(0, h, chunk):
        sl = slice(start, start + chunk)
        T = torch.einsum("im,om,jm->oij", d.Zt, W[sl], d_other.Zt)  # (oc, B, B')
        Y = torch.einsum("ioc,oij->icjo", D[:, sl], T)
        out += torch.einsum("icjo,jod->icjd", Y, Do[:, sl])
    return out.view(B * r, Bo * ro)


@functools.singledispatch
def stage_diag_quadratic_sums(
    d: StageDerivatives, M: torch.Tensor, X: torch.Tensor
) -> torch.Tensor:
    """``diag(U_l^T X U_l)`` summed over the entries that share a column weight (see the
    module docstring): for a ``Linear`` stage over the output units, ``(m,)``; for any other
    stage the diagonal itself, ``(p,)`` (docs/algorithm.md section 16)."""
    return stage_diag_quadratic(d, M, X)


@stage_diag_quadratic_sums.register
def _(d: LinearDerivatives, M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``s[m] = sum_{i,j} Zt[i,m] R[i,j] Zt[j,m]`` with ``R[i,j] = sum_{c,d} X[(i,c),(j,d)]
    (D D^T)[(i,c),(j,d)]``: ``O((B r)^2 h_out + B^2 m)``, the cost of the stage's Gram term
    (the per-entry diagonal costs ``B^2 r^2 h_out`` in a slower contraction)."""
    B, h, r = M.shape
    D = _scaled_pullback(d, M).transpose(1, 2).reshape(B * r, h)
    R = (torch.mm(D, D.T).mul_(X)).view(B, r, B, r).sum((1, 3))  # (B, B)
    ZT = d.Zt.T
    return ((ZT @ R) * ZT).sum(1)


@functools.singledispatch
def stage_gram_blocks(
    d: StageDerivatives, M: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-sample diagonal blocks of ``U_l diag(weight) U_l^T``: ``(B, r, r)``
    (docs/algorithm.md section 16)."""
    rows = torch.einsum("bor,bop->brp", M, _dense_Dx(d))
    return torch.einsum("brp,bsp->brs", rows if weight is None else rows * weight, rows)


@stage_gram_blocks.register
def _(d: LinearDerivatives, M: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Block ``i``: ``(D_i^T D_i) (Zt_i diag(w) Zt_i)`` for column weights, else
    ``sum_o D[i,o,:]^T D[i,o,:] t[i,o]`` with ``t[i,o] = sum_m Zt[i,m]^2 W[o,m]``:
    ``O(B h_out (r^2 + m))``."""
    D = _scaled_pullback(d, M)  # (B, h_out, r)
    if weight is None or weight.numel() == d.m:
        z = (d.Zt * d.Zt) if weight is None else d.Zt * d.Zt * weight
        return z.sum(1)[:, None, None] * (D.transpose(1, 2) @ D)
    W = d.to_matrix(weight.reshape(-1, 1))[:, :, 0]  # (h_out, m)
    t = (d.Zt * d.Zt) @ W.T  # (B, h_out)
    return torch.einsum("ioc,io,iod->icd", D, t, D)


@functools.singledispatch
def stage_gram_factors(d: StageDerivatives, M: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What ``U_l U_l'^T`` between two batches needs of one of them, for the stage's pullback
    ``M`` ``(B, h_out, r)``: ``(rows,)``, the dense ``(B r, p)`` rows of ``U_l``
    (docs/algorithm.md section 17: the data-parallel Gram matrix moves these between ranks).
    Every tensor has the batch in its first dimension."""
    return (_stage_rows(d, M),)


@stage_gram_factors.register
def _(d: LinearDerivatives, M: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(D, Zt)``: the scaled pullback ``(B r, h_out)`` and the selected input columns
    ``(B, m)``."""
    B, h, r = M.shape
    return (_scaled_pullback(d, M).transpose(1, 2).reshape(B * r, h), d.Zt)


def gram_from_factors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], r: int) -> torch.Tensor:
    """``U_l^(a) U_l^(b)T`` ``(B_a r, B_b r)`` from :func:`stage_gram_factors` of two batches:
    ``rows_a rows_b^T``, or for a ``Linear`` stage ``(D_a D_b^T) * (Zt_a Zt_b^T (x) 1 1^T)``."""
    if len(a) == 1:
        return a[0] @ b[0].T
    (Da, Za), (Db, Zb) = a, b
    out = Da @ Db.T
    out.view(Za.shape[0], r, Zb.shape[0], r).mul_((Za @ Zb.T)[:, None, :, None])
    return out


# ---------------------------------------------------------------------- the factor
class KeptEigendecomposition:
    """``eigh()`` of a Gram matrix ``gram()``, computed once and kept (its subclasses set
    ``_eigh = None`` and define ``gram``)."""

    _eigh: tuple[torch.Tensor, torch.Tensor] | None

    def gram(self) -> torch.Tensor:
        raise NotImplementedError

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e, Q)``: ``A = Q diag(e) Q^T``, ``e`` ascending (computed once)."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.gram())
        return self._eigh

    @property
    def has_eigh(self) -> bool:
        """Whether the eigendecomposition is kept (every shift ``lam`` then costs nothing)."""
        return self._eigh is not None


class OutputSpace(KeptEigendecomposition):
    """``U = F J`` of a Gauss-Newton matrix ``G = U^T U`` (docs/algorithm.md section 14).

    Args:
        stages: the chain's stage derivatives (first order only is used).
        factor: the loss head's factor ``F`` ``(B, r, K)`` (``F_i^T F_i = S_i``).

    Rows are ordered ``(i, c)``: sample-major. The Gram matrix and its eigendecomposition
    are computed on first use and kept (they do not depend on the damping). ``exact``:
    ``F^T F = S`` to rounding (False for a generic loss's clamped factor).
    """

    def __init__(
        self, stages: Sequence[StageDerivatives], factor: torch.Tensor, exact: bool = True
    ):
        self.stages = tuple(stages)
        self.factor = factor
        #: ``F^T F = S`` to rounding (a closed-form loss factor, section 2.1)
        self.exact = exact
        self.batch, self.rank_rows, self.outputs = factor.shape
        self.rows = self.batch * self.rank_rows
        self._gram: torch.Tensor | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_params(self) -> int:
        return sum(d.num_params for d in self.stages)

    # ---------------------------------------------------------------- sweeps
    def apply(self, v: Sequence[torch.Tensor]) -> torch.Tensor:
        """``U v`` ``(B r, k)`` for per-stage blocks ``v[l]`` ``(p_l, k)``: the forward tangent
        ``t_l = Dx_l v_l + Dz_l t_{l-1}``, then ``F_i t_L[i]``."""
        t = None
        for d, vl in zip(self.stages, v, strict=True):
            t = d.Dx(vl) if t is None else d.Dx(vl) + d.Dz(t)
        return torch.bmm(self.factor, t).reshape(self.rows, -1)

    def apply_T(self, w: torch.Tensor) -> list[torch.Tensor]:
        """``U^T w``: per-stage blocks ``(p_l, k)`` for ``w`` ``(B r, k)``: ``u_L = F^T w``, the
        backward adjoints ``u_{l-1} = Dz_l^T u_l`` and ``(U^T w)_l = Dx_l^T u_l``."""
        u = torch.bmm(self.factor.transpose(1, 2), w.reshape(self.batch, self.rank_rows, -1))
        out: list[torch.Tensor] = [None] * len(self.stages)  # type: ignore[list-item]
        for l in range(len(self.stages) - 1, -1, -1):
            d = self.stages[l]
            out[l] = d.Dx_T(u)
            if l:
                u = d.Dz_T(u)
        return out

    def pullbacks(self):
        """``(l, M_l)`` from the last stage to the first: ``M_l`` ``(B, h_l, r)``, the
        transposed ``F``-weighted output Jacobian in stage ``l``'s output."""
        M = self.factor.transpose(1, 2)
        for l in range(len(self.stages) - 1, -1, -1):
            yield l, M
            if l:
                M = self.stages[l].Dz_T(M)

    # ---------------------------------------------------------------- Gram matrix
    def gram(self) -> torch.Tensor:
        """``A = U U^T`` ``(B r, B r)``, symmetric positive semi-definite (computed once)."""
        if self._gram is None:
            self._gram = self._build_gram(None)
        return self._gram

    def weighted_gram(self, weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``U W U^T`` ``(B r, B r)`` for a diagonal ``W`` over the parameters, given per stage
        (see the module docstring; ``None``: weight 1), computed anew each call
        (docs/algorithm.md section 16)."""
        return self._build_gram(weights)

    def _build_gram(self, weights: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
        A = self.factor.new_zeros(self.rows, self.rows)
        work = torch.empty_like(A)
        for l, M in self.pullbacks():
            w = None if weights is None else weights[l]
            add_stage_gram_(self.stages[l], M, A, work, w)
        lower = A.tril_()  # the stages fill (at least) the lower triangle
        return lower.add_(lower.tril(-1).T)

    def cross_gram(
        self, other: OutputSpace, weights: Sequence[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """``U W U'^T`` ``(B r, B' r')`` with ``other`` the output space of the same chain at
        another batch (docs/algorithm.md section 16); ``weights`` as for
        :meth:`weighted_gram`. Both pullback sweeps run side by side."""
        out = self.factor.new_zeros(self.rows, other.rows)
        for (l, M), (_, M_other) in zip(self.pullbacks(), other.pullbacks(), strict=True):
            w = None if weights is None else weights[l]
            out += stage_cross_gram(self.stages[l], M, other.stages[l], M_other, w)
        return out

    def gram_blocks(self, weights: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """The per-sample diagonal blocks of ``U W U^T``: ``(B, r, r)`` (docs/algorithm.md
        section 16)."""
        out = self.factor.new_zeros(self.batch, self.rank_rows, self.rank_rows)
        for l, M in self.pullbacks():
            out += stage_gram_blocks(self.stages[l], M, None if weights is None else weights[l])
        return out

    def diag_quadratic(self, X: torch.Tensor) -> list[torch.Tensor]:
        """``diag(U^T X U)`` per stage, ``(p_l,)``, for a symmetric ``X`` ``(B r, B r)``."""
        out: list[torch.Tensor] = [None] * len(self.stages)  # type: ignore[list-item]
        for l, M in self.pullbacks():
            out[l] = stage_diag_quadratic(self.stages[l], M, X)
        return out

    def diag_quadratic_sums(self, X: torch.Tensor) -> list[torch.Tensor]:
        """:func:`stage_diag_quadratic_sums` per stage: ``(m,)`` for a ``Linear`` stage (sums
        over its output units), ``(p_l,)`` otherwise."""
        out: list[torch.Tensor] = [None] * len(self.stages)  # type: ignore[list-item]
        for l, M in self.pullbacks():
            out[l] = stage_diag_quadratic_sums(self.stages[l], M, X)
        return out

    def diagonal(self) -> list[torch.Tensor]:
        """``diag(G) = diag(U^T U)`` per stage (``X = I``)."""
        eye = torch.eye(self.rows, dtype=self.factor.dtype, device=self.factor.device)
        return self.diag_quadratic(eye)

    # ---------------------------------------------------------------- costs
    def flops(self) -> float:
        """Estimated floating-point operations of the Gram matrix (unless kept) and one
        Cholesky (none when the eigendecomposition is kept: every shift reuses it)."""
        B, r = self.batch, self.rank_rows
        if self._eigh is not None:
            return 0.0
        if self._gram is not None:
            return (B * r) ** 3 / 3.0
        total = 0.0
        for d in self.stages:
            total += 2.0 * B * r * d.in_size * d.out_size  # the pullback
            if isinstance(d, LinearDerivatives):
                total += 2.0 * (B * r) ** 2 * d.out_size + 2.0 * B * B * d.m
            else:
                total += 2.0 * B * r * d.out_size * d.num_params + 2.0 * (B * r) ** 2 * d.num_params
        return total + (B * r) ** 3 / 3.0

    def stored_bytes(self) -> int:
        """Peak bytes: the Gram matrix, its factor and a stage's term, one pullback pair and
        (for a generic stage) its dense rows."""
        B, r, item = self.batch, self.rank_rows, self.factor.element_size()
        widest = max(max(d.in_size, d.out_size) for d in self.stages)
        dense = max(
            (B * r * d.num_params for d in self.stages if not isinstance(d, LinearDerivatives)),
            default=0,
        )
        return (4 * (B * r) ** 2 + 2 * B * widest * r + dense) * item
