"""hessinv beyond one process, on ``torch.distributed`` (docs/algorithm.md section 17).

* :class:`DataParallelHessian`, :class:`DataParallelGGN`: each rank holds a shard of the
  batch; results are those of the union of the shards, the same on every rank.
* :class:`PipelineHessian`, :class:`PipelineGGN`: each rank owns a contiguous range of the
  chain's stages and keeps only their derivatives and factors.

Run with ``torchrun --nproc-per-node R script.py`` (gloo on CPUs, NCCL on GPUs); see
``examples/distributed_curvature.py``.
"""

from hessinv.distributed.comm import Communicator
from hessinv.distributed.data_parallel import DataParallelGGN, DataParallelHessian
from hessinv.distributed.pipeline import PipelineFactorization, PipelineGGN, PipelineHessian

__all__ = [
    "DataParallelHessian",
    "DataParallelGGN",
    "PipelineHessian",
    "PipelineGGN",
    "PipelineFactorization",
    "Communicator",
]
