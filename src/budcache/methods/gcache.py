"""GCache, re-implemented for budcache's sampler from its description (arXiv 2608.13043; no public code known).

GCache fixes the budget ``K`` and chooses the computed steps by dynamic
programming over a bound on how the cache's error propagates to the final
sample, with a Bayesian-optimisation outer loop over the bound's constants.
This re-implementation makes the following choices.

- **Local errors.** Edge ``i -> j`` (compute ``i`` and ``j``, reuse ``i``'s
  block-stack residual on ``i+1 .. j-1``) has local error ``e(i, j)``: the
  RMS distance at step ``j`` between the latent reached by that segment and
  the full-step latent, started from the full-step state before step ``i``
  (teacher-forced), averaged over the calibration pairs. One run from each
  ``i`` that computes ``i`` and skips everything after gives ``e(i, j)`` for
  every ``j`` at once (``N - 1`` runs of one computed step each, plus the
  full-step pass that records the states).
- **Propagation bound.** For a velocity field that is ``L``-Lipschitz in
  ``x``, an error made at noise level ``sigma_j`` grows by at most
  ``exp(L (sigma_j - sigma_N))`` until the end (Gronwall). The bound of a
  schedule is the sum over its segments of

      w(i, j) = e(i, j)^p * exp(L (sigma_j - sigma_N))

  with ``p`` an exponent that lets the bound weigh large local errors more or
  less than linearly (``p = 1``: the plain bound).
- **Dynamic programming.** The schedule with ``K`` computed steps (the first
  and the last always among them) minimising the bound is a least-sum path
  ``0 -> N-1`` through ``K`` nodes: exact DP in ``O(K N^2)``
  (:func:`gcache_path`; :func:`brute_force_gcache_path` enumerates, for tests).
- **Bayesian optimisation.** ``L`` and ``p`` are not known; the outer loop
  chooses them by the calibration loss (mean final-latent MSE against the
  full-step output) of the DP's schedule: a Gaussian process (RBF kernel on the
  unit square of ``(L / L_max, (p - p_lo) / (p_hi - p_lo))``, standardised
  targets, fixed length scale 0.25) and expected improvement over 512 seeded
  random candidates, after ``init`` seeded random points (the first one is the
  plain bound ``L = 1, p = 1``). ``evals`` evaluations in all; losses are memoised,
  so parameters that give an already scored schedule cost nothing. The best
  schedule seen is kept.

``K = 1`` computes step 0 only. Every input computes exactly ``K`` steps.
"""

from __future__ import annotations

import itertools
import math
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
from .meancache import min_sum_path
from .profile import Trajectory, record_trajectory


# ------------------------------------------------------------------------------ bound and DP
def bound_weights(local: np.ndarray, sigmas: Sequence[float], lipschitz: float, power: float) -> np.ndarray:
    """``w(i, j) = e(i, j)^p * exp(L (sigma_j - sigma_N))`` (NaN where ``e`` is)."""
    e = np.asarray(local, dtype=np.float64)
    s = np.asarray(sigmas, dtype=np.float64)
    n = e.shape[0]
    gain = np.exp(lipschitz * (s[:n] - s[-1]))
    with np.errstate(invalid="ignore"):
        return np.power(np.clip(e, 0.0, None), power) * gain[None, :]


def gcache_path(weights: np.ndarray, k: int) -> tuple[tuple[int, ...], float]:
    """The ``k``-node path ``0 -> N-1`` with the least sum of edge weights (exact DP)."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    if w.ndim != 2 or w.shape[1] != n or n < 2:
        raise ConfigError(f"edge weights must be a square (N, N) matrix with N >= 2; got shape {w.shape}")
    if not 2 <= k <= n:
        raise ConfigError(f"a path from step 0 to step {n - 1} needs 2..{n} computed steps (got K={k})")
    found = min_sum_path(w, k)
    if found is None:
        raise ConfigError(f"no path from step 0 to step {n - 1} with {k} computed steps uses only measured edges")
    return found


def brute_force_gcache_path(weights: np.ndarray, k: int) -> tuple[tuple[int, ...], float]:
    """Every ``k``-node path, the least sum (exponential; for tests)."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    best: tuple[tuple[int, ...], float] | None = None
    for mid in itertools.combinations(range(1, n - 1), k - 2):
        path = (0, *mid, n - 1)
        c = [w[i, j] for i, j in zip(path, path[1:])]
        if not all(np.isfinite(c)):
            continue
        total = float(sum(c))
        if best is None or total < best[1]:
            best = (path, total)
    if best is None:
        raise ConfigError("no path uses only measured edges")
    return best


def local_errors(problem: Any, calib: Any, traj: Trajectory) -> np.ndarray:
    """``e(i, j)``: RMS latent distance at ``j`` of computing ``i`` and reusing on ``i+1 .. j-1`` (teacher-forced)."""
    n = problem.steps
    if traj.states is None:
        raise ConfigError("GCache's local errors need the full-step states (record_trajectory(keep_states=True))")
    e = np.full((n, n), np.nan)
    for i in range(n - 1):
        e[i, i + 1] = 0.0
        if i + 2 > n - 1:
            continue
        mask = torch.zeros(n, dtype=torch.bool)
        mask[0] = mask[i] = True
        sampler = reuse_sampler(problem)(StaticMask(mask))

        def after(st: Any, i: int = i) -> None:
            j = st.step
            if j >= i + 2:
                d = (st.x.detach().float().cpu() - traj.x[j]).pow(2).flatten(1).mean(1).sqrt()
                e[i, j] = float(d.mean())

        with torch.no_grad():
            sampler.run(traj.states[i], calib.cond, calib.uncond, until=n - 1, callback=after)
    return e


