"""Per-item quality of final latents against the full-step teacher: the one definition every stage reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

#: MSE floor of the PSNR: identical outputs score ``10 log10(1 / 1e-12) = 120`` dB, so means stay finite.
MSE_FLOOR = 1e-12


def latent_psnr(mse: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item PSNR on latents, the teacher's per-item range as peak: ``10 log10(range^2 / MSE)``."""
    t = teacher.flatten(1)
    peak = (t.max(1).values - t.min(1).values).pow(2)
    return 10 * torch.log10(peak / mse.clamp_min(MSE_FLOOR))


@torch.no_grad()
def item_metrics(problem: Any, latents: torch.Tensor, teacher: torch.Tensor, prompts: Sequence[str] | None = None,
                 lpips: Any = None) -> dict[str, np.ndarray]:
    """Per-item metrics of ``latents`` against the full-step ``teacher`` latents.

    - ``latent_mse``: ``mean((x - x_full)^2)`` per item;
    - ``psnr``: ``10 log10(1 / max(MSE, 1e-12))`` on images in [0, 1] when the problem decodes them
      (:meth:`Problem.images`), else :func:`latent_psnr`;
    - ``ssim``: on decoded images of at least 7x7 pixels;
    - ``lpips``: with an LPIPS metric object (optional);
    - ``checker_ok``: 0/1 per image when ``prompts`` are given and the problem has a prompt checker.

    Args:
        problem: the problem (its ``images`` and ``checker_accuracy``).
        latents: final latents (B, ...).
        teacher: the full-step latents (B, ...).
        prompts: the items' prompts (for the checker).
        lpips: a callable ``lpips(a, b)`` on image pairs, or ``None``.
    """
    latents, teacher = latents.detach(), teacher.detach()
    mse = (latents - teacher).pow(2).flatten(1).mean(1)
    out = {"latent_mse": mse.cpu().numpy()}
    a, b = problem.images(latents), problem.images(teacher)
    if a is None or b is None:
        out["psnr"] = latent_psnr(mse, teacher).cpu().numpy()
        return out
    a, b = a.float().clamp(0, 1), b.float().clamp(0, 1)
    img_mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    out["psnr"] = (10 * torch.log10(1.0 / img_mse)).cpu().numpy()
    if a.dim() == 4 and min(a.shape[-2:]) >= 7:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        out["ssim"] = ssim(a, b, data_range=1.0, reduction="none").cpu().numpy()
    if lpips is not None:
        out["lpips"] = np.array([float(lpips(a[i:i + 1], b[i:i + 1])) for i in range(len(a))])
    if prompts is not None:
        verdicts = problem.checker_accuracy(list(prompts), a)
        if verdicts is not None:
            out["checker_ok"] = np.asarray(verdicts, dtype=np.float64)
    return out


@dataclass(frozen=True)
class PairedGap:
    """``stat(ref) - stat(other)`` over paired items, with its bootstrap interval (``None`` below 2 items)."""

    gap: float
    low: float | None
    high: float | None

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or wholly below 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def fields(self, key: str) -> dict[str, Any]:
        """The JSON fields of a report row: ``{key: gap, key_ci: [low, high]}`` (no ``key_ci`` without one)."""
        out: dict[str, Any] = {key: self.gap}
        if self.low is not None and self.high is not None:
            out[f"{key}_ci"] = [self.low, self.high]
        return out


def gap_text(gap: float, ci: Sequence[float] | None = None) -> str:
    """``+1.23 [-0.40, +2.95]``: a paired gap with its interval (just the gap without one)."""
    return f"{gap:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def paired_gap(ref: np.ndarray, other: np.ndarray, stat: Literal["mean", "median"] = "median", *,
               resamples: int = 2000, level: float = 0.95, seed: int = 0) -> PairedGap:
    """The gap ``stat(ref) - stat(other)`` between two methods scored on the same items, with a paired
    percentile-bootstrap interval at ``level``.

    Items are resampled jointly (scipy's ``bootstrap(paired=True)``), so the interval is the spread of the gap
    over draws of the evaluation items: an interval that holds 0 is a gap the draw of items can reverse.
    Seeded, so the same scores give the same interval.

    Args:
        ref: the reference method's per-item scores (n,).
        other: the other method's scores on the same items (n,).
        stat: ``"mean"`` or ``"median"``.
        resamples: bootstrap resamples.
        level: confidence level of the interval.
        seed: the resampling's seed.
    """
    from scipy.stats import bootstrap

    a, b = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need equal 1-d shapes (got {a.shape} and {b.shape})")
    if stat not in ("mean", "median"):
        raise ValueError(f"stat must be 'mean' or 'median' (got {stat!r})")
    fn = np.mean if stat == "mean" else np.median
    gap = float(fn(a) - fn(b))
    if len(a) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return PairedGap(gap, None, None)

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return fn(x, axis=axis) - fn(y, axis=axis)

    ci = bootstrap((a, b), statistic, paired=True, vectorized=True, n_resamples=resamples,
                   confidence_level=level, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return PairedGap(gap, float(ci.low), float(ci.high))
