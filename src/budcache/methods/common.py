"""Pieces the methods share: the relative L1 signal, sampling through a problem's sampler, budgets, calibration."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..sampler import Controller, run_batches


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element ``mean|a - b| / mean|b|`` over everything but the batch dimension: (B, ...) -> (B,)."""
    if a.shape != b.shape:
        raise ConfigError(f"relative L1 needs equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    num = (a - b).abs().flatten(1).mean(1)
    den = b.abs().flatten(1).mean(1).clamp_min(1e-12)
    return num / den


def polyval(coefficients: torch.Tensor | list[float], x: torch.Tensor) -> torch.Tensor:
    """``p(x) = c_0 x^d + c_1 x^(d-1) + ... + c_d`` (highest power first, as ``numpy.poly1d``), by Horner."""
    c = torch.as_tensor(coefficients, dtype=torch.float64)
    out = torch.zeros_like(x, dtype=torch.float64)
    for ci in c:
        out = out * x.double() + ci
    return out


#: The cache mechanism of every re-implemented baseline: the originals reuse the last computed residual
#: (DiCache replaces it by its own aligned estimate), whatever mechanism the problem defaults to.
MECHANISM = "reuse"


def reuse_sampler(problem: Any) -> Any:
    """``make_sampler(controller)`` of ``problem`` with residual reuse (for the evaluator)."""
    return lambda controller, *args, **kw: problem.make_sampler(controller, *args, **{**kw, "mechanism": MECHANISM})


def run_sampler(sampler: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> Any:
    """One run of ``sampler`` over the whole batch ``noise``; its ``SampleResult``."""
    st = sampler.run(sampler.start(noise), cond, uncond)
    return sampler.result(st)


def calib_mse(latents: torch.Tensor, calib: Any) -> float:
    """Mean latent MSE against the calibration teacher: ``mean_i mean((x_i - x_full_i)^2)``."""
    return float((latents - calib.teacher).pow(2).flatten(1).mean(1).mean())


def run_controller(problem: Any, controller: Controller, noise: torch.Tensor, cond: Any, uncond: Any = None,
                   batch: int = 64, callback: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``noise`` in batches through ``problem``'s sampler with ``controller`` (residual reuse).

    Returns the final latents (B, ...) and which elements computed at every
    step (N, B) bool. ``callback(state, offset)`` runs after every step.
    """
    if batch < 1:
        raise ConfigError(f"batch must be >= 1 (got {batch})")
    per_batch = None if callback is None else (lambda offset, size: (lambda st: callback(st, offset)))
    with torch.no_grad():
        res = run_batches(reuse_sampler(problem)(controller), noise, cond, uncond, batch, callback=per_batch)
    return res.latent, res.computed


def check_budget(problem: Any, nfe: int) -> int:
    """``nfe`` as an int in ``1..problem.steps`` or a ConfigError naming it."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= problem.steps:
        raise ConfigError(f"budget nfe={nfe!r} must be an integer in 1..{problem.steps} (the number of steps)")
    return nfe


def calib_key(problem: Any, calib: Any) -> tuple:
    """What offline measurements depend on: the calibration set and the problem's sampler settings."""
    return (calib.digest, problem.steps, problem.solver, problem.guidance)
