"""Per-stage derivatives, one class per layer family, behind one interface (docs/algorithm.md
section 2).

Pure per-stage tensor mathematics; nothing here knows about networks or chains.

* :class:`StageDerivatives` (``base.py``): the interface -- products with ``Dx``, ``Dz``,
  ``Dxx``, ``Dzx``, ``Dzz`` and their transposes, the section-6 curvature recursion and
  the basis ``Y`` of the stage-wise factorization;
* :class:`LinearDerivatives` (``linear/``): ``nn.Linear`` + elementwise activations in
  Kronecker form, never dense in parameter space (section 8);
* :class:`GenericDerivatives` (``generic.py``): any per-sample stage, through ``torch.func``;
* :func:`loss_head` (``loss.py``): the loss as per-sample gradient, Hessian blocks and
  their factor.

Which class a stage of a chain gets is decided in :mod:`hessinv.network.dispatch`.
"""

from __future__ import annotations

from hessinv.derivatives.base import (
    Complement,
    DenseStage,
    FrontTerms,
    Hooks,
    StageDerivatives,
    block_diagonal,
    by_class,
)
from hessinv.derivatives.generic import GenericDerivatives
from hessinv.derivatives.linear import (
    LinearComplement,
    LinearDerivatives,
    LinearForward,
    LinearInput,
    elementwise_derivatives,
    linear_complements,
    linear_forwards,
    linear_front_terms,
)
from hessinv.derivatives.loss import FoldedLoss, LossHead, fold_output_activation, loss_head

__all__ = [
    "StageDerivatives",
    "DenseStage",
    "Complement",
    "LinearDerivatives",
    "LinearComplement",
    "GenericDerivatives",
    "LossHead",
    "loss_head",
    "fold_output_activation",
    "FoldedLoss",
    "LinearForward",
    "LinearInput",
    "linear_forwards",
    "linear_complements",
    "linear_front_terms",
    "block_diagonal",
    "by_class",
    "Hooks",
    "FrontTerms",
    "elementwise_derivatives",
]
