"""Where masks are scored and how the search uses the workers: the ``--backend``, ``--workers`` and ``--scheme``
options of ``budcache search``.

Backends: ``inprocess`` (this process, one thread), ``local`` (W worker
processes on this machine, :mod:`budcache.search.local`), ``ray`` (W Ray
actors, :mod:`budcache.search.distributed`), and ``auto``: ``local`` with
every core for tinyflow, ``inprocess`` for a diffusers pipeline (one replica
per core would not fit a large model; give ``--backend local`` or ``ray``
explicitly) and for a peer mechanism (scored in-process only). The default of
``budcache search`` is ``auto``, that of :func:`budcache.search.job.run_search`
``inprocess`` (a library call starts no process unless asked).

With several candidate mechanisms (``--mechanism auto``), a budget's candidates
whose evaluators live in different processes are searched at the same time,
each in its own thread of the driver: at most one in-process candidate (a
peer's schedule) beside candidates on local worker processes (Ray candidates
run one after another: their estimator plans are scored in this process). Each
candidate's search is the one it would run alone, so the policy is unchanged.
The local workers stay one per core beside the in-process candidate: on the
2-core machine that measured faster than leaving a core to it (BENCHMARKS.md,
"The default search on this machine's 2 cores").

Splits (``--split``, local workers and Ray actors): ``items`` (the default
while W <= C) gives each worker a share of the C calibration items and sends
it every mask, so a mask costs about 1/W and nothing is speculated; ``masks``
sends whole masks to the worker holding their longest prefix and speculates
on W annealing proposals per request (the in-process losses for any W);
``hybrid`` (the default when W > C) does both: ``G = W / S`` groups take the
masks by prefix, and the S workers of a group split the items (S the largest
divisor of W up to C). See :class:`~budcache.search.local.LocalEvaluator`.

Schemes: ``sequential`` (the default: the paper's annealing then hill
climbing, :func:`budcache.search.anneal.search`: the same policy for every
backend and W with ``--split masks``, fixed by W with the item split) and ``tempering``
(:mod:`budcache.search.parallel`: W proposals per round, one per group with
the hybrid split; the policy depends on the seed and W). Both defaults are what measured best on held-out pairs on the
project's 2-core machine (BENCHMARKS.md, "Parallel search").
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..peers import PEER_MECHANISMS
from ..problems.data import CalibrationSet
from .anneal import SearchConfig, SearchResult, search
from .distributed import WORK_SPLITS, make_evaluator
from .local import LocalEvaluator, default_workers
from .losses import LossFn, latent_mse
from .parallel import SCHEMES, TemperingConfig, search_tempering
from .procs import auto_backend

BACKENDS = ("auto", "inprocess", "local", "ray")
MAX_WORKERS = 4096


def resolve_backend(backend: str, *, pipeline: bool, mechanism: str | None) -> str:
    """The backend ``auto`` stands for (see the module docstring); other names unchanged."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is unknown; choose one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    return auto_backend(pipeline=pipeline, mechanism=mechanism)


def resolve_workers(backend: str, workers: int | None) -> int:
    """The worker count: ``workers``, or by default every core for ``local`` and 1 otherwise."""
    if workers is None:
        return default_workers() if backend == "local" else 1
    if type(workers) is not int or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be an integer in 1..{MAX_WORKERS} (got {workers!r})")
    if backend == "inprocess" and workers != 1:
        raise ConfigError("--workers applies only with --backend local or ray (in-process scoring is one worker)")
    return workers


