"""Search (and align) on a diffusers pipeline: its own transformer, scheduler and encoded prompts.

:class:`PipelineProblem` has the interface of
:class:`budcache.search.run.TinyflowProblem`, so the evaluator, the search,
the alignment and the comparison run unchanged on FLUX, SD3 and Wan
pipelines. Prompts are encoded once (with the pipeline's text encoders, or
read from a precomputed embeddings file when the pipeline has none); the
noise is the pipeline's own ``prepare_latents`` with one generator per seed,
so a seed gives the same image as ``pipe(..., generator=torch.Generator().manual_seed(seed))``;
the sigmas are the ones the pipeline's scheduler would run (FLUX's
resolution shift included). The search works on latents only; decoding
through the VAE happens only for reports, when the pipeline has one.

Embeddings file (safetensors): ``prompt_embeds`` (P, L, D), optionally
``pooled_prompt_embeds`` (P, Dp), ``negative_prompt_embeds`` and
``negative_pooled_prompt_embeds`` (1 or P rows); its metadata ``prompts`` is
a JSON list of the P prompts. Write one with :func:`save_embeddings`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..denoisers import ADAPTERS, FluxDenoiser, TextCond
from ..errors import ConfigError
from ..io import atomic_write_bytes
from ..sampler import Sampler
from ..schedules import validate_sigmas
from .calibration import CalibrationSet, pairs_for
from .evaluator import make_calibration

#: Pipelines whose transformer, latents and prompts budcache knows how to drive.
SUPPORTED = ("FluxPipeline", "StableDiffusion3Pipeline", "WanPipeline")


def load_pipeline(path_or_id: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a diffusers pipeline from a local directory (or a model id already in the local cache), offline."""
    from diffusers import DiffusionPipeline

    # Components saved as [null, null] (no VAE or text encoder, e.g. a pipeline used with precomputed
    # embeddings) are passed as None explicitly: diffusers refuses to load them otherwise.
    absent: dict[str, None] = {}
    index = Path(path_or_id) / "model_index.json"
    if index.is_file():
        try:
            spec = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{index} is not valid JSON: {exc}") from None
        absent = {k: None for k, v in spec.items() if isinstance(v, list) and len(v) == 2 and v[1] is None}
    try:
        pipe = DiffusionPipeline.from_pretrained(path_or_id, dtype=dtype, local_files_only=True, **absent)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the pipeline {path_or_id!r} offline: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_embeddings(path: str | Path, prompts: Sequence[str], prompt_embeds: torch.Tensor,
                    pooled_prompt_embeds: torch.Tensor | None = None,
                    negative_prompt_embeds: torch.Tensor | None = None,
                    negative_pooled_prompt_embeds: torch.Tensor | None = None) -> Path:
    """Write precomputed prompt embeddings (safetensors, atomically) for pipelines without text encoders."""
    from safetensors.torch import save

    if prompt_embeds.shape[0] != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but prompt_embeds has {prompt_embeds.shape[0]} rows")
    tensors = {"prompt_embeds": prompt_embeds}
    for name, t in (("pooled_prompt_embeds", pooled_prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds),
                    ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
        if t is not None:
            tensors[name] = t
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata={"prompts": json.dumps(list(prompts))}))


