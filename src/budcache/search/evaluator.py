"""Scores many cache masks fast, exactly as one-by-one evaluation would.

Three savings, all exact:

- **memo**: the loss of a compute set is computed once;
- **prefix sharing**: two masks equal on steps ``0..j-1`` have identical
  trajectories up to step ``j``; sampler states are kept at every step of
  every evaluated mask (an LRU store), and a new mask resumes from its longest
  stored prefix instead of step 0;
- **batching**: candidates resuming from the same state run as one batch
  (``candidates x items`` elements, one mask row each); on a step, only the
  elements that compute run the block stack.

A peer's schedule (:class:`PeerScheduleEvaluator`) gets the memo and prefix
sharing: its states carry a copy of the peer hooks' state.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import estimators as est
from ..errors import ConfigError, ModelOutputError
from ..problems.data import CalibrationSet
from ..sampler import Sampler, SamplerState, StaticMask, map_state, slice_state, tile_cond, tile_state
from .losses import LossFn, latent_mse

#: A mask (True computes) or, with per-step estimators, a plan (0 computes, c > 0 skips with estimator c).
Mask = tuple[bool, ...]
Plan = tuple[int, ...]


def plan_of(steps: int, compute: Sequence[int], estimator: str | Sequence[str]) -> Plan:
    """The plan of a compute set whose skipped steps use ``estimator`` (one name, or one per skipped step)."""
    s = set(int(c) for c in compute)
    skipped = [k for k in range(steps) if k not in s]
    names = [estimator] * len(skipped) if isinstance(estimator, str) else list(estimator)
    if len(names) != len(skipped):
        raise ConfigError(f"{len(names)} estimator names for {len(skipped)} skipped steps")
    out = [est.COMPUTE] * steps
    for k, n in zip(skipped, names):
        out[k] = est.CODES[est.get(n).name]
    return tuple(out)


def plan_names(plan: Plan) -> tuple[str, ...]:
    """Estimator names of a plan's skipped steps, ascending."""
    return tuple(est.NAMES[c] for c in plan if c != est.COMPUTE)


def mask_of(steps: int, compute: Sequence[int]) -> Mask:
    """Boolean mask (N,) of a compute set."""
    s = set(int(c) for c in compute)
    return tuple(k in s for k in range(steps))


def compute_of(mask: Sequence[bool]) -> tuple[int, ...]:
    """Compute set of a boolean mask."""
    return tuple(k for k, m in enumerate(mask) if m)


def check_computes(computes: Sequence[Sequence[int]], steps: int) -> list[tuple[int, ...]]:
    """Sorted compute sets; a ConfigError names any set that is empty, misses step 0, repeats or overflows."""
    keys = [tuple(sorted(int(c) for c in comp)) for comp in computes]
    for k in keys:
        if not k or k[0] != 0 or k[-1] >= steps or len(set(k)) != len(k):
            raise ConfigError(f"compute set {list(k)} is invalid for {steps} steps "
                              "(step 0 must compute; indices in 0..N-1, unique)")
    return keys


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (``None``: as it is), restoring the count after.

    A fixed thread count fixes the kernels' reduction order, so a loss is the same bits on every call.
    """
    prev = torch.get_num_threads()
    if threads is not None and threads != prev:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


@dataclass
class EvaluatorStats:
    """Work counters: masks scored, model-side work, wall time."""

    evaluations: int = 0        # distinct masks actually run
    memo_hits: int = 0          # requests answered from the memo
    item_evaluations: int = 0   # (item, step) pairs that ran the full block stack
    stack_calls: int = 0        # batched model calls that ran the block stack
    steps_run: int = 0          # sampler steps taken (batched)
    wall_s: float = 0.0


def memoised(memo: dict[Any, float], keys: Sequence[Any], stats: EvaluatorStats,
             score: Callable[[list[Any]], None]) -> list[float]:
    """The values of ``keys`` from ``memo``; the missing ones are scored once each, in first-seen order, by
    ``score(todo)``, which fills ``memo``. Counts memo hits and the scoring's wall time in ``stats``."""
    todo = list(dict.fromkeys(k for k in keys if k not in memo))
    stats.memo_hits += len(keys) - len(todo)
    if todo:
        t0 = time.perf_counter()
        score(todo)
        stats.wall_s += time.perf_counter() - t0
    return [memo[k] for k in keys]


