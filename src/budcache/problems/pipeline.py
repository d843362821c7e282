"""A diffusers pipeline as a problem: its own transformer, scheduler, noise and encoded prompts.

What differs between families (latents, resolution shift, prompt encoding,
decoding) comes from the pipeline's :class:`~budcache.problems.families.Family`
record; this module holds only what every family shares. Prompts are
encoded once (with the pipeline's text encoders, or read from a precomputed
embeddings file when the pipeline has none); the noise is the pipeline's own
``prepare_latents`` with one generator per seed, so a seed gives the same image
as ``pipe(..., generator=torch.Generator().manual_seed(seed))``; the sigmas are
the ones the pipeline's scheduler would run. The search works on latents
only; decoding through the VAE happens only for reports, when the pipeline
has one.

Embeddings file (safetensors): ``prompt_embeds`` (P, L, D), optionally
``pooled_prompt_embeds`` (P, Dp), ``negative_prompt_embeds`` and
``negative_pooled_prompt_embeds`` (1 or P rows), and for families whose
encoders pad or have a second text stream ``prompt_embeds_mask`` (P, L),
``prompt_embeds_2`` (P, L2, D2), ``prompt_embeds_mask_2`` (P, L2) and their
``negative_`` forms; its metadata ``prompts`` is a JSON list of the P
prompts. Write one with :func:`save_embeddings`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..denoisers import ADAPTERS, TextCond
from ..errors import ConfigError
from ..io import atomic_write_bytes
from ..schedules import validate_sigmas
from .base import ProblemBase
from .families import Family, family_of
from .settings import DEFAULT_MECHANISM, SamplerSettings

#: The positive conditioning tensors an embeddings file may hold (each also as ``negative_<name>``), in the
#: order of :class:`~budcache.denoisers.TextCond`'s fields (``prompt_embeds`` is required).
COND_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
EMBEDDING_NAMES = COND_NAMES + tuple(f"negative_{n}" for n in COND_NAMES)


def load_pipeline(path_or_id: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """Load a diffusers pipeline from a local directory (or a model id already in the local cache), offline.

    Only safetensors weights are read.
    """
    from diffusers import DiffusionPipeline  # the model stack loads only when a pipeline is asked for

    # Components saved as [null, null] (no VAE or text encoder, e.g. a pipeline used with precomputed
    # embeddings) are passed as None explicitly: diffusers refuses to load them otherwise.
    absent: dict[str, None] = {}
    index = Path(path_or_id) / "model_index.json"
    if index.is_file():
        try:
            spec = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{index} is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{index} must hold a JSON object")
        absent = {k: None for k, v in spec.items() if isinstance(v, list) and len(v) == 2 and v[1] is None}
    try:
        pipe = DiffusionPipeline.from_pretrained(path_or_id, dtype=dtype, local_files_only=True,
                                                 use_safetensors=True, **absent)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load the pipeline {path_or_id!r} offline: {reason[:300]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_embeddings(path: str | Path, prompts: Sequence[str], prompt_embeds: torch.Tensor,
                    pooled_prompt_embeds: torch.Tensor | None = None,
                    negative_prompt_embeds: torch.Tensor | None = None,
                    negative_pooled_prompt_embeds: torch.Tensor | None = None, **extra: torch.Tensor | None) -> Path:
    """Write precomputed prompt embeddings (safetensors, atomically) for pipelines without text encoders.

    Args:
        path: the file to write.
        prompts: the P prompts, in the rows' order.
        prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds: the
            conditioning tensors (negative ones with 1 or P rows).
        **extra: more tensors of :data:`EMBEDDING_NAMES` by name (token masks, a second text stream).
    """
    if prompt_embeds.shape[0] != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but prompt_embeds has {prompt_embeds.shape[0]} rows")
    unknown = sorted(set(extra) - set(EMBEDDING_NAMES))
    if unknown:
        raise ConfigError(f"unknown embeddings {unknown}; valid names: {list(EMBEDDING_NAMES)}")
    tensors = {"prompt_embeds": prompt_embeds}
    for name, t in (("pooled_prompt_embeds", pooled_prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds),
                    ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds), *extra.items()):
        if t is not None:
            tensors[name] = t
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata={"prompts": json.dumps(list(prompts))}))


def load_embeddings(path: str | Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Read an embeddings file written by :func:`save_embeddings`; checks names and shapes."""
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
    known = set(EMBEDDING_NAMES)
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


