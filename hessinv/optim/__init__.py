"""Second-order optimizers built on exact curvature of a chain network.

Both optimizers build a curvature ``B`` on the batch passed to ``step`` (the exact
Hessian :class:`hessinv.ChainHessian` by default, the Gauss-Newton matrix
``hessinv.ChainGGN`` with ``curvature="ggn"``, or any :class:`CurvatureProtocol`) and
use its exact factorization of ``B + lam I`` with its exact inertia (docs/algorithm.md
section 5), which costs time linear in depth. Notation for one step at parameters
``x`` on a batch: ``f`` the loss, ``g`` its gradient and

    m(s) = f + g^T s + 1/2 s^T B s

the quadratic model of the loss around ``x``. The *predicted reduction* of a step
``s`` is ``m(0) - m(s)``, the *actual reduction* is ``f(x) - f(x + s)`` and
``rho = actual / predicted``.

* :class:`DampedNewton`: Levenberg-Marquardt damped Newton,
  ``s = -lr (B + eps I)^-1 g``, with ``eps`` adapted by the outcome of each step
  (classic Levenberg-Marquardt with ``curvature="ggn"``).
* :class:`TrustRegionNewton`: the exact (Moré-Sorensen) solution of the trust-region
  subproblem ``min m(s) s.t. ||s|| <= radius``, with the inertia of ``B + lam I``
  to tell where ``B + lam I`` is positive definite; the radius adapts with ``rho``.
* :func:`trust_region_subproblem`: that subproblem solver on its own.
* :class:`CurvatureProtocol`, :class:`FactorizationProtocol`: what they need from ``B``.

* :class:`CurvaturePreconditioner`: the exact solve as a preconditioner for any
  ``torch.optim`` optimizer (SGD, Adam): ``update(inputs, targets)`` every ``k`` steps,
  ``precondition_()`` before ``opt.step()``.

Both optimizers are ``torch.optim.Optimizer`` s (parameter groups, schedulers,
``state_dict``, ``zero_grad``) that take the batch in ``step(inputs, targets)``, since they
need the whole batch to build ``B`` (and re-evaluate the loss on it to accept or reject the
step). The shared step template and its design choices are in :mod:`hessinv.optim.base`.
"""

from hessinv.optim.damped_newton import DampedNewton
from hessinv.optim.preconditioner import CurvaturePreconditioner
from hessinv.optim.protocol import CurvatureProtocol, FactorizationProtocol
from hessinv.optim.subproblem import TrustRegionSolution, trust_region_subproblem
from hessinv.optim.trust_region import TrustRegionNewton

__all__ = [
    "DampedNewton",
    "TrustRegionNewton",
    "CurvaturePreconditioner",
    "trust_region_subproblem",
    "TrustRegionSolution",
    "CurvatureProtocol",
    "FactorizationProtocol",
]
