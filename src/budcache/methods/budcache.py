"""budcache's own methods: static policies whose K of N computed steps every input spends exactly.

- ``budcache``: the mask searched on the calibration set at the budget, as
  ``budcache search`` does by default (velocity forecasts, then an estimator
  per skipped step), or a given policy file;
- ``budcache-reuse`` (the paper's residual reuse), ``budcache-forecast``
  (the residual forecast in the step index) and ``taylorseer-searched``
  (diffusers' TaylorSeer on the searched schedule): the mask searched and run
  with that mechanism;
- ``uniform``: K evenly spaced computed steps; ``plain``: the K-step sampler
  without caching (the controls).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..policy import CachePolicy
from ..search.anneal import SearchConfig, search
from ..search.evaluator import Evaluator, PeerScheduleEvaluator
from ..search.job import DEFAULT_MECHANISM, DEFAULT_REFINE, PEER_SEARCH, peer_grid_start, refine_plan, search_estimators
from ..search.losses import get_loss
from ..specs import PEER_MECHANISMS
from .base import MethodRun
from .common import run_sampler


@dataclass
class StaticMethod:
    """Base of methods with a fixed mask: every element computes exactly the mask's steps."""

    name: str = "static"
    kind: str = "static"
    mechanism: str | None = None
    policy: CachePolicy | None = None

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.policy is None:
            raise ConfigError(f"method {self.name!r} is not fitted: call fit(problem, calib, nfe) first")
        res = run_sampler(problem.make_sampler(self.policy, mechanism=self.mechanism), noise, cond, uncond)
        return MethodRun(res.latent, res.nfe.float(), {"computed": res.computed, "mask": self.policy.strip()})


@dataclass
class UniformMethod(StaticMethod):
    """K evenly spaced computed steps (``CachePolicy.uniform``), residual reuse."""

    name: str = "uniform"

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        self.policy = CachePolicy.uniform(problem.steps, nfe)


@dataclass
class PlainMethod:
    """The plain K-step sampler: the same schedule family at K steps, no caching."""

    name: str = "plain"
    kind: str = "static"
    nfe: int | None = None

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        self.nfe = nfe

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if self.nfe is None:
            raise ConfigError("method 'plain' is not fitted: call fit(problem, calib, nfe) first")
        res = run_sampler(problem.make_sampler(None, self.nfe), noise, cond, uncond)
        return MethodRun(res.latent, res.nfe.float(), {"steps": self.nfe})


@dataclass
class BudcacheMethod(StaticMethod):
    """budcache's searched mask: SA + hill climbing on the calibration loss at budget K.

    The search runs with the method's ``mechanism`` (residual reuse by
    default), so the mask is the best one for the way skipped steps are
    approximated. ``policies`` maps a budget to a given policy (no search at
    that budget). Successive budgets warm-start from the previous one and
    share the evaluator (memo and prefix states) of one calibration set.
    """

    name: str = "budcache"
    mechanism: str | None = "reuse"
    estimators: tuple[str, ...] = ()
    policies: dict[int, CachePolicy] = field(default_factory=dict)
    search_kw: dict[str, Any] = field(default_factory=dict)
    loss: str = "mse"
    progress: bool = False
    _evaluator: Any = None
    _calib: Any = None
    _last: tuple[int, ...] | None = None
    search_wall_s: float = 0.0

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        if nfe in self.policies:
            pol = self.policies[nfe]
            if pol.steps != problem.steps:
                raise ConfigError(f"policy for NFE {nfe} has {pol.steps} steps but the comparison uses "
                                  f"{problem.steps}")
            self.policy = pol
            return
        mech = self.mechanism or "reuse"
        estimator, refine = search_estimators(mech, self.estimators)

        view = problem.with_settings(mechanism=mech)  # this method's estimator as the sampler's default
        if self._calib is not calib:
            if mech in PEER_MECHANISMS:
                self._evaluator = PeerScheduleEvaluator(view.make_sampler, calib, mechanism=mech,
                                                        loss=get_loss(self.loss))
            else:
                self._evaluator = Evaluator(view.make_sampler, calib, loss=get_loss(self.loss), estimator=estimator)
            self._calib, self._last = calib, None
        kw = dict(self.search_kw)
        init = self._last
        t0 = time.perf_counter()
        if mech in PEER_MECHANISMS:
            kw = {**PEER_SEARCH, **{k: v for k, v in kw.items() if k == "seed"}}
            init = peer_grid_start(self._evaluator, problem.steps, nfe) or init
        cfg = SearchConfig(steps=problem.steps, nfe=nfe, **kw)
        res = search(self._evaluator.losses, cfg, init=init, progress=self.progress)
        refined, names = refine_plan(view, calib, self._evaluator, res.compute, mech, refine, get_loss(self.loss),
                                     progress=self.progress)
        self._last = res.compute
        self.search_wall_s = time.perf_counter() - t0
        self.policy = CachePolicy(problem.steps, res.compute, meta={
            "solver": problem.solver, "guidance": problem.guidance, "mechanism": mech, "budget": nfe,
            "search_loss": refined.loss if refined is not None else res.loss, "loss": self.loss,
            "calibration_digest": calib.digest, "calibration_pairs": len(calib)}, estimators=names)


