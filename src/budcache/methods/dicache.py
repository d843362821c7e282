"""DiCache, re-implemented for budcache's sampler (Bujiazi/DiCache, FLUX/run_flux_dicache.py).

Online probe: on every step after the forced prefix, the first ``m`` blocks
run (a probe that stops there) and give ``p_t``, the image stream after block
``m-1``; with ``x_t`` the stack input,

    dy_t = mean|p_t - p_{t-1}| / mean|p_{t-1}|,   acc += dy_t
    skip if acc < threshold, else compute and set acc = 0

(``p_{t-1}`` is the previous step's probe output, computed or not; this is
the original's ``delta_y`` error, its recommended one; the ``delta_minus``
variant, ``|dy - dx|``, is not implemented). Steps
``k <= int(r T)`` (``r`` = 0.2; the original's ``cnt <= int(ret_ratio * T)``)
and the last step always compute.

Trajectory alignment on a skipped step, from the residuals ``R`` (whole
stack) and ``Rp = p - x`` (probe) of the last two computed steps:

    gamma = clip(mean|(p_t - x_t) - Rp[-2]| / mean|Rp[-1] - Rp[-2]|, 1, 1.5)
    h_t   = x_t + R[-2] + gamma (R[-1] - R[-2])

(plain reuse of ``R[-1]`` while fewer than two are stored). The estimate is
handed to budcache's cache hooks for that step.

Cost: a skipped step still runs ``m`` of the stack's ``n`` blocks, so an
element's NFE is ``computed + (m / n) * skipped``. A computed step resumes
from its probe (the stack continues at block ``m``), so it costs 1. Unlike
the original, forced steps also run through the probe (then resume): the
same work, and the probe output the next step compares against.

Documented choices: decisions, ``acc`` and ``gamma`` are per batch element
(the original reduces over the batch); with classifier-free guidance the probe
reads the conditional pass and the decision and ``gamma`` apply to both
passes; the text stream's residual is aligned with the same ``gamma`` (the
output reads only the image stream); the probe cost is counted in blocks (a
double-stream block counts like a single-stream one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..hooks import ResidualHistory, stack_size
from ..sampler import SamplerState, SignalController, StepSignals
from .base import MethodRun
from .bisect import ThresholdFit, calibrate_threshold
from .common import check_budget, rel_l1, run_controller

#: A threshold no accumulated probe distance reaches: only the forced steps compute.
NEVER = 1e9


def forced_steps(steps: int, retention: float) -> set[int]:
    """Steps DiCache always computes: ``k <= int(r T)`` and the last."""
    return set(range(min(int(retention * steps), steps - 1) + 1)) | {steps - 1}


def aligned_estimate(history: ResidualHistory, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``R[-2] + gamma (R[-1] - R[-2])`` per element; ``R[-1]`` where only one residual is stored."""
    def one(r: tuple[torch.Tensor | None, ...]) -> torch.Tensor | None:
        if not r or r[0] is None:
            return None
        if len(r) < 2 or r[1] is None:
            return r[0]
        view = (-1,) + (1,) * (r[0].dim() - 1)
        g = gamma.to(device=r[0].device, dtype=r[0].dtype).view(view)
        have = (history.steps[1] >= 0).view(view)
        return torch.where(have, r[1] + g * (r[0] - r[1]), r[0])

    return one(history.img), one(history.txt)


