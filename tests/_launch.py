"""Run a function on ``R`` processes joined by a gloo process group, inside pytest.

The processes are forked (no re-import: a launch costs tens of milliseconds, not seconds),
each joins a group through a file store, runs ``fn(rank, world, *args)`` and leaves. An
exception in any process fails the launch with that process's traceback; a launch that
outlives ``deadline_s`` is killed and fails (a hang is a failure, never a stuck suite).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, timeout_s: float, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(world: int, fn, *args, timeout_s: float = 30.0, deadline_s: float = 120.0) -> None:
    """``fn(rank, world, *args)`` on ``world`` forked processes (group timeout ``timeout_s``)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fd, store = tempfile.mkstemp(prefix="hessinv-store-")
    os.close(fd)
    os.unlink(store)  # the file store creates it
    ctx = mp.start_processes(
        _entry,
        args=(world, store, timeout_s, fn, args),
        nprocs=world,
        join=False,
        start_method="fork",
    )
    start = time.monotonic()
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() - start > deadline_s:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {world} processes did not finish within {deadline_s} s")
    finally:
        if os.path.exists(store):
            os.unlink(store)
