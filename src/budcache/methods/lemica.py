"""LeMiCa, re-implemented for budcache's sampler (UnicomAI/LeMiCa; its graph-building code is unreleased).

Caching as a path in a DAG over the steps ``0 .. N-1``: an edge ``i -> j``
(``i < j``) means "compute at ``i`` and at ``j``, reuse ``i``'s cache on
``i+1 .. j-1``". Its weight is the error that segment alone causes, measured
offline on calibration inputs: the mean final-output L1
``mean|x_0^{(i,j)} - x_0^full|`` of the sampler that computes every step but
``i+1 .. j-1``. A schedule with ``K`` computed steps is a path from step 0 to
step ``N-1`` through ``K`` nodes; LeMiCa picks the path whose edge errors,
sorted in descending order, are lexicographically smallest (minimise the
worst segment, then the second worst, ...).

:func:`lexminimax_path` solves this exactly by dynamic programming over
(node, computed nodes so far), keeping for each the best sorted error tuple:
appending the same edges to two partial paths keeps their lexicographic
order (sorted-descending tuples compared lexicographically are compatible
with multiset union), so the best prefix extends to the best path.
:func:`brute_force_path` enumerates every path (for tests).

Documented choices: edges of length 1 (``j = i + 1``) cost 0 and are not
run; the error is measured with residual reuse and the problem's solver and
guidance; ``max_span`` (default: none) can drop very long segments and
``items`` (default: all) measure the edges on the first calibration pairs
only, to save calibration time (the measurement costs about ``N^3 / 6``
computed steps per pair); the first and the last step always compute, as in
LeMiCa's released FLUX schedules.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..policy import CachePolicy
from ..sampler import StaticMask
from ..search.evaluator import Evaluator
from ..search.losses import latent_l1
from .base import MethodRun
from .common import calib_key, check_budget, reuse_sampler, run_controller

Cost = tuple[float, ...]


def _check_graph(weights: np.ndarray, k: int) -> int:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ConfigError(f"edge weights must be a square (N, N) matrix; got shape {w.shape}")
    n = w.shape[0]
    if n == 1 and k == 1:
        return n
    if not 2 <= k <= n:
        raise ConfigError(f"a path from step 0 to step {n - 1} needs 2..{n} computed steps (got K={k})")
    return n


def path_cost(weights: np.ndarray, path: tuple[int, ...]) -> Cost:
    """Edge errors of a path, sorted in descending order."""
    return tuple(sorted((float(weights[i, j]) for i, j in zip(path, path[1:])), reverse=True))


def lexminimax_path(weights: np.ndarray, k: int) -> tuple[tuple[int, ...], Cost]:
    """The path ``0 -> ... -> N-1`` with ``k`` nodes whose sorted-descending edge errors are lexicographically least.

    ``weights[i, j]`` is the error of edge ``i -> j`` (``i < j``); a non-finite
    weight means no edge. DP: ``best[c][j]`` = least cost of a path from 0 to
    ``j`` with ``c`` nodes, ``O(K N^2)`` tuple comparisons. Ties keep the
    path found first (smaller predecessor).
    """
    w = np.asarray(weights, dtype=np.float64)
    n = _check_graph(w, k)
    if n == 1:
        return (0,), ()
    best: list[dict[int, tuple[Cost, tuple[int, ...]]]] = [dict() for _ in range(k + 1)]
    best[1][0] = ((), (0,))
    for c in range(2, k + 1):
        # a node j at position c needs k - c more nodes after it: j <= n - 1 - (k - c)
        for j in range(c - 1, n - (k - c)):
            for i, (cost, path) in best[c - 1].items():
                if i >= j or not np.isfinite(w[i, j]):
                    continue
                cand = tuple(sorted((*cost, float(w[i, j])), reverse=True))
                if j not in best[c] or cand < best[c][j][0]:
                    best[c][j] = (cand, (*path, j))
    if n - 1 not in best[k]:
        raise ConfigError(f"no path from step 0 to step {n - 1} with {k} computed steps uses only measured edges")
    cost, path = best[k][n - 1]
    return path, cost


def brute_force_path(weights: np.ndarray, k: int) -> tuple[tuple[int, ...], Cost]:
    """Every path with ``k`` nodes from 0 to N-1, the lexicographically least (exponential; for tests)."""
    w = np.asarray(weights, dtype=np.float64)
    n = _check_graph(w, k)
    if n == 1:
        return (0,), ()
    best: tuple[Cost, tuple[int, ...]] | None = None
    for mid in itertools.combinations(range(1, n - 1), k - 2):
        path = (0, *mid, n - 1)
        if not all(np.isfinite(w[i, j]) for i, j in zip(path, path[1:])):
            continue
        cost = path_cost(w, path)
        if best is None or cost < best[0]:
            best = (cost, path)
    if best is None:
        raise ConfigError(f"no path from step 0 to step {n - 1} with {k} computed steps uses only measured edges")
    return best[1], best[0]


def edge_errors(make_sampler: Any, calib: Any, steps: int, max_span: int | None = None,
                progress: bool = False) -> np.ndarray:
    """``E[i, j]`` = mean final-latent L1 of the sampler that skips only ``i+1 .. j-1`` (NaN: no edge).

    Runs through budcache's evaluator (prefix sharing and batching: exact).
    """
    span = steps if max_span is None else max_span
    if span < 1:
        raise ConfigError(f"max_span must be >= 1 (got {max_span})")
    w = np.full((steps, steps), np.nan)
    edges = [(i, j) for i in range(steps) for j in range(i + 1, min(steps, i + span + 1))]
    for i, j in edges:
        if j == i + 1:
            w[i, j] = 0.0
    todo = [(i, j) for i, j in edges if j > i + 1]
    if todo:
        ev = Evaluator(make_sampler, calib, loss=latent_l1)
        sets = [[s for s in range(steps) if not i < s < j] for i, j in todo]
        chunk = 32
        bar = None
        if progress:
            bar = tqdm(total=len(sets), desc="LeMiCa edge errors", leave=False)
        for a in range(0, len(sets), chunk):
            for (i, j), loss in zip(todo[a:a + chunk], ev.losses(sets[a:a + chunk])):
                w[i, j] = loss
            if bar is not None:
                bar.update(len(sets[a:a + chunk]))
        if bar is not None:
            bar.close()
    return w


class LeMiCa:
    """LeMiCa as a compared method: measure edge errors once per calibration set, DP per budget, static mask."""

    name = "lemica"
    kind = "static"

    def __init__(self, *, max_span: int | None = None, items: int | None = None, batch: int = 64,
                 progress: bool = False) -> None:
        if items is not None and items < 1:
            raise ConfigError(f"LeMiCa needs items >= 1 calibration pairs for its edges (got {items})")
        self.max_span = max_span
        self.items = items
        self.batch = batch
        self.progress = progress
        self.policy: CachePolicy | None = None
        self.cost: Cost = ()
        self.fit_s = 0.0
        self._edges: dict[tuple, np.ndarray] = {}

    def edges(self, problem: Any, calib: Any) -> np.ndarray:
        """The (N, N) edge errors of ``calib`` (measured once, then reused for every budget)."""
        key = calib_key(problem, calib) + (self.max_span, self.items)
        if key not in self._edges:
            if self.items is not None and self.items < len(calib):
                calib = calib.items(0, self.items)
            with torch.no_grad():
                self._edges[key] = edge_errors(reuse_sampler(problem), calib, problem.steps, self.max_span,
                                               self.progress)
        return self._edges[key]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        t0 = time.perf_counter()
        w = self.edges(problem, calib)
        path, self.cost = lexminimax_path(w, nfe)
        self.fit_s = time.perf_counter() - t0
        self.policy = CachePolicy(problem.steps, path, meta={"method": "lemica", "budget": nfe,
                                                             "edge_errors_sorted": list(self.cost)})

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.policy is None:
            raise ConfigError("LeMiCa has no schedule yet: call fit(problem, calib, nfe)")
        latent, computed = run_controller(problem, StaticMask(self.policy), noise, cond, uncond, batch=self.batch)
        return MethodRun(latent, computed.sum(0).double(), {"computed": computed, "compute": list(self.policy.compute)})
