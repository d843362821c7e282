"""TeaCache, re-implemented for budcache's sampler (ali-vilab/TeaCache, TeaCache4FLUX).

Indicator: the first block's AdaLN-modulated image input
``m_t = LN(h_t) (1 + scale_msa) + shift_msa``, read by a probe that stops at
the stack input (nothing of the block stack runs). At step ``t``:

    rel_t = mean|m_t - m_{t-1}| / mean|m_{t-1}|
    acc  += max(0, poly(rel_t))
    skip if acc < delta, else compute and set acc = 0

The first and the last step always compute and set ``acc = 0``; ``m_{t-1}``
updates on every step. ``poly`` rescales the indicator's change into the
model output's change; for a model other than FLUX it is refitted, as
TeaCache does for a new model: on full-step calibration runs, a degree-4
least-squares fit of ``rel-L1(v_t, v_{t-1})`` (the model output, the
velocity) against ``rel_t``.

Documented choices: decisions are per batch element (as TeaCache run with
batch size 1; the original reduces over the whole batch); a negative
``poly`` value counts as 0 (a fit can dip below zero between its data
points); with classifier-free guidance the indicator is read from the
conditional pass and the decision applies to both passes; the indicator's
own cost (the first block's norm) is not counted in the NFE, as in TeaCache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..hooks import modulated_input
from ..sampler import SamplerState, SignalController, StepSignals
from .base import MethodRun
from .bisect import ThresholdFit, calibrate_threshold
from .common import calib_key, check_budget, polyval, rel_l1, run_controller

#: TeaCache's FLUX rescaling polynomial (highest power first).
FLUX_COEFFICIENTS = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)


class TeaCacheController(SignalController):
    """TeaCache's rule: accumulate the rescaled indicator change; compute once it reaches ``delta``.

    ``trace`` keeps, per step, the raw ``rel_t`` (B,) (NaN at step 0) and the
    accumulator after the decision, for fitting and for tests.
    """

    def __init__(self, delta: float, coefficients: Sequence[float] = FLUX_COEFFICIENTS) -> None:
        if not np.isfinite(delta) or delta < 0:
            raise ConfigError(f"TeaCache threshold delta must be a number >= 0 (got {delta})")
        if len(coefficients) < 1:
            raise ConfigError("TeaCache needs at least one polynomial coefficient")
        self.delta = float(delta)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.acc: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.trace: list[dict[str, torch.Tensor]] = []

    def indicator(self, signals: StepSignals) -> torch.Tensor:
        """``m_t`` (B, T, D)."""
        return modulated_input(signals.transformer, signals.probe(0))

    def decide_with(self, step: int, state: SamplerState, signals: StepSignals) -> torch.Tensor:
        m = self.indicator(signals).float()
        b = m.shape[0]
        last = signals.sampler.steps - 1
        if step == 0 or self.prev is None or self.prev.shape != m.shape:
            self.acc = torch.zeros(b, dtype=torch.float64)
            self.prev = None
            self.trace = []
        if step == 0 or step == last or self.prev is None:
            rel = torch.full((b,), float("nan"), dtype=torch.float64)
            compute = torch.ones(b, dtype=torch.bool)
            self.acc = torch.zeros(b, dtype=torch.float64)
            if self.prev is not None:
                rel = rel_l1(m, self.prev).double().cpu()
        else:
            rel = rel_l1(m, self.prev).double().cpu()
            self.acc = self.acc + polyval(self.coefficients, rel).clamp_min(0.0)
            compute = self.acc >= self.delta
            self.acc = torch.where(compute, torch.zeros_like(self.acc), self.acc)
        self.prev = m
        self.trace.append({"rel": rel, "acc": self.acc.clone(), "compute": compute.clone()})
        return compute


def fit_rescaler(problem: Any, calib: Any, degree: int = 4, batch: int = 64) -> tuple[tuple[float, ...], dict]:
    """TeaCache's polynomial refitted on ``problem``'s model from full-step runs of ``calib``.

    Pairs ``(rel-L1 of m_t, rel-L1 of v_t)`` for every step ``t >= 1`` and item;
    ``numpy.polyfit`` of degree ``degree``. Returns the coefficients (highest
    power first) and fit diagnostics (points, R^2, input range).
    """
    if degree < 1:
        raise ConfigError(f"polynomial degree must be >= 1 (got {degree})")
    ctl = TeaCacheController(delta=0.0, coefficients=(0.0,))  # never skips: every step computes
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    prev_v: dict[int, torch.Tensor] = {}

    def after(state: SamplerState, offset: int) -> None:
        v = state.last_v.float()
        k = state.step - 1
        if k >= 1:
            xs.append(ctl.trace[k]["rel"])
            ys.append(rel_l1(v, prev_v[offset]).double().cpu())
        prev_v[offset] = v

    run_controller(problem, ctl, calib.noise, calib.cond, calib.uncond, batch=batch, callback=after)
    x = torch.cat(xs).numpy()
    y = torch.cat(ys).numpy()
    if x.size <= degree:
        raise ConfigError(f"too few calibration points ({x.size}) to fit a degree-{degree} polynomial; "
                          "use more steps or calibration items")
    coef = np.polyfit(x, y, degree)
    pred = np.polyval(coef, x)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1e-30
    info = {"points": int(x.size), "r2": 1.0 - ss_res / ss_tot, "x_min": float(x.min()), "x_max": float(x.max())}
    return tuple(float(c) for c in coef), info


class TeaCache:
    """TeaCache as a compared method: refit the polynomial, calibrate ``delta`` to the budget, sample.

    ``refit=False`` keeps ``coefficients`` (default: TeaCache's FLUX ones).
    ``delta`` given: skip calibration and use it.
    """

    name = "teacache"
    kind = "threshold"

    def __init__(self, *, refit: bool = True, coefficients: Sequence[float] = FLUX_COEFFICIENTS, degree: int = 4,
                 delta: float | None = None, tol: float = 0.5, max_evals: int = 40, batch: int = 64,
                 progress: bool = False) -> None:
        self.refit = refit
        self.coefficients = tuple(float(c) for c in coefficients)
        self.degree = degree
        self.delta = delta
        self.fixed_delta = delta is not None
        self.tol = tol
        self.max_evals = max_evals
        self.batch = batch
        self.progress = progress
        self.fit_info: dict[str, Any] = {}
        self.calibration: ThresholdFit | None = None
        self._fits: dict[tuple, tuple[tuple[float, ...], dict]] = {}

    @property
    def threshold(self) -> float | None:
        """The threshold ``delta`` in use (calibrated or given)."""
        return self.delta

    @property
    def calib_nfe(self) -> float | None:
        """Mean NFE of the calibrated threshold on the calibration inputs."""
        return None if self.calibration is None else self.calibration.mean

    def nfe_at(self, problem: Any, calib: Any, delta: float) -> torch.Tensor:
        """Per-item NFE (B,) of ``calib`` at threshold ``delta``."""
        _, computed = run_controller(problem, TeaCacheController(delta, self.coefficients), calib.noise,
                                     calib.cond, calib.uncond, batch=self.batch)
        return computed.sum(0).double()

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        if self.refit:
            key = calib_key(problem, calib)
            if key not in self._fits:
                self._fits[key] = fit_rescaler(problem, calib, self.degree, self.batch)
            self.coefficients, info = self._fits[key]
            self.fit_info = {"coefficients": list(self.coefficients), **info}
        if self.fixed_delta:
            return
        self.calibration = calibrate_threshold(lambda t: self.nfe_at(problem, calib, t), nfe, lo=0.0, hi=1.0,
                                               tol=self.tol, max_evals=self.max_evals, progress=self.progress)
        self.delta = self.calibration.threshold

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.delta is None:
            raise ConfigError("TeaCache has no threshold yet: call fit(problem, calib, nfe) or pass delta=")
        latent, computed = run_controller(problem, TeaCacheController(self.delta, self.coefficients), noise, cond,
                                          uncond, batch=self.batch)
        extra: dict[str, Any] = {"computed": computed, "threshold": self.delta, "coefficients": list(self.coefficients)}
        if self.calibration is not None:
            extra["calibration"] = self.calibration.as_dict()
        return MethodRun(latent, computed.sum(0).double(), extra)
