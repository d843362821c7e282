"""diffusers' own caches, applied unchanged to the transformer inside budcache's sampler (``diffusers.hooks``).

- ``fbcache``: FirstBlockCache, its threshold bisected to the budget's mean
  NFE on calibration inputs;
- ``magcache``: MagCache, magnitude ratios from its own calibration mode, its
  threshold bisected to the budget;
- ``taylorseer``: TaylorSeer in lite mode (the block stack is skipped and the
  output projection forecast, the step-level variant), its (warm-up,
  interval) grid point picked on the calibration loss.

Each is a :class:`~.hooked.HookMethod`: fresh hooks per generation, cost
counted from block runs.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

from ..errors import ConfigError
from ..sampler import select_items
from ..search.losses import get_loss
from .bisect import bisect_threshold
from .common import run_sampler
from .hooked import HookMethod


@dataclass
class FirstBlockCacheMethod(HookMethod):
    """diffusers' FirstBlockCache; its threshold bisected to the budget's mean NFE on calibration inputs."""

    name: str = "fbcache"
    per_element: bool = True
    threshold: float | None = None
    calib_nfe: float | None = None

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        if self.threshold is None:
            raise ConfigError("fbcache is not fitted: call fit(problem, calib, nfe) first")
        transformer.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        return transformer.disable_cache

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        def at(t: float) -> torch.Tensor:
            self.threshold = t
            return self.sample(problem, calib.noise, calib.cond, calib.uncond).nfe

        self.threshold, self.calib_nfe = bisect_threshold(at, nfe, 0.0, 0.5)


def magcache_schedule(steps: int, nfe: int) -> tuple[float, int]:
    """MagCache's ``(retention_ratio, max_skip_steps)`` for a budget: its FLUX retention 0.1 (less when K is
    small) and the smallest ``max_skip_steps >= 5`` (its FLUX value) that lets the threshold reach K - 1."""
    retained = min(int(0.1 * steps + 0.5), max(1, nfe // 2))
    ratio = (retained - 0.49) / steps  # int(ratio * steps + 0.5) == retained
    goal = max(nfe - 1, retained + 1)
    m = 5
    while retained + math.ceil((steps - retained) / (m + 1)) > goal and m < steps:
        m += 1
    return ratio, m


@dataclass
class MagCacheMethod(HookMethod):
    """diffusers' MagCache with magnitude ratios from its own calibration mode on the calibration set.

    The ratios are what its calibration mode prints at the end of a run (cond
    branch). Its schedule depends on the ratios only, so every input gets the
    same NFE; the threshold is bisected to the budget.
    """

    name: str = "magcache"
    ratios: list[float] | None = None
    threshold: float | None = None
    retention_ratio: float = 0.1
    max_skip_steps: int = 5
    calib_nfe: float | None = None
    _steps: int = 0

    def config(self, steps: int, calibrate: bool = False) -> Any:
        if calibrate:
            return MagCacheConfig(calibrate=True, num_inference_steps=steps)
        if self.ratios is None or self.threshold is None:
            raise ConfigError("magcache is not fitted: call fit(problem, calib, nfe) first")
        return MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                              retention_ratio=self.retention_ratio, num_inference_steps=steps,
                              mag_ratios=list(self.ratios))

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        transformer.enable_cache(self.config(self._steps))
        return transformer.disable_cache

    def calibrate(self, problem: Any, calib: Any) -> list[float]:
        """Run MagCache's calibration mode once over the calibration batch and read the ratios it prints."""
        tr = problem.transformer
        tr.enable_cache(self.config(problem.steps, calibrate=True))
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                run_sampler(problem.make_sampler(None), calib.noise, calib.cond, calib.uncond)
        finally:
            tr.disable_cache()
        lists = []
        for line in buf.getvalue().splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]") and "MagCache" not in line:
                lists.append([float(v) for v in ast.literal_eval(line)])
        if not lists or len(lists[0]) != problem.steps:
            raise ConfigError(f"MagCache's calibration mode printed no ratios for {problem.steps} steps "
                              "(diffusers changed its calibration output?)")
        return lists[0]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        self._steps = problem.steps
        if self.ratios is None or len(self.ratios) != problem.steps:
            self.ratios = self.calibrate(problem, calib)
        self.retention_ratio, self.max_skip_steps = magcache_schedule(problem.steps, nfe)
        first = select_items(calib.cond, torch.tensor([0]))
        one = (calib.noise[:1], first, select_items(calib.uncond, torch.tensor([0])))

        def at(t: float) -> torch.Tensor:  # input-independent schedule: one element measures it
            self.threshold = t
            return self.generate(problem, *one).nfe

        self.threshold, _ = bisect_threshold(at, nfe, 0.0, 0.5)
        self.calib_nfe = self.mean_nfe(problem, calib)


def taylorseer_count(steps: int, before: int, interval: int) -> int:
    """Computed steps of TaylorSeer's rule: ``s < before`` or ``(s - before - 1) % interval == 0``."""
    return sum(1 for s in range(steps) if s < before or (s - before - 1) % interval == 0)


@dataclass
class TaylorSeerMethod(HookMethod):
    """diffusers' TaylorSeer in lite mode (blocks skipped, output projection forecast to ``max_order``).

    Its schedule is static: the first ``before`` steps, then every
    ``interval``-th. ``fit`` tries every ``(before, interval)`` that computes
    exactly K steps and keeps the one with the lowest calibration loss
    (``loss``: the search's default, log-MSE, so both are scored by the same loss).
    """

    name: str = "taylorseer"
    kind: str = "static"
    before: int | None = None
    interval: int | None = None
    max_order: int = 1
    loss: str = "logmse"
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        if self.before is None or self.interval is None:
            raise ConfigError("taylorseer is not fitted: call fit(problem, calib, nfe) first")
        transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=self.before, max_order=self.max_order,
            taylor_factors_dtype=torch.float32, use_lite_mode=True))
        return transformer.disable_cache

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        n = problem.steps
        options = []
        for before in range(1, nfe + 1):
            ivs = [i for i in range(1, n + 1) if taylorseer_count(n, before, i) == nfe]
            if ivs:
                options.append((before, min(ivs)))
        if not options:
            raise ConfigError(f"TaylorSeer's schedule cannot compute exactly {nfe} of {n} steps")
        self.candidates = []
        for before, interval in options:
            self.before, self.interval = before, interval
            run = self.sample(problem, calib.noise, calib.cond, calib.uncond)
            value = float(get_loss(self.loss)(run.latent.float(), calib.teacher.float()).mean())
            self.candidates.append({"before": before, "interval": interval, "loss": value})
        best = min(self.candidates, key=lambda c: c["loss"])
        self.before, self.interval = best["before"], best["interval"]