def make_backend(backend: str, problem: Any, calib: CalibrationSet, *, loss: LossFn = latent_mse,
                 naive: bool = False, workers: int | None = None, address: str | None = None,
                 factory: Callable[[str], Any] | None = None, estimator: str | None = None,
                 mechanism: str | None = None, split: str = "auto") -> Any:
    """The evaluator of a resolved backend; ``local`` builds :class:`~budcache.search.local.LocalEvaluator`
    (replicas from ``factory``, default as for Ray: ``problem.replica()``), the others
    :func:`~budcache.search.distributed.make_evaluator`.

    Args:
        backend: ``inprocess``, ``local`` or ``ray`` (``auto`` resolved by :func:`resolve_backend`).
        problem, calib, loss, naive, estimator, mechanism: as for ``make_evaluator``.
        workers: W (default: :func:`resolve_workers`).
        address: a Ray cluster to join (``ray`` only).
        factory: ``factory(device) -> problem`` replica recipe for the workers.
        split: how local workers or Ray actors share a request (``auto``, ``items``, ``masks``; see
            :class:`~budcache.search.local.LocalEvaluator`).
    """
    if backend == "auto" or backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} must be one of {list(BACKENDS[1:])} here")
    w = resolve_workers(backend, workers)
    if address and backend != "ray":
        raise ConfigError("--ray-address applies only with --backend ray")
    if split not in WORK_SPLITS:
        raise ConfigError(f"--split {split!r} is unknown; choose one of {list(WORK_SPLITS)}")
    if backend != "local":
        return make_evaluator(backend, problem, calib, loss=loss, naive=naive, workers=w, address=address,
                              factory=factory, estimator=estimator, mechanism=mechanism, split=split)
    if (mechanism or problem.mechanism) in PEER_MECHANISMS:
        raise ConfigError(f"mechanism {mechanism!r} is searched in-process only (--backend inprocess)")
    if factory is None:
        factory = problem.replica()
    return LocalEvaluator(factory, calib, loss=loss, workers=w, prefix_sharing=not naive, estimator=estimator,
                          split=split)


def search_scheme(scheme: str, losses: Callable[[Sequence[Sequence[int]]], list[float]], cfg: SearchConfig, *,
               workers: int, sa_batch: int = 1, init: Sequence[int] | None = None,
               checkpoint: str | Path | None = None, resume: bool = False, digest: str = "",
               progress: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """One budget's mask search with ``scheme`` (``tempering`` over ``workers`` proposals per round, or
    ``sequential`` with ``sa_batch`` speculative proposals per call)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--scheme {scheme!r} is unknown; choose one of {list(SCHEMES)}")
    if scheme == "sequential":
        return search(losses, cfg, init=init, checkpoint=checkpoint, resume=resume, digest=digest,
                      progress=progress, on_step=on_step, sa_batch=sa_batch)
    return search_tempering(losses, cfg, TemperingConfig(workers=workers), init=init, checkpoint=checkpoint,
                            resume=resume, digest=digest, progress=progress, on_step=on_step)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend``, ``--workers``, ``--scheme`` and ``--ray-address`` on a sub-parser."""
    g = p.add_argument_group("evaluation backend and parallel search")
    g.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="where masks are scored: auto (default: local worker processes for tinyflow, this process "
                        "for a --pipeline; with --mechanism auto, TaylorSeer's schedule is searched in this process "
                        "at the same time as budcache's on the workers), inprocess (this process, one thread), "
                        "local (worker processes, one thread each) or ray (actors)")
    g.add_argument("--workers", type=int, default=None,
                   help="workers W (default: every core for local, 1 for ray); the policy is fixed by the seed and "
                        "W (with --scheme tempering, or the item split's rounding): give it to reproduce a search "
                        "on another machine")
    g.add_argument("--scheme", default="sequential", choices=list(SCHEMES),
                   help="sequential (default: the paper's annealing; with --split masks the same policy whatever "
                        "the workers) or tempering (W proposals per round, one per group with --split hybrid; "
                        "replica exchange with block shifts, then hill climbing)")
    g.add_argument("--split", default="auto", choices=list(WORK_SPLITS),
                   help="how local workers or Ray actors share the work: items (each worker scores every mask on its "
                        "share of the calibration pairs: a mask costs 1/W, no speculation), masks (whole masks per "
                        "worker, routed by prefix, W speculative proposals), hybrid (masks routed across W/S groups, "
                        "each group's S workers splitting the pairs; S the largest divisor of W up to the pairs) or "
                        "auto (default: items while W <= calibration pairs, else hybrid, else masks)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto or HOST:6379); default: start a local one")


def backend_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The backend options of parsed arguments, as keyword arguments of :func:`budcache.search.job.run_search`."""
    return {"backend": a.backend, "workers": a.workers, "ray_address": a.ray_address, "scheme": a.scheme,
            "split": a.split}
