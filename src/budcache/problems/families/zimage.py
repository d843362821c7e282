"""Z-Image (``ZImagePipeline``): (B, C, H, W) latents, FLUX's resolution shift, variable-length Qwen3 text
states (padded here with a mask), a model that runs on lists and predicts ``-v``.

The pipeline guides with ``v_c + s (v_c - v_u)``, budcache with ``v_u + g (v_c - v_u)``: budcache's
``guidance = g`` is the pipeline's ``guidance_scale = g - 1`` (``guidance_scale=0``, Z-Image-Turbo's, is
``guidance=1``).
"""

from __future__ import annotations

from typing import Any

import torch

from ...denoisers import TextCond, ZImageDenoiser
from .flux import grid
from .record import Family, PipelineView, calculate_mu, default_vae_scale


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    return v.pipe.prepare_latents(1, v.transformer.in_channels, v.height, v.width, torch.float32, v.device, g)


def _timesteps(v: PipelineView, n: int, cfg: Any) -> dict[str, Any]:
    r, c = grid(v)
    return {"mu": calculate_mu(r * c, cfg, 1.15), "sigmas": torch.linspace(1.0, 1 / n, n).tolist()}


def _padded(states: list[torch.Tensor]) -> TextCond:
    """Variable-length (L_i, D) caption states as (B, L, D) with a (B, L) mask of the real tokens."""
    n = max(s.shape[0] for s in states)
    pe = torch.stack([torch.cat([s, s.new_zeros(n - s.shape[0], s.shape[1])]) for s in states])
    mask = torch.stack([torch.arange(n, device=pe.device) < s.shape[0] for s in states]).long()
    return TextCond(pe, mask=mask)


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    pe, npe = v.pipe.encode_prompt(prompt=list(prompts), device=v.device, do_classifier_free_guidance=cfg,
                                   negative_prompt=[v.negative_prompt] * len(prompts))
    return _padded(pe), (_padded(npe) if cfg else None)


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    vae = v.pipe.vae
    return latents / vae.config.scaling_factor + vae.config.shift_factor


FAMILY = Family(pipeline="ZImagePipeline", transformer="ZImageTransformer2DModel",
                denoiser=lambda v: ZImageDenoiser(v.transformer), latents=_latents, timestep_kwargs=_timesteps,
                encode=_encode, vae_latents=_vae_latents, vae_scale=default_vae_scale)
