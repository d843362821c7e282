"""MeanCache, re-implemented for budcache's sampler (ICLR 2026, arXiv 2601.19961; UnicomAI/MeanCache).

MeanCache caches the model *output* (the velocity) and, on a skipped step,
uses an estimate of the **average velocity** over the step's interval instead
of the last instantaneous one. With the run's log of latents ``x_m`` and the
velocities ``v_m`` actually used (computed or estimated) at past steps, and a
window of ``s`` past steps ending at step ``k - 1``:

    u_bar = (x_k - x_{k-s}) / (sigma_k - sigma_{k-s})          mean velocity over the window
    d     = (v_{k-s} - u_bar) / (sigma_k - sigma_{k-s})        finite-difference JVP estimate
    v_k   = v_{k-1} - d (sigma_{k+1} - sigma_k)                 the skipped step's velocity

(``s = 1`` with Euler gives ``d = 0``: plain velocity reuse; the released code's
``v_diff_mean``.) The window is chosen per cached segment among
``windows`` (default 1..6, the released code's ``jvp1_s2 .. s6``).

**Schedule: peak-suppressed shortest path under a budget.** As in LeMiCa, a
schedule with ``K`` computed steps is a path ``0 -> ... -> N-1`` through ``K``
steps of a DAG whose edge ``i -> j`` means "compute ``i`` and ``j``, estimate
``i+1 .. j-1``". The edge's cost ``c(i, j)`` is the error of that segment
with its best window, and MeanCache picks the path minimising

    sum_edges c(e) + lam * max_edges c(e)

(the sum keeps the total error small, the ``lam``-weighted peak keeps any
single segment from dominating). :func:`peak_suppressed_path` solves it
exactly: for every candidate peak ``M`` (each distinct edge cost), the
least-sum ``K``-node path using only edges with ``c <= M`` (dynamic
programming, ``O(K N^2)``), then the best of ``sum + lam * max`` over ``M``.
:func:`brute_force_peak_path` enumerates every path (for tests).

**Edge costs.** The released code ships fixed schedules and per-segment
windows for its models (its graph-building code is not released). Here the
cost of ``i -> j`` is measured on the full-step trajectories of the
calibration pairs, teacher-forced: from the full-step state after step ``i``,
run the estimates over ``i+1 .. j-1`` with the problem's solver and take
``mean |x_j - x_j^full|`` (mean over pairs and entries). This needs no
model call beyond the one full-step pass, so every edge and window is
measured (``N^2 / 2`` edges x ``len(windows)``), at the price of measuring
the segment's local error rather than its effect on the final image.

Documented choices: ``lam`` = 1; edges of length 1 cost 0; the first and the
last step always compute (``K = 1`` computes step 0 only, with the window of
the edge to the last step); with classifier-free guidance the estimate is
formed from the guided velocity (as the released code, which logs the
combined prediction); the estimate replaces the velocity before the problem's
own solver steps, so multistep solvers keep their usual history.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..policy import CachePolicy
from ..sampler import StaticMask
from .base import MethodRun
from .common import calib_key, check_budget
from .profile import StepSolver, Trajectory, record_trajectory, run_batches, solver_of

#: Windows (past steps) MeanCache may use for a segment's average-velocity estimate.
WINDOWS = (1, 2, 3, 4, 5, 6)


def mean_velocity(log: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int, window: int,
                  sigmas: torch.Tensor) -> torch.Tensor:
    """The average-velocity estimate at step ``k`` from ``log[m] = (x_m, x_{m+1}, v_m)``, ``m < k``."""
    if k < 1 or len(log) < k:
        raise ConfigError(f"step {k} needs the log of steps 0..{k - 1}")
    s = max(1, min(window, k))
    i0 = k - s
    x_start, x_end = log[i0][0], log[k - 1][1]
    span = (sigmas[k] - sigmas[i0]).to(x_end.dtype)
    u_bar = (x_end - x_start) / span
    d = (log[i0][2] - u_bar) / span
    return log[k - 1][2] - d * (sigmas[k + 1] - sigmas[k]).to(x_end.dtype)


def _check(weights: np.ndarray, k: int) -> int:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 2:
        raise ConfigError(f"edge costs must be a square (N, N) matrix with N >= 2; got shape {w.shape}")
    n = w.shape[0]
    if not 2 <= k <= n:
        raise ConfigError(f"a path from step 0 to step {n - 1} needs 2..{n} computed steps (got K={k})")
    return n


def objective(weights: np.ndarray, path: Sequence[int], lam: float) -> float:
    """``sum + lam * max`` of a path's edge costs."""
    c = [float(weights[i, j]) for i, j in zip(path, path[1:])]
    return float(sum(c) + lam * max(c))


