"""The problem: a model, its sampler settings, prompts, noise, conditioning and decoding, as one type.

Every stage (search, align, compare) takes a :class:`Problem` and nothing
else about the model: it never asks which model it is. :class:`ProblemBase`
writes the parts that do not depend on the model once (sampler factory,
calibration sets, final latents, per-item quality); a model family adds its
denoiser, sigmas, prompts, conditioning, noise and decoder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..policy import CachePolicy
from ..sampler import Sampler
from .data import CalibrationSet, make_calibration, run_items, weights_digest
from .settings import SamplerSettings


@runtime_checkable
class Problem(Protocol):
    """What a stage runs on. ``settings`` is the one source of truth for N, solver, estimator and guidance."""

    name: str
    settings: SamplerSettings
    #: True when :meth:`prompts` draws fresh prompts for every seed (tinyflow's grammar); False when the
    #: problem has a fixed prompt list (then held-out splits reuse the prompts with other seeds).
    draws_prompts: bool

    @property
    def transformer(self) -> torch.nn.Module: ...
    @property
    def steps(self) -> int: ...
    @property
    def schedule(self) -> str: ...
    def denoiser(self) -> Any: ...
    def sigmas(self, steps: int | None = None) -> torch.Tensor: ...
    def make_sampler(self, controller: Any, steps: int | None = None, *, solver: str | None = None,
                     mechanism: str | None = None, guidance: float | None = None,
                     sigmas: torch.Tensor | None = None) -> Sampler: ...
    def prompts(self, n: int, seed: int) -> list[str]: ...
    def conds(self, prompts: Sequence[str]) -> tuple[Any, Any]: ...
    def noise(self, seeds: Sequence[int]) -> torch.Tensor: ...
    def images(self, latents: torch.Tensor) -> torch.Tensor | None: ...
    def calibration(self, prompts: list[str], seeds: list[int]) -> CalibrationSet: ...
    def final_latents(self, calib: CalibrationSet, policy: CachePolicy | None, plain_steps: int | None = None,
                      batch: int = 64) -> torch.Tensor: ...
    def with_settings(self, **changes: Any) -> Problem: ...
    def checker_accuracy(self, prompts: Sequence[str], images: torch.Tensor) -> np.ndarray | None: ...
    def replica(self) -> Callable[[str], Problem]: ...
    def to(self, device: str | torch.device) -> Problem: ...


class ProblemBase:
    """The model-independent half of a :class:`Problem`; subclasses set ``name``, ``settings``,
    ``draws_prompts`` and define the model's half (transformer, denoiser, sigmas, prompts, conds, noise,
    images, to)."""

    name: str = "problem"
    settings: SamplerSettings
    draws_prompts: bool = False

    # settings, read-only: a problem with other settings is a new problem (with_settings) ---------------
    @property
    def steps(self) -> int:
        """N, the number of solver steps."""
        return self.settings.steps

    @property
    def solver(self) -> str:
        return self.settings.solver

    @property
    def mechanism(self) -> str:
        return self.settings.mechanism

    @property
    def guidance(self) -> float:
        return self.settings.guidance

    @property
    def schedule(self) -> str:
        """The name of the sigma schedule (written into policies' ``meta``)."""
        return "flux"

    @property
    def transformer(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def with_settings(self, **changes: Any) -> ProblemBase:
        """The same model (weights shared) with other sampler settings.

        Args:
            **changes: fields of :class:`SamplerSettings` (``None`` keeps a field).
        """
        other = copy.copy(self)
        other.settings = self.settings.replace(**changes)
        return other

    # the model's half -----------------------------------------------------------------------------------
    def denoiser(self) -> Any:
        raise NotImplementedError

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prompts(self, n: int, seed: int) -> list[str]:
        raise NotImplementedError

    def conds(self, prompts: Sequence[str]) -> tuple[Any, Any]:
        raise NotImplementedError

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def images(self, latents: torch.Tensor) -> torch.Tensor | None:
        return None

    def calibration_info(self) -> dict[str, Any]:
        """What besides prompts and seeds defines a calibration set of this problem (hashed into its digest)."""
        return {"model": self.name, "weights": weights_digest(self.transformer), "steps": self.steps,
                "solver": self.solver, "mechanism": self.mechanism, "guidance": self.guidance}

    def checker_accuracy(self, prompts: Sequence[str], images: torch.Tensor) -> np.ndarray | None:
        """Per-image 0/1 verdicts of a prompt checker, where the problem has one (else ``None``)."""
        return None

    def replica(self) -> Callable[[str], Any]:
        """A picklable recipe ``recipe(device) -> problem`` that rebuilds this problem on a worker.

        The default ships the problem itself (pickled once) and moves it to the worker's device.
        """
        return Shipped(self)

    def to(self, device: str | torch.device) -> ProblemBase:
        raise NotImplementedError

    # written once for every problem ---------------------------------------------------------------------
    def make_sampler(self, controller: Any, steps: int | None = None, *, solver: str | None = None,
                     mechanism: str | None = None, guidance: float | None = None,
                     sigmas: torch.Tensor | None = None) -> Sampler:
        """A sampler with the problem's settings; keyword arguments override them for one sampler.

        Args:
            controller: a policy, a controller, or ``None`` (compute every step).
            steps: N for this sampler (default: the settings'); ignored when ``sigmas`` is given.
            solver, mechanism, guidance: per-sampler overrides of the settings.
            sigmas: explicit N+1 sigmas (e.g. learned by ``align``).
        """
        return Sampler(self.denoiser(), self.sigmas(steps) if sigmas is None else sigmas, solver or self.solver,
                       controller, mechanism or self.mechanism, self.guidance if guidance is None else guidance)

    def calibration(self, prompts: list[str], seeds: list[int]) -> CalibrationSet:
        """The pairs' noise, conditioning and full-step teacher latents."""
        cond, uncond = self.conds(prompts)
        return make_calibration(self.make_sampler, prompts, seeds, self.noise(seeds), cond, uncond,
                                self.calibration_info())

    def final_latents(self, calib: CalibrationSet, policy: CachePolicy | None, plain_steps: int | None = None,
                      batch: int = 64) -> torch.Tensor:
        """Final latents of ``calib``'s items under a policy, or of the plain ``plain_steps``-step sampler."""
        sampler = self.make_sampler(None, plain_steps) if plain_steps else self.make_sampler(policy)
        return run_items(sampler, calib.noise, calib.cond, calib.uncond, batch)


class Shipped:
    """A problem sent to workers as it is (pickled once) and placed on the worker's device."""

    def __init__(self, problem: Any) -> None:
        self.problem = problem

    def __call__(self, device: str) -> Any:
        return self.problem.to(device)
