"""FLUX.1 (``FluxPipeline``): packed 2x2 latent tokens, resolution-shifted sigmas, T5 + CLIP pooled text."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...denoisers import FluxDenoiser, TextCond
from ...errors import ConfigError
from .record import Family, PipelineView, calculate_mu, default_vae_scale


def grid(v: PipelineView) -> tuple[int, int]:
    """Rows and columns of packed latent tokens at the view's resolution."""
    r, c = v.height // (v.vae_scale_factor * 2), v.width // (v.vae_scale_factor * 2)
    if r < 1 or c < 1:
        raise ConfigError(f"height {v.height} x width {v.width} is too small for vae_scale_factor "
                          f"{v.vae_scale_factor}")
    return r, c


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    lat, _ = v.pipe.prepare_latents(1, v.transformer.config.in_channels // 4, v.height, v.width, torch.float32,
                                    v.device, g)
    return lat


def _timesteps(v: PipelineView, n: int, cfg: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"mu": calculate_mu(int(np.prod(grid(v))), cfg, 1.15)}
    if not getattr(cfg, "use_flow_sigmas", False):
        kw["sigmas"] = np.linspace(1.0, 1 / n, n)
    return kw


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    pe, pooled, _ = v.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=v.device)
    un = None
    if cfg:
        npe, npooled, _ = v.pipe.encode_prompt(prompt=[v.negative_prompt] * len(prompts), prompt_2=None,
                                               device=v.device)
        un = TextCond(npe, npooled, v.embedded_guidance)
    return TextCond(pe, pooled, v.embedded_guidance), un


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    vae = v.pipe.vae
    lat = v.pipe._unpack_latents(latents, v.height, v.width, v.vae_scale_factor)
    return lat / vae.config.scaling_factor + vae.config.shift_factor


FAMILY = Family(pipeline="FluxPipeline", transformer="FluxTransformer2DModel",
                denoiser=lambda v: FluxDenoiser(v.transformer, *grid(v)), latents=_latents,
                timestep_kwargs=_timesteps, encode=_encode, vae_latents=_vae_latents, vae_scale=default_vae_scale,
                pooled=True)
