"""The user-facing curvature operators (:class:`ChainHessian`, :class:`ChainGGN`) and what
they offer: products, diagonal, spectrum tools, memory and cost estimates, the output
space of the Gauss-Newton matrix and the factorizations under the accuracy contract
(docs/algorithm.md sections 3, 6, 11, 12, 14, 15)."""
