"""The family record: what differs between diffusers pipelines when budcache drives their model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ...denoisers import TextCond


class PipelineView(Protocol):
    """What a family's functions read of the problem: the pipeline and the latent geometry."""

    pipe: Any
    height: int
    width: int
    num_frames: int
    vae_scale_factor: int
    negative_prompt: str
    embedded_guidance: float | None

    @property
    def transformer(self) -> torch.nn.Module: ...
    @property
    def device(self) -> torch.device: ...


#: ``encode(view, prompts, cfg)`` -> positive conditioning and, when ``cfg``, the negative one.
Encode = Callable[[PipelineView, list[str], bool], tuple[TextCond, "TextCond | None"]]


@dataclass(frozen=True)
class Family:
    """One model family: how to drive its transformer outside the pipeline's loop.

    Args:
        pipeline: the diffusers pipeline class name (the registry key).
        transformer: the transformer class name the adapter expects.
        denoiser: ``denoiser(view) -> Denoiser``, the call adapter of :mod:`budcache.denoisers`.
        latents: ``latents(view, generator) -> (1, ...)``, the pipeline's own initial noise for one seed.
        timestep_kwargs: ``kwargs(view, n, scheduler_config)`` for the scheduler's ``set_timesteps``
            (the resolution shift ``mu``, explicit sigmas), as the pipeline passes them.
        encode: prompt encoding with the pipeline's text encoders (see :data:`Encode`).
        vae_latents: ``vae_latents(view, latents)``: the pipeline's latents as its VAE decodes them
            (unpacking and the latent normalisation undone); ``None`` when the family has no decoder.
        vae_scale: ``vae_scale(pipe) -> int``, the VAE's spatial down-sampling factor.
        pooled: whether the conditioning has a pooled text vector (embeddings files must hold one).
        video: whether latents have a frame axis (``--num-frames`` applies).
        requires: further conditioning tensors an embeddings file must hold for this family (names of
            :data:`budcache.problems.pipeline.COND_NAMES`, e.g. a second text stream and its mask).
        decode_batch: the most latents the VAE decodes in one call (0: the whole batch), for VAEs that
            decode one item at a time.
    """

    pipeline: str
    transformer: str
    denoiser: Callable[[PipelineView], Any]
    latents: Callable[[PipelineView, torch.Generator], torch.Tensor]
    timestep_kwargs: Callable[[PipelineView, int, Any], dict[str, Any]]
    encode: Encode
    vae_latents: Callable[[PipelineView, torch.Tensor], torch.Tensor] | None
    vae_scale: Callable[[Any], int]
    pooled: bool = False
    video: bool = False
    requires: tuple[str, ...] = ()
    decode_batch: int = 0


def default_vae_scale(pipe: Any) -> int:
    """``pipe.vae_scale_factor`` (8 when unset)."""
    return int(getattr(pipe, "vae_scale_factor", 8) or 8)


def calculate_mu(seq_len: int, cfg: Any, max_shift: float) -> float:
    """The resolution shift of FLUX-style schedulers, linear in the token count ``L``:
    ``mu = b0 + (L - L0) (b1 - b0) / (L1 - L0)`` between the config's ``base_image_seq_len`` ``L0``
    (``base_shift`` ``b0``) and ``max_image_seq_len`` ``L1`` (``max_shift`` ``b1``), as the pipelines compute it."""
    l0, l1 = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    b0, b1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift)
    slope = (b1 - b0) / (l1 - l0)
    return seq_len * slope + (b0 - slope * l0)
