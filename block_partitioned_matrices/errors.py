"""Exceptions raised by :mod:`block_partitioned_matrices`."""

from __future__ import annotations

__all__ = ["SingularMatrixError"]


class SingularMatrixError(ValueError):
    """A factorization met an exactly zero pivot, so the matrix is singular.

    Subclass of :class:`ValueError`; the message names the block row (and the
    row inside that block) where elimination broke down.

    >>> issubclass(SingularMatrixError, ValueError)
    True
    """