class DiCacheController(SignalController):
    """DiCache's probe rule and trajectory alignment (see the module docstring).

    ``trace`` keeps per step ``dy`` (NaN on forced steps), ``acc`` after the
    decision, ``gamma`` (NaN where no alignment applies) and the decision.
    """

    residual_depth = 2

    def __init__(self, threshold: float, probe_blocks: int = 1, retention: float = 0.2,
                 gamma_range: tuple[float, float] = (1.0, 1.5)) -> None:
        if not np.isfinite(threshold) or threshold < 0:
            raise ConfigError(f"DiCache threshold must be a number >= 0 (got {threshold})")
        if not isinstance(probe_blocks, int) or probe_blocks < 1:
            raise ConfigError(f"DiCache probe depth must be an integer >= 1 (got {probe_blocks!r})")
        if not 0 <= retention < 1:
            raise ConfigError(f"DiCache retention ratio must lie in [0, 1) (got {retention})")
        if not gamma_range[0] <= gamma_range[1]:
            raise ConfigError(f"gamma range must be (low, high) with low <= high (got {gamma_range})")
        self.threshold = float(threshold)
        self.probe_blocks = probe_blocks
        self.retention = retention
        self.gamma_range = (float(gamma_range[0]), float(gamma_range[1]))
        self.trace: list[dict[str, torch.Tensor]] = []
        self._reset(0)

    def _reset(self, b: int) -> None:
        self.acc = torch.zeros(b, dtype=torch.float64)
        self.prev_probe: torch.Tensor | None = None
        self.rp: list[torch.Tensor | None] = [None, None]   # probe residuals of the last two computed steps
        self.count = torch.zeros(b, dtype=torch.long)       # computed steps seen per element (capped at 2)
        self.trace = []

    def gamma(self, rp_now: torch.Tensor) -> torch.Tensor:
        """``clip(mean|Rp_now - Rp[-2]| / mean|Rp[-1] - Rp[-2]|, low, high)`` per element; NaN without two."""
        b = rp_now.shape[0]
        if self.rp[1] is None:
            return torch.full((b,), float("nan"), dtype=torch.float64)
        num = (rp_now - self.rp[1]).abs().flatten(1).mean(1)
        den = (self.rp[0] - self.rp[1]).abs().flatten(1).mean(1)
        g = torch.nan_to_num(num / den, nan=self.gamma_range[0], posinf=self.gamma_range[1])
        g = g.clamp(*self.gamma_range).double().cpu()
        return torch.where(self.count >= 2, g, torch.full_like(g, float("nan")))

    def decide_with(self, step: int, state: SamplerState, signals: StepSignals) -> torch.Tensor:
        probe = signals.probe(self.probe_blocks)
        x_in, p = probe.h_in.float(), probe.h_out.float()    # (B, T, D) each
        b = p.shape[0]
        if step == 0 or self.prev_probe is None or self.prev_probe.shape != p.shape:
            self._reset(b)
        forced = step in forced_steps(signals.sampler.steps, self.retention) or self.prev_probe is None
        dy = torch.full((b,), float("nan"), dtype=torch.float64)
        if forced:
            compute = torch.ones(b, dtype=torch.bool)
            self.acc = torch.zeros(b, dtype=torch.float64)
        else:
            dy = rel_l1(p, self.prev_probe).double().cpu()
            self.acc = self.acc + dy
            compute = self.acc >= self.threshold
            self.acc = torch.where(compute, torch.zeros_like(self.acc), self.acc)
        rp_now = p - x_in
        gamma = self.gamma(rp_now)
        skipped = ~compute
        if bool(skipped.any()):
            g = torch.nan_to_num(gamma, nan=1.0)
            signals.set_estimator(lambda hist, k, g=g: aligned_estimate(hist, g))
        if bool(compute.any()) and hasattr(signals, "resume_from"):
            signals.resume_from(self.probe_blocks)  # the computed elements continue from the probe
        # computed elements push this step's probe residual (the hooks push the stack residual)
        c = compute.to(p.device)
        view = (-1,) + (1,) * (p.dim() - 1)
        if self.rp[0] is None:
            self.rp = [rp_now.clone(), None]
        else:
            older = self.rp[1] if self.rp[1] is not None else torch.zeros_like(rp_now)
            self.rp = [torch.where(c.view(view), rp_now, self.rp[0]), torch.where(c.view(view), self.rp[0], older)]
        self.count = torch.where(compute, (self.count + 1).clamp_max(2), self.count)
        self.prev_probe = p
        self.trace.append({"dy": dy, "acc": self.acc.clone(), "gamma": torch.where(skipped, gamma, float("nan")),
                           "compute": compute.clone()})
        return compute


