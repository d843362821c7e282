"""tinyflow: budcache's embedded default model.

A tiny ``diffusers.FluxTransformer2DModel`` (2 double-stream and 6
single-stream blocks, 64 image tokens of 4x4 pixels) and a tiny text encoder
over a grammar of coloured shapes, trained by :mod:`budcache.tinyflow.train`
on images rendered from prompts that leave attributes free. The weights ship
inside the package in diffusers' format and load offline.

>>> from budcache import tinyflow
>>> tf = tinyflow.load()
>>> result = tf.sample(["a red circle", "two squares"], seeds=[0, 1], steps=28)
>>> images = tf.images(result.latent)          # (2, 3, 32, 32) in [0, 1]
>>> pipe = tinyflow.load_pipeline()            # a real diffusers.FluxPipeline
>>> out = pipe(**tf.pipeline_inputs(["a red circle"]), num_inference_steps=28, output_type="latent")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..denoisers import FluxCond, FluxDenoiser
from ..errors import ConfigError
from ..pipelines import apply as apply_policy
from ..pipelines import remove as remove_policy
from ..sampler import sample
from ..schedules import flux
from . import grammar
from .model import IMAGE_SIZE, TinyTextEncoder, latent_to_image

WEIGHTS_DIR = Path(__file__).parent / "weights"
ROWS = COLS = IMAGE_SIZE // 4
LATENT_SHAPE = (ROWS * COLS, 48)
#: Default classifier-free guidance scale for tinyflow.
DEFAULT_GUIDANCE = 1.0


def _weights(path: str | Path | None, subfolders: tuple[str, str] = ("transformer", "text_encoder")) -> Path:
    p = Path(path) if path is not None else WEIGHTS_DIR
    for sub in subfolders:
        if not (p / sub / "config.json").is_file():
            raise ConfigError(f"tinyflow weights not found: {p / sub / 'config.json'} is missing")
        if not any((p / sub).glob("*.safetensors")):
            raise ConfigError(f"tinyflow weights not found: {p / sub} holds no .safetensors file (other formats "
                              "are not loaded)")
    return p


def scheduler() -> Any:
    """FLUX's flow-matching Euler scheduler with the resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