# ------------------------------------------------------------------------------ Bayesian optimisation
def _gp_posterior(xs: np.ndarray, ys: np.ndarray, cand: np.ndarray, length: float,
                  noise: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-0.5 * d2 / length ** 2)

    kxx = k(xs, xs) + noise * np.eye(len(xs))
    chol = np.linalg.cholesky(kxx)
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, ys))
    kxc = k(xs, cand)
    mu = kxc.T @ alpha
    v = np.linalg.solve(chol, kxc)
    var = np.clip(1.0 - (v ** 2).sum(0), 1e-12, None)
    return mu, np.sqrt(var)


def expected_improvement(mu: np.ndarray, sd: np.ndarray, best: float, xi: float = 0.01) -> np.ndarray:
    """EI for minimisation."""
    z = (best - mu - xi) / sd
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    pdf = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    return (best - mu - xi) * cdf + sd * pdf


def bayes_opt(objective: Any, evals: int, init: int, seed: int, first: Sequence[float] | None = None,
              length: float = 0.25, candidates: int = 512) -> list[tuple[np.ndarray, float]]:
    """Minimise ``objective(u)`` over the unit square: seeded random start, then GP + expected improvement."""
    if evals < 1 or init < 1:
        raise ConfigError(f"Bayesian optimisation needs evals >= 1 and init >= 1 (got {evals}, {init})")
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    if first is not None:
        pts.append(np.asarray(first, dtype=np.float64))
    while len(pts) < min(init, evals):
        pts.append(rng.random(2))
    hist = [(u, float(objective(u))) for u in pts]
    while len(hist) < evals:
        xs = np.stack([h[0] for h in hist])
        ys = np.array([h[1] for h in hist])
        sd_y = ys.std() or 1.0
        z = (ys - ys.mean()) / sd_y
        cand = rng.random((candidates, 2))
        mu, sd = _gp_posterior(xs, z, cand, length)
        u = cand[int(np.argmax(expected_improvement(mu, sd, float(z.min()))))]
        hist.append((u, float(objective(u))))
    return hist


# ------------------------------------------------------------------------------ the method
class GCache:
    """GCache as a compared method (choices in the module docstring)."""

    name = "gcache"
    kind = "static"

    def __init__(self, *, evals: int = 12, init: int = 4, lipschitz_max: float = 10.0,
                 power_range: tuple[float, float] = (0.5, 2.0), seed: int = 0, batch: int = 64) -> None:
        if lipschitz_max <= 0 or not 0 < power_range[0] < power_range[1]:
            raise ConfigError(f"GCache needs lipschitz_max > 0 and 0 < p_lo < p_hi (got {lipschitz_max}, "
                              f"{power_range})")
        self.evals = evals
        self.init = init
        self.lipschitz_max = float(lipschitz_max)
        self.power_range = (float(power_range[0]), float(power_range[1]))
        self.seed = seed
        self.batch = batch
        self.policy: CachePolicy | None = None
        self.history: list[dict[str, Any]] = []
        self.fit_s = 0.0
        self._local: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._evaluators: dict[tuple, Evaluator] = {}

    def params(self, u: Sequence[float]) -> tuple[float, float]:
        """``(L, p)`` of a point of the unit square."""
        lo, hi = self.power_range
        return float(u[0]) * self.lipschitz_max, lo + float(u[1]) * (hi - lo)

    def local(self, problem: Any, calib: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(e, sigmas)`` of ``calib`` (measured once per calibration set)."""
        key = calib_key(problem, calib)
        if key not in self._local:
            traj = record_trajectory(problem, calib, keep_states=True)
            self._local[key] = (local_errors(problem, calib, traj), traj.sigmas.double().numpy())
        return self._local[key]

    def evaluator(self, problem: Any, calib: Any) -> Evaluator:
        key = calib_key(problem, calib)
        if key not in self._evaluators:
            self._evaluators[key] = Evaluator(reuse_sampler(problem), calib, loss=latent_mse)
        return self._evaluators[key]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        t0 = time.perf_counter()
        n = problem.steps
        self.history = []
        if nfe in (1, n):
            compute = (0,) if nfe == 1 else tuple(range(n))
            self.policy = CachePolicy(n, compute, meta={"method": "gcache", "budget": nfe})
            self.fit_s = time.perf_counter() - t0
            return
        e, sig = self.local(problem, calib)
        ev = self.evaluator(problem, calib)

        def objective(u: np.ndarray) -> float:
            lip, p = self.params(u)
            path, bound = gcache_path(bound_weights(e, sig, lip, p), nfe)
            with torch.no_grad():
                loss = ev.loss_of(path)
            self.history.append({"L": lip, "p": p, "bound": bound, "loss": loss, "compute": list(path)})
            return math.log(max(loss, 1e-30))

        first = (1.0 / self.lipschitz_max, (1.0 - self.power_range[0]) / (self.power_range[1] - self.power_range[0]))
        bayes_opt(objective, self.evals, self.init, self.seed, first=first)
        best = min(self.history, key=lambda h: (h["loss"], h["compute"]))
        self.policy = CachePolicy(n, best["compute"], meta={"method": "gcache", "budget": nfe, "L": best["L"],
                                                            "p": best["p"], "calib_loss": best["loss"]})
        self.fit_s = time.perf_counter() - t0

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.policy is None:
            raise ConfigError("GCache has no schedule yet: call fit(problem, calib, nfe)")
        latent, computed = run_controller(problem, StaticMask(self.policy), noise, cond, uncond, batch=self.batch)
        return MethodRun(latent, computed.sum(0).double(), {"computed": computed, "compute": list(self.policy.compute)})


__all__ = ["GCache", "bayes_opt", "bound_weights", "brute_force_gcache_path", "gcache_path", "local_errors"]
