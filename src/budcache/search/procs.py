"""How local worker processes are started: forked from a clean server process that has the model stack loaded.

A spawned worker imports torch, diffusers and budcache itself, about 6 s of CPU
each on the project's machine, paid again by every worker and every
replacement. With the ``forkserver`` start method (POSIX), one server process
is started from a fresh interpreter, imports :data:`PRELOAD` once, and forks
each worker from that state: a worker then costs a fork and its replica's
weights. The server has run no torch kernel, so no thread pool is forked (the
reason not to fork the driver itself, which has). Where ``forkserver`` is not
available the workers are spawned as before. Results do not depend on the start
method: each worker builds its replica and sets its thread count itself.

This module imports no torch, so the CLI can start the server
(:func:`start_worker_server`) before the driver imports the model stack; the
two imports then run on two cores at once.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

from ..specs import PEER_MECHANISMS

#: Modules the fork server imports once, before it forks any worker: the worker body and tinyflow's replica.
PRELOAD = ("budcache.search.local", "budcache.problems.tinyflow")


def auto_backend(*, pipeline: bool, mechanism: str | None) -> str:
    """What ``--backend auto`` stands for: ``inprocess`` for a diffusers pipeline or a peer's mechanism (their
    hooks run in this process), else ``local`` worker processes."""
    return "inprocess" if pipeline or mechanism in PEER_MECHANISMS else "local"


def start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def worker_context() -> BaseContext:
    """The multiprocessing context local workers start from (see the module docstring)."""
    ctx = mp.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs: it keeps its first preload
    return ctx


def start_worker_server() -> None:
    """Start the fork server now, in the background, so that its imports overlap this process's own.

    Returns at once; the first worker start waits for the server's imports. Does nothing where workers are
    spawned, or when the server is already running.
    """
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