class DiCache:
    """DiCache as a compared method: calibrate the threshold to the budget (probe cost included), sample."""

    name = "dicache"
    kind = "threshold"

    def __init__(self, *, probe_blocks: int = 1, retention: float = 0.2, gamma_range: tuple[float, float] = (1.0, 1.5),
                 threshold: float | None = None, tol: float = 0.5, max_evals: int = 40, batch: int = 64,
                 progress: bool = False) -> None:
        DiCacheController(0.0, probe_blocks, retention, gamma_range)  # validate once, early
        self.probe_blocks = probe_blocks
        self.retention = retention
        self.gamma_range = gamma_range
        self.threshold = threshold
        self.fixed_threshold = threshold is not None
        self.tol = tol
        self.max_evals = max_evals
        self.batch = batch
        self.progress = progress
        self.calibration: ThresholdFit | None = None

    def controller(self, threshold: float) -> DiCacheController:
        return DiCacheController(threshold, self.probe_blocks, self.retention, self.gamma_range)

    def probe_fraction(self, problem: Any) -> float:
        """``m / n``: the share of the block stack a probe runs."""
        n = stack_size(problem.transformer)
        if self.probe_blocks > n:
            raise ConfigError(f"probe depth {self.probe_blocks} exceeds the {n} blocks of the stack")
        return self.probe_blocks / n

    def cost(self, problem: Any, computed: torch.Tensor) -> torch.Tensor:
        """Per-element NFE (B,): ``computed + (m / n) * skipped`` from the (N, B) decisions."""
        c = computed.sum(0).double()
        return c + self.probe_fraction(problem) * (computed.shape[0] - c)

    def nfe_at(self, problem: Any, calib: Any, threshold: float) -> torch.Tensor:
        _, computed = run_controller(problem, self.controller(threshold), calib.noise, calib.cond, calib.uncond,
                                     batch=self.batch)
        return self.cost(problem, computed)

    def min_nfe(self, problem: Any) -> float:
        """The least NFE DiCache can spend: forced steps computed, every other step probed."""
        forced = len(forced_steps(problem.steps, self.retention))
        return forced + (problem.steps - forced) * self.probe_fraction(problem)

    @property
    def calib_nfe(self) -> float | None:
        """Mean NFE of the calibrated threshold on the calibration inputs."""
        return None if self.calibration is None else self.calibration.mean

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        """Bisect the threshold to mean NFE ``nfe``. A budget below :meth:`min_nfe` is out of DiCache's reach:
        the threshold then skips every step it may (``calibration.reached`` is False, its NFE says by how much)."""
        check_budget(problem, nfe)
        if self.fixed_threshold:
            return
        if nfe < self.min_nfe(problem) - self.tol:
            v = self.nfe_at(problem, calib, NEVER)
            self.calibration = ThresholdFit(NEVER, float(nfe), float(v.mean()), float(v.min()), float(v.max()), False,
                                            1, ((NEVER, float(v.mean())),))
        else:
            self.calibration = calibrate_threshold(lambda t: self.nfe_at(problem, calib, t), nfe, lo=0.0, hi=1.0,
                                                   tol=self.tol, max_evals=self.max_evals, progress=self.progress)
        self.threshold = self.calibration.threshold

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.threshold is None:
            raise ConfigError("DiCache has no threshold yet: call fit(problem, calib, nfe) or pass threshold=")
        latent, computed = run_controller(problem, self.controller(self.threshold), noise, cond, uncond,
                                          batch=self.batch)
        extra: dict[str, Any] = {"computed": computed, "threshold": self.threshold,
                                 "probe_fraction": self.probe_fraction(problem)}
        if self.calibration is not None:
            extra["calibration"] = self.calibration.as_dict()
        return MethodRun(latent, self.cost(problem, computed), extra)