def min_sum_path(weights: np.ndarray, k: int) -> tuple[tuple[int, ...], float] | None:
    """Least-sum path ``0 -> N-1`` through ``k`` nodes (non-finite weight: no edge); None when there is none."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    w = np.where(np.isfinite(w) & np.triu(np.ones((n, n), dtype=bool), 1), w, np.inf)
    d = np.full(n, np.inf)
    d[0] = 0.0
    back = []
    for _ in range(2, k + 1):
        m = d[:, None] + w
        arg = np.argmin(m, axis=0)
        d = m[arg, np.arange(n)]
        back.append(arg)
    if not np.isfinite(d[n - 1]):
        return None
    path = [n - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return tuple(reversed(path)), float(d[n - 1])


def peak_suppressed_path(weights: np.ndarray, k: int, lam: float = 1.0) -> tuple[tuple[int, ...], float]:
    """The ``k``-node path ``0 -> N-1`` minimising ``sum + lam * max`` of its edge costs (exact; module docstring)."""
    w = np.asarray(weights, dtype=np.float64)
    n = _check(w, k)
    if lam < 0:
        raise ConfigError(f"the peak weight lam must be >= 0 (got {lam})")
    upper = w[np.triu(np.ones((n, n), dtype=bool), 1)]
    best: tuple[tuple[int, ...], float] | None = None
    for m in np.unique(upper[np.isfinite(upper)]):
        found = min_sum_path(np.where(w <= m, w, np.inf), k)
        if found is None:
            continue
        obj = objective(w, found[0], lam)
        if best is None or obj < best[1]:
            best = (found[0], obj)
    if best is None:
        raise ConfigError(f"no path from step 0 to step {n - 1} with {k} computed steps uses only measured edges")
    return best


def brute_force_peak_path(weights: np.ndarray, k: int, lam: float = 1.0) -> tuple[tuple[int, ...], float]:
    """Every ``k``-node path, the least ``sum + lam * max`` (exponential; for tests)."""
    w = np.asarray(weights, dtype=np.float64)
    n = _check(w, k)
    best: tuple[tuple[int, ...], float] | None = None
    for mid in itertools.combinations(range(1, n - 1), k - 2):
        path = (0, *mid, n - 1)
        if not all(np.isfinite(w[i, j]) for i, j in zip(path, path[1:])):
            continue
        obj = objective(w, path, lam)
        if best is None or obj < best[1]:
            best = (path, obj)
    if best is None:
        raise ConfigError(f"no path from step 0 to step {n - 1} with {k} computed steps uses only measured edges")
    return best


def edge_costs(traj: Trajectory, solver: Any, windows: Sequence[int] = WINDOWS) -> tuple[np.ndarray, np.ndarray]:
    """``(cost, window)`` (N, N): each edge's teacher-forced segment error with its best window (module docstring)."""
    n = traj.steps
    if traj.states is None:
        raise ConfigError("MeanCache's edge costs need the full-step states (record_trajectory(keep_states=True))")
    sig = traj.sigmas
    cost = np.full((n, n), np.nan)
    best_w = np.zeros((n, n), dtype=np.int64)
    full_log = [(traj.x[m], traj.x[m + 1], traj.v[m]) for m in range(n)]
    for i in range(n - 1):
        cost[i, i + 1] = 0.0
        best_w[i, i + 1] = 1
        hist0 = tuple(h.detach().float().cpu() for h in traj.states[i + 1].history) if i + 1 < n else ()
        for w in windows:
            log = list(full_log[:i + 1])
            x, hist = traj.x[i + 1], hist0
            for k in range(i + 1, n - 1):
                v = mean_velocity(log, k, w, sig)
                x_next, hist = solver.step(x, v, k, sig, hist)
                log.append((x, x_next, v))
                x = x_next
                j = k + 1
                c = float((x - traj.x[j]).abs().mean())
                if not np.isfinite(cost[i, j]) or c < cost[i, j]:
                    cost[i, j], best_w[i, j] = c, w
    return cost, best_w


