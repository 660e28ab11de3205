"""Errors and warnings hessinv raises where a result cannot be trusted.

Every exception names the matrix or the model part it is about and says what to do.
"""

from __future__ import annotations

__all__ = [
    "SingularMatrixError",
    "MemoryBudgetError",
    "AccuracyWarning",
    "DistributedError",
]


class SingularMatrixError(ValueError):
    """``H + damping I`` is singular (to working precision).

    Attributes:
        damping: the ``eps`` of ``H + eps I``.
        nullity: a lower bound on the dimension of its null space when one is known
            (for instance from the structure of a wide layer), else ``None``.
    """

    def __init__(self, message: str, damping: float, nullity: int | None = None):
        super().__init__(message)
        self.damping = damping
        self.nullity = nullity


class MemoryBudgetError(MemoryError):
    """A factorization would need more memory than allowed; raised before allocating.

    Attributes:
        required: the estimated number of bytes.
        available: the budget in bytes it was compared with.
    """

    def __init__(self, message: str, required: int, available: int):
        super().__init__(message)
        self.required = required
        self.available = available


class AccuracyWarning(RuntimeWarning):
    """A result is returned but its accuracy could not be certified (the message says why)."""


class DistributedError(RuntimeError):
    """A collective of a multi-process curvature failed or another rank reported a failure
    (docs/algorithm.md section 17).

    Raised instead of waiting forever: the message names the phase (the hessinv call), the
    rank(s) concerned and what to check -- a rank that stopped or crashed, one that did not
    reach the same call within the process group's timeout (``init_process_group(timeout=)``),
    or ranks that make different hessinv calls.

    Attributes:
        phase: the hessinv step in which the collective failed.
        ranks: the ranks that reported a failure, when known (else empty).
    """

    def __init__(self, message: str, phase: str, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.phase = phase
        self.ranks = ranks
