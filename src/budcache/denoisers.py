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
    """Text conditioning: token states (B, L, D), optional pooled vector (B, P), optional distilled guidance,
    and the optional token masks and second text stream of families whose encoders pad.

    FLUX and SD3 use both tensors; Wan uses the token states only. ``mask`` (B, L) marks the real tokens of
    ``prompt_embeds`` (1) and the padding (0); ``None`` means every token is real. ``prompt_embeds_2``
    (B, L2, D2) with ``mask_2`` is a second text stream (HunyuanVideo 1.5's ByT5 glyph states).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    guidance: float | None = None
    mask: torch.Tensor | None = None
    prompt_embeds_2: torch.Tensor | None = None
    mask_2: torch.Tensor | None = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TextCond:
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return TextCond(fn(self.prompt_embeds), f(self.pooled_prompt_embeds), self.guidance, f(self.mask),
                        f(self.prompt_embeds_2), f(self.mask_2))

    def select(self, idx: torch.Tensor) -> TextCond:
        """The conditioning of batch elements ``idx``."""
        return self._map(lambda t: t.index_select(0, idx.to(t.device)))

    def tile(self, n: int) -> TextCond:
        """The whole batch repeated ``n`` times (candidate-major), e.g. for candidate masks."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


def token_mask(cond: TextCond, second: bool = False) -> torch.Tensor:
    """The (B, L) token mask of ``cond``'s first (or second) text stream; all ones when none is stored."""
    states, mask = (cond.prompt_embeds_2, cond.mask_2) if second else (cond.prompt_embeds, cond.mask)
    if states is None:
        raise ConfigError("this model needs a second text stream (prompt_embeds_2) in its conditioning")
    if mask is None:
        return torch.ones(states.shape[:2], dtype=torch.int64, device=states.device)
    return mask


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


