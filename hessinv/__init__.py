"""hessinv: the exact Hessian of deep chain networks, in time linear in depth.

Hessian-vector products, the exact damped Newton solve ``(H + eps I)^-1 g``,
log-determinant, inertia, diagonal and spectrum tools of the Hessian (and of the
generalized Gauss-Newton matrix) of ``loss_fn(model(inputs), targets)`` for a model
that is a chain of stages (an ``nn.Sequential``). The mathematics is in
``docs/algorithm.md``; the sections are cited in the docstrings.
"""

from hessinv import distributed, optim
from hessinv.curvature.factorization import (
    DenseFactorization,
    Factorization,
    OutputSpaceFactorization,
    RiccatiFactorization,
    TridiagonalFactorization,
)
from hessinv.curvature.hessian import ChainGGN, ChainHessian
from hessinv.curvature.spectrum import EigenvalueBracket
from hessinv.errors import (
    AccuracyWarning,
    DistributedError,
    MemoryBudgetError,
    SingularMatrixError,
)
from hessinv.laplace import LaplaceGGN, MarginalLikelihoodGrad
from hessinv.optim import (
    CurvaturePreconditioner,
    DampedNewton,
    TrustRegionNewton,
    trust_region_subproblem,
)
from hessinv.tools.reference import conjugate_gradient, dense_hessian
from hessinv.vectors import flatten, unflatten

#: the one place the version is written (pyproject.toml reads it from here)
__version__ = "0.3.0"

__all__ = [
    "ChainHessian",
    "ChainGGN",
    "Factorization",
    "RiccatiFactorization",
    "TridiagonalFactorization",
    "OutputSpaceFactorization",
    "DenseFactorization",
    "EigenvalueBracket",
    "SingularMatrixError",
    "MemoryBudgetError",
    "AccuracyWarning",
    "DistributedError",
    "DampedNewton",
    "TrustRegionNewton",
    "CurvaturePreconditioner",
    "trust_region_subproblem",
    "optim",
    "distributed",
    "LaplaceGGN",
    "MarginalLikelihoodGrad",
    "flatten",
    "unflatten",
    "dense_hessian",
    "conjugate_gradient",
]
