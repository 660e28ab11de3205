"""Forward pass and backward derivative sweep over a chain (docs/algorithm.md sections 1-2).

The forward pass stores every stage input ``z_{l-1}`` and the model output ``o``. The
loss head gives the loss, ``b_L = dL/do`` and the per-sample loss Hessian blocks ``S``.
The backward sweep then walks from the last stage to the first, building each stage's
:class:`~hessinv.derivatives.StageDerivatives` with its adjoint ``b_l`` and passing
``b_{l-1} = Dz_l^T b_l`` on; the gradient falls out on the way, ``g_l = Dx_l^T b_l``.
For the Gauss-Newton matrix (``second_order=False``) the stages drop their second-order
terms but the loss curvature ``S`` stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from hessinv.derivatives import (
    LinearDerivatives,
    LossHead,
    StageDerivatives,
    linear_complements,
    loss_head,
)
from hessinv.network.chain import Chain, Stage
from hessinv.network.dispatch import is_linear_stage, linear_stage_forwards, stage_derivatives
from hessinv.progress import progress_bar

__all__ = [
    "ChainDerivatives",
    "compute_derivatives",
    "forward_pass",
    "backward_sweep",
    "batch_size",
]


class ChainDerivatives(NamedTuple):
    """Everything one sweep yields: the loss, its head, the stages' derivatives, the gradient."""

    loss: torch.Tensor
    head: LossHead
    stages: tuple[StageDerivatives, ...]
    gradient: tuple[torch.Tensor, ...]


def batch_size(inputs) -> int:
    """``B``: the leading size shared by every tensor of ``inputs`` (a tensor or a pytree)."""
    leaves = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    if not leaves:
        raise TypeError("inputs must be a tensor or a tuple/dict of tensors with the batch first")
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            f"every input tensor must have the same non-empty batch dimension first; got leading "
            f"sizes {sorted(str(s) for s in sizes)}"
        )
    return sizes.pop()


def _copy(z):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, z)


def _equal(z, probe) -> bool:
    """Whether ``probe`` (a copy of ``z`` a stage was applied to) still equals ``z``."""
    same = tree_map(
        lambda a, b: bool(torch.equal(a, b)) if isinstance(a, torch.Tensor) else True, z, probe
    )
    return all(tree_flatten(same)[0])


def _sample_hint(stage: Stage, z, B: int, always: bool = False) -> str:
    """For the chain's first stage, whose input is ``z``: what to do if the inputs are one
    sample without its batch dimension (an item of a ``Dataset``), whose first feature size
    was taken for the batch size ``B``. Given ``always``, or when every tensor of ``z`` is
    one-dimensional; else ``""``."""
    leaves = [t for t in tree_flatten(z)[0] if isinstance(t, torch.Tensor)]
    if stage.index or not leaves or not (always or all(t.dim() == 1 for t in leaves)):
        return ""
    shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
    return (
        f". The batch size {B} is the leading size of the inputs (here {shapes}): if they "
        "are one sample without its batch dimension (an item of a Dataset), add it "
        "(inputs.unsqueeze(0)), or pass data=torch.utils.data.DataLoader(dataset, "
        "batch_size=...)"
    )


def _check_per_sample(stage: Stage, x: torch.Tensor, z, out: torch.Tensor, hint: str) -> None:
    """Raise ``ValueError`` if the stage's batch output differs from its per-sample outputs
    (``hint`` ends the message: :func:`_sample_hint`)."""
    try:
        single = vmap(lambda zi: stage.apply(x, tree_map(lambda t: t.unsqueeze(0), zi)).squeeze(0))(
            z
        )
    except Exception as err:  # torch.func refuses some operations (in-place on inputs, .item())
        raise ValueError(
            f"stage {stage.index} ({', '.join(stage.param_names)}) cannot be differentiated one "
            f"sample at a time by torch.func ({type(err).__name__}: {err}); in-place updates of "
            f"a module's input and data-dependent Python control flow are not supported{hint}"
        ) from err
    if single.shape != out.shape:
        raise ValueError(
            f"stage {stage.index} ({stage.param_names[0]}...) maps a batch to shape "
            f"{tuple(out.shape)} but one sample to {tuple(single.shape[1:])}; stages must keep "
            f"the batch dimension first and act on each sample independently{hint}"
        )
    tol = 1e3 * torch.finfo(out.dtype).eps * (1.0 + out.abs().max())
    if (single - out).abs().max() > tol:
        raise ValueError(
            f"stage {stage.index} ({', '.join(stage.param_names)}) couples the samples of a batch "
            "(its output for one sample depends on the others); this is not supported"
        )


