"""Denoisers: the model as the sampler sees it, ``v = D(x, sigma, cond)``.

A denoiser is either a diffusers transformer behind a small per-family call
adapter (which arguments the model takes: packed latents, ids, timestep
scaling, pooled text), or any plain callable ``v(x, sigma, cond)``. Only a
transformer can take residual caches (hooks on its block stack); a callable
supports velocity reuse alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .errors import ConfigError
from .hooks import model_context


class Denoiser(Protocol):
    """What the sampler calls: velocity for latents ``x`` (B, ...) at ``sigma`` (B,)."""

    transformer: torch.nn.Module | None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, context: str) -> torch.Tensor: ...


@dataclass
class CallableDenoiser:
    """Wraps ``fn(x, sigma, cond) -> v``; no block stack, so only velocity reuse applies."""

    fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    transformer: None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, context: str) -> torch.Tensor:
        return self.fn(x, sigma, cond)


@dataclass(frozen=True)
class TextCond:
    """Text conditioning: token states (B, L, D), optional pooled vector (B, P), optional distilled guidance.

    FLUX and SD3 use both tensors; Wan uses the token states only.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    guidance: float | None = None

    def select(self, idx: torch.Tensor) -> TextCond:
        """The conditioning of batch elements ``idx``."""
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds.index_select(0, idx)
        return TextCond(self.prompt_embeds.index_select(0, idx), pooled, self.guidance)

    def tile(self, n: int) -> TextCond:
        """The whole batch repeated ``n`` times (candidate-major), e.g. for candidate masks."""
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds.repeat(n, 1)
        return TextCond(self.prompt_embeds.repeat(n, 1, 1), pooled, self.guidance)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


#: FLUX conditioning (the same structure).
FluxCond = TextCond


class FluxDenoiser:
    """Calls a ``FluxTransformer2DModel`` on packed latents (B, T, C) the way FluxPipeline does.

    ``height``/``width`` are the latent grid of tokens (rows, columns); image
    ids are ``[0, row, col]``, text ids zeros; the timestep is ``sigma`` (the
    model multiplies it by 1000), computed as ``(1000 sigma) / 1000`` like the
    pipeline so both give identical inputs.
    """

    def __init__(self, transformer: torch.nn.Module, rows: int, cols: int) -> None:
        self.transformer = transformer
        self.rows, self.cols = rows, cols
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _position_ids(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, device, dtype)
        if key not in self._ids:
            img = torch.zeros(self.rows, self.cols, 3, device=device, dtype=dtype)
            img[..., 1] = torch.arange(self.rows, device=device, dtype=dtype)[:, None]
            img[..., 2] = torch.arange(self.cols, device=device, dtype=dtype)[None, :]
            self._ids[key] = (img.reshape(-1, 3), torch.zeros(length, 3, device=device, dtype=dtype))
        return self._ids[key]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if cond.pooled_prompt_embeds is None:
            raise ConfigError("FLUX needs pooled_prompt_embeds")
        if x.dim() != 3 or x.shape[1] != self.rows * self.cols:
            raise ConfigError(f"FLUX latents must be packed (B, {self.rows * self.cols}, C); got {tuple(x.shape)}")
        img_ids, txt_ids = self._position_ids(cond.prompt_embeds.shape[1], x.device, x.dtype)
        timestep = (sigma * 1000).to(x.dtype) / 1000
        guidance = None
        if getattr(self.transformer.config, "guidance_embeds", False):
            g = 3.5 if cond.guidance is None else cond.guidance
            guidance = torch.full((x.shape[0],), g, device=x.device, dtype=torch.float32)
        with model_context(self.transformer, context):
            return self.transformer(hidden_states=x, timestep=timestep, guidance=guidance,
                                    pooled_projections=cond.pooled_prompt_embeds,
                                    encoder_hidden_states=cond.prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                                    return_dict=False)[0]


def _timestep(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1000 sigma`` in the schedule's precision, as FlowMatch schedulers form ``timesteps``."""
    return (sigma * 1000).to(dtype)


class SD3Denoiser:
    """Calls an ``SD3Transformer2DModel`` on latents (B, C, H, W) the way StableDiffusion3Pipeline does.

    The pipeline passes ``timestep = 1000 sigma`` (its scheduler's timesteps)
    and the text states and pooled vector; CFG runs as two calls here (one per
    ``cache_context``), which equals the pipeline's one batched call up to
    float rounding.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"SD3 latents must be (B, C, H, W); got {tuple(x.shape)}")
        if cond.pooled_prompt_embeds is None:
            raise ConfigError("SD3 needs pooled_prompt_embeds")
        with model_context(self.transformer, context):
            return self.transformer(hidden_states=x, timestep=_timestep(sigma, x.dtype),
                                    encoder_hidden_states=cond.prompt_embeds,
                                    pooled_projections=cond.pooled_prompt_embeds, return_dict=False)[0]


class WanDenoiser:
    """Calls a ``WanTransformer3DModel`` on latents (B, C, F, H, W) the way WanPipeline does (``t = 1000 sigma``)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if x.dim() != 5:
            raise ConfigError(f"Wan latents must be (B, C, F, H, W); got {tuple(x.shape)}")
        with model_context(self.transformer, context):
            return self.transformer(hidden_states=x, timestep=_timestep(sigma, x.dtype),
                                    encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]


#: Call adapters by transformer class name; each takes (transformer, **geometry).
ADAPTERS: dict[str, Callable[..., Denoiser]] = {"FluxTransformer2DModel": FluxDenoiser,
                                                "SD3Transformer2DModel": SD3Denoiser,
                                                "WanTransformer3DModel": WanDenoiser}


def as_denoiser(model: Any, **geometry: Any) -> Denoiser:
    """A denoiser for ``model``: a known diffusers transformer, a denoiser, or a plain callable."""
    if type(model).__name__.endswith("Pipeline") or hasattr(model, "components"):
        raise ConfigError(f"got a pipeline ({type(model).__name__}); budcache's sampler takes its transformer: "
                          "pass pipe.transformer (or use budcache.diffusers.apply(pipe, policy))")
    if hasattr(model, "transformer") and callable(model):
        return model
    if isinstance(model, torch.nn.Module) and type(model).__name__ in ADAPTERS:
        try:
            return ADAPTERS[type(model).__name__](model, **geometry)
        except TypeError as exc:
            raise ConfigError(f"{type(model).__name__} needs its latent geometry: {exc} "
                              "(for FLUX pass rows=..., cols=..., the token grid)") from None
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        raise ConfigError(f"no call adapter for {type(model).__name__}; supported: {sorted(ADAPTERS)}")
    if callable(model):
        return CallableDenoiser(model)
    raise ConfigError(f"cannot use {type(model).__name__} as a denoiser")
