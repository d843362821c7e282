"""The one threshold bisection: the threshold whose mean NFE on calibration inputs hits a target.

Threshold methods (TeaCache, DiCache, diffusers' FirstBlockCache and MagCache,
cache-dit's DBCache) spend an input-dependent number of evaluations. To
compare them at a budget, bisect on the threshold ``t`` until the mean NFE of
the calibration inputs is within ``tol`` of the target:

    find t with | mean_i nfe_i(t) - target | <= tol

assuming ``nfe(t)`` does not increase with ``t`` (a larger threshold skips
more; pass ``increasing=True`` for the opposite). :func:`calibrate_threshold`
takes any function ``t -> per-element NFE`` (or one mean NFE), so it serves
every method; :func:`bisect_threshold` is the same bisection returning only
``(threshold, mean NFE)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..errors import ConfigError

#: Bisection stops once the calibration mean NFE is this close to the target.
NFE_TOLERANCE = 0.5


@dataclass(frozen=True)
class ThresholdFit:
    """The calibrated threshold and the NFE it realises on the calibration inputs."""

    threshold: float
    target: float
    mean: float
    min: float
    max: float
    reached: bool                  # |mean - target| <= tol
    evaluations: int               # calls of the NFE function
    history: tuple[tuple[float, float], ...] = field(default=())  # (threshold, mean NFE) in call order

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {"threshold": self.threshold, "target": self.target, "nfe_mean": self.mean, "nfe_min": self.min,
                "nfe_max": self.max, "reached": self.reached, "evaluations": self.evaluations,
                "history": [list(h) for h in self.history]}


#: What an NFE function returns: the per-element NFE (B,) of the calibration inputs, or their mean.
NFEValues = torch.Tensor | Sequence[float] | float


def _as_nfe(values: NFEValues) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ConfigError("the NFE function returned no elements")
    if not bool(torch.isfinite(t).all()):
        raise ConfigError("the NFE function returned a non-finite NFE")
    return t


def calibrate_threshold(nfe_of: Callable[[float], NFEValues], target: float, *,
                        lo: float = 0.0, hi: float = 1.0, tol: float = NFE_TOLERANCE, max_evals: int = 40,
                        max_expand: int = 30, increasing: bool = False, geometric: bool = False,
                        refine: int = 3, progress: bool = False) -> ThresholdFit:
    """Bisection on the threshold so that ``mean(nfe_of(t))`` is within ``tol`` of ``target``.

    ``nfe_of(t)`` returns the per-element NFE (B,) of the calibration inputs at
    threshold ``t``. The bracket ``[lo, hi]`` grows (``hi`` doubles, up to
    ``max_expand`` times) until it contains the target. ``geometric`` bisects
    at ``sqrt(lo * hi)`` (thresholds spanning decades; needs ``lo > 0``). When
    no threshold reaches the target within ``max_evals`` calls (NFE jumps over
    it), the closest one is returned with ``reached=False``. Once within
    ``tol``, up to ``refine`` more bisection steps look for a threshold closer
    to the target; the closest seen wins (ties: the one not above the target).

    Args:
        nfe_of: threshold -> per-element NFE (or their mean) on the calibration inputs.
        target: the mean NFE to reach (> 0).
        lo, hi: the starting bracket, ``lo < hi``.
        tol: how close the mean NFE must come to ``target``.
        max_evals: calls of ``nfe_of`` at most (>= 2).
        max_expand: doublings of ``hi`` at most.
        increasing: NFE grows with the threshold instead of falling.
        geometric: bisect at the geometric mean (needs ``lo > 0``).
        refine: extra bisection steps once within ``tol``.
        progress: show a progress bar.
    """
    if not math.isfinite(target) or target <= 0:
        raise ConfigError(f"target NFE must be a positive number (got {target})")
    if tol <= 0:
        raise ConfigError(f"tolerance must be > 0 (got {tol})")
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"threshold bracket must satisfy lo < hi (got lo={lo}, hi={hi})")
    if geometric and lo <= 0:
        raise ConfigError(f"geometric bisection needs lo > 0 (got lo={lo})")
    if refine < 0:
        raise ConfigError(f"refine must be >= 0 (got {refine})")
    if max_evals < 2:
        raise ConfigError(f"max_evals must be >= 2 (got {max_evals})")
    sign = -1.0 if increasing else 1.0  # work with g(t) = sign * (mean - target), non-increasing in t
    seen: dict[float, torch.Tensor] = {}
    history: list[tuple[float, float]] = []
    bar = None
    if progress:
        bar = tqdm(total=max_evals, desc=f"calibrating threshold (target NFE {target:g})", leave=False)

    def evaluate(t: float) -> float:
        if t not in seen:
            seen[t] = _as_nfe(nfe_of(t))
            history.append((t, float(seen[t].mean())))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(threshold=f"{t:.4g}", nfe=f"{float(seen[t].mean()):.2f}")
        return sign * (float(seen[t].mean()) - target)

    def best() -> ThresholdFit:
        t = min(seen, key=lambda k: (abs(float(seen[k].mean()) - target), float(seen[k].mean()) > target, k))
        v = seen[t]
        if bar is not None:
            bar.close()
        return ThresholdFit(t, float(target), float(v.mean()), float(v.min()), float(v.max()),
                            abs(float(v.mean()) - target) <= tol, len(seen), tuple(history))

    g_lo = evaluate(lo)
    if g_lo <= tol:  # the low end is already within tol, or even it overshoots: nothing to bisect
        return best()
    g_hi = evaluate(hi)
    expand = 0
    while g_hi > tol and expand < max_expand and len(seen) < max_evals:
        lo, g_lo = hi, g_hi
        hi = hi * 2 if hi > 0 else 1.0
        g_hi = evaluate(hi)
        expand += 1
    if g_hi > tol:  # no threshold in reach skips enough
        return best()
    # invariant: g(lo) > 0 >= g(hi) or g(hi) within tol; bisect, then refine a little once within tol
    extra = int(abs(g_hi) <= tol)
    while len(seen) < max_evals and extra <= refine and g_hi != 0:
        mid = math.sqrt(lo * hi) if geometric else 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        g = evaluate(mid)
        if abs(g) <= tol:
            extra += 1
            if g == 0:
                break
        if g > 0:
            lo = mid
        else:
            hi, g_hi = mid, g
    return best()


def bisect_threshold(nfe_of: Callable[[float], NFEValues], target: float,
                     lo: float = 0.0, hi: float = 1.0, *, tol: float = NFE_TOLERANCE,
                     refine: int = 1) -> tuple[float, float]:
    """``(threshold, mean NFE)`` of :func:`calibrate_threshold`, one refining step by default (the peers' hooks).

    ``nfe_of(t)`` returns the per-element NFE or their mean; ``lo < hi``
    brackets the start, ``hi`` doubles until the target is inside.
    """
    fit = calibrate_threshold(nfe_of, target, lo=lo, hi=hi, tol=tol, refine=refine)
    return fit.threshold, fit.mean
