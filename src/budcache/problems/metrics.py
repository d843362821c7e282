"""Per-item quality of final latents against the full-step teacher: the one definition every stage reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