def forward_pass(stages: Sequence[Stage], params: Sequence[torch.Tensor], z, B: int) -> list:
    """``[z_in, z_1, ..., z_m]``: the input of the first of ``stages`` and every stage's output,
    each stage checked (batch first, per sample, its input left intact)."""
    zs = [z]
    with torch.no_grad():
        for stage, x in zip(stages, params, strict=True):
            z = zs[-1]
            linear = is_linear_stage(stage, z)
            probe = z if linear else _copy(z)
            out = stage.apply(x, probe)
            if not linear and not _equal(z, probe):
                raise ValueError(
                    f"stage {stage.index} ({', '.join(stage.param_names)}) modifies its input in "
                    "place (e.g. z.add_(...)); the chain's derivatives need stages that leave "
                    "their input intact: write z = z + ... instead"
                )
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != B:
                raise ValueError(
                    f"stage {stage.index} ({', '.join(stage.param_names)}) returned "
                    f"{tuple(getattr(out, 'shape', ()))}; every stage must keep the batch "
                    f"dimension ({B}) first{_sample_hint(stage, z, B, always=True)}"
                )
            if not linear:
                _check_per_sample(stage, x, z, out, _sample_hint(stage, z, B))
            zs.append(out)
    return zs


def backward_sweep(
    stages: Sequence[Stage],
    params: Sequence[torch.Tensor],
    zs: list,
    b: torch.Tensor,
    *,
    first_has_input: bool = False,
    second_order: bool = True,
    oracle: str = "auto",
    progress: bool | None = None,
) -> tuple[tuple[StageDerivatives, ...], tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The derivatives of ``stages`` from their inputs and outputs ``zs``
    (:func:`forward_pass`) and the adjoint ``b`` ``(B, h)`` of the last one's output:
    ``(derivatives, gradient blocks, b_in)``. ``first_has_input``: the first of ``stages``
    is not the chain's first (its input is a variable), and ``b_in`` is the adjoint of that
    input; else ``None``."""
    L = len(stages)
    derivs: list[StageDerivatives] = [None] * L  # type: ignore[list-item]
    grads: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    # batched over stages; the Gauss-Newton matrix checks the ranks of the stage inputs only
    # if a route needs the bases (its output space does not: section 14)
    forwards = linear_stage_forwards(stages, params, zs, oracle, compress=second_order)
    bar = progress_bar(L, "derivatives", progress)
    b_in = None
    for l in range(L - 1, -1, -1):
        has_input = l > 0 or first_has_input
        d = stage_derivatives(
            stages[l],
            params[l],
            zs[l],
            b,
            has_input=has_input,
            second_order=second_order,
            oracle=oracle,
            forward=forwards.get(l),
        )
        derivs[l] = d
        grads[l] = d.Dx_T(b[:, :, None])[:, 0]
        if has_input:
            b = d.Dz_T(b[:, :, None])[:, :, 0]
            b_in = b if l == 0 else None
        bar.update()
    bar.close()
    linear_complements([d for d in derivs if isinstance(d, LinearDerivatives) and d.Q is not None])
    return tuple(derivs), tuple(grads), b_in


def compute_derivatives(
    chain: Chain,
    params: list[torch.Tensor],
    inputs,
    loss_fn,
    targets,
    *,
    second_order: bool = True,
    oracle: str = "auto",
    progress: bool | None = None,
    head_fn=loss_head,
) -> ChainDerivatives:
    """Run the forward pass and the backward derivative sweep.

    Args:
        chain: the stages.
        params: flat ``(p_l,)`` selected parameters of each stage.
        inputs: the input batch (a tensor ``(B, ...)`` or a pytree of them).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, a sum of per-sample terms.
        second_order: False for the Gauss-Newton matrix.
        oracle: ``"auto"``, ``"analytic"`` or ``"generic"`` (see :mod:`hessinv.derivatives`).
        progress: show a progress bar when the sweep takes more than a couple of seconds.
        head_fn: ``head_fn(loss_fn, outputs, targets, oracle) -> LossHead`` (default
            :func:`~hessinv.derivatives.loss_head`; a data-parallel curvature computes the
            head of the global batch and keeps its own rows, docs/algorithm.md section 17).
    """
    B = batch_size(inputs)
    with torch.no_grad():
        zs = forward_pass(chain.stages, params, chain.apply_prefix(inputs), B)
    head = head_fn(loss_fn, zs[-1], targets, oracle)
    derivs, grads, _ = backward_sweep(
        chain.stages,
        params,
        zs,
        head.grad,
        second_order=second_order,
        oracle=oracle,
        progress=progress,
    )
    return ChainDerivatives(head.value, head, derivs, grads)
