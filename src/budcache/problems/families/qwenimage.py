"""Qwen-Image (``QwenImagePipeline``): packed 2x2 latent tokens, FLUX's resolution shift, Qwen2.5-VL text
states with a padding mask, per-channel latent statistics.

The pipeline's true CFG rescales the guided velocity to the conditional one's norm; budcache's sampler
guides with ``v_u + g (v_c - v_u)``, so the two agree exactly only without guidance (the pipeline's default,
no negative prompt).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...denoisers import QwenImageDenoiser, TextCond
from .flux import grid
from .record import Family, PipelineView, calculate_mu, default_vae_scale


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    return v.pipe.prepare_latents(1, v.transformer.config.in_channels // 4, v.height, v.width, torch.float32,
                                  v.device, g)


def _timesteps(v: PipelineView, n: int, cfg: Any) -> dict[str, Any]:
    r, c = grid(v)
    return {"mu": calculate_mu(r * c, cfg, 1.15), "sigmas": np.linspace(1.0, 1 / n, n)}


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    pe, mask = v.pipe.encode_prompt(prompt=prompts, device=v.device)
    un = None
    if cfg:
        npe, nmask = v.pipe.encode_prompt(prompt=[v.negative_prompt] * len(prompts), device=v.device)
        un = TextCond(npe, guidance=v.embedded_guidance, mask=nmask)
    return TextCond(pe, guidance=v.embedded_guidance, mask=mask), un


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    cfg = v.pipe.vae.config
    lat = v.pipe._unpack_latents(latents, v.height, v.width, v.vae_scale_factor)
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(lat)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(lat)
    return lat * std + mean


FAMILY = Family(pipeline="QwenImagePipeline", transformer="QwenImageTransformer2DModel",
                denoiser=lambda v: QwenImageDenoiser(v.transformer, *grid(v)), latents=_latents,
                timestep_kwargs=_timesteps, encode=_encode, vae_latents=_vae_latents, vae_scale=default_vae_scale)
