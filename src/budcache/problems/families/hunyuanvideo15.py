"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``): (B, C, F, H, W) latents fed with zero
condition channels, shifted ``linspace(1, 0)`` sigmas, two text streams with masks (Qwen2.5-VL and ByT5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...denoisers import HunyuanVideo15Denoiser, TextCond
from .record import Family, PipelineView


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    return v.pipe.prepare_latents(1, v.pipe.num_channels_latents, v.height, v.width, v.num_frames, torch.float32,
                                  v.device, g)


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    def one(texts: list[str]) -> TextCond:
        pe, mask, pe2, mask2 = v.pipe.encode_prompt(prompt=texts, device=v.device, dtype=v.transformer.dtype,
                                                    batch_size=len(texts))
        return TextCond(pe, mask=mask, prompt_embeds_2=pe2, mask_2=mask2)

    return one(list(prompts)), (one([v.negative_prompt] * len(prompts)) if cfg else None)


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    return latents / v.pipe.vae.config.scaling_factor


def _vae_scale(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor_spatial", 16) or 16)


FAMILY = Family(pipeline="HunyuanVideo15Pipeline", transformer="HunyuanVideo15Transformer3DModel",
                denoiser=lambda v: HunyuanVideo15Denoiser(v.transformer, int(v.pipe.vision_num_semantic_tokens)),
                latents=_latents, timestep_kwargs=lambda v, n, c: {"sigmas": np.linspace(1.0, 0.0, n + 1)[:-1]},
                encode=_encode, vae_latents=_vae_latents, vae_scale=_vae_scale, video=True,
                requires=("prompt_embeds_2",), decode_batch=1)  # its VAE's mid-block attention takes one item