class PipelineProblem(ProblemBase):
    """A diffusers pipeline as a problem, driven through its family's record.

    Args:
        pipe: a loaded pipeline whose class has a record in :data:`budcache.problems.families.FAMILIES`.
        steps, solver, mechanism, guidance: the :class:`SamplerSettings` (or pass ``settings``);
            ``guidance`` is classifier-free guidance (for FLUX, true CFG with the negative prompt).
        settings: the settings as one object (overrides the four fields).
        height, width: image size in pixels (default: the pipeline's).
        num_frames: frames, for video families (default 1).
        embeddings: a precomputed embeddings file (see :func:`save_embeddings`), for pipelines without
            text encoders; its prompts are the problem's prompts.
        negative_prompt: the negative prompt when guidance != 1.
        embedded_guidance: the distilled guidance of guidance-distilled models (FLUX-dev), or ``None``.
        name: the model's name in reports and policies (default ``pipeline:<class>``).
    """

    draws_prompts = False

    def __init__(self, pipe: Any, steps: int = 28, solver: str = "euler", mechanism: str = DEFAULT_MECHANISM,
                 guidance: float = 1.0, *, settings: SamplerSettings | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, embeddings: str | Path | None = None,
                 negative_prompt: str = "", embedded_guidance: float | None = None, name: str | None = None) -> None:
        self.family: Family = family_of(pipe)
        cls = type(pipe).__name__
        tr = getattr(pipe, "transformer", None)
        if tr is None or getattr(pipe, "transformer_2", None) is not None:
            raise ConfigError(f"{cls}: budcache's search needs exactly one transformer")
        if type(tr).__name__ not in ADAPTERS:
            raise ConfigError(f"no call adapter for {type(tr).__name__}; supported: {sorted(ADAPTERS)}")
        self.pipe, self.kind = pipe, cls
        self.settings = settings or SamplerSettings(steps, solver, mechanism, guidance)
        self.negative_prompt = negative_prompt
        self.embedded_guidance = embedded_guidance
        self.name = name or f"pipeline:{cls}"
        self.vae_scale_factor = self.family.vae_scale(pipe)
        default = int(getattr(pipe, "default_sample_size", 64) or 64) * self.vae_scale_factor
        self.height = int(height or default)
        self.width = int(width or default)
        if num_frames is not None and not self.family.video:
            raise ConfigError(f"--num-frames applies to video pipelines; {cls} makes images")
        self.num_frames = int(num_frames or 1)
        self._embedded: tuple[list[str], dict[str, torch.Tensor]] | None = None
        if embeddings is not None:
            self._embedded = load_embeddings(embeddings)
        self._sigma_cache: dict[int, torch.Tensor] = {}
        probe = self.noise([0])  # validates the geometry early, with a clear error
        self.latent_shape = tuple(probe.shape[1:])

    @property
    def schedule(self) -> str:
        return f"scheduler:{type(self.pipe.scheduler).__name__}"

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    def denoiser(self) -> Any:
        return self.family.denoiser(self)

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        """The N+1 sigmas the pipeline's scheduler runs for ``steps`` steps at this resolution."""
        n = int(steps or self.steps)
        if n not in self._sigma_cache:
            self._sigma_cache[n] = self._scheduler_sigmas(n)
        return self._sigma_cache[n]

    def prompts(self, n: int, seed: int) -> list[str]:
        """The prompts of the embeddings file (a pipeline has no prompt grammar of its own)."""
        if self._embedded is None:
            raise ConfigError("a pipeline search needs calibration prompts: pass --prompts FILE (.txt, .jsonl, .csv) "
                              "or --embeddings FILE.safetensors")
        return list(self._embedded[0])

    def conds(self, prompts: Sequence[str]) -> tuple[TextCond, TextCond | None]:
        """Conditioning (and the negative one when guidance is on) for each prompt, encoded once per distinct prompt."""
        uniq = sorted(set(prompts), key=list(prompts).index)
        pos, neg = self._encode(uniq)
        idx = torch.tensor([uniq.index(p) for p in prompts], device=pos.prompt_embeds.device)
        return pos.select(idx), (None if neg is None else neg.select(idx))

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """The pipeline's own initial latents, one generator per seed."""
        return torch.cat([self.family.latents(self, torch.Generator("cpu").manual_seed(int(s))) for s in seeds])

    def calibration_info(self) -> dict[str, Any]:
        return {**super().calibration_info(), "height": self.height, "width": self.width,
                "num_frames": self.num_frames}

    def final_latents(self, calib: Any, policy: Any, plain_steps: int | None = None, batch: int = 16) -> torch.Tensor:
        return super().final_latents(calib, policy, plain_steps, batch)

    def images(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Decoded images (B, 3, H, W) in [0, 1] when the pipeline has a VAE; None otherwise (video: frame 0)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None or self.family.vae_latents is None:
            return None
        with torch.no_grad():
            lat = self.family.vae_latents(self, latents).to(vae.dtype)
            step = self.family.decode_batch or len(lat)
            img = torch.cat([vae.decode(lat[i:i + step], return_dict=False)[0].float()
                             for i in range(0, len(lat), step)])
        if img.dim() == 5:  # video: (B, C, F, H, W) -> first frame
            img = img[:, :, 0]
        return ((img + 1) / 2).clamp(0, 1)

    def to(self, device: str | torch.device) -> PipelineProblem:
        self.pipe.to(device)
        self._sigma_cache.clear()
        return self

    # shared by every family ------------------------------------------------------------------------------
    def _scheduler_sigmas(self, n: int) -> torch.Tensor:
        sched = copy.deepcopy(self.pipe.scheduler)
        kw = dict(self.family.timestep_kwargs(self, n, sched.config))
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
        if all(getattr(self.pipe, k, None) is None for k in ("text_encoder", "text_encoder_2", "text_encoder_3")):
            raise ConfigError(f"{self.kind} has no text encoder: pass --embeddings FILE.safetensors with precomputed "
                              "prompt embeddings (budcache.problems.save_embeddings writes one)")
        with torch.no_grad():
            return self.family.encode(self, prompts, cfg)

    def _from_file(self, prompts: list[str], cfg: bool) -> tuple[TextCond, TextCond | None]:
        assert self._embedded is not None
        names, t = self._embedded
        missing = [p for p in prompts if p not in names]
        if missing:
            raise ConfigError(f"prompts not in the embeddings file: {missing[:3]}")
        idx = torch.tensor([names.index(p) for p in prompts])
        pooled = self.family.pooled
        if pooled and "pooled_prompt_embeds" not in t:
            raise ConfigError(f"{self.kind} needs 'pooled_prompt_embeds' in the embeddings file")
        absent = [n for n in self.family.requires if n not in t]
        if absent:
            raise ConfigError(f"{self.kind} needs {absent} in the embeddings file")
        g = self.embedded_guidance

        def rows(name: str) -> torch.Tensor | None:
            x = t.get(name)
            if x is None or (name.endswith("pooled_prompt_embeds") and not pooled):
                return None
            x = x.to(self.device, torch.float32 if x.is_floating_point() else x.dtype)
            return x.expand(len(prompts), *x.shape[1:]).clone() if x.shape[0] == 1 else x.index_select(0, idx)

        def cond(prefix: str) -> TextCond:
            pe, pooled_pe, mask, pe2, mask2 = (rows(prefix + n) for n in COND_NAMES)
            assert pe is not None
            return TextCond(pe, pooled_pe, g, mask, pe2, mask2)

        pos = cond("")
        if not cfg:
            return pos, None
        needed = ["negative_prompt_embeds"] + [f"negative_{n}" for n in (*(("pooled_prompt_embeds",) if pooled else ()),
                                                                          *self.family.requires)]
        if any(n not in t for n in needed):
            raise ConfigError(f"guidance != 1 needs {needed} in the embeddings file for {self.kind}")
        return pos, cond("negative_")
