"""Reading a model, a loss and a batch into a :class:`ChainSnapshot`: the stages, their
parameters, the batch and the derivatives of one sweep (docs/algorithm.md sections 1, 2).

Everything is read (copied) here: later changes to the model or the data do not reach a
snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import torch
from torch.utils._pytree import tree_map

from hessinv.derivatives import fold_output_activation, loss_head
from hessinv.network.chain import Chain, build_chain
from hessinv.network.checks import check_inputs, check_targets
from hessinv.network.sweep import ChainDerivatives, compute_derivatives
from hessinv.vectors import ParameterLayout

__all__ = ["ChainSnapshot", "read_chain", "fold_head"]


@dataclasses.dataclass(frozen=True)
class ChainSnapshot:
    """A chain at one point: ``chain`` (stages; a trailing activation folded into the loss
    where :func:`fold_head` applies), the flat selected ``params`` per stage, the copied
    ``inputs`` and ``targets``, the ``layout`` of the parameters and the ``derivatives`` of
    the sweep."""

    chain: Chain
    params: tuple[torch.Tensor, ...]
    inputs: object
    targets: object
    layout: ParameterLayout
    derivatives: ChainDerivatives


def fold_head(chain: Chain, loss_fn):
    """The chain with a trailing activation folded into the loss where the pair has a
    closed form without cancellation (:func:`~hessinv.derivatives.fold_output_activation`)."""
    last = chain.stages[-1]
    k, folded = fold_output_activation(last.modules[1:], loss_fn)
    if not k:
        return chain, loss_fn
    stages = (*chain.stages[:-1], dataclasses.replace(last, modules=last.modules[:-k]))
    return dataclasses.replace(chain, stages=stages), folded


def _clone(tree):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while a chain's stages are built: the sweep
    makes a few small objects per stage, and at depth 1000 the collections they trigger
    (each scanning every object alive) took 40% of the time. Cyclic garbage made meanwhile
    is collected as usual afterwards; the collector is left as it was found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_chain(
    model,
    loss_fn,
    inputs,
    targets,
    params,
    *,
    second_order: bool,
    oracle: str,
    progress: bool | None,
    head_fn=loss_head,
) -> ChainSnapshot:
    """Split ``model`` into stages, check and copy the batch, run the derivative sweep
    (``head_fn``: see :func:`~hessinv.network.sweep.compute_derivatives`)."""
    with gc_paused():
        chain, head_loss = fold_head(build_chain(model, params), loss_fn)
        flat = chain.flat_params()
        parts = tuple(flat.split([s.num_params for s in chain.stages]))
        dtype, device = flat.dtype, flat.device
        if not bool(torch.isfinite(flat).all()):  # one sync; the culprit found only on failure
            for stage, x in zip(chain.stages, parts, strict=True):
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"parameters {stage.param_names} contain NaN or Inf")
        check_inputs(inputs, dtype, device)
        check_targets(targets, device)
        inputs, targets = _clone(inputs), _clone(targets)
        layout = ParameterLayout(
            names=chain.param_names,
            shapes=tuple(sh for s in chain.stages for sh in s.param_shapes),
            stage_sizes=tuple(s.num_params for s in chain.stages),
            dtype=dtype,
            device=device,
        )
        derivatives = compute_derivatives(
            chain,
            list(parts),
            inputs,
            head_loss,
            targets,
            second_order=second_order,
            oracle=oracle,
            progress=progress,
            head_fn=head_fn,
        )
    return ChainSnapshot(chain, parts, inputs, targets, layout, derivatives)