def default_method(**kw: Any) -> BudcacheMethod:
    """budcache's default search (``budcache search`` with no options): the mask searched with velocity
    forecasts in sigma, then each skipped step's estimator chosen among vtaylor1, vtaylor2 and output."""
    return BudcacheMethod(name="budcache", mechanism=DEFAULT_MECHANISM, estimators=DEFAULT_REFINE, **kw)


def reuse_method(**kw: Any) -> BudcacheMethod:
    """The paper's budcache: the mask searched and run with residual reuse."""
    return BudcacheMethod(name="budcache-reuse", mechanism="reuse", **kw)


def forecast_method(**kw: Any) -> BudcacheMethod:
    """budcache's mask searched and run with the residual forecast mechanism (linear in the step index)."""
    return BudcacheMethod(name="budcache-forecast", mechanism="forecast1", **kw)


def taylorseer_searched_method(**kw: Any) -> BudcacheMethod:
    """diffusers' TaylorSeer (its own code, lite mode) on the compute schedule budcache's search finds."""
    return BudcacheMethod(name="taylorseer-searched", mechanism="taylorseer", **kw)


#: The compare method that runs a given policy of each version-1 mechanism; any other estimator (and version-2
#: policies) goes to ``budcache``.
POLICY_METHODS: dict[str, str] = {"reuse": "budcache-reuse", "forecast1": "budcache-forecast",
                                  "taylorseer": "taylorseer-searched"}


def policy_method(policy: CachePolicy) -> str:
    """The compare method that runs ``policy``: by its mechanism (``meta``), ``budcache`` for any estimator."""
    mech = str(policy.meta.get("mechanism", "reuse"))
    if policy.estimators is not None:
        return "budcache"
    return POLICY_METHODS.get(mech, "budcache")



#: Given policies: budget -> one policy, or several that run as different methods (the first is the reference).
GivenPolicies = Mapping[int, "CachePolicy | Sequence[CachePolicy]"]


def given_lists(policies: GivenPolicies | None) -> dict[int, list[CachePolicy]]:
    """``policies`` with every budget's value as a list, in the order given; a ConfigError names a budget whose
    value is empty or holds anything but :class:`CachePolicy` objects.

    Args:
        policies: budget -> a policy, or a sequence of policies.
    """
    out: dict[int, list[CachePolicy]] = {}
    for k, v in (policies or {}).items():
        pols = [v] if isinstance(v, CachePolicy) else (list(v) if isinstance(v, (list, tuple)) else None)
        if not pols or not all(isinstance(p, CachePolicy) for p in pols):
            raise ConfigError(f"the policies given for NFE {k} must be a CachePolicy or a non-empty list of them "
                              f"(got {type(v).__name__})")
        out[int(k)] = pols
    return out


def same_schedule(a: CachePolicy, b: CachePolicy) -> bool:
    """True when two policies run the same: the same steps, computed steps, sigmas, estimators and mechanism."""
    return (a.steps, a.compute, a.sigmas, a.estimators, a.meta.get("mechanism")) == \
        (b.steps, b.compute, b.sigmas, b.estimators, b.meta.get("mechanism"))


def route_policies(policies: GivenPolicies | None) -> dict[str, dict[int, CachePolicy]]:
    """Method name -> budget -> the given policy it runs (:func:`policy_method`).

    A second policy of one budget for the same method is dropped when it runs the same as the first (e.g. the
    kept policy of ``budcache search`` and the candidate's own file it was kept from), and otherwise a
    ConfigError.

    Args:
        policies: budget -> a policy, or several that run as different methods.
    """
    routed: dict[str, dict[int, CachePolicy]] = {}
    for k, pols in given_lists(policies).items():
        for pol in pols:
            target = policy_method(pol)
            first = routed.get(target, {}).get(k)
            if first is not None:
                if same_schedule(first, pol):
                    continue
                raise ConfigError(f"two different policies for NFE {k} run as method {target!r}; give one per "
                                  "method (a TaylorSeer-schedule policy runs as taylorseer-searched, a version-1 "
                                  "reuse or forecast1 policy as budcache-reuse or budcache-forecast, any other as "
                                  "budcache)")
            routed.setdefault(target, {})[k] = pol
    return routed
