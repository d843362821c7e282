"""Local backend: W worker processes on this machine, one model replica and one torch thread each.

The driver (this process) runs the search; every request for losses is split
across the workers at once. Each worker is a process (forked from a clean
server that has the model stack imported, else spawned: :mod:`budcache.search.procs`) holding a
replica built by the Ray backend's recipes (:class:`~budcache.problems.TinyflowReplica`,
:class:`~budcache.problems.Shipped`) and a local
:class:`~budcache.search.distributed.EvalWorker` (an evaluator with its own
prefix store), with one torch thread, on aligned weights and data (see
:mod:`budcache.search.distributed`).

Three ways to share the work (``split``, :data:`WORK_SPLITS`):

- ``items`` (the default while W <= C): worker ``w`` holds a contiguous share
  of the C calibration items and scores every requested mask on it, returning
  per-item losses; the driver averages them in item order (float32, as one
  batch's mean is taken). A mask then costs about ``ceil(C / W)`` item
  evaluations of critical path instead of C, the sequential annealing needs no
  speculation, and prefix sharing works in every worker (each stores its
  items' states for every prefix). The losses equal the in-process ones bit
  for bit where the model's kernels give a row the same bits whatever the
  batch size, as one-thread CPU kernels do on the project's machine (tested);
  elsewhere they are fixed by the worker count.
- ``masks``: each mask runs on one worker as its own batch of all C items (the
  in-process losses bit for bit); the driver remembers which mask prefixes
  each worker has run and routes (:func:`route`) a new mask to the worker
  holding its longest prefix, each worker taking at most ``ceil(n / W)`` of a
  request's ``n`` masks, visited in sorted order so that masks sharing a
  prefix land together. Routing changes only the cost, never a loss; the
  annealing speculates on ``W`` proposals per request.
- ``hybrid`` (the default when W > C): ``G = W / S`` groups of ``S`` workers
  (S the largest divisor of W up to C); masks are routed across the groups
  as the mask split routes them across workers, and the S workers of a group
  score its masks on their item shares as the item split does (worker ``w``:
  group ``w // S``, share ``w % S``). The annealing speculates on G proposals
  per request and tempering draws G per round, each costing about ``C / S``
  items of critical path. With the paper's two calibration pairs, W = 8 runs
  as 4 x 2 and W = 32 as 16 x 2.

Faults: a worker that dies (killed, out of memory) is replaced by a fresh
process and its chunk sent again, up to ``max_retries`` times per request; a
budcache error inside a worker (e.g. NaN or Inf from the model, naming the mask
and the step) is raised again in the driver with the same type, message,
``step`` and ``computes``. Workers exit when the driver goes away (their pipe
closes), so a killed driver leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import BudcacheError, ConfigError, ModelOutputError
from ..problems.data import CalibrationSet
from .distributed import EvalWorker, SplitLayout, WorkerError, merge_item_replies
from .evaluator import EvaluatorStats, check_computes, mask_of, memoised, plan_of
from .losses import LossFn, latent_mse
from .procs import worker_context

Compute = tuple[int, ...]
Mask = tuple[bool, ...]


def default_workers() -> int:
    """The cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def route(todo: Sequence[Compute], steps: int, held: list[set[Any]],
          key: Callable[[Compute], tuple[Any, ...]] | None = None) -> list[list[Compute]]:
    """One chunk per worker: each mask to the worker holding its longest prefix, at most ``ceil(n / W)`` each.

    ``held[w]`` holds the prefixes worker ``w`` has run (updated here with the
    assigned masks' prefixes); ``key(item)`` is the per-step row whose prefixes
    the workers store (default: the boolean mask of a compute set; a plan is its
    own row). Items are visited in the order of
    :func:`~budcache.search.distributed.split_chunks` (sorted, shared prefixes
    together); ties go to the least-loaded, then lowest-numbered worker.
    Deterministic.
    """
    row = key or (lambda k: mask_of(steps, k))
    workers = len(held)
    order = sorted(todo, key=row, reverse=True)
    cap = -(-len(order) // workers) if order else 0
    chunks: list[list[Compute]] = [[] for _ in range(workers)]
    for k in order:
        m = row(k)
        w = max((w for w in range(workers) if len(chunks[w]) < cap),
                key=lambda w, m=m: (_depth(m, held[w]), -len(chunks[w]), -w))
        chunks[w].append(k)
        held[w].update(m[:j] for j in range(1, len(m)))
    return chunks


def _depth(mask: tuple[Any, ...], held: set[Any]) -> int:
    """Length of ``mask``'s longest proper prefix in ``held`` (0: none)."""
    j = len(mask) - 1
    while j > 0 and mask[:j] not in held:
        j -= 1
    return j


def _serve(conn: Connection, factory: Callable[[str], Any], calib: CalibrationSet, loss: LossFn,
           options: dict[str, Any]) -> None:
    """Worker process body: build the replica, then answer ``("losses" | "plans", chunk)`` until told to stop or
    orphaned. Ctrl-C is the driver's to handle (it keeps its checkpoint and stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = EvalWorker(factory, calib, loss, options)
        conn.send(("ok", worker.info()))
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        conn.send(_failure(exc))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if msg[0] == "stop":
            return
        try:
            conn.send(("ok", worker.call(msg[0], msg[1])))
        except BaseException as exc:  # noqa: BLE001 - reported to the driver
            conn.send(_failure(exc))


def _failure(exc: BaseException) -> tuple[Any, ...]:
    """A picklable report of an exception raised in a worker."""
    if isinstance(exc, BudcacheError):
        return ("error", type(exc).__name__, str(exc), getattr(exc, "step", None), getattr(exc, "computes", None))
    return ("crash", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:])


def _reraise(slot: int, reply: tuple[Any, ...]) -> BaseException:
    """The driver-side exception of a worker's failure report."""
    if reply[0] == "error":
        kinds = {"ModelOutputError": ModelOutputError, "ConfigError": ConfigError}
        err = kinds.get(reply[1], WorkerError)(reply[2])
        if reply[3] is not None or reply[4] is not None:
            err.step, err.computes = reply[3], reply[4]  # type: ignore[attr-defined]
        return err
    return WorkerError(f"local worker {slot} failed:\n{reply[1]}")


class _Slot:
    """One worker process and the driver's end of its pipe."""

    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


class LocalEvaluator(SplitLayout):
    """Drop-in for :class:`~budcache.search.evaluator.Evaluator` whose masks are scored by local worker processes.

    Args:
        factory: ``factory(device) -> problem`` builds the replica in each worker
            (:class:`~budcache.problems.TinyflowReplica`, or
            :class:`~budcache.problems.Shipped` around a picklable problem).
        calib: the calibration set with its teacher outputs.
        loss: per-item loss (a module-level function: it is pickled to the workers).
        workers: W worker processes (default: every core this process may use).
        split: how the workers share a request (:data:`WORK_SPLITS`): ``items`` gives each worker a contiguous
            share of the calibration items and sends it every mask (a mask costs about 1/W of its one-process
            time, nothing is speculated, and the search runs as in-process: the per-item losses are averaged
            in item order, in float32, as one batch's are); ``masks`` sends each worker whole masks (each on
            all items), routed to the worker holding the longest prefix, with ``sa_batch = W`` speculative
            annealing proposals per request; ``hybrid`` routes masks across ``W / S`` groups whose ``S`` workers
            split the items; ``auto`` (default): ``items`` when ``W <= C``, else ``hybrid`` where some
            ``S >= 2`` divides W, else ``masks``.
        prefix_sharing, max_state_bytes, estimator: the workers' evaluator settings.
        threads: torch threads per worker (1: bit-reproducible losses, one core each).
        max_retries: replacements of a dead worker per request before a :class:`WorkerError`.
        start_timeout: seconds a worker may take to start (import torch, build its replica).
    """

    def __init__(self, factory: Callable[[str], Any], calib: CalibrationSet, *, loss: LossFn = latent_mse,
                 workers: int | None = None, prefix_sharing: bool = True, max_state_bytes: int = 2 * 2**30,
                 threads: int = 1, estimator: str | None = None, max_retries: int = 3,
                 start_timeout: float = 600.0, split: str = "auto") -> None:
        workers = default_workers() if workers is None else workers
        if type(workers) is not int or workers < 1:
            raise ConfigError(f"--workers must be an integer >= 1 (got {workers!r})")
        if type(threads) is not int or threads < 1:
            raise ConfigError(f"threads per worker must be >= 1 (got {threads})")
        if calib.teacher is None:
            raise ConfigError("the calibration set has no teacher outputs; build it with make_calibration")
        self.workers = workers
        self._set_layout(split, workers, len(calib))
        self.estimator = estimator  # the workers' masks use it; per-step estimators are refined in-process
        self.calib = calib
        self.max_retries = max_retries
        self.start_timeout = start_timeout
        self.memo: dict[Compute, float] = {}
        self.plan_memo: dict[tuple[int, ...], float] = {}
        self.stats = EvaluatorStats()
        self.restarts = 0
        opts = {"prefix_sharing": prefix_sharing, "batch_candidates": False, "max_batch": 512,
                "max_state_bytes": max_state_bytes, "threads": threads, "estimator": estimator,
                "keep_items": self.split != "masks"}
        self._ctx = worker_context()
        self._args = [(factory, calib if self.split == "masks" else calib.items(a, b), loss, opts)
                      for a, b in self.shares]
        self.slots: list[_Slot] = []
        self.held: list[set[Mask]] = [set() for _ in range(self.groups)]  # prefixes each group has run
        try:
            self.slots = [_Slot(self._ctx, self._args[i]) for i in range(workers)]
            infos = [self._started(i) for i in range(workers)]
        except BaseException:
            self.close()
            raise
        self.pids = [i["pid"] for i in infos]
        self.steps = infos[0]["steps"]

    # -- Evaluator interface -------------------------------------------------------------
    def loss_of(self, compute: Sequence[int]) -> float:
        return self.losses([compute])[0]

    def losses(self, computes: Sequence[Sequence[int]]) -> list[float]:
        """Losses of several compute sets; unknown ones are scored by all workers at once."""
        row = None if self.estimator is None else (lambda k: plan_of(self.steps, k, self.estimator))
        return memoised(self.memo, check_computes(computes, self.steps), self.stats,
                        lambda todo: self._score(todo, self.memo, "losses", row))

    def plan_losses(self, plans: Sequence[Sequence[int]]) -> list[float]:
        """Losses of plans (per-step estimators; needs ``estimator``), scored by all workers at once."""
        if self.estimator is None:
            raise ConfigError("plan_losses needs an evaluator built with an estimator")
        keys = [tuple(int(c) for c in p) for p in plans]
        return memoised(self.plan_memo, keys, self.stats,
                        lambda todo: self._score(todo, self.plan_memo, "plans", tuple))

    def close(self) -> None:
        """Stop the worker processes."""
        for s in self.slots:
            s.stop()
        self.slots = []

    def __enter__(self) -> LocalEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- internals -----------------------------------------------------------------------
    def _score(self, todo: list[Compute], memo: dict[Compute, float], kind: str,
               row: Callable[[Compute], tuple[Any, ...]] | None) -> None:
        """Route ``todo`` to the workers, score it (``kind``: losses or plans) and fill ``memo``."""
        chunks = route(todo, self.steps, self.held, row) if self.groups > 1 else [todo]
        if self.split != "masks":  # every worker of a group scores the group's keys on its items; averaged here
            s = self.per_group
            replies = self._gather({w: chunks[w // s] for w in range(self.workers) if chunks[w // s]},
                                   "items" if kind == "losses" else "item_plans")
            for g, chunk in enumerate(chunks):
                if chunk:
                    merge_item_replies(chunk, [replies[g * s + j] for j in range(s)], memo, self.stats)
            return
        replies = self._gather({w: c for w, c in enumerate(chunks) if c}, kind)
        for w, (vals, work) in replies.items():
            for k, v in zip(chunks[w], vals):
                memo[k] = v
            for f in ("evaluations", "item_evaluations", "stack_calls", "steps_run"):
                setattr(self.stats, f, getattr(self.stats, f) + work[f])

    def _started(self, i: int) -> dict[str, Any]:
        """Wait for worker ``i``'s start report."""
        s = self.slots[i]
        if not s.conn.poll(self.start_timeout):
            raise WorkerError(f"local worker {i} did not start within {self.start_timeout:g} s")
        try:
            reply = s.conn.recv()
        except (EOFError, OSError):
            raise WorkerError(f"local worker {i} died while starting (exit code {s.proc.exitcode})") from None
        if reply[0] != "ok":
            raise _reraise(i, reply)
        return reply[1]

    def _replace(self, i: int) -> None:
        """A fresh worker in slot ``i`` (the old one died); its prefix store starts empty."""
        self.restarts += 1
        old = self.slots[i]
        if old.proc.is_alive():
            old.proc.kill()
        old.proc.join(5)
        old.conn.close()
        self.slots[i] = _Slot(self._ctx, self._args[i])
        self.held[i // self.per_group] = set()  # its group no longer holds all its prefixes
        self._started(i)

    def _gather(self, jobs: dict[int, list[Compute]], kind: str = "losses") -> dict[int, Any]:
        """Send each worker its chunk and collect the replies, replacing and retrying a worker that dies."""
        results: dict[int, Any] = {}
        tries = dict.fromkeys(jobs, 0)
        pending: dict[int, list[Compute]] = {}

        def send(w: int) -> None:
            try:
                self.slots[w].conn.send((kind, jobs[w]))
            except (OSError, ValueError):
                pass  # dead already: its sentinel fires below
            pending[w] = jobs[w]

        for w in jobs:
            send(w)
        error: BaseException | None = None
        while pending:
            by_conn = {self.slots[w].conn: w for w in pending}
            by_sentinel = {self.slots[w].proc.sentinel: w for w in pending}
            ready = wait([*by_conn, *by_sentinel])
            for r in ready:
                w = by_conn.get(r, by_sentinel.get(r))  # type: ignore[arg-type]
                if w not in pending:
                    continue
                s = self.slots[w]
                reply = None
                if s.conn.poll():
                    try:
                        reply = s.conn.recv()
                    except (EOFError, OSError):
                        reply = None
                if reply is None and s.proc.is_alive():
                    s.proc.join(0.05)  # woken by the pipe closing before the process ends: wait for the sentinel
                    continue
                pending.pop(w)
                if reply is None:  # the worker died
                    tries[w] += 1
                    if tries[w] > self.max_retries:
                        error = error or WorkerError(
                            f"local worker {w} died and {tries[w] - 1} replacement(s) did not help (exit code "
                            f"{s.proc.exitcode})")
                        continue
                    self._replace(w)
                    send(w)
                elif reply[0] == "ok":
                    results[w] = reply[1]
                else:
                    error = error or _reraise(w, reply)
        if error is not None:
            raise error
        return results


def make_local_evaluator(factory: Callable[[str], Any], calib: CalibrationSet, **kw: Any) -> LocalEvaluator:
    """A :class:`LocalEvaluator` (``kw`` as its arguments); a ConfigError names a bad worker count."""
    w = kw.get("workers")
    if w is not None and (type(w) is not int or w < 1 or w > 4096):
        raise ConfigError(f"--workers must be an integer in 1..4096 (got {w!r})")
    return LocalEvaluator(factory, calib, **kw)