class MeanCache:
    """MeanCache as a compared method: edge costs once per calibration set, exact path per budget."""

    name = "meancache"
    kind = "static"

    def __init__(self, *, lam: float = 1.0, windows: Sequence[int] = WINDOWS, batch: int = 64) -> None:
        if lam < 0:
            raise ConfigError(f"MeanCache's peak weight lam must be >= 0 (got {lam})")
        if not windows or any(int(w) < 1 for w in windows):
            raise ConfigError(f"MeanCache's windows must be integers >= 1 (got {list(windows)})")
        self.lam = float(lam)
        self.windows = tuple(int(w) for w in windows)
        self.batch = batch
        self.policy: CachePolicy | None = None
        self.step_window: list[int] = []
        self.objective = 0.0
        self.fit_s = 0.0
        self._edges: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def edges(self, problem: Any, calib: Any) -> tuple[np.ndarray, np.ndarray]:
        key = calib_key(problem, calib) + (self.windows,)
        if key not in self._edges:
            traj = record_trajectory(problem, calib, keep_states=True)
            self._edges[key] = edge_costs(traj, solver_of(problem), self.windows)
        return self._edges[key]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        t0 = time.perf_counter()
        n = problem.steps
        cost, win = self.edges(problem, calib)
        if nfe == 1:
            path, self.objective = (0,), float(cost[0, n - 1])
            ends = [(0, n)]
            wins = [int(win[0, n - 1])]
        else:
            path, self.objective = peak_suppressed_path(cost, nfe, self.lam)
            ends = list(zip(path, path[1:]))
            wins = [int(win[i, j]) for i, j in ends]
        self.step_window = [0] * n
        for (i, j), w in zip(ends, wins):
            for s in range(i + 1, j):
                self.step_window[s] = w
        self.policy = CachePolicy(n, path, meta={"method": "meancache", "budget": nfe, "lam": self.lam,
                                                 "objective": self.objective, "windows": self.step_window})
        self.fit_s = time.perf_counter() - t0

    def solver(self, problem: Any) -> StepSolver:
        mask = self.policy.mask_tensor()
        windows = self.step_window

        def replace(k: int, x: torch.Tensor, v: torch.Tensor, log: list, sigmas: torch.Tensor) -> Any:
            if bool(mask[k]):
                return None
            return mean_velocity(log, k, windows[k], sigmas)

        return StepSolver(solver_of(problem), replace=replace)

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.policy is None:
            raise ConfigError("MeanCache has no schedule yet: call fit(problem, calib, nfe)")
        solver = self.solver(problem)
        latent, computed = run_batches(
            lambda: problem.make_sampler(StaticMask(self.policy), mechanism="output", solver=solver),
            noise, cond, uncond, self.batch)
        return MethodRun(latent, computed.sum(0).double(), {"computed": computed, "compute": list(self.policy.compute),
                                                            "windows": list(self.step_window)})
