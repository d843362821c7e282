"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): (B, C, H, W) latents, three text encoders, pooled text."""

from __future__ import annotations

from typing import Any

import torch

from ...denoisers import SD3Denoiser, TextCond
from .record import Family, PipelineView, calculate_mu, default_vae_scale


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    return v.pipe.prepare_latents(1, v.transformer.config.in_channels, v.height, v.width, torch.float32, v.device, g)


def _timesteps(v: PipelineView, n: int, cfg: Any) -> dict[str, Any]:
    if not cfg.get("use_dynamic_shifting", False):
        return {}
    p = v.transformer.config.patch_size
    seq = (v.height // v.vae_scale_factor // p) * (v.width // v.vae_scale_factor // p)
    return {"mu": calculate_mu(seq, cfg, 1.16)}


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    pe, npe, pooled, npooled = v.pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=v.device, do_classifier_free_guidance=cfg,
        negative_prompt=[v.negative_prompt] * len(prompts))
    return TextCond(pe, pooled), (TextCond(npe, npooled) if cfg else None)


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    vae = v.pipe.vae
    return latents / vae.config.scaling_factor + vae.config.shift_factor


FAMILY = Family(pipeline="StableDiffusion3Pipeline", transformer="SD3Transformer2DModel",
                denoiser=lambda v: SD3Denoiser(v.transformer), latents=_latents, timestep_kwargs=_timesteps,
                encode=_encode, vae_latents=_vae_latents, vae_scale=default_vae_scale, pooled=True)
