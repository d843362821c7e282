"""Ray backend for the search's evaluator: one model replica per worker actor.

The driver runs annealing and hill climbing (:func:`budcache.search.anneal.search`)
and sends every request for losses out at once: with the item split (the
default while W <= C) every actor gets every unknown mask and scores it on its
share of the calibration items; with the mask split the masks still unknown are
sorted (so masks sharing a prefix land on the same worker) and cut into at most
``workers`` contiguous chunks, one per actor. Each actor holds its own replica
of the problem (one GPU each where the cluster has GPUs, else CPU threads) and a
local :class:`~budcache.search.evaluator.Evaluator`, so prefix sharing (a new
mask resumes from the worker's stored state of its longest known prefix) works
inside every worker.

Same seed, same policy, whatever the backend and worker count, with the mask
split (the item split's policy is fixed by the seed and W):

- a mask's loss does not depend on which worker or batch evaluated it: both
  backends score every mask as its own batch of the C calibration items
  (``batch_candidates=False``; prefix sharing stays on) with a fixed thread
  count (``threads=1`` by default) on weights and data aligned alike (see
  :func:`align_weights`), so each model call has the same shapes, row
  positions and memory alignment wherever it runs (verified bit for bit by
  ``tests/test_ray.py``; batching candidates together would let the kernels
  round differently for other batch shapes). On GPUs, equal bits also need
  the same GPU model and library versions on every worker;
- SA stays sequential: with the mask split the driver scores
  ``sa_batch = workers`` proposals per round trip, speculating that each is
  rejected, and replays them with the real random generator (see
  :mod:`budcache.search.anneal`), so the accepted moves are exactly those of
  the in-process search; with the item split (``split="items"``, the default
  while W <= C) every actor scores each proposal on its share of the
  calibration items and nothing is speculated (the losses are then fixed by
  W: see :class:`~budcache.search.local.LocalEvaluator`);
- a worker that dies (killed, out of memory, node lost) is replaced by a fresh
  actor and its chunk is sent again, up to ``max_retries`` times per request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..errors import BudcacheError, ConfigError, require
from ..peers import PEER_MECHANISMS
from ..problems.data import CalibrationSet
from .evaluator import Evaluator, EvaluatorStats, PeerScheduleEvaluator, check_computes, mask_of, memoised
from .losses import LossFn, latent_mse, mean_of_items

BACKENDS = ("inprocess", "ray")


class WorkerError(BudcacheError, RuntimeError):
    """A Ray worker could not be started or kept dying; the message names the worker and the cause."""


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % ALIGN == 0


#: Byte alignment of every tensor a canonical evaluation reads (the CPU allocator's own alignment).
ALIGN = 64


def to_device(obj: Any, device: str) -> Any:
    """``obj`` with every tensor inside (dataclasses, dicts, lists, tuples) on ``device``, contiguous and
    aligned to :data:`ALIGN` bytes (copied only where needed)."""
    if torch.is_tensor(obj):
        t = obj.to(device)
        return t if _aligned(t) else t.clone(memory_format=torch.contiguous_format)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def align_weights(module: torch.nn.Module | None) -> int:
    """Re-allocate, in place and with equal values, every parameter or buffer of ``module`` that is not
    contiguous and :data:`ALIGN`-byte aligned; returns how many moved.

    CPU matrix kernels may round differently for data at other alignments, and
    loaders differ (a safetensors load can leave weights 8 bytes off; a
    pickled copy on a worker is aligned): canonical evaluation needs both
    sides aligned.
    """
    moved = 0
    if module is None:
        return moved
    for m in module.modules():
        for group in (m._parameters, m._buffers):
            for t in group.values():
                if t is not None and not _aligned(t):
                    t.data = t.data.clone(memory_format=torch.contiguous_format)
                    moved += 1
    return moved


#: How W workers share the work (``--split``): ``items`` (every worker scores every mask on its own share of
#: the calibration items), ``masks`` (each worker scores whole masks, routed by prefix), ``hybrid`` (masks
#: routed across ``G`` groups, each group's ``S`` workers scoring them on their shares of the items; ``W = G x S``),
#: ``auto`` (:func:`resolve_split`).
WORK_SPLITS = ("auto", "items", "masks", "hybrid")


def hybrid_shares(workers: int, items: int) -> int:
    """``S`` of the hybrid split: the largest divisor of W that is at most C (1: no item split possible)."""
    return max(s for s in range(1, min(workers, items) + 1) if workers % s == 0)


def resolve_split(split: str, workers: int, items: int) -> str:
    """The split ``split`` comes to with W workers and C calibration items.

    ``auto``: ``items`` while ``W <= C``, else ``hybrid`` where some ``S >= 2``
    divides W (:func:`hybrid_shares`), else ``masks``. ``hybrid`` comes to
    ``items`` when ``W <= C`` and to ``masks`` when no such S exists (the same
    layouts). A ConfigError names an unknown split or an item split with more
    workers than items.
    """
    if split not in WORK_SPLITS:
        raise ConfigError(f"--split {split!r} is unknown; choose one of {list(WORK_SPLITS)}")
    if split == "items" and workers > items:
        raise ConfigError(f"--split items needs at most one worker per calibration item ({workers} workers, "
                          f"{items} items); use fewer --workers, --split hybrid or --split masks")
    if split in ("auto", "hybrid"):
        if workers <= items:
            return "items"
        return "hybrid" if hybrid_shares(workers, items) > 1 else "masks"
    return split


def split_layout(split: str, workers: int, items: int) -> tuple[int, int]:
    """``(G, S)`` of a resolved split: G proposal groups of S workers, each worker of a group holding one of
    S item shares (``items``: ``(1, W)``, ``masks``: ``(W, 1)``, ``hybrid``: ``(W / S, S)``)."""
    s = {"items": workers, "masks": 1, "hybrid": hybrid_shares(workers, items)}[split]
    return workers // s, s


class SplitLayout:
    """Where each of W workers stands under a resolved split (one definition for local workers and Ray actors).

    Worker ``w`` is in group ``w // S`` and holds item share ``w % S``; a group
    scores each proposal on all its workers at once, so the annealing speculates
    on ``sa_batch = G`` proposals per request. ``proposals`` is tempering's W:
    one per group with the hybrid split, W otherwise.
    """

    split: str
    groups: int
    per_group: int
    shares: list[tuple[int, int]]
    sa_batch: int
    proposals: int

    def _set_layout(self, split: str, workers: int, items: int) -> None:
        self.split = resolve_split(split, workers, items)
        self.groups, self.per_group = split_layout(self.split, workers, items)
        shares = item_shares(items, self.per_group)
        self.shares = [shares[w % self.per_group] for w in range(workers)]
        self.sa_batch = self.groups
        self.proposals = self.groups if self.split == "hybrid" else workers


def item_shares(items: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ranges ``[start, stop)`` of ``items`` calibration items, one per worker, sizes within one."""
    return [(j * items // workers, (j + 1) * items // workers) for j in range(workers)]


def merge_item_replies(keys: Sequence[tuple[int, ...]], replies: Sequence[tuple[list[list[float]], dict[str, Any]]],
                       memo: dict[tuple[int, ...], float], stats: EvaluatorStats) -> None:
    """Fill ``memo`` from an item split's replies (one per worker, in share order: per-item losses of every key
    and the work done) with :func:`~budcache.search.losses.mean_of_items`; count each key once in ``stats``
    and the workers' work summed."""
    for j, k in enumerate(keys):
        memo[k] = mean_of_items([r[0][j] for r in replies])
    stats.evaluations += len(keys)
    for f in ("item_evaluations", "stack_calls", "steps_run"):
        setattr(stats, f, getattr(stats, f) + sum(r[1][f] for r in replies))


# ------------------------------------------------------------------------------ worker
class EvalWorker:
    """Ray actor body: one replica of the problem and a local evaluator (prefix sharing, batching)."""

    def __init__(self, factory: Callable[[str], Any], calib: CalibrationSet, loss: LossFn,
                 options: dict[str, Any]) -> None:
        torch.set_num_threads(options["threads"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        problem = factory(self.device)
        align_weights(problem.transformer)
        with torch.no_grad():
            self.evaluator = Evaluator(problem.make_sampler, to_device(calib, self.device), loss=loss, **options)

    def info(self) -> dict[str, Any]:
        """Process id, device, thread count and step count of this worker."""
        return {"pid": os.getpid(), "device": self.device, "threads": torch.get_num_threads(),
                "steps": self.evaluator.steps}

    def losses(self, computes: list[tuple[int, ...]]) -> tuple[list[float], dict[str, Any]]:
        """Losses of ``computes`` and the work this call did (evaluator stats delta)."""
        return self.call("losses", computes)

    def call(self, kind: str, keys: list[tuple[int, ...]]) -> tuple[list[Any], dict[str, Any]]:
        """The evaluator's ``kind`` (:data:`WORKER_CALLS`) of ``keys``, and the work this call did."""
        if kind not in WORKER_CALLS:
            raise ConfigError(f"unknown worker call {kind!r}; one of {list(WORKER_CALLS)}")
        before = asdict(self.evaluator.stats)
        with torch.no_grad():
            vals = getattr(self.evaluator, WORKER_CALLS[kind])(keys)
        after = asdict(self.evaluator.stats)
        return vals, {k: after[k] - before[k] for k in after}


#: What a worker answers: losses or per-item losses of compute sets or of plans (per-step estimators).
WORKER_CALLS = {"losses": "losses", "plans": "plan_losses", "items": "item_losses",
                "item_plans": "item_plan_losses"}


# ------------------------------------------------------------------------------ driver
def split_chunks(todo: Sequence[tuple[int, ...]], steps: int, workers: int) -> list[list[tuple[int, ...]]]:
    """At most ``workers`` contiguous, balanced chunks of ``todo`` sorted by mask (shared prefixes together)."""
    order = sorted(todo, key=lambda k: mask_of(steps, k), reverse=True)
    n = min(workers, len(order))
    bounds = [round(j * len(order) / n) for j in range(n + 1)]
    return [order[bounds[j]:bounds[j + 1]] for j in range(n)]


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (or the one already joined), else start a local one.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    ray = require("ray", "ray")
    if ray.is_initialized():
        return False
    import logging

    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at --ray-address {address!r}: {exc}") from None
        return True
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    return True


class RayEvaluator(SplitLayout):
    """Drop-in for :class:`~budcache.search.evaluator.Evaluator` whose masks are scored by Ray actors.

    ``factory(device) -> problem`` builds one replica per actor (a problem's
    :meth:`~budcache.problems.Problem.replica` recipe); the problem's
    ``make_sampler`` and ``calib`` define the loss as in the in-process
    evaluator. ``threads`` per worker (torch threads, and the
    CPUs each actor reserves); ``gpus`` per worker (default: 1 when the
    cluster has GPUs, else 0); ``split``: ``items`` (each actor holds a share
    of the calibration items and scores every mask), ``masks`` (whole masks
    per actor), ``hybrid`` (masks cut across ``W / S`` groups of actors, each
    group's S actors splitting the items) or ``auto`` (items while W <= C, else
    hybrid, else masks), as for :class:`~budcache.search.local.LocalEvaluator`.
    """

    def __init__(self, factory: Callable[[str], Any], calib: CalibrationSet, *, loss: LossFn = latent_mse,
                 workers: int = 1, address: str | None = None, prefix_sharing: bool = True,
                 batch_candidates: bool = False, max_batch: int = 512, max_state_bytes: int = 2 * 2**30,
                 threads: int = 1, gpus: float | None = None, max_retries: int = 3,
                 estimator: str | None = None, split: str = "auto") -> None:
        if type(workers) is not int or workers < 1:
            raise ConfigError(f"--workers must be an integer >= 1 (got {workers!r})")
        if calib.teacher is None:
            raise ConfigError("the calibration set has no teacher outputs; build it with make_calibration")
        if type(threads) is not int or threads < 1:
            raise ConfigError(f"threads per worker must be >= 1 (got {threads})")
        self._ray = require("ray", "ray")
        self._started = connect(address, num_cpus=None if address else max(os.cpu_count() or 1, workers * threads))
        self.workers = workers
        self.estimator = estimator  # the workers' masks use it; per-step estimators are refined in-process
        self._set_layout(split, workers, len(calib))
        self.max_retries = max_retries
        self.calib = calib
        self.memo: dict[tuple[int, ...], float] = {}
        self.stats = EvaluatorStats()
        self.restarts = 0
        self.actors: list[Any] = []
        try:
            res = self._ray.cluster_resources()
            self.gpus = float(gpus) if gpus is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
            self.threads = threads
            need = {"GPU": workers * self.gpus} if self.gpus else {"CPU": workers * threads}
            for kind, n in need.items():
                if n > res.get(kind, 0):  # actors would wait forever for resources that do not exist
                    raise ConfigError(f"{workers} workers need {n:g} {kind}s but the Ray cluster has "
                                      f"{res.get(kind, 0):g}; use fewer --workers")
            opts = {"prefix_sharing": prefix_sharing, "batch_candidates": batch_candidates, "max_batch": max_batch,
                    "max_state_bytes": max_state_bytes, "threads": threads, "estimator": estimator,
                    "keep_items": self.split != "masks"}
            fac = self._ray.put(factory)
            whole = self._ray.put(calib) if self.split == "masks" else None
            self._args = [(fac, whole if whole is not None else self._ray.put(calib.items(a, b)), loss, opts)
                          for a, b in self.shares]
            self._actor_cls = self._ray.remote(EvalWorker)
            self.actors = [self._new_actor(i) for i in range(workers)]
            infos = [self._call(i, lambda a: a.info.remote(), retry=False) for i in range(workers)]
        except BaseException:
            self.close()
            raise
        self.devices = [i["device"] for i in infos]
        self.steps = infos[0]["steps"]

    # -- Evaluator interface -------------------------------------------------------------
    def loss_of(self, compute: Sequence[int]) -> float:
        return self.losses([compute])[0]

    def losses(self, computes: Sequence[Sequence[int]]) -> list[float]:
        """Losses of several compute sets; unknown ones are scored by all workers at once."""
        def score(todo: list[tuple[int, ...]]) -> None:
            if self.split != "masks":  # each group's actors score its masks on their items; averaged here
                s = self.per_group
                chunks = split_chunks(todo, self.steps, self.groups) if self.groups > 1 else [todo]
                jobs = [(g * s + j, (lambda a, c=c: a.call.remote("items", c)))
                        for g, c in enumerate(chunks) for j in range(s)]
                replies = self._gather(jobs, retry=True)
                for g, c in enumerate(chunks):
                    merge_item_replies(c, replies[g * s:(g + 1) * s], self.memo, self.stats)
                return
            chunks, replies = self._scatter(todo)
            for chunk, (vals, work) in zip(chunks, replies):
                for k, v in zip(chunk, vals):
                    self.memo[k] = v
                for f in ("evaluations", "item_evaluations", "stack_calls", "steps_run"):
                    setattr(self.stats, f, getattr(self.stats, f) + work[f])

        return memoised(self.memo, check_computes(computes, self.steps), self.stats, score)

    def close(self) -> None:
        """Stop the workers, and Ray itself when this evaluator started it."""
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _new_actor(self, i: int) -> Any:
        opts: dict[str, Any] = {"num_cpus": self.threads if not self.gpus else 1, "num_gpus": self.gpus}
        return self._actor_cls.options(**opts).remote(*self._args[i])

    def _replace(self, i: int) -> None:
        """A fresh actor in slot ``i`` (the old one is dead or unreachable)."""
        self.restarts += 1
        try:
            self._ray.kill(self.actors[i])
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[i] = self._new_actor(i)

    def _call(self, i: int, submit: Callable[[Any], Any], retry: bool = True) -> Any:
        """``submit(actor_i)`` and wait, replacing the actor and retrying when it dies."""
        return self._gather([(i, submit)], retry)[0]

    def _scatter(self, todo: list[tuple[int, ...]]) -> tuple[list[list[tuple[int, ...]]], list[Any]]:
        """Send one chunk of ``todo`` to each worker and collect the replies."""
        chunks = split_chunks(todo, self.steps, self.workers)
        jobs = [(j, (lambda a, c=c: a.losses.remote(c))) for j, c in enumerate(chunks)]
        return chunks, self._gather(jobs, retry=True)

    def _gather(self, jobs: list[tuple[int, Callable[[Any], Any]]], retry: bool) -> list[Any]:
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        results: list[Any] = [None] * len(jobs)
        tries = [0] * len(jobs)
        pending = {jobs[j][1](self.actors[jobs[j][0]]): j for j in range(len(jobs))}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            j = pending.pop(ready[0])
            slot = jobs[j][0]
            try:
                results[j] = ray.get(ready[0])
            except RayTaskError as exc:  # an error raised by budcache inside the worker: the worker's own
                cause = getattr(exc, "cause", None)
                if isinstance(cause, BudcacheError):
                    raise cause from None
                raise WorkerError(f"Ray worker {slot} failed: {exc}") from None
            except RayActorError as exc:  # the worker died (killed, crashed, node lost)
                tries[j] += 1
                if not retry or tries[j] > self.max_retries:
                    raise WorkerError(f"Ray worker {slot} died and {tries[j] - 1} replacement(s) did not help: "
                                      f"{exc}") from None
                self._replace(slot)
                pending[jobs[j][1](self.actors[slot])] = j
        return results


# ------------------------------------------------------------------------------ entry points
def make_evaluator(backend: str, problem: Any, calib: CalibrationSet, *, loss: LossFn = latent_mse,
                   naive: bool = False, workers: int = 1, address: str | None = None,
                   factory: Callable[[str], Any] | None = None, threads: int = 1,
                   estimator: str | None = None, mechanism: str | None = None, split: str = "auto") -> Any:
    """The evaluator of a backend: ``inprocess`` (default) or ``ray`` (``workers`` actors; ``factory(device)``
    builds a replica on each, default: ``problem.replica()``).

    Both score masks in canonical batches with ``threads`` torch threads, so a
    mask's loss is the same bits whichever backend, worker or call scored it;
    ``naive`` also turns prefix sharing off. ``estimator`` (a name of
    :mod:`budcache.estimators`) fills the masks' skipped steps and enables
    plans (per-step estimators) in-process; ``split`` says how Ray actors share the work (see
    :class:`~budcache.search.local.LocalEvaluator`); a problem whose mechanism is a
    peer's (``taylorseer``) is scored by
    :class:`~budcache.search.evaluator.PeerScheduleEvaluator` (in-process only)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is unknown; choose one of {list(BACKENDS)}")
    mechanism = mechanism or problem.mechanism
    peer = mechanism in PEER_MECHANISMS
    if backend == "inprocess":
        if workers != 1 or address:
            raise ConfigError("--workers and --ray-address apply only with --backend ray")
        if split != "auto":
            raise ConfigError("--split applies only with workers (--backend local or ray)")
        align_weights(problem.transformer)
        if peer:
            return PeerScheduleEvaluator(problem.make_sampler, to_device(calib, str(calib.noise.device)),
                                         mechanism=mechanism, loss=loss, threads=threads, prefix_sharing=not naive)
        return Evaluator(problem.make_sampler, to_device(calib, str(calib.noise.device)), loss=loss,
                         prefix_sharing=not naive, batch_candidates=False, threads=threads, estimator=estimator)
    if peer:
        raise ConfigError(f"mechanism {mechanism!r} is searched in-process only (--backend inprocess)")
    if factory is None:  # the problem says how to rebuild itself on a worker (e.g. from a model path)
        factory = problem.replica()
    return RayEvaluator(factory, calib, loss=loss, workers=workers, address=address, prefix_sharing=not naive,
                        batch_candidates=False, threads=threads, estimator=estimator, split=split)