class PrefixStore:
    """Sampler states keyed by the mask (or plan) prefix that produced them, for prefix sharing.

    An LRU store of at most ``max_bytes`` bytes of tensors (at least one
    state is kept); :meth:`longest` gives a mask's longest stored prefix, or
    the start state. ``enabled=False`` stores nothing (every mask starts at
    step 0).
    """

    def __init__(self, start: SamplerState, steps: int, *, max_bytes: int, enabled: bool = True) -> None:
        self.start, self.steps, self.max_bytes, self.enabled = start, steps, max_bytes, enabled
        self.states: OrderedDict[tuple[Any, ...], SamplerState] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        return key in self.states

    def __len__(self) -> int:
        return len(self.states)

    def longest(self, mask: tuple[Any, ...]) -> tuple[tuple[Any, ...], SamplerState]:
        """``(prefix, state)``: the longest stored prefix of ``mask`` and its state (``()`` and the start)."""
        if self.enabled:
            for j in range(self.steps, 0, -1):
                st = self.states.get(mask[:j])
                if st is not None:
                    for i in range(1, j + 1):  # keep the whole path to this state fresh
                        if mask[:i] in self.states:
                            self.states.move_to_end(mask[:i])
                    return mask[:j], st
        return (), self.start

    def put(self, key: tuple[Any, ...], state: SamplerState) -> None:
        """Keep ``state`` under ``key`` (the oldest states leave once over ``max_bytes``)."""
        if not self.enabled or key in self.states:
            return
        self.states[key] = state
        self.bytes += _nbytes(state)
        while self.bytes > self.max_bytes and len(self.states) > 1:
            _, old = self.states.popitem(last=False)
            self.bytes -= _nbytes(old)


