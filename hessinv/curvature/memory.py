"""Memory estimates and the budget a factorization is checked against before it starts.

The estimates count the tensors each method keeps plus the largest transient front
(docs/algorithm.md section 5 for the sizes): a :class:`MemoryBudgetError` before the
factorization is better than an allocator failure deep inside it.
"""

from __future__ import annotations

import os

import torch

from hessinv.errors import MemoryBudgetError
from hessinv.settings import DENSE_CHUNK, OPERATOR_FLOPS, OPERATORS

__all__ = ["memory_estimate", "available_memory", "check_budget", "route_flops"]


def memory_estimate(stages, S: torch.Tensor) -> dict[str, int]:
    """Estimated bytes per method for the stages' derivatives and loss blocks ``S``.

    Keys: ``"derivatives"`` (what is stored now), ``"riccati"`` (kept factors plus the
    largest transient front, without delayed pivots, plus the front terms made ahead of
    the sweep, docs/algorithm.md section 13), ``"tridiagonal"`` (the pivoted band
    LU of blocks ``p_l + 2 a_l``) and ``"dense"`` (``H`` and its LU).
    """
    from hessinv.derivatives import FrontTerms
    from hessinv.linalg.riccati import terms_budget

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
        peak = max(
            peak,
            a_out * a_out + N * a_out + a_in * a_out + 3 * N * N + 3 * N * a_in + 4 * a_in * a_in,
        )
        m = d.num_params + 2 * a_out
        tri += 4 * m * m  # band LU: diagonal, two off-diagonals and the fill-in, per block
        n += d.num_params
    return {
        "derivatives": stored,
        "riccati": (kept + peak) * item + ahead,
        "tridiagonal": (tri + peak) * item,
        "dense": 3 * n * n * item,  # the matrix, its eigenvectors and a product's workspace
    }


def route_flops(stages, n: int) -> dict[str, float]:
    """Estimated work of the ``riccati`` and ``dense`` routes (docs/algorithm.md section 15)
    and the per-stage overhead of the output space (``_output_overhead``; its arithmetic is
    :meth:`~hessinv.output_space.OutputSpace.flops`), in floating-point operations.

    Riccati, per stage with basis size ``N`` and state sizes ``a_in = B h_in``,
    ``a_out = B h_out``: assemble ``N^2 a_out + N a_out^2``, factor ``N^3 / 3``, couple
    ``N^2 a_in``, update ``N a_in^2 + a_in a_out (a_in + a_out)``. Dense: ``n`` products of
    ``8 B (p_l + h_in h_out)`` per stage and an eigendecomposition of ``6 n^3``.
    """
    riccati = 0.0
    product = 0.0
    for d in stages:
        N, a_in, a_out = d.basis_size, d.batch * d.in_size, d.batch * d.out_size
        riccati += 2.0 * (
            N * N * a_out
            + N * a_out * a_out
            + N**3 / 6
            + N * N * a_in
            + N * a_in * a_in
            + a_in * a_out * (a_in + a_out)
        )
        product += 8.0 * d.batch * (d.num_params + d.in_size * d.out_size)
    L = len(stages)
    chunks = -(-n // DENSE_CHUNK)
    return {
        "riccati": riccati + L * OPERATORS["riccati"] * OPERATOR_FLOPS,
        "dense": n * product + 6.0 * n**3 + chunks * L * OPERATORS["dense"] * OPERATOR_FLOPS,
        "_output_overhead": L * OPERATORS["output"] * OPERATOR_FLOPS,
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
            required,
            budget,
        )