def _packed_ids(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """FLUX.2's image position ids ``(t, h, w, l) = (0, row, col, 0)`` of a row-major token grid (T, 4)."""
    ids = torch.zeros(rows, cols, 4, dtype=torch.int64, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(-1, 4)


class Flux2Denoiser:
    """Calls a ``Flux2Transformer2DModel`` on packed latents (B, T, C) the way Flux2Pipeline does.

    Image ids are ``(0, row, col, 0)`` for the ``rows x cols`` token grid, text ids ``(0, 0, 0, l)``; the
    timestep is ``(1000 sigma) / 1000`` (the model multiplies it by 1000); the embedded guidance is
    ``cond.guidance`` (the pipeline's default 4.0 when unset), passed on every call as the pipeline does.
    """

    def __init__(self, transformer: torch.nn.Module, rows: int, cols: int) -> None:
        self.transformer = transformer
        self.rows, self.cols = rows, cols

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.rows * self.cols:
            raise ConfigError(f"FLUX.2 latents must be packed (B, {self.rows * self.cols}, C); got {tuple(x.shape)}")
        img_ids = _packed_ids(self.rows, self.cols, x.device)
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 4, dtype=torch.int64, device=x.device)
        txt_ids[:, 3] = torch.arange(cond.prompt_embeds.shape[1], device=x.device)
        g = 4.0 if cond.guidance is None else cond.guidance
        guidance = torch.full((x.shape[0],), g, device=x.device, dtype=torch.float32)
        with model_context(self.transformer, context):
            return self.transformer(hidden_states=x, timestep=_timestep(sigma, x.dtype) / 1000, guidance=guidance,
                                    encoder_hidden_states=cond.prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                                    return_dict=False)[0]


class QwenImageDenoiser:
    """Calls a ``QwenImageTransformer2DModel`` on packed latents (B, T, C) the way QwenImagePipeline does.

    ``img_shapes`` is one ``(1, rows, cols)`` frame per element; the timestep is ``(1000 sigma) / 1000``;
    the text mask is ``cond.mask`` (``None`` when every token is real, as the pipeline passes it); the
    embedded guidance only for guidance-distilled configs.
    """

    def __init__(self, transformer: torch.nn.Module, rows: int, cols: int) -> None:
        self.transformer = transformer
        self.rows, self.cols = rows, cols

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.rows * self.cols:
            raise ConfigError(f"Qwen-Image latents must be packed (B, {self.rows * self.cols}, C); "
                              f"got {tuple(x.shape)}")
        guidance = None
        if getattr(self.transformer.config, "guidance_embeds", False):
            g = 1.0 if cond.guidance is None else cond.guidance
            guidance = torch.full((x.shape[0],), g, device=x.device, dtype=torch.float32)
        mask = None if cond.mask is None or bool(cond.mask.all()) else cond.mask
        with model_context(self.transformer, context):
            return self.transformer(hidden_states=x, timestep=_timestep(sigma, x.dtype) / 1000, guidance=guidance,
                                    encoder_hidden_states_mask=mask, encoder_hidden_states=cond.prompt_embeds,
                                    img_shapes=[[(1, self.rows, self.cols)]] * x.shape[0], return_dict=False)[0]


class ZImageDenoiser:
    """Calls a ``ZImageTransformer2DModel`` on latents (B, C, H, W) the way ZImagePipeline does.

    The model takes lists: one (C, 1, H, W) latent and one (L_i, D) caption (the real tokens of
    ``cond.mask``) per element. Its time runs the other way, ``t = (1000 - 1000 sigma) / 1000``, and it
    predicts ``-v``, so the velocity is the negated output.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"Z-Image latents must be (B, C, H, W); got {tuple(x.shape)}")
        mask = token_mask(cond).bool()
        caps = [e[m] for e, m in zip(cond.prompt_embeds, mask)]
        t = (1000 - _timestep(sigma, torch.float32)) / 1000
        with model_context(self.transformer, context):
            out = self.transformer(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2).to(x.dtype)


class HunyuanVideo15Denoiser:
    """Calls a ``HunyuanVideo15Transformer3DModel`` on latents (B, C, F, H, W) the way its text-to-video
    pipeline does.

    The input is ``[x, 0, 0]`` (latents, zero condition latents, zero condition mask: 2C + 1 channels),
    ``t = 1000 sigma``, both text streams with their masks, and zero image embeddings
    (``image_tokens`` of them), which the model reads as text-to-video.
    """

    def __init__(self, transformer: torch.nn.Module, image_tokens: int = 729) -> None:
        self.transformer = transformer
        self.image_tokens = image_tokens

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: TextCond, context: str) -> torch.Tensor:
        if x.dim() != 5:
            raise ConfigError(f"HunyuanVideo 1.5 latents must be (B, C, F, H, W); got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        inp = torch.cat([x, torch.zeros_like(x), x.new_zeros(b, 1, f, h, w)], dim=1)
        image = x.new_zeros(b, self.image_tokens, self.transformer.config.image_embed_dim)
        pe = cond.prompt_embeds
        with model_context(self.transformer, context):
            return self.transformer(hidden_states=inp, image_embeds=image, timestep=_timestep(sigma, x.dtype),
                                    encoder_hidden_states=pe, encoder_attention_mask=token_mask(cond).to(pe.dtype),
                                    encoder_hidden_states_2=cond.prompt_embeds_2,
                                    encoder_attention_mask_2=token_mask(cond, second=True).to(pe.dtype),
                                    return_dict=False)[0]


#: Call adapters by transformer class name; each takes (transformer, **geometry).
ADAPTERS: dict[str, Callable[..., Denoiser]] = {"FluxTransformer2DModel": FluxDenoiser,
                                                "SD3Transformer2DModel": SD3Denoiser,
                                                "WanTransformer3DModel": WanDenoiser,
                                                "Flux2Transformer2DModel": Flux2Denoiser,
                                                "QwenImageTransformer2DModel": QwenImageDenoiser,
                                                "ZImageTransformer2DModel": ZImageDenoiser,
                                                "HunyuanVideo15Transformer3DModel": HunyuanVideo15Denoiser}


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
