"""FLUX.2 (``Flux2Pipeline``): packed 2x2 latent tokens with 4-axis position ids, an empirical resolution and
step-count shift, Mistral text states (no pooled vector) and embedded guidance."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...denoisers import Flux2Denoiser, TextCond
from .flux import grid
from .record import Family, PipelineView, default_vae_scale


def _latents(v: PipelineView, g: torch.Generator) -> torch.Tensor:
    lat, _ = v.pipe.prepare_latents(1, v.transformer.config.in_channels // 4, v.height, v.width, torch.float32,
                                    v.device, g)
    return lat


def _timesteps(v: PipelineView, n: int, cfg: Any) -> dict[str, Any]:
    # the pipeline's own module holds the empirical mu(L, N); it is loaded once a Flux2Pipeline exists
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    r, c = grid(v)
    kw: dict[str, Any] = {"mu": compute_empirical_mu(image_seq_len=r * c, num_steps=n)}
    if not getattr(cfg, "use_flow_sigmas", False):
        kw["sigmas"] = np.linspace(1.0, 1 / n, n)
    return kw


def _encode(v: PipelineView, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
    pe, _ = v.pipe.encode_prompt(prompt=prompts, device=v.device)
    un = None
    if cfg:
        npe, _ = v.pipe.encode_prompt(prompt=[v.negative_prompt] * len(prompts), device=v.device)
        un = TextCond(npe, guidance=v.embedded_guidance)
    return TextCond(pe, guidance=v.embedded_guidance), un


def _vae_latents(v: PipelineView, latents: torch.Tensor) -> torch.Tensor:
    """Tokens back to the (B, 4C, r, c) grid, the VAE's batch-norm statistics restored, then 2x2 unpatchified."""
    vae = v.pipe.vae
    r, c = grid(v)
    lat = latents.transpose(1, 2).reshape(latents.shape[0], -1, r, c)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat)
    return v.pipe._unpatchify_latents(lat * std + mean)


FAMILY = Family(pipeline="Flux2Pipeline", transformer="Flux2Transformer2DModel",
                denoiser=lambda v: Flux2Denoiser(v.transformer, *grid(v)), latents=_latents,
                timestep_kwargs=_timesteps, encode=_encode, vae_latents=_vae_latents, vae_scale=default_vae_scale)
