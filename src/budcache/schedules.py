"""Sigma schedules for flow-matching samplers.

Convention: sigma runs from 1 (pure noise) to 0 (data), ``x_sigma = (1 - sigma) x0 + sigma eps``.
A schedule of ``n`` steps is a 1-D float32 tensor of ``n + 1`` strictly decreasing sigmas
ending at 0; step ``k`` goes from ``sigmas[k]`` to ``sigmas[k + 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "SCHEDULES",
    "flux",
    "flux_mu",
    "get_schedule",
    "linear",
    "validate_sigmas",
    "wan",
]


def _check_steps(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(f"number of steps must be an int >= 1, got {n!r}")
    if n < 1:
        raise ConfigError(f"number of steps must be >= 1, got {n}")
    return n


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1, dtype=torch.float32)])


def linear(n: int) -> Tensor:
    """Evenly spaced schedule: ``sigma_k = 1 - k / n`` for ``k = 0..n``."""
    n = _check_steps(n)
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).to(torch.float32)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX shift exponent, linear in the token count:
    ``mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len - base_seq_len)``."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ConfigError(f"image_seq_len must be an int >= 1, got {image_seq_len!r}")
    if max_seq_len == base_seq_len:
        raise ConfigError(
            f"max_seq_len and base_seq_len must differ, both are {base_seq_len!r}"
        )
    # Same operation order as diffusers' calculate_shift.
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux(
    n: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """FLUX resolution-dependent schedule.

    ``s_k = linspace(1, 1/n, n)``, ``mu = flux_mu(image_seq_len, ...)``,
    ``s'_k = exp(mu) / (exp(mu) + (1/s_k - 1))``, then a final 0 is appended
    (as FluxPipeline with FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)).
    """
    n = _check_steps(n)
    mu = flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    # The scheduler receives the base grid as float32.
    base = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64).to(torch.float32).to(torch.float64)
    e = math.exp(mu)
    shifted = e / (e + (1.0 / base - 1.0))
    return _append_zero(shifted)


def wan(n: int, shift: float = 5.0, num_train_timesteps: int = 1000) -> Tensor:
    """Constant-shift schedule (Wan, SD3): ``s' = shift s / (1 + (shift - 1) s)``.

    Matches FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n): the base grid is
    ``linspace(1, s_min, n)`` with ``s_min = shift (1/T) / (1 + (shift - 1)/T)``, ``T = num_train_timesteps``,
    each value is shifted, and a final 0 is appended.
    """
    n = _check_steps(n)
    if not (isinstance(shift, (int, float)) and not isinstance(shift, bool)) or not (
        math.isfinite(shift) and shift > 0
    ):
        raise ConfigError(f"shift must be a finite number > 0, got {shift!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ConfigError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")

    def _shift(s: Tensor) -> Tensor:
        return shift * s / (1.0 + (shift - 1.0) * s)

    # The scheduler's smallest training sigma (already shifted, float32).
    t_min = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)
    s_min = float(_shift(t_min))
    base = torch.linspace(1.0, s_min, n, dtype=torch.float64)
    return _append_zero(_shift(base))


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear,
    "flux": flux,
    "wan": wan,
}


def get_schedule(name: str, n: int, **kwargs: Any) -> Tensor:
    """Build the schedule ``name`` with ``n`` steps (``n + 1`` sigmas); ``kwargs`` go to its function."""
    if name not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}"
        )
    _check_steps(n)
    try:
        return SCHEDULES[name](n, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for schedule {name!r}: {exc}") from exc


def validate_sigmas(sigmas: Tensor, n: int | None = None, *, end_at_zero: bool = False) -> Tensor:
    """Check that ``sigmas`` is a valid schedule and return it unchanged.

    Requires a 1-D tensor of ``n + 1`` (if ``n`` is given, else at least 2) finite values in
    ``[0, 1]`` with ``sigmas[i + 1] < sigmas[i]``; with ``end_at_zero`` also ``sigmas[-1] == 0``.
    """
    if not isinstance(sigmas, Tensor):
        raise ConfigError(f"sigmas must be a torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1:
        raise ConfigError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if sigmas.is_complex() or not sigmas.is_floating_point():
        raise ConfigError(f"sigmas must be a real floating-point tensor, got dtype {sigmas.dtype}")
    if n is not None:
        _check_steps(n)
        if sigmas.numel() != n + 1:
            raise ConfigError(f"sigmas must have n + 1 = {n + 1} entries, got {sigmas.numel()}")
    elif sigmas.numel() < 2:
        raise ConfigError(f"sigmas must have at least 2 entries, got {sigmas.numel()}")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    for i, s in enumerate(values):
        if not math.isfinite(s):
            raise ConfigError(f"sigmas[{i}] is not finite ({s})")
        if not 0.0 <= s <= 1.0:
            raise ConfigError(f"sigmas[{i}] = {s} is outside [0, 1]")
    for i in range(len(values) - 1):
        if not values[i + 1] < values[i]:
            raise ConfigError(
                f"sigmas must be strictly decreasing: sigmas[{i + 1}] = {values[i + 1]} "
                f">= sigmas[{i}] = {values[i]}"
            )
    if end_at_zero and values[-1] != 0.0:
        raise ConfigError(f"sigmas must end at 0, last value is {values[-1]}")
    return sigmas
