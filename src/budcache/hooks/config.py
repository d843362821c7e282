"""What a residual cache is asked to do: its configuration, the decision of one step, and the probe a decision
may carry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..estimators import History

__all__ = ["MECHANISMS", "CacheConfig", "Decision", "Estimator", "Probe", "ResidualHistory"]

#: Residual mechanisms the hooks implement, with their extrapolation order.
MECHANISMS: dict[str, int] = {"reuse": 0, "forecast1": 1, "forecast2": 2}

#: The per-element residual history of a cache context (see :class:`budcache.estimators.History`).
ResidualHistory = History

#: ``estimator(history, step) -> (R_hat_img, R_hat_txt)``: a step's own residual estimate for skipped elements.
Estimator = Callable[[History, int], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class Probe:
    """Signals of one model call, read without running the whole block stack.

    ``h_in`` (B, T, D): image stream entering the stack; ``temb`` (B, D): the
    timestep/text embedding the blocks get; ``h_out`` (B, T, D): image stream
    after the first ``blocks`` blocks (``None`` when ``blocks`` is 0);
    ``output``: that block's whole output (every stream), so a computed step
    can resume from it.
    """

    h_in: torch.Tensor
    temb: torch.Tensor | None
    h_out: torch.Tensor | None
    blocks: int
    stack_size: int
    output: Any = None


@dataclass(frozen=True)
class CacheConfig:
    """Configuration of a residual cache on one transformer.

    Args:
        mechanism: the default residual estimate ``R_hat`` of a skipped step (:data:`MECHANISMS`):
            ``reuse`` (``R_hat = R_j``, the last computed step ``j``) or ``forecast1``/``forecast2``
            (Newton extrapolation in the step index, :mod:`budcache.estimators`).
        depth: computed residuals kept per element, at least the mechanism's ``order + 1``
            (a step's own estimator may need more).
        output_depth: model outputs kept per context for velocity forecasts (0: none).
        resolver: ``resolver(module, args, kwargs, state) -> Decision`` for every call, or an object
            with ``host_decision(context) -> Decision`` deciding on the host when a ``cache_context``
            is entered (pipelines); ``None``: decisions come from ``CacheHandle.set_decision``.
        check_finite: after every call, check the model's (or the forecast) output for NaN and Inf and raise
            :class:`~budcache.errors.ModelOutputError` naming the step. It reads a device value back once per
            call (a host sync; off by default, so a compiled graph stays whole).
    """

    mechanism: str = "reuse"
    depth: int | None = None
    output_depth: int = 0
    resolver: Any = None
    check_finite: bool = False

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"mechanism {self.mechanism!r} is not a residual mechanism; choose one of "
                              f"{list(MECHANISMS)}")
        if self.depth is not None and (not isinstance(self.depth, int) or self.depth < 1):
            raise ConfigError(f"residual depth must be an integer >= 1 (got {self.depth!r})")

    @property
    def order(self) -> int:
        """Extrapolation order of the mechanism."""
        return MECHANISMS[self.mechanism]

    @property
    def residual_depth(self) -> int:
        """Residuals kept per element: ``max(order + 1, depth)``."""
        return max(self.order + 1, self.depth or 1)


@dataclass(frozen=True)
class Decision:
    """Which elements compute at ``step``: ``compute`` is a bool tensor (B,).

    ``estimator`` (optional) replaces the mechanism's ``R_hat`` for the
    skipped elements of this step. ``resume`` (optional) is a :class:`Probe`
    of this step's call in context ``resume_context``: there, the computing
    elements take its output of the first ``probe.blocks`` blocks instead of
    running them again (other contexts run every block).
    """

    step: int
    compute: torch.Tensor
    estimator: Estimator | None = None
    resume: Probe | None = None
    resume_context: str = "cond"
    #: Host-side facts of a static policy, so no hook reads ``compute`` back: ``True`` every element computes,
    #: ``False`` none does (``compute`` then need not match the batch). ``None``: read ``compute``.
    computes: bool | None = None
    #: ``step`` as a 0-d tensor on the model's device: compiled hooks use it in tensor math instead of the int,
    #: so no graph is specialised on the step.
    at: torch.Tensor | None = None
    #: Every element skipped with a velocity estimator: forecast the model's whole output from the outputs
    #: stored at computed steps; the model does not run (pipelines; budcache's sampler forecasts velocities itself).
    velocity: Callable[[History, Any], torch.Tensor] | None = None
