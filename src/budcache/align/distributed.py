"""Data parallel alignment over calibration items with ``torch.distributed`` (gloo on CPU).

Every rank holds the same schedule parameters and the whole calibration set;
an optimizer step's items are split over the ranks, each rank accumulates
``sum_i loss_i / n_step`` over its share, and the gradients are summed with an
all-reduce before clipping and the update, so ``W`` ranks give the update of
one process over the same items (the effective batch is
``micro_batch x accumulation x W``).

Start it with ``torchrun --nproc-per-node W -m budcache.cli align ...`` (the
``env://`` variables), or with ``budcache align --nproc W``, which spawns ``W``
local processes through :func:`spawn`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0)."""
    return world()[0] == 0


def init_from_env() -> bool:
    """Join the process group described by torchrun's variables (gloo); False when there is none."""
    if not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    dist.init_process_group("gloo", init_method="env://")
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (no-op with one process); returns ``t``."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``t`` to every rank in place (no-op with one process)."""
    if world()[1] > 1:
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable[..., Any], size: int, port: int, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, threads: int = 1) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes joined in a gloo group (``fn`` must be importable)."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ConfigError(f"number of processes must be an int >= 1 (got {nprocs!r})")
    if dist.is_available() and dist.is_initialized():
        raise ConfigError("a process group is already running; start either with torchrun or with --nproc")
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(fn, nprocs, _free_port(), threads, args), nprocs=nprocs, join=True)
