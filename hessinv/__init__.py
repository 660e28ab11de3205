"""hessinv: the exact Hessian of deep chain networks, in time linear in depth.

Hessian-vector products, the exact damped Newton solve ``(H + eps I)^-1 g``,
log-determinant, inertia and diagonal of the Hessian of
``loss_fn(model(inputs), targets)`` for a model that is a chain of stages
(an ``nn.Sequential``). See ``ALGORITHM.md`` for the mathematics.
"""

from .chain import Chain, Stage, build_chain
from .derivatives import StageDerivatives
from .hessian import ChainHessian, HessianFactorization
from .reference import conjugate_gradient, dense_hessian
from .riccati import SingularStageError
from .vectors import flatten, unflatten

__version__ = "0.1.0"

__all__ = [
    "ChainHessian",
    "HessianFactorization",
    "StageDerivatives",
    "SingularStageError",
    "Chain",
    "Stage",
    "build_chain",
    "flatten",
    "unflatten",
    "dense_hessian",
    "conjugate_gradient",
]