class Evaluator:
    """Loss of cache masks on a calibration set, through budcache's sampler.

    ``make_sampler(controller)`` builds the sampler (denoiser, sigmas, solver,
    mechanism, guidance) for a controller; the evaluator supplies one static
    mask row per element. ``threads`` fixes torch's thread count while
    scoring. Losses are bit-reproducible (independent of call order, grouping
    and worker) with ``batch_candidates=False`` and a fixed ``threads``: every
    mask then runs as its own batch of the C calibration items, so each model
    call has the same shape and row positions whatever else is scored; batched
    candidates share model calls, whose kernels may round differently for
    other batch shapes. A model output with NaN or Inf raises
    :class:`~budcache.errors.ModelOutputError` naming the step and the compute
    set(s) that produced it (attributes ``step`` and ``computes``).
    """

    #: SA proposals the search scores per call (1: no speculation; a parallel backend raises it).
    sa_batch: int = 1

    def __init__(self, make_sampler, calib: CalibrationSet, *, loss: LossFn = latent_mse,
                 prefix_sharing: bool = True, batch_candidates: bool = True, max_batch: int = 512,
                 max_state_bytes: int = 2 * 2**30, threads: int | None = None,
                 estimator: str | None = None, keep_items: bool = False) -> None:
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ConfigError(f"threads must be an integer >= 1 (got {threads!r})")
        if calib.teacher is None:
            raise ConfigError("the calibration set has no teacher outputs; build it with make_calibration")
        self.make_sampler = make_sampler
        self.calib = calib
        self.loss = loss
        self.prefix_sharing = prefix_sharing
        self.batch_candidates = batch_candidates
        self.max_batch = max(len(calib), max_batch)
        self.max_state_bytes = max_state_bytes
        self.threads = threads
        self.steps = make_sampler(None).steps
        self.memo: dict[tuple[int, ...], float] = {}
        self.plan_memo: dict[Plan, float] = {}
        # None: masks run with the sampler's own mechanism (version 1); a name: skipped steps of a compute
        # set use that estimator, and plans (per-step estimators) can be scored with plan_losses
        self.estimator = None if estimator is None else est.get(estimator).name
        self.stats = EvaluatorStats()
        # per-item losses of each scored mask or plan, kept for a driver that splits the items across workers
        self.keep_items = keep_items
        self.items: dict[tuple[int, ...], list[float]] = {}
        self._store = PrefixStore(make_sampler(None).start(calib.noise), self.steps, max_bytes=max_state_bytes,
                                  enabled=prefix_sharing)

    # -- public ------------------------------------------------------------------------
    def loss_of(self, compute: Sequence[int]) -> float:
        return self.losses([compute])[0]

    def close(self) -> None:
        """Release resources (nothing in-process; remote backends stop their workers)."""

    def losses(self, computes: Sequence[Sequence[int]]) -> list[float]:
        """Losses of several compute sets (evaluated together where possible)."""
        def score(todo: list[tuple[int, ...]]) -> None:
            with pinned_threads(self.threads):
                if self.estimator is None:
                    self._run([mask_of(self.steps, k) for k in todo])
                else:
                    plans = [plan_of(self.steps, k, self.estimator) for k in todo]
                    self._run([p for p in plans if p not in self.plan_memo])
                    for k, p in zip(todo, plans):
                        self.memo[k] = self.plan_memo[p]

        return memoised(self.memo, check_computes(computes, self.steps), self.stats, score)

    def plan_losses(self, plans: Sequence[Sequence[int]]) -> list[float]:
        """Losses of plans (per-step estimators, see :func:`plan_of`); needs an evaluator with ``estimator``."""
        if self.estimator is None:
            raise ConfigError("plan_losses needs an evaluator built with an estimator")
        keys = [tuple(int(c) for c in p) for p in plans]
        for p in keys:
            if len(p) != self.steps or p[0] != est.COMPUTE or not all(c == est.COMPUTE or c in est.NAMES for c in p):
                raise ConfigError(f"plan {list(p)} is invalid for {self.steps} steps")
        def score(todo: list[Plan]) -> None:
            with pinned_threads(self.threads):
                self._run(todo)

        return memoised(self.plan_memo, keys, self.stats, score)

    def item_losses(self, computes: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per-item losses (one list of C floats, in item order) of compute sets; needs ``keep_items``."""
        keys = check_computes(computes, self.steps)
        self.losses(keys)
        return [self._items(k if self.estimator is None else plan_of(self.steps, k, self.estimator)) for k in keys]

    def item_plan_losses(self, plans: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per-item losses of plans (see :meth:`plan_losses`); needs ``keep_items``."""
        keys = [tuple(int(c) for c in p) for p in plans]
        self.plan_losses(keys)
        return [self._items(k) for k in keys]

    # -- internals ---------------------------------------------------------------------
    def _items(self, key: tuple[int, ...]) -> list[float]:
        if not self.keep_items:
            raise ConfigError("per-item losses need an evaluator built with keep_items=True")
        return self.items[key]

    def _run(self, masks: list[Mask]) -> None:
        groups: dict[Mask, list[Mask]] = {}
        starts: dict[Mask, SamplerState] = {}
        for m in masks:
            key, st = self._store.longest(m)
            groups.setdefault(key, []).append(m)
            starts[key] = st
        c = len(self.calib)
        per_batch = max(1, self.max_batch // c) if self.batch_candidates else 1
        for key, ms in groups.items():
            for i in range(0, len(ms), per_batch):
                self._run_group(starts[key], ms[i:i + per_batch])

    def _run_group(self, start: SamplerState, masks: list[Mask]) -> None:
        c, r = len(self.calib), len(masks)
        if self.estimator is None:
            rows = torch.tensor(masks, dtype=torch.bool).repeat_interleave(c, 0)  # (r*C, N), candidate-major
            sampler: Sampler = self.make_sampler(StaticMask(rows))
        else:
            rows = torch.tensor(masks, dtype=torch.long).repeat_interleave(c, 0)
            sampler = self.make_sampler(StaticMask.from_plan(rows))
        state = tile_state(start, r) if r > 1 else start
        cond, uncond = tile_cond(self.calib.cond, r), tile_cond(self.calib.uncond, r)
        last_nfe = [state.nfe]
        at = [start.step]  # the step being taken (for error reports)

        def after_step(st: SamplerState) -> None:
            at[0] = st.step
            n = int((st.nfe - last_nfe[0]).sum())
            last_nfe[0] = st.nfe
            self.stats.item_evaluations += n
            self.stats.stack_calls += int(n > 0) * (2 if sampler.guidance != 1.0 else 1)
            self.stats.steps_run += 1
            if self.prefix_sharing and st.step < self.steps:  # final states are never resumed (memo answers)
                for i, m in enumerate(masks):
                    if m[:st.step] not in self._store:
                        self._store.put(m[:st.step], slice_state(st, i * c, (i + 1) * c, clone=r > 1))

        try:
            state = sampler.run(state, cond, uncond, callback=after_step)
        except ModelOutputError as exc:
            raise self._non_finite(start, masks, at[0], exc) from None
        teacher = self.calib.teacher
        for i, m in enumerate(masks):
            x = state.x[i * c:(i + 1) * c]
            per_item = self.loss(x.float(), teacher.float())
            value = float(per_item.mean())
            key = compute_of(m) if self.estimator is None else m
            (self.memo if self.estimator is None else self.plan_memo)[key] = value
            if self.keep_items:
                self.items[key] = per_item.tolist()
            self.stats.evaluations += 1

    def _non_finite(self, start: SamplerState, masks: list[Mask], step: int, exc: Exception) -> ModelOutputError:
        """The error naming the mask(s) whose own run is non-finite at ``step`` (each re-run alone from
        ``start`` to isolate it; all of the group's masks if none fails alone)."""
        c = len(self.calib)
        bad = masks
        if len(masks) > 1:
            bad = []
            for m in masks:
                rows = torch.tensor([m] * c)
                s: Sampler = self.make_sampler(StaticMask(rows) if self.estimator is None else
                                               StaticMask.from_plan(rows))
                try:
                    s.run(start, self.calib.cond, self.calib.uncond, until=step + 1)
                except ModelOutputError:
                    bad.append(m)
            bad = bad or masks
        if self.estimator is not None:
            bad = [tuple(c == est.COMPUTE for c in m) for m in bad]
        computes = [list(compute_of(m)) for m in bad]
        strips = ["".join("C" if b else "." for b in m) for m in bad]
        more = f" (and {len(bad) - 1} more: {computes[1:]})" if len(bad) > 1 else ""
        err = ModelOutputError(f"the model returned NaN or Inf at step {step} while evaluating compute set "
                               f"{computes[0]} (mask {strips[0]}){more}; sampler: {exc}")
        err.step, err.computes = step, [tuple(c_) for c_ in computes]
        return err


def _nbytes(state: SamplerState) -> int:
    """Bytes held by a sampler state's tensors."""
    total = 0

    def add(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.element_size() * t.nelement()
        return t

    map_state(state, add)
    return total


class PeerScheduleEvaluator:
    """Loss of compute masks that drive a peer's cache (e.g. diffusers' TaylorSeer) on the calibration set.

    Every mask runs the C calibration items through ``make_sampler`` with the
    peer's hooks installed for that mask (the sampler's ``mechanism`` names the
    peer). Memoised, with prefix sharing (``prefix_sharing``): the sampler's
    states carry a copy of the hooks' state after every step, so a mask resumes
    from its longest evaluated prefix, bit for bit as one whole run. No
    candidate batching (the hooks hold one schedule). Deterministic with a
    fixed ``threads``.
    """

    sa_batch: int = 1

    def __init__(self, make_sampler, calib: CalibrationSet, *, mechanism: str, loss: LossFn = latent_mse,
                 threads: int | None = None, prefix_sharing: bool = True, max_state_bytes: int = 2 * 2**30) -> None:
        if calib.teacher is None:
            raise ConfigError("the calibration set has no teacher outputs; build it with make_calibration")
        self.make_sampler = make_sampler
        self.calib = calib
        self.mechanism = mechanism
        self.loss = loss
        self.threads = threads
        self.steps = make_sampler(None).steps
        self.memo: dict[tuple[int, ...], float] = {}
        self.stats = EvaluatorStats()
        self._store = PrefixStore(make_sampler(None).start(calib.noise), self.steps, max_bytes=max_state_bytes,
                                  enabled=prefix_sharing)

    def loss_of(self, compute: Sequence[int]) -> float:
        return self.losses([compute])[0]

    def close(self) -> None:
        """Nothing to release."""

    def losses(self, computes: Sequence[Sequence[int]]) -> list[float]:
        return memoised(self.memo, check_computes(computes, self.steps), self.stats, self._score)

    def _score(self, todo: list[tuple[int, ...]]) -> None:
        with pinned_threads(self.threads):
            for k in todo:
                self._score_one(k)

    def _score_one(self, k: tuple[int, ...]) -> None:
        """One mask, resumed from its longest stored prefix; every step's state is stored."""
        mask = mask_of(self.steps, k)
        _, start = self._store.longest(mask)
        sampler: Sampler = self.make_sampler(StaticMask(torch.tensor(mask)), mechanism=self.mechanism)
        per_call = 2 if sampler.guidance != 1.0 else 1
        last = [int(start.nfe[0])]

        def after_step(st: SamplerState) -> None:
            n = int(st.nfe[0])
            self.stats.item_evaluations += (n - last[0]) * len(self.calib)
            self.stats.stack_calls += (n - last[0]) * per_call
            last[0] = n
            self.stats.steps_run += 1
            if st.step < self.steps:  # final states are never resumed (memo answers)
                self._store.put(mask[:st.step], st)

        try:
            st = sampler.run(start, self.calib.cond, self.calib.uncond, callback=after_step)
        except ModelOutputError as exc:
            err = ModelOutputError(f"while evaluating compute set {list(k)} with {self.mechanism}: {exc}")
            err.step, err.computes = None, [k]
            raise err from None
        self.memo[k] = float(self.loss(st.x.float(), self.calib.teacher.float()).mean())
        self.stats.evaluations += 1
