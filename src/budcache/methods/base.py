"""The interface every compared method implements (budcache's own, the peers' and the re-implemented ones).

A method is fitted once per budget on calibration inputs (polynomials,
thresholds, edge errors, masks: everything offline) and then samples
evaluation inputs through budcache's one sampler, so every method shares the
transformer, noise, sigmas and solver. ``nfe`` counts full block-stack
evaluations per element; partial work (a probe that runs a few blocks) is
counted as the fraction of the stack it runs, so budgets compare honestly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class MethodRun:
    """Outcome of one method on a batch: final latents and per-element cost."""

    latent: torch.Tensor                   # (B, ...) final latents
    nfe: torch.Tensor                      # (B,) float: full evaluations per element, probes counted fractionally
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"computed": (N, B) bool, "threshold": 0.3}


@runtime_checkable
class Method(Protocol):
    """A step-caching method compared at a budget of ``nfe`` evaluations out of ``problem.steps``.

    ``problem`` is a :class:`budcache.problems.Problem` (a TinyflowProblem, a PipelineProblem) or any object
    with the same interface (``transformer``, ``denoiser()``, ``steps``,
    ``solver``, ``guidance``, ``sigmas(steps)``, ``make_sampler(controller, ...)``).
    """

    name: str
    #: "static": the same NFE for every input; "threshold": input-dependent, calibrated to the budget on average
    kind: str

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        """Everything offline for budget ``nfe`` on the calibration set ``calib`` (a CalibrationSet)."""
        ...

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        """Sample a batch from ``noise`` with the fitted method."""
        ...
