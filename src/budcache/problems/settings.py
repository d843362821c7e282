"""The sampler settings a problem runs with: the one source of truth for N, the solver and the estimator."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..specs import ALL_MECHANISMS, SOLVER_NAMES

#: The estimator a policy's skipped steps use when nothing else names one (version-1 policies, plain runs).
DEFAULT_MECHANISM = "reuse"


@dataclass(frozen=True)
class SamplerSettings:
    """How a problem samples: ``steps`` solver steps of ``solver`` with classifier-free ``guidance``;
    skipped steps of a policy are filled by ``mechanism`` unless the policy names its own estimators.

    Args:
        steps: N, the number of solver steps of the full sampler (>= 1).
        solver: a name of :data:`budcache.solvers.SOLVERS` (``euler``, ``dpmpp2m``, ``ipndm``).
        mechanism: the estimator of skipped steps (:data:`budcache.specs.ALL_MECHANISMS`).
        guidance: classifier-free guidance scale, a finite number >= 0 (1 = off).
    """

    steps: int = 28
    solver: str = "euler"
    mechanism: str = DEFAULT_MECHANISM
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--steps must be an integer >= 1 (got {self.steps!r})")
        if not isinstance(self.solver, str) or self.solver.lower() not in SOLVER_NAMES:
            raise ConfigError(f"unknown solver {self.solver!r}; valid names: {', '.join(sorted(SOLVER_NAMES))}")
        if self.mechanism not in ALL_MECHANISMS:
            raise ConfigError(f"mechanism {self.mechanism!r} is unknown; choose one of {list(ALL_MECHANISMS)}")
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (math.isfinite(g) and g >= 0):
            raise ConfigError(f"--guidance must be a finite number >= 0 (got {g!r})")
        object.__setattr__(self, "guidance", float(g))

    def replace(self, **changes: object) -> SamplerSettings:
        """A copy with ``changes`` (validated again); ``None`` values keep the current setting."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
