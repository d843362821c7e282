"""Command-line options shared by ``budcache search``, ``align`` and ``compare``.

Argument types (seed, guidance) and the options that point a command at a
diffusers pipeline instead of tinyflow. The pipeline code itself loads only
when ``--pipeline`` is given, so parsing stays light.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ConfigError
from ..io import printable

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


def problem_from_args(a: argparse.Namespace, steps: int, solver: str, mechanism: str, guidance: float) -> Any:
    """The PipelineProblem that ``--pipeline`` names, or None for tinyflow."""
    if getattr(a, "pipeline", None) is None:
        for opt in ("embeddings", "height", "width", "num_frames"):
            if getattr(a, opt, None) is not None:
                raise ConfigError(f"--{opt.replace('_', '-')} applies only with --pipeline")
        return None
    import torch

    from .pipeline import PipelineProblem, load_pipeline

    pipe = load_pipeline(a.pipeline, getattr(torch, a.dtype), a.device)
    return PipelineProblem(pipe, steps, solver, mechanism, guidance, height=a.height, width=a.width,
                           num_frames=a.num_frames, embeddings=a.embeddings, negative_prompt=a.negative_prompt,
                           name=f"pipeline:{a.pipeline}")


def policy_settings(a: argparse.Namespace, policy: Any, default_mechanism: str) -> None:
    """Fill ``a.solver``, ``a.mechanism`` and ``a.guidance`` from the policy's ``meta`` where not given.

    The settings a policy was searched with are the defaults; an explicit option overrides them. A
    ``meta`` value of the wrong type is an error naming the file and the field.
    """
    meta = dict(policy.meta)

    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"policy {a.policy}: meta.{key} must be {want}, got {printable(repr(meta[key]))[:60]}")

    for key in ("solver", "mechanism"):
        if key in meta and not isinstance(meta[key], str):
            raise bad(key, "a name (string)")
    if "guidance" in meta:
        g = meta["guidance"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise bad("guidance", "a number >= 0")
    a.solver = a.solver or str(meta.get("solver", "euler"))
    a.mechanism = a.mechanism or str(meta.get("mechanism", default_mechanism))
    a.guidance = a.guidance if a.guidance is not None else float(meta.get("guidance", 1.0))
