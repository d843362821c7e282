"""Names of the estimators and mechanisms, with no heavy import (policies and the CLI read them).

The estimators themselves (the math) are in :mod:`budcache.estimators`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator.

    Args:
        name: its name in policies and on the command line.
        target: ``"residual"`` (block-stack residual, needs a transformer) or ``"velocity"`` (model output).
        order: Newton order, 0 (reuse), 1 or 2.
        time: the time variable of the forecast, ``"step"`` or ``"sigma"`` (irrelevant for order 0).
        summary: one line for ``budcache show`` and the docs.
        letter: its character in a plan strip (:meth:`budcache.policy.CachePolicy.estimator_strip`).
    """

    name: str
    target: Literal["residual", "velocity"]
    order: int
    time: Literal["step", "sigma"]
    summary: str
    letter: str

    @property
    def depth(self) -> int:
        """Stored values it needs: ``order + 1``."""
        return self.order + 1


#: Every estimator by name. ``reuse``/``forecast1``/``forecast2``/``output`` are version 1's mechanisms.
ESTIMATORS: dict[str, EstimatorSpec] = {s.name: s for s in (
    EstimatorSpec("reuse", "residual", 0, "step", "reuse the last computed stack residual", "r"),
    EstimatorSpec("forecast1", "residual", 1, "step", "residual, linear in the step index", "f"),
    EstimatorSpec("forecast2", "residual", 2, "step", "residual, quadratic (Newton) in the step index", "F"),
    EstimatorSpec("taylor1", "residual", 1, "sigma", "residual, linear in sigma", "t"),
    EstimatorSpec("taylor2", "residual", 2, "sigma", "residual, quadratic (Newton) in sigma", "T"),
    EstimatorSpec("output", "velocity", 0, "step", "reuse the last computed velocity", "o"),
    EstimatorSpec("vtaylor1", "velocity", 1, "sigma", "velocity, linear in sigma", "v"),
    EstimatorSpec("vtaylor2", "velocity", 2, "sigma", "velocity, quadratic (Newton) in sigma", "V"),
    EstimatorSpec("vforecast1", "velocity", 1, "step", "velocity, linear in the step index (TaylorSeer lite's)", "s"),
    EstimatorSpec("vforecast2", "velocity", 2, "step", "velocity, quadratic (Newton) in the step index", "S"),
)}

#: Stable integer code of every estimator (plans store codes; 0 is reserved for "compute").
CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(ESTIMATORS)}
NAMES: dict[int, str] = {c: n for n, c in CODES.items()}
COMPUTE = 0


def get(name: str) -> EstimatorSpec:
    """The estimator called ``name``; a ConfigError lists the known ones."""
    spec = ESTIMATORS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"estimator {name!r} is unknown; choose one of {list(ESTIMATORS)}")
    return spec


def plan_legend(quote: str = "") -> str:
    """The plan strip's letters: ``C`` computed, then one ``<letter> <name>`` per estimator (each letter wrapped
    in ``quote``)."""
    return ", ".join([f"{quote}C{quote} computed",
                      *(f"{quote}{s.letter}{quote} {n}" for n, s in ESTIMATORS.items())])


def residual_names() -> tuple[str, ...]:
    return tuple(n for n, s in ESTIMATORS.items() if s.target == "residual")


def velocity_names() -> tuple[str, ...]:
    return tuple(n for n, s in ESTIMATORS.items() if s.target == "velocity")



#: Peers' caches whose compute schedule budcache can search and apply (:mod:`budcache.peers`).
PEER_MECHANISMS: tuple[str, ...] = ("taylorseer",)

#: Every mechanism a sampler, ``budcache search`` or ``budcache sample`` accepts.
ALL_MECHANISMS: tuple[str, ...] = (*ESTIMATORS, *PEER_MECHANISMS)

#: Solver names (the classes live in :mod:`budcache.solvers`, whose registry has exactly these keys).
SOLVER_NAMES: tuple[str, ...] = ("euler", "dpmpp2m", "ipndm")
