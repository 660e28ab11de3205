"""Choosing the route of a factorization (docs/algorithm.md section 15).

Per route, the peak memory (:func:`memory_per_route`) and the work (:func:`cost_per_route`,
floating-point operations plus a fixed amount per operator and stage); ``method="auto"``
takes the cheapest route that fits the budget, and when none fits the error lists what each
needs.
"""

from __future__ import annotations

from hessinv.curvature.factorization import (
    DenseFactorization,
    Factorization,
    OutputSpaceFactorization,
    RiccatiFactorization,
    TridiagonalFactorization,
)
from hessinv.curvature.memory import available_memory, check_budget, memory_estimate, route_flops
from hessinv.derivatives.linear import LinearDerivatives, compress_linear_stages
from hessinv.errors import MemoryBudgetError
from hessinv.network.checks import check_bytes, finite

__all__ = ["METHODS", "prepare_bases", "memory_per_route", "cost_per_route", "choose", "factorize"]

#: the routes :func:`factorize` takes by name; ``"auto"`` picks among a class's ``routes``
METHODS = ("auto", "output", "riccati", "dense", "tridiagonal")
_FACTORIZATIONS = {
    "output": OutputSpaceFactorization,
    "riccati": RiccatiFactorization,
    "dense": DenseFactorization,
    "tridiagonal": TridiagonalFactorization,
}


def prepare_bases(curvature) -> None:
    """Give the ``Linear`` stages their row-space bases if the sweep left them unchecked (the
    Gauss-Newton sweep does: its output space needs none, section 14): the Riccati and
    tridiagonal routes' sizes, hence their estimates, depend on them (section 8). One
    batched SVD per stage shape, done once."""
    compress_linear_stages(
        [d for d in curvature.stage_derivatives() if isinstance(d, LinearDerivatives)]
    )


def memory_per_route(curvature) -> dict[str, int]:
    """Estimated peak bytes of every route of ``curvature`` (and ``derivatives``, held now)."""
    est = memory_estimate(curvature.stage_derivatives(), curvature.loss_hessian_blocks())
    space = curvature.output_space_or_none()
    if space is not None:
        est["output"] = space.stored_bytes()
    return est


def cost_per_route(curvature) -> dict[str, float]:
    """Estimated work of every route of ``curvature`` that ``"auto"`` considers."""
    costs = route_flops(curvature.stage_derivatives(), curvature.num_params)
    overhead = costs.pop("_output_overhead")
    space = curvature.output_space_or_none()
    if space is not None:
        costs["output"] = space.flops() + overhead
    return costs


def choose(curvature, damping: float, method: str, max_memory: int | None) -> str:
    """The route for ``method``: by name (checked against the budget), or for ``"auto"`` the
    cheapest of ``curvature.routes`` that fits."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    name = f"{curvature.symbol} + {damping:g} I"
    if method in ("riccati", "tridiagonal") or curvature.output_space_or_none() is None:
        prepare_bases(curvature)  # a route that needs the bases may be taken: size it right
    est = memory_per_route(curvature)
    if method != "auto":
        if method not in est:
            raise ValueError(
                f"method={method!r} is not available for {type(curvature).__name__}"
                + (
                    " (the loss Hessian blocks are indefinite, so G has no output-space factor)"
                    if method == "output" and curvature.symbol == "G"
                    else ""
                )
                + f"; available: {sorted(k for k in est if k != 'derivatives')}"
            )
        check_budget(
            est[method], curvature.device, max_memory, f"the {method} factorization of {name}"
        )
        return method
    candidates = [r for r in curvature.routes if r in est]
    if damping == 0 and "output" in candidates and len(candidates) > 1:
        candidates.remove("output")  # Woodbury divides by the damping
    budget = available_memory(curvature.device) if max_memory is None else int(max_memory)
    fitting = [r for r in candidates if est[r] <= budget]
    if not fitting:
        needs = ", ".join(f"{r}: {est[r] / 2**30:.2f} GiB" for r in candidates)
        source = "max_memory" if max_memory is not None else f"free memory on {curvature.device}"
        raise MemoryBudgetError(
            f"no route to factor {name} fits the budget ({source}: {budget / 2**30:.2f} "
            f"GiB); each needs about {needs}. Use fewer samples per factorization, float32, "
            "a narrower model, or pass max_memory= to override",
            min(est[r] for r in candidates),
            budget,
        )
    costs = cost_per_route(curvature)
    return min(fitting, key=lambda r: (costs[r], candidates.index(r)))


def factorize(curvature, damping, method: str, max_memory, progress: bool | None) -> Factorization:
    """The factorization of ``curvature + damping I`` on the route :func:`choose` picks."""
    damping = finite(damping, "damping")
    max_memory = check_bytes(max_memory, "max_memory")
    route = choose(curvature, damping, method, max_memory)
    if route == "riccati":
        return RiccatiFactorization(curvature, damping, progress=progress)
    return _FACTORIZATIONS[route](curvature, damping)
