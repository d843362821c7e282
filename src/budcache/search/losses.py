"""Search losses: how far a mask's final latents are from the full-step teacher's, per calibration item.

The search loss of a mask ``m`` is
``L(m) = mean_{(c,z)} loss(x_0^m(z, c), x_0^full(z, c))`` over the
calibration set (:class:`budcache.problems.CalibrationSet`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError

#: Per-item loss between final latents and the teacher's: (C, ...) x (C, ...) -> (C,).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def latent_mse(x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item ``mean((x - x_full)^2)``."""
    return (x - teacher).pow(2).flatten(1).mean(1)


def latent_l1(x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item ``mean(|x - x_full|)``."""
    return (x - teacher).abs().flatten(1).mean(1)


def latent_log_mse(x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item ``log(mean((x - x_full)^2))``: its mean is minus the mean latent PSNR (over ln 10 / 10).

    The plain MSE averages errors, so a few hard items dominate it; the log
    weighs every item's relative error equally, which is what a per-image
    quality metric (PSNR, paired wins) rewards.
    """
    return torch.log((x - teacher).pow(2).flatten(1).mean(1).clamp_min(1e-20))


def mean_of_items(parts: Sequence[Sequence[float]]) -> float:
    """The calibration loss ``L = mean_i loss_i`` from per-item losses given in item order, split in parts.

    Taken as the in-process evaluator takes it (a float32 mean over the C
    items), so items scored on different workers give the same bits as one
    batch would.
    """
    return float(torch.tensor([v for p in parts for v in p], dtype=torch.float32).mean())


LOSSES: dict[str, LossFn] = {"mse": latent_mse, "l1": latent_l1, "logmse": latent_log_mse}


def get_loss(name: str) -> LossFn:
    """The loss named ``name`` (``mse``, ``l1``, ``logmse``)."""
    if name not in LOSSES:
        raise ConfigError(f"loss {name!r} is unknown; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
