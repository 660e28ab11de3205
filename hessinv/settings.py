"""Every tuning threshold of hessinv in one place (docs/algorithm.md sections 10, 11, 13-15).

Accuracy thresholds change results and are part of the contract; the others change only
speed and memory. Each constant says where it is used and why it has its value.
"""

from __future__ import annotations

# ---------------------------------------------------------------------- accuracy (contract)
#: backward-error bound of every solve in float64 (docs/algorithm.md section 11) ...
BACKWARD_ERROR_FLOAT64 = 1e-12
#: ... and in lower precision (float32 refinement reaches about ten times its roundoff; a
#: looser bound let unrefined float32 solves through with forward errors 100x a dense LU's)
BACKWARD_ERROR_FLOAT32 = 1e-6
#: iterative refinement steps at most in ``refine="auto"`` mode; a step that gains less than
#: :data:`REFINEMENT_GAIN` counts as stalled
MAX_REFINEMENT = 10
REFINEMENT_GAIN = 0.5
#: threshold of the pivot tests of the fronts: growth (direct fronts) or multipliers (eigen
#: fronts) up to ``1 / tau`` (section 10); ``HARD_TAU`` when a factorization is hardened
DEFAULT_TAU = 1e-2
HARD_TAU = 0.1
#: the output space's inverse diagonal warns above this estimated relative error (float64;
#: ``INVERSE_DIAGONAL_WARN_FLOAT32`` in float32), section 14
INVERSE_DIAGONAL_WARN_FLOAT64 = 1e-8
INVERSE_DIAGONAL_WARN_FLOAT32 = 1e-3
#: the output space's logdet comes from the eigendecomposition, its rounding-level eigenvalues
#: set to zero, where they could add more than this to log det (``B r^2 u ||U U^T|| / |lam|``)
LOGDET_ROUNDING = 1e-12

# ---------------------------------------------------------------------- speed and memory
#: stages with more parameters than this are not batched with others in the sweeps' batched
#: steps: their products already keep a device busy, and on a CPU a stack of them falls out
#: of the cache (width 256: 3x slower products than one stage at a time), section 13
BATCH_PARAMS = 1 << 14
#: from this many right-hand sides on, the products' batched steps go stage by stage with
#: plain matrix products: the arithmetic dominates, and stacking the stages costs a copy
#: (200 columns at depth 32, width 16, batch 64: the stack and its einsums took 2/3 of G V)
MANY_COLUMNS = 16
#: at most this many stages' front terms are made in one batched call ...
TERMS_STAGES = 16
#: ... and held at once (bytes): on a GPU, where a batched call saves launches ...
TERMS_BYTES = 1 << 25
#: ... and on a CPU, where it saves dispatches but terms that fall out of the cache before
#: their front uses them cost more than that (width 16, batch 32: 4 MB per stage, 6% slower)
TERMS_BYTES_CPU = 1 << 20
#: stages per host read of the pivot tests on CUDA where the fronts are expected definite
#: (the Gauss-Newton matrix with damping > 0), section 13
RUN_LENGTH = 16
#: bytes of the intermediate tensors of the output space's inverse diagonal per chunk of
#: output units (section 14)
DIAGONAL_CHUNK_BYTES = 1 << 26
#: floating-point operations a stage's operator costs besides its arithmetic (its dispatch
#: and launch; about 20 us at 10 GFlop/s): deep chains of small stages are bound by it
OPERATOR_FLOPS = 2e5
#: operators per stage of each route (counted with hessinv.tools.syncs.KernelCounter: the
#: factorization of H at width 16; the output space's pullback and Gram term), section 15
OPERATORS = {"riccati": 60, "output": 12, "dense": 10}
#: columns of the identity per product when a curvature forms its dense matrix
DENSE_CHUNK = 1024

# ---------------------------------------------------------------------- progress bars
#: a progress bar appears only after this many seconds, and only on a terminal
PROGRESS_DELAY_S = 2.0
