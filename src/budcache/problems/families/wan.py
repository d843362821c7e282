"""Wan 2.x text-to-video (``WanPipeline``): (B, C, F, H, W) latents, UMT5 text, per-channel latent statistics."""

from __future__ import annotations

from typing import Any

import torch

from ...denoisers import TextCond, WanDenoiser
from .record import Family, PipelineView


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    return v.pipe.prepare_latents(1, v.transformer.config.in_channels, v.height, v.width, v.num_frames,
                                  torch.float32, v.device, g)


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    pe, npe = v.pipe.encode_prompt(prompt=prompts, negative_prompt=[v.negative_prompt] * len(prompts),
                                   do_classifier_free_guidance=cfg, device=v.device)
    return TextCond(pe), (TextCond(npe) if cfg else None)


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    cfg = v.pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(latents)
    return latents / std + mean


def _vae_scale(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)


FAMILY = Family(pipeline="WanPipeline", transformer="WanTransformer3DModel",
                denoiser=lambda v: WanDenoiser(v.transformer), latents=_latents, timestep_kwargs=lambda v, n, c: {},
                encode=_encode, vae_latents=_vae_latents, vae_scale=_vae_scale, video=True)
