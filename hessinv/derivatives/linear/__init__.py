"""``nn.Linear`` followed by elementwise activations, in Kronecker form (docs/algorithm.md section
8).

``kernels`` (batched per-sample products), ``forward`` (forward-pass parts of many stages
at once), ``operators`` (:class:`LinearDerivatives`), ``basis`` (front terms in the basis
``Y``), ``complement`` (the directions outside ``Y``).
"""

from hessinv.derivatives.linear.basis import linear_front_terms
from hessinv.derivatives.linear.complement import LinearComplement, linear_complements
from hessinv.derivatives.linear.forward import (
    LinearForward,
    LinearInput,
    compress_linear_stages,
    elementwise_derivatives,
    linear_forwards,
)
from hessinv.derivatives.linear.operators import LinearDerivatives

__all__ = [
    "LinearDerivatives",
    "LinearComplement",
    "LinearInput",
    "LinearForward",
    "linear_forwards",
    "linear_complements",
    "linear_front_terms",
    "elementwise_derivatives",
    "compress_linear_stages",
]
