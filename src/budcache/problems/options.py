"""Command-line options shared by ``budcache search``, ``align``, ``compare`` and ``sample``.

Argument types (seed, guidance), the options that point a command at a
diffusers pipeline instead of tinyflow, and :func:`build_problem`, which
turns them into a :class:`~budcache.problems.Problem`. The model stack loads
only inside :func:`build_problem`, so parsing and ``--help`` stay light.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ConfigError
from ..io import printable
from .settings import SamplerSettings

MAX_SEED = 2**63 - 1


def seed_arg(text: str) -> int:
    """An argparse type: a seed in 0..2**63-1 (what torch's and NumPy's generators take)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text[:40]} is out of range (allowed 0..{MAX_SEED})")
    return v


def guidance_arg(text: str) -> float:
    """An argparse type: a classifier-free guidance scale, a finite number >= 0 (1 = off)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range (a finite number >= 0; 1 = off)")
    return v


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """Options that point a command at a diffusers pipeline instead of tinyflow."""
    g = p.add_argument_group("diffusers pipeline (instead of tinyflow)")
    g.add_argument("--pipeline", default=None, metavar="PATH_OR_ID",
                   help="a local diffusers pipeline directory (or a model id already in the local cache); offline")
    g.add_argument("--embeddings", default=None, metavar="FILE",
                   help="precomputed prompt embeddings (.safetensors) for pipelines without text encoders")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    g.add_argument("--num-frames", type=int, default=None, help="frames (video pipelines; default 1)")
    g.add_argument("--negative-prompt", default="", help="negative prompt when guidance != 1")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu", help="torch device for the pipeline (e.g. cuda)")


def build_problem(a: argparse.Namespace, settings: SamplerSettings) -> Any:
    """The problem the options name: the ``--pipeline`` (a PipelineProblem), else tinyflow (``--model``
    weights, default the shipped ones)."""
    if getattr(a, "pipeline", None) is None:
        for opt in ("embeddings", "height", "width", "num_frames"):
            if getattr(a, opt, None) is not None:
                raise ConfigError(f"--{opt.replace('_', '-')} applies only with --pipeline")
        from .tinyflow import TinyflowProblem  # the model stack loads on first use

        return TinyflowProblem(settings=settings, model=getattr(a, "model", None))
    if getattr(a, "model", None) is not None:
        raise ConfigError("--model (tinyflow weights) and --pipeline exclude each other")
    for opt in ("height", "width", "num_frames"):
        v = getattr(a, opt, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} must be >= 1 (got {v})")
    import torch

    from .pipeline import PipelineProblem, load_pipeline

    pipe = load_pipeline(a.pipeline, getattr(torch, a.dtype), a.device)
    return PipelineProblem(pipe, settings=settings, height=a.height, width=a.width, num_frames=a.num_frames,
                           embeddings=a.embeddings, negative_prompt=a.negative_prompt, name=f"pipeline:{a.pipeline}")


def settings_from(policy: Any = None, *, steps: int | None = None, solver: str | None = None,
                  mechanism: str | None = None, guidance: float | None = None, default_mechanism: str = "reuse",
                  source: str = "") -> SamplerSettings:
    """The sampler settings of a run: the given values, else the policy's ``meta``, else the defaults.

    The settings a policy was searched with are the defaults; an explicit value overrides them. A
    ``meta`` value of the wrong type is an error naming the file (``source``) and the field.

    Args:
        policy: a :class:`budcache.CachePolicy`, or ``None``.
        steps: N (default: the policy's, else 28); must equal the policy's when both are given.
        solver, mechanism, guidance: explicit settings (``None``: the policy's, else the defaults).
        default_mechanism: the estimator when neither ``mechanism`` nor the policy names one.
        source: where the policy came from, for error messages.
    """
    meta = dict(policy.meta) if policy is not None else {}

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"policy {source}: meta.{key} must be {want}, got {printable(repr(meta[key]))[:60]}")

    for key in ("solver", "mechanism"):
        if key in meta and not isinstance(meta[key], str):
            raise bad(key, "a name (string)")
    if "guidance" in meta:
        g = meta["guidance"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise bad("guidance", "a number >= 0")
    if steps is None:
        steps = policy.steps if policy is not None else 28
    elif policy is not None and steps != policy.steps:
        raise ConfigError(f"--steps {steps} but the policy {source} is for {policy.steps} steps")
    return SamplerSettings(steps=steps, solver=solver or str(meta.get("solver", "euler")),
                           mechanism=mechanism or str(meta.get("mechanism", default_mechanism)),
                           guidance=guidance if guidance is not None else float(meta.get("guidance", 1.0)))
