"""Errors and warnings hessinv raises where a result cannot be trusted.

Every exception names the matrix or the model part it is about and says what to do.
"""

from __future__ import annotations

__all__ = [
    "SingularMatrixError",
    "MemoryBudgetError",
    "AccuracyWarning",
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