@dataclass
class TinyFlow:
    """The loaded model: transformer, text encoder and helpers around budcache's sampler."""

    transformer: torch.nn.Module
    text_encoder: TinyTextEncoder

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> FluxCond:
        """FLUX conditioning for prompts of tinyflow's grammar ("" is the unconditional prompt)."""
        ids = torch.from_numpy(grammar.tokenize(list(prompts))).to(self.device)
        tok, pooled = self.text_encoder(ids)
        return FluxCond(tok, pooled)

    def sigmas(self, steps: int) -> torch.Tensor:
        """FLUX's shifted schedule at tinyflow's 64 tokens (what FluxPipeline uses)."""
        return flux(steps, ROWS * COLS).to(self.device)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Packed Gaussian noise (B, 64, 48), one generator per seed (batch-independent)."""
        return torch.stack([torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(self.device)

    def denoiser(self) -> FluxDenoiser:
        return FluxDenoiser(self.transformer, ROWS, COLS)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 28, *, solver: str = "euler",
               policy: Any = None, mechanism: str | None = None, guidance: float = DEFAULT_GUIDANCE,
               sigmas: torch.Tensor | None = None, progress: bool = False) -> Any:
        """Sample with budcache's sampler; returns a :class:`budcache.sampler.SampleResult`.

        A policy runs with the estimators it names (version 2) or was searched with (``meta["mechanism"]``);
        ``mechanism`` applies only to policies and masks that name none (default ``reuse``).
        """
        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cond = self.encode(prompts)
        uncond = self.encode([""] * len(prompts)) if guidance != 1.0 else None
        sig = self.sigmas(steps) if sigmas is None else sigmas
        return sample(self.denoiser(), self.noise(seeds), cond, sig, solver=solver, policy=policy,
                      mechanism=mechanism, guidance=guidance, uncond=uncond, progress=progress)

    @staticmethod
    def images(latents: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, 64, 48) -> RGB images (B, 3, 32, 32) in [0, 1]."""
        return ((latent_to_image(latents.float()) + 1) / 2).clamp(0, 1)

    def pipeline_inputs(self, prompts: Sequence[str], guidance: float = DEFAULT_GUIDANCE,
                        seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Keyword arguments for tinyflow's FluxPipeline: embeddings, size, guidance and noise."""
        cond = self.encode(prompts)
        kw: dict[str, Any] = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                                  height=IMAGE_SIZE, width=IMAGE_SIZE)
        if guidance != 1.0:
            un = self.encode([""] * len(prompts))
            kw.update(negative_prompt_embeds=un.prompt_embeds, negative_pooled_prompt_embeds=un.pooled_prompt_embeds,
                      true_cfg_scale=guidance)
        if seeds is not None:
            kw["latents"] = self.noise(seeds)
        return kw

    def pipeline_sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 28, *, policy: Any = None,
                        mechanism: str | None = None, guidance: float = DEFAULT_GUIDANCE,
                        compile: str | None = None) -> torch.Tensor:
        """Packed latents from tinyflow's FluxPipeline, a policy applied with ``budcache.diffusers.apply``.

        The whole-compile path: with ``compile`` (a ``torch.compile`` backend, e.g. ``"inductor"``) the
        hooked transformer runs under ``torch.compile(..., fullgraph=True)``, which a static policy allows
        (three graphs per CFG pass, none recompiled by later calls). Euler only (the pipeline's scheduler).

        Args:
            prompts, seeds: one image per pair.
            steps: N.
            policy: a :class:`~budcache.policy.CachePolicy` (``None``: every step computes).
            mechanism: estimator of a policy that names none (default: the policy's, else ``reuse``).
            guidance: true CFG scale (1: off).
            compile: ``torch.compile`` backend, or ``None`` for eager.
        """
        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        pipe = self.pipeline()
        if policy is not None:
            apply_policy(pipe, policy, mechanism=mechanism)
        try:
            if compile is not None:
                pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=compile)
            out = pipe(**self.pipeline_inputs(list(prompts), guidance, seeds=seeds), num_inference_steps=steps,
                       output_type="latent", return_dict=False)[0]
        finally:
            pipe.transformer = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
            remove_policy(pipe)  # the transformer is shared with this TinyFlow: leave it unhooked
        return out

    def pipeline(self) -> Any:
        """A real ``diffusers.FluxPipeline`` around this transformer (no VAE: the packed image is the latent)."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=scheduler(), vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=self.transformer)
        pipe.vae_scale_factor = 2  # 32 px -> 16x16 latent cells of 2x2 px -> 8x8 packed tokens
        pipe.default_sample_size = IMAGE_SIZE // 2
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load(path: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32,
         subfolders: tuple[str, str] = ("transformer", "text_encoder")) -> TinyFlow:
    """Load tinyflow from the package (or ``path``) with no network access.

    ``subfolders`` name the transformer's and the text encoder's directories under ``path`` (a training
    checkpoint's EMA weights: ``("transformer_ema", "text_encoder_ema")``); each is built from its own
    ``config.json``, so any depth or word convolution loads as it was trained.
    """
    from diffusers import FluxTransformer2DModel

    p = _weights(path, subfolders)
    models = []
    for cls, sub in ((FluxTransformer2DModel, subfolders[0]), (TinyTextEncoder, subfolders[1])):
        try:
            models.append(cls.from_pretrained(p / sub, local_files_only=True, torch_dtype=dtype, use_safetensors=True,
                                              low_cpu_mem_usage=False))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            # diffusers chains several OSErrors for one truncated or missing file: name the folder once
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"tinyflow weights {p / sub}: cannot load them ({reason[:300]})") from None
    tr, enc = models
    if tuple(enc.config.vocab) != grammar.VOCAB:
        raise ConfigError(f"text encoder at {p} was trained on another vocabulary")
    return TinyFlow(tr.to(device).eval(), enc.to(device).eval())


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
    """A real ``diffusers.FluxPipeline`` around tinyflow; encode prompts with ``load().pipeline_inputs``."""
    return load(path, device).pipeline()


__all__ = ["TinyFlow", "load", "load_pipeline", "scheduler", "grammar", "WEIGHTS_DIR", "DEFAULT_GUIDANCE"]