def load_embeddings(path: str | Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Read an embeddings file written by :func:`save_embeddings`; checks names and shapes."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"embeddings file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ConfigError(f"embeddings file {p} is not a valid safetensors file: {exc}") from None
    try:
        prompts = json.loads(meta.get("prompts", "null"))
    except json.JSONDecodeError:
        prompts = None
    if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
        raise ConfigError(f"embeddings file {p}: metadata 'prompts' must be a JSON list of strings")
    known = {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    if "prompt_embeds" not in tensors or set(tensors) - known:
        optional = sorted(known - {"prompt_embeds"})
        raise ConfigError(f"embeddings file {p}: expected 'prompt_embeds' and optionally {optional}"
                          f"; found {sorted(tensors)}")
    n = len(prompts)
    for k, t in tensors.items():
        rows_ok = t.shape[0] == n or (k.startswith("negative") and t.shape[0] == 1)
        if not rows_ok or not torch.isfinite(t).all():
            raise ConfigError(f"embeddings file {p}: '{k}' has shape {tuple(t.shape)} for {n} prompts, or "
                              "non-finite values")
    return prompts, tensors


class PipelineProblem:
    """A diffusers pipeline as a search problem: sampler factory, sigmas, conditioning, noise, decoding.

    ``height``/``width`` (and ``num_frames`` for Wan) fix the latent geometry;
    ``guidance`` is classifier-free guidance (for FLUX, true CFG with the
    negative prompt; the distilled guidance of FLUX-dev is ``embedded_guidance``).
    """

    def __init__(self, pipe: Any, steps: int = 28, solver: str = "euler", mechanism: str = "reuse",
                 guidance: float = 1.0, *, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, embeddings: str | Path | None = None,
                 negative_prompt: str = "", embedded_guidance: float | None = None, name: str | None = None) -> None:
        cls = type(pipe).__name__
        if cls not in SUPPORTED:
            raise ConfigError(f"pipeline {cls} is not supported for search; supported: {list(SUPPORTED)} "
                              "(budcache.diffusers.apply works on any pipeline whose blocks diffusers knows)")
        tr = getattr(pipe, "transformer", None)
        if tr is None or getattr(pipe, "transformer_2", None) is not None:
            raise ConfigError(f"{cls}: budcache's search needs exactly one transformer")
        if type(tr).__name__ not in ADAPTERS:
            raise ConfigError(f"no call adapter for {type(tr).__name__}; supported: {sorted(ADAPTERS)}")
        self.pipe, self.kind = pipe, cls
        self.steps, self.solver, self.mechanism, self.guidance = steps, solver, mechanism, float(guidance)
        self.negative_prompt = negative_prompt
        self.embedded_guidance = embedded_guidance
        self.name = name or f"pipeline:{cls}"
        self.schedule = f"scheduler:{type(pipe.scheduler).__name__}"
        vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        if cls == "WanPipeline":
            vsf = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
        default = int(getattr(pipe, "default_sample_size", 64) or 64) * vsf
        self.height = int(height or default)
        self.width = int(width or default)
        self.num_frames = int(num_frames or 1)
        self.vae_scale_factor = vsf
        self._embedded: tuple[list[str], dict[str, torch.Tensor]] | None = None
        if embeddings is not None:
            self._embedded = load_embeddings(embeddings)
        self._sigma_cache: dict[int, torch.Tensor] = {}
        probe = self._latents([0])  # validates the geometry early, with a clear error
        self.latent_shape = tuple(probe.shape[1:])

    # The interface of TinyflowProblem ------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def denoiser(self) -> Any:
        tr = self.transformer
        if self.kind == "FluxPipeline":
            return FluxDenoiser(tr, *self._flux_grid())
        return ADAPTERS[type(tr).__name__](tr)

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The N+1 sigmas the pipeline's scheduler runs for ``steps`` steps at this resolution."""
        n = int(steps or self.steps)
        if n not in self._sigma_cache:
            self._sigma_cache[n] = self._scheduler_sigmas(n)
        return self._sigma_cache[n]

    def make_sampler(self, controller: Any, steps: int | None = None, *, solver: str | None = None,
                     mechanism: str | None = None, guidance: float | None = None,
                     sigmas: torch.Tensor | None = None) -> Sampler:
        return Sampler(self.denoiser(), self.sigmas(steps) if sigmas is None else sigmas, solver or self.solver,
                       controller, mechanism or self.mechanism, self.guidance if guidance is None else guidance)

    def conds(self, prompts: Sequence[str]) -> tuple[TextCond, TextCond | None]:
        """Conditioning (and the negative one when guidance is on) for each prompt, encoded once per distinct prompt."""
        uniq = sorted(set(prompts), key=list(prompts).index)
        pos, neg = self._encode(uniq)
        idx = torch.tensor([uniq.index(p) for p in prompts], device=pos.prompt_embeds.device)
        return pos.select(idx), (None if neg is None else neg.select(idx))

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return self._latents(seeds)

    def calibration(self, prompts: list[str], seeds: list[int]) -> CalibrationSet:
        cond, uncond = self.conds(prompts)
        from .run import _weights_digest

        info = {"model": self.name, "weights": _weights_digest(self.transformer), "steps": self.steps,
                "solver": self.solver, "mechanism": self.mechanism, "guidance": self.guidance,
                "height": self.height, "width": self.width, "num_frames": self.num_frames}
        return make_calibration(self.make_sampler, prompts, seeds, self.noise(seeds), cond, uncond, info)

    def final_latents(self, calib: CalibrationSet, policy: Any, plain_steps: int | None = None,
                      batch: int = 16) -> torch.Tensor:
        from .run import run_items

        sampler = self.make_sampler(None, plain_steps) if plain_steps else self.make_sampler(policy)
        return run_items(sampler, calib, batch)

    def default_prompts(self, n: int, seed: int) -> list[str]:
        """Prompts of the embeddings file (a pipeline has no prompt grammar of its own)."""
        if self._embedded is None:
            raise ConfigError("a pipeline search needs calibration prompts: pass --prompts FILE (.txt, .jsonl, .csv) "
                              "or --embeddings FILE.safetensors")
        return list(self._embedded[0])

    def heldout_pairs(self, n: int, seed: int, calib_prompts: Sequence[str]) -> tuple[list[str], list[int]]:
        """Held-out pairs: the calibration prompts cycled with seeds disjoint from calibration's."""
        base = list(dict.fromkeys(calib_prompts))
        prompts = [base[i % len(base)] for i in range(n)]
        return prompts, [seed + 7_777_777 + i for i in range(n)]

    def images(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Decoded images (B, 3, H, W) in [0, 1] when the pipeline has a VAE; None otherwise."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return None
        with torch.no_grad():
            if self.kind == "FluxPipeline":
                lat = self.pipe._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
                lat = lat / vae.config.scaling_factor + vae.config.shift_factor
            elif self.kind == "StableDiffusion3Pipeline":
                lat = latents / vae.config.scaling_factor + vae.config.shift_factor
            else:
                mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
                std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
                lat = latents / std + mean
            img = vae.decode(lat.to(vae.dtype), return_dict=False)[0].float()
        if img.dim() == 5:  # video: (B, C, F, H, W) -> first frame
            img = img[:, :, 0]
        return ((img + 1) / 2).clamp(0, 1)

    # Pipeline specifics --------------------------------------------------------------------
    def _flux_grid(self) -> tuple[int, int]:
        r, c = self.height // (self.vae_scale_factor * 2), self.width // (self.vae_scale_factor * 2)
        if r < 1 or c < 1:
            raise ConfigError(f"height {self.height} x width {self.width} is too small for vae_scale_factor "
                              f"{self.vae_scale_factor}")
        return r, c

    def _latents(self, seeds: Sequence[int]) -> torch.Tensor:
        tr, pipe = self.transformer, self.pipe
        dt, dev = torch.float32, self.device
        out = []
        for s in seeds:
            g = torch.Generator("cpu").manual_seed(int(s))
            if self.kind == "FluxPipeline":
                lat, _ = pipe.prepare_latents(1, tr.config.in_channels // 4, self.height, self.width, dt, dev, g)
            elif self.kind == "StableDiffusion3Pipeline":
                lat = pipe.prepare_latents(1, tr.config.in_channels, self.height, self.width, dt, dev, g)
            else:
                lat = pipe.prepare_latents(1, tr.config.in_channels, self.height, self.width, self.num_frames, dt,
                                           dev, g)
            out.append(lat)
        return torch.cat(out)

    def _scheduler_sigmas(self, n: int) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = copy.deepcopy(self.pipe.scheduler)
        cfg = sched.config
        kw: dict[str, Any] = {}
        if self.kind == "FluxPipeline":
            seq = int(np.prod(self._flux_grid()))
            if not getattr(cfg, "use_flow_sigmas", False):
                kw["sigmas"] = np.linspace(1.0, 1 / n, n)
            kw["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        elif self.kind == "StableDiffusion3Pipeline" and cfg.get("use_dynamic_shifting", False):
            p = self.transformer.config.patch_size
            seq = (self.height // self.vae_scale_factor // p) * (self.width // self.vae_scale_factor // p)
            kw["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        if "sigmas" in kw:
            sched.set_timesteps(sigmas=kw.pop("sigmas"), device="cpu", **kw)
        else:
            sched.set_timesteps(n, device="cpu", **kw)
        sig = getattr(sched, "sigmas", None)
        if sig is None or len(sched.timesteps) != n or sig.numel() != n + 1:
            raise ConfigError(f"the pipeline's scheduler {type(sched).__name__} does not expose N+1 flow-matching "
                              "sigmas; budcache's sampler needs a flow-matching scheduler")
        sig = sig.detach().to(torch.float32).cpu()
        validate_sigmas(sig)
        return sig.to(self.device)

    def _encode(self, prompts: list[str]) -> tuple[TextCond, TextCond | None]:
        cfg = self.guidance != 1.0
        if self._embedded is not None:
            return self._from_file(prompts, cfg)
        pipe, dev = self.pipe, self.device
        if all(getattr(pipe, k, None) is None for k in ("text_encoder", "text_encoder_2", "text_encoder_3")):
            raise ConfigError(f"{self.kind} has no text encoder: pass --embeddings FILE.safetensors with precomputed "
                              "prompt embeddings (budcache.search.pipeline.save_embeddings writes one)")
        neg = [self.negative_prompt] * len(prompts)
        with torch.no_grad():
            if self.kind == "FluxPipeline":
                pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev)
                un = None
                if cfg:
                    npe, npooled, _ = pipe.encode_prompt(prompt=neg, prompt_2=None, device=dev)
                    un = TextCond(npe, npooled, self.embedded_guidance)
                return TextCond(pe, pooled, self.embedded_guidance), un
            if self.kind == "StableDiffusion3Pipeline":
                pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                                              do_classifier_free_guidance=cfg, negative_prompt=neg)
                return TextCond(pe, pooled), (TextCond(npe, npooled) if cfg else None)
            pe, npe = pipe.encode_prompt(prompt=prompts, negative_prompt=neg, do_classifier_free_guidance=cfg,
                                         device=dev)
            return TextCond(pe), (TextCond(npe) if cfg else None)

    def _from_file(self, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
        assert self._embedded is not None
        names, t = self._embedded
        missing = [p for p in prompts if p not in names]
        if missing:
            raise ConfigError(f"prompts not in the embeddings file: {missing[:3]}")
        idx = torch.tensor([names.index(p) for p in prompts])
        needs_pooled = self.kind in ("FluxPipeline", "StableDiffusion3Pipeline")
        if needs_pooled and "pooled_prompt_embeds" not in t:
            raise ConfigError(f"{self.kind} needs 'pooled_prompt_embeds' in the embeddings file")
        g = self.embedded_guidance

        def rows(name: str) -> torch.Tensor | None:
            x = t.get(name)
            if x is None:
                return None
            x = x.to(self.device, torch.float32)
            return x.expand(len(prompts), *x.shape[1:]).clone() if x.shape[0] == 1 else x.index_select(0, idx)

        pos = TextCond(rows("prompt_embeds"), rows("pooled_prompt_embeds") if needs_pooled else None, g)
        if not cfg:
            return pos, None
        if "negative_prompt_embeds" not in t or (needs_pooled and "negative_pooled_prompt_embeds" not in t):
            raise ConfigError("guidance != 1 needs 'negative_prompt_embeds' (and 'negative_pooled_prompt_embeds' for "
                              f"{self.kind}) in the embeddings file")
        return pos, TextCond(rows("negative_prompt_embeds"),
                             rows("negative_pooled_prompt_embeds") if needs_pooled else None, g)


__all__ = ["PipelineProblem", "load_pipeline", "save_embeddings", "load_embeddings", "SUPPORTED", "pairs_for"]
