"""ECAD, re-implemented for budcache's sampler (ICLR 2026, arXiv 2506.15682; aniaggarwal/ecad).

ECAD searches caching schedules with a multi-objective genetic algorithm
(NSGA-II) and returns a Pareto front of quality against cost. Here:

- **Genome**: a step mask (which of the ``N`` steps compute; step 0 always).
  ECAD's own genome also chooses per block and per component inside a step;
  budcache caches the whole block stack, so the step is the unit here.
- **Objectives** (both minimised): the calibration loss (mean final-latent MSE
  against the full-step output on the calibration pairs, budcache's
  evaluator: memo, prefix sharing, batching) and the cost (computed steps).
  ECAD scores image quality with a learned metric on about 100 prompts; the
  calibration pairs and the latent MSE take that role here.
- **Budget band**: for budget ``K`` the population lives in the cost band
  ``[K - width, K + width]`` (clipped to ``1..N``), so it traces the front
  around ``K`` rather than across all costs. Every individual is repaired into
  the band (step 0 on; then random computed steps off, or skipped steps on).
- **Generation**: binary tournaments on (front rank, crowding distance)
  choose parents; uniform crossover, then bit-flip mutation of each step but
  step 0 with probability ``1 / N``, then repair; the ``P`` parents and ``P``
  children are merged and NSGA-II's environmental selection (non-dominated
  fronts in order, the last partial front by crowding distance, boundary
  points first) keeps exactly ``P``.
- **Start**: the uniform mask at every cost of the band, then seeded random
  masks, ``P`` in all.
- **Result**: the front of every mask scored (``front``, (cost, loss) pairs) and,
  for the budget, the best scored mask with exactly ``K`` computed steps (the
  band always holds the uniform one), so every input computes exactly ``K``.

Defaults ``P = 16``, ``generations = 8``, ``width = 2``; the evaluator (and
its memo) is shared by the budgets of one calibration set; the run is
seeded, hence deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..policy import CachePolicy
from ..sampler import StaticMask
from ..search.evaluator import Evaluator
from ..search.losses import latent_mse
from .base import MethodRun
from .common import calib_key, check_budget, reuse_sampler, run_controller


# ------------------------------------------------------------------------------ NSGA-II pieces
def non_dominated_fronts(objs: np.ndarray) -> list[list[int]]:
    """Indices of ``objs`` (P, M) sorted into non-dominated fronts (minimisation), best front first."""
    p = objs.shape[0]
    dominated_by = [[] for _ in range(p)]
    count = np.zeros(p, dtype=np.int64)
    for a in range(p):
        for b in range(p):
            if a == b:
                continue
            if np.all(objs[a] <= objs[b]) and np.any(objs[a] < objs[b]):
                dominated_by[a].append(b)
            elif np.all(objs[b] <= objs[a]) and np.any(objs[b] < objs[a]):
                count[a] += 1
    fronts = [[a for a in range(p) if count[a] == 0]]
    while fronts[-1]:
        nxt = []
        for a in fronts[-1]:
            for b in dominated_by[a]:
                count[b] -= 1
                if count[b] == 0:
                    nxt.append(b)
        fronts.append(sorted(nxt))
    return fronts[:-1]


def crowding(objs: np.ndarray, front: Sequence[int]) -> np.ndarray:
    """NSGA-II crowding distance of the members of one front (infinite at each objective's extremes)."""
    f = list(front)
    dist = np.zeros(len(f))
    if len(f) <= 2:
        return np.full(len(f), np.inf)
    for m in range(objs.shape[1]):
        vals = objs[f, m]
        order = np.argsort(vals, kind="stable")
        span = vals[order[-1]] - vals[order[0]]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span <= 0:
            continue
        for r in range(1, len(f) - 1):
            dist[order[r]] += (vals[order[r + 1]] - vals[order[r - 1]]) / span
    return dist


def select(objs: np.ndarray, size: int) -> list[int]:
    """NSGA-II environmental selection: exactly ``size`` indices of ``objs``."""
    if not 0 <= size <= objs.shape[0]:
        raise ConfigError(f"cannot select {size} of {objs.shape[0]} individuals")
    chosen: list[int] = []
    for front in non_dominated_fronts(objs):
        if len(chosen) + len(front) <= size:
            chosen += front
            continue
        d = crowding(objs, front)
        order = sorted(range(len(front)), key=lambda r: (-d[r], front[r]))
        chosen += [front[r] for r in order[:size - len(chosen)]]
        break
    return chosen


def ranks(objs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Front rank and crowding distance of every individual (for tournaments)."""
    rank = np.zeros(objs.shape[0], dtype=np.int64)
    dist = np.zeros(objs.shape[0])
    for r, front in enumerate(non_dominated_fronts(objs)):
        rank[front] = r
        dist[front] = crowding(objs, front)
    return rank, dist


def repair(mask: np.ndarray, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """``mask`` with step 0 computed and between ``lo`` and ``hi`` computed steps (random steps flipped)."""
    m = mask.astype(bool).copy()
    m[0] = True
    on = int(m.sum())
    if on > hi:
        idx = np.flatnonzero(m[1:]) + 1
        m[rng.choice(idx, on - hi, replace=False)] = False
    elif on < lo:
        idx = np.flatnonzero(~m)
        m[rng.choice(idx, lo - on, replace=False)] = True
    return m


def uniform_mask(steps: int, k: int) -> np.ndarray:
    m = np.zeros(steps, dtype=bool)
    m[list(CachePolicy.uniform(steps, k).compute)] = True
    return m


# ------------------------------------------------------------------------------ the method
class ECAD:
    """ECAD as a compared method (choices in the module docstring)."""

    name = "ecad"
    kind = "static"

    def __init__(self, *, population: int = 16, generations: int = 8, width: int = 2, seed: int = 0,
                 batch: int = 64) -> None:
        if population < 2 or generations < 0 or width < 0:
            raise ConfigError(f"ECAD needs population >= 2, generations >= 0, width >= 0 (got {population}, "
                              f"{generations}, {width})")
        self.population = population
        self.generations = generations
        self.width = width
        self.seed = seed
        self.batch = batch
        self.policy: CachePolicy | None = None
        self.front: list[tuple[int, float]] = []
        self.history: list[dict[str, float]] = []
        self.last_population: list[tuple[int, ...]] = []
        self.fit_s = 0.0
        self._evaluators: dict[tuple, Any] = {}

    def evaluator(self, problem: Any, calib: Any) -> Any:
        """One evaluator per calibration set, shared by every budget (its memo carries over)."""
        key = calib_key(problem, calib)
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(reuse_sampler(problem), calib, loss=latent_mse)
        return self._evaluators[key]

    def band(self, steps: int, k: int) -> tuple[int, int]:
        return max(1, k - self.width), min(steps, k + self.width)

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        t0 = time.perf_counter()
        n = problem.steps
        ev = self.evaluator(problem, calib)
        lo, hi = self.band(n, nfe)
        rng = np.random.default_rng(self.seed + 1009 * nfe)
        scored: dict[tuple[int, ...], float] = {}

        def score(masks: list[np.ndarray]) -> np.ndarray:
            comps = [tuple(int(i) for i in np.flatnonzero(m)) for m in masks]
            todo = list(dict.fromkeys(c for c in comps if c not in scored))
            if todo:
                with torch.no_grad():
                    for c, loss in zip(todo, ev.losses(todo)):
                        scored[c] = float(loss)
            return np.array([[scored[c], len(c)] for c in comps])

        pop = [uniform_mask(n, c) for c in sorted(range(lo, hi + 1), key=lambda c: (abs(c - nfe), c))]
        pop = pop[:self.population]
        while len(pop) < self.population:
            pop.append(repair(rng.random(n) < nfe / n, lo, hi, rng))
        objs = score(pop)
        self.history = []
        for g in range(self.generations):
            rank, dist = ranks(objs)

            def tournament(pop: list[np.ndarray] = pop, rank: np.ndarray = rank,
                           dist: np.ndarray = dist) -> np.ndarray:
                a, b = rng.integers(0, len(pop), 2)
                better = a if (rank[a], -dist[a]) < (rank[b], -dist[b]) else b
                return pop[int(better)]

            children = []
            for _ in range(self.population):
                pa, pb = tournament(), tournament()
                child = np.where(rng.random(n) < 0.5, pa, pb)
                flip = rng.random(n) < 1.0 / n
                flip[0] = False
                children.append(repair(child ^ flip, lo, hi, rng))
            merged = pop + children
            mobjs = np.concatenate([objs, score(children)])
            keep = select(mobjs, self.population)
            pop, objs = [merged[i] for i in keep], mobjs[keep]
            self.history.append({"generation": g, "best_loss_at_K": min(
                (v for c, v in scored.items() if len(c) == nfe), default=float("nan")), "scored": len(scored)})
        self.last_population = [tuple(int(i) for i in np.flatnonzero(m)) for m in pop]
        at_k = [(v, c) for c, v in scored.items() if len(c) == nfe]
        loss, compute = min(at_k)
        allv = np.array([[v, len(c)] for c, v in scored.items()])
        front = non_dominated_fronts(allv)[0]
        self.front = sorted((int(allv[i, 1]), float(allv[i, 0])) for i in front)
        self.policy = CachePolicy(n, compute, meta={"method": "ecad", "budget": nfe, "calib_loss": loss,
                                                    "scored": len(scored), "band": [lo, hi],
                                                    "front": [list(p) for p in self.front]})
        self.fit_s = time.perf_counter() - t0

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.policy is None:
            raise ConfigError("ECAD has no schedule yet: call fit(problem, calib, nfe)")
        latent, computed = run_controller(problem, StaticMask(self.policy), noise, cond, uncond, batch=self.batch)
        return MethodRun(latent, computed.sum(0).double(), {"computed": computed, "compute": list(self.policy.compute)})
