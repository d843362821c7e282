"""tinyflow as a problem: the embedded default model, its prompt grammar, noise, decoder and checker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import tinyflow
from ..tinyflow import checker, grammar
from .base import ProblemBase
from .settings import DEFAULT_MECHANISM, SamplerSettings


def tinyflow_prompts(n: int, seed: int = 12345) -> list[str]:
    """``n`` distinct tinyflow prompts covering every template (single, fully specified, pair, count)."""
    rng = np.random.default_rng(seed)
    mixes = [
        grammar.TemplateMix(empty=0, single=1, pair=0, count=0),
        grammar.TemplateMix(empty=0, single=1, pair=0, count=0, p_size=1, p_colour=1, p_position=1),
        grammar.TemplateMix(empty=0, single=0, pair=1, count=0),
        grammar.TemplateMix(empty=0, single=0, pair=0, count=1),
    ]
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        p = grammar.prompt_of(grammar.sample_spec(rng, mixes[len(out) % len(mixes)]))
        tries += 1
        if p not in seen or tries > 50 * n:
            seen.add(p)
            out.append(p)
    return out


class TinyflowProblem(ProblemBase):
    """tinyflow with sampler settings: the default problem of every stage.

    Args:
        tf: a loaded :class:`budcache.tinyflow.TinyFlow` (default: the shipped weights).
        steps, solver, mechanism, guidance: the :class:`SamplerSettings` (or pass ``settings``).
        settings: the settings as one object (overrides the four fields).
        model: the weights folder to load when ``tf`` is not given (``None``: the shipped weights).
    """

    name = "tinyflow"
    draws_prompts = True

    def __init__(self, tf: tinyflow.TinyFlow | None = None, steps: int = 28, solver: str = "euler",
                 mechanism: str = DEFAULT_MECHANISM, guidance: float = 1.0, *,
                 settings: SamplerSettings | None = None, model: str | None = None) -> None:
        self.loaded_from = None if tf is not None else (model or "")  # where workers can load the weights again
        self.tf = tf if tf is not None else tinyflow.load(model)
        self.settings = settings or SamplerSettings(steps, solver, mechanism, guidance)

    @property
    def transformer(self) -> torch.nn.Module:
        """The diffusers transformer every method runs on."""
        return self.tf.transformer

    def denoiser(self) -> Any:
        """budcache's call adapter around the transformer."""
        return self.tf.denoiser()

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        return self.tf.sigmas(steps or self.steps)

    def prompts(self, n: int, seed: int) -> list[str]:
        """``n`` prompts of tinyflow's grammar covering every template, drawn from ``seed``."""
        return tinyflow_prompts(n, seed=seed)

    def conds(self, prompts: Sequence[str]) -> tuple[Any, Any]:
        cond = self.tf.encode(prompts)
        return cond, (self.tf.encode([""] * len(prompts)) if self.guidance != 1.0 else None)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        return self.tf.noise(seeds)

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB images in [0, 1] (tinyflow's latents are packed pixels)."""
        return self.tf.images(latents)

    def checker_accuracy(self, prompts: Sequence[str], images: torch.Tensor) -> np.ndarray:
        """1 where tinyflow's checker finds what the prompt asks for in the image, else 0."""
        return np.array([float(checker.check(p, im).ok) for p, im in zip(prompts, images)])

    def replica(self) -> Any:
        """Weights loaded from disk: workers load them again (nothing large is pickled); weights given in
        memory: the problem is shipped as it is."""
        if self.loaded_from is None:
            return super().replica()
        return TinyflowReplica(self.loaded_from or None, self.settings)

    def to(self, device: str | torch.device) -> TinyflowProblem:
        self.tf.transformer.to(device)
        self.tf.text_encoder.to(device)
        return self


@dataclass(frozen=True)
class TinyflowReplica:
    """Recipe for a tinyflow problem on a worker: the weights folder (``None``: shipped) and the settings."""

    model: str | None = None
    settings: SamplerSettings = SamplerSettings()

    def __call__(self, device: str) -> TinyflowProblem:
        problem = TinyflowProblem(tinyflow.load(self.model, device), settings=self.settings)
        problem.loaded_from = self.model or ""
        return problem
