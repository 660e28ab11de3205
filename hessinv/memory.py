"""Memory estimates and the budget a factorization is checked against before it starts.

The estimates count the tensors each method keeps plus the largest transient front
(docs/algorithm.md section 5 for the sizes): a :class:`MemoryBudgetError` before the
factorization is better than an allocator failure deep inside it.
"""

from __future__ import annotations

import os

import torch

from .errors import MemoryBudgetError

__all__ = ["memory_estimate", "available_memory", "check_budget"]


def memory_estimate(stages, S: torch.Tensor) -> dict[str, int]:
    """Estimated bytes per method for the stages' derivatives and loss blocks ``S``.

    Keys: ``"derivatives"`` (what is stored now), ``"riccati"`` (kept factors plus the
    largest transient front, without delayed pivots, plus the front terms made ahead of
    the sweep, docs/algorithm.md section 13), ``"tridiagonal"`` (the pivoted band
    LU of blocks ``p_l + 2 a_l``) and ``"dense"`` (``H`` and its LU).
    """
    from .derivatives import FrontTerms
    from .riccati import terms_budget

    item = S.element_size()
    stored = sum(d.stored_bytes() for d in stages)
    terms = [FrontTerms.stored_bytes(d) for d in stages]
    ahead = max(max(terms, default=0), min(terms_budget(S.device), sum(terms)))
    kept = peak = 0
    tri = 0
    n = 0
    for d in stages:
        N = d.basis_size
        a_out, a_in = d.batch * d.out_size, d.batch * d.in_size
        kept += N * N + N * a_in
        # alive while stage l is eliminated: V_{l+1}; (Dx Y)^T V and Dz^T V; the front's G
        # (assembled, symmetrised, factored), F (twice) and Q; the update and the next V
        # (with its symmetrised copy)
        peak = max(peak, a_out * a_out + N * a_out + a_in * a_out + 3 * N * N + 3 * N * a_in
                   + 4 * a_in * a_in)
        m = d.num_params + 2 * a_out
        tri += 4 * m * m  # band LU: diagonal, two off-diagonals and the fill-in, per block
        n += d.num_params
    return {
        "derivatives": stored,
        "riccati": (kept + peak) * item + ahead,
        "tridiagonal": (tri + peak) * item,
        "dense": 2 * n * n * item,
    }


def available_memory(device: torch.device) -> int:
    """Free bytes: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on Linux CPUs."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


def check_budget(required: int, device: torch.device, max_memory: int | None, what: str) -> None:
    """Raise :class:`MemoryBudgetError` when ``required`` bytes exceed the budget."""
    budget = available_memory(device) if max_memory is None else int(max_memory)
    if required > budget:
        source = "max_memory" if max_memory is not None else f"free memory on {device}"
        raise MemoryBudgetError(
            f"{what} needs about {required / 2**30:.2f} GiB but the budget ({source}) is "
            f"{budget / 2**30:.2f} GiB; use fewer samples per factorization, float32, a "
            "narrower model, or pass max_memory= to override",
            required, budget,
        )
