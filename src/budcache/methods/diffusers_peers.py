"""Methods compared by ``budcache compare``: budcache's own and the peers' shipped implementations.

Every method implements :class:`budcache.baselines.base.Method` and samples
through budcache's one sampler (same transformer, noise, sigmas, solver):

- ``budcache``: the mask searched on the calibration set at the budget (or a
  given policy file); ``budcache-forecast``: the mask searched and run with
  the residual forecast mechanism instead of reuse; ``uniform``: K evenly spaced computed
  steps; ``plain``: the K-step sampler without caching.
- Peers' own code, applied unchanged to the transformer (``diffusers.hooks``):
  ``fbcache`` (FirstBlockCache), ``magcache`` (MagCache, ratios from its own
  calibration mode), ``taylorseer`` (TaylorSeer, lite mode: the block stack is
  skipped and the output projection forecast, the step-level variant); and
  cache-dit's ``dbcache`` and ``cachedit-steps`` (its static steps mask) when
  ``cache-dit`` is installed.

Peer hooks decide with one scalar per transformer call, so input-dependent
ones (FirstBlockCache, DBCache) sample one element per call: batching would
tie the images' decisions together. Their cost is counted exactly: a forward
hook on an inner module of every block counts the block runs, and
``nfe = sum_b runs_b w_b / (sum_b w_b * passes)`` with ``w_b`` the block's
parameter count (a probe block on a skipped step costs its fraction of the
stack) and ``passes`` the transformer calls per step (2 with guidance).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, MissingExtraError
from ..policy import CachePolicy
from ..sampler import _select
from ..search.calibration import get_loss
from .base import MethodRun

#: Bisection stops once the calibration mean NFE is this close to the target.
NFE_TOLERANCE = 0.5


# ------------------------------------------------------------------------------ helpers
def _passes(problem: Any) -> int:
    """Transformer calls per step: 2 with classifier-free guidance, else 1."""
    return 2 if float(problem.guidance) != 1.0 else 1


def _run_sampler(sampler: Any, noise: torch.Tensor, cond: Any, uncond: Any) -> Any:
    st = sampler.run(sampler.start(noise), cond, uncond)
    return sampler.result(st)


def _elements(n: int) -> Iterator[torch.Tensor]:
    for i in range(n):
        yield torch.tensor([i])


def _calib_loss(latents: torch.Tensor, calib: Any) -> float:
    """Mean latent MSE against the calibration teacher."""
    return float((latents - calib.teacher).pow(2).flatten(1).mean(1).mean())


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's repeated blocks in call order (every ``ModuleList`` child named ``*blocks*``)."""
    blocks: list[torch.nn.Module] = []
    for name, child in transformer.named_children():
        if "block" in name and isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    if not blocks:
        raise ConfigError(f"{type(transformer).__name__} has no block lists (a ModuleList named '*blocks*')")
    return blocks


class BlockWork:
    """Counts real block runs: a forward hook on each block's first parametrised child module.

    A cache hook that skips a block replaces the block's forward, so the inner
    module does not run and is not counted. ``work`` is the parameter-weighted
    number of stack runs: ``sum_b runs_b w_b / sum_b w_b``.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.blocks = transformer_blocks(transformer)
        self.weights = [sum(p.numel() for p in b.parameters()) for b in self.blocks]
        self.runs = [0] * len(self.blocks)
        self._handles = []
        for i, block in enumerate(self.blocks):
            inner = next((m for m in block.children() if any(True for _ in m.parameters())), None)
            if inner is None:
                raise ConfigError(f"block {i} of {type(transformer).__name__} has no parametrised child to count")
            self._handles.append(inner.register_forward_hook(self._counter(i)))

    def _counter(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.runs[i] += 1
        return hook

    @property
    def work(self) -> float:
        return sum(r * w for r, w in zip(self.runs, self.weights)) / sum(self.weights)

    @property
    def full_runs(self) -> int:
        """Runs of the last block: how many times the whole stack ran."""
        return self.runs[-1]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> BlockWork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bisect_threshold(mean_nfe: Callable[[float], float], target: float, lo: float = 0.0, hi: float = 1.0,
                     iters: int = 14, tol: float = NFE_TOLERANCE, max_hi: float = 1e6) -> tuple[float, float]:
    """Threshold ``t`` whose mean NFE is closest to ``target``, assuming NFE falls as ``t`` grows.

    ``hi`` doubles until ``mean_nfe(hi) <= target`` (up to ``max_hi``); then
    bisection on ``[lo, hi]`` keeps the threshold with the smallest
    ``|mean_nfe(t) - target|`` and stops once it is within ``tol``.
    Returns ``(threshold, mean NFE at it)``.
    """
    if not lo < hi:
        raise ConfigError(f"threshold bracket must satisfy lo < hi (got {lo}, {hi})")
    seen: dict[float, float] = {}

    def f(t: float) -> float:
        if t not in seen:
            seen[t] = float(mean_nfe(t))
        return seen[t]

    while f(hi) > target and hi < max_hi:
        lo, hi = hi, hi * 2
    for _ in range(iters):
        best = min(seen, key=lambda t: (abs(seen[t] - target), t))
        if abs(seen[best] - target) <= tol:
            break
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    best = min(seen, key=lambda t: (abs(seen[t] - target), t))
    return best, seen[best]


def calibrate(nfe_of: Callable[[float], torch.Tensor], target: float, lo: float, hi: float) -> tuple[float, float]:
    """Threshold whose calibration mean NFE is closest to ``target``; ``nfe_of(t)`` gives per-element NFE.

    Uses the baselines' shared bisection (``budcache.baselines.calibrate``)
    when it is installed, else :func:`bisect_threshold`.
    """
    try:
        from .bisect import calibrate_threshold
    except ImportError:
        return bisect_threshold(lambda t: float(nfe_of(t).double().mean()), target, lo, hi)
    fit = calibrate_threshold(nfe_of, target, lo=lo, hi=hi, tol=NFE_TOLERANCE, refine=1)
    return fit.threshold, fit.mean


# ------------------------------------------------------------------------------ budcache's methods
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
        res = _run_sampler(problem.make_sampler(self.policy, mechanism=self.mechanism), noise, cond, uncond)
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
        res = _run_sampler(problem.make_sampler(None, self.nfe), noise, cond, uncond)
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
        from ..peers import PEER_MECHANISMS
        from ..search.anneal import SearchConfig, search
        from ..search.calibration import get_loss
        from ..search.evaluator import Evaluator, PeerScheduleEvaluator
        from ..search.run import PEER_SEARCH, peer_grid_start, refine_plan, search_estimators

        mech = self.mechanism or "reuse"
        estimator, refine = search_estimators(mech, self.estimators)

        class _Problem:  # the comparison's problem, with this method's mechanism as the sampler's default
            def __getattr__(self, name: str) -> Any:
                return getattr(problem, name)

            mechanism = mech

            @staticmethod
            def make_sampler(controller: Any, *args: Any, **kw: Any) -> Any:
                kw.setdefault("mechanism", mech)
                return problem.make_sampler(controller, *args, **kw)

        view = _Problem()
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
    from ..search.run import DEFAULT_MECHANISM, DEFAULT_REFINE

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
BUDCACHE_METHODS: dict[str, Callable[..., BudcacheMethod]] = {
    "budcache": default_method, "budcache-reuse": reuse_method, "budcache-forecast": forecast_method,
    "taylorseer-searched": taylorseer_searched_method}


def policy_method(policy: CachePolicy) -> str:
    """The compare method that runs ``policy``: by its mechanism (``meta``), ``budcache`` for any estimator."""
    mech = str(policy.meta.get("mechanism", "reuse"))
    if policy.estimators is not None:
        return "budcache"
    return POLICY_METHODS.get(mech, "budcache")


# ------------------------------------------------------------------------------ peers' hooks
@dataclass
class HookMethod:
    """A peer's cache applied unchanged to the transformer for each generation, then removed.

    ``install(transformer)`` applies the peer's hooks and returns a function
    that removes them. A diffusers pipeline resets stateful hooks at the end
    of every call; budcache's sampler has no such call, and without a reset
    TaylorSeer's step counter runs on into the next generation (its second
    image differs from the first). Fresh hooks per generation give every
    generation the state of a pipeline call, even after an interrupted one.
    """

    name: str = "hook"
    kind: str = "threshold"
    per_element: bool = False

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:  # pragma: no cover - interface
        raise NotImplementedError

    def generate(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        """One hooked generation of the whole batch; NFE counted from block runs (one value for the batch)."""
        tr = problem.transformer
        remove = self.install(tr)
        try:
            with BlockWork(tr) as work:
                res = _run_sampler(problem.make_sampler(None), noise, cond, uncond)
        finally:
            remove()
        nfe = work.work / _passes(problem)
        b = noise.shape[0]
        return MethodRun(res.latent, torch.full((b,), nfe, dtype=torch.float64),
                         {"full_runs": work.full_runs / _passes(problem)})

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if not self.per_element or noise.shape[0] == 1:
            return self.generate(problem, noise, cond, uncond)
        runs = [self.generate(problem, noise[i], _select(cond, i), _select(uncond, i)) for i in _elements(len(noise))]
        return MethodRun(torch.cat([r.latent for r in runs]), torch.cat([r.nfe for r in runs]),
                         {"full_runs": [r.extra["full_runs"] for r in runs]})

    def mean_nfe(self, problem: Any, calib: Any) -> float:
        """Mean NFE over the calibration set with the current settings."""
        return float(self.sample(problem, calib.noise, calib.cond, calib.uncond).nfe.mean())


@dataclass
class FirstBlockCacheMethod(HookMethod):
    """diffusers' FirstBlockCache; its threshold bisected to the budget's mean NFE on calibration inputs."""

    name: str = "fbcache"
    per_element: bool = True
    threshold: float | None = None
    calib_nfe: float | None = None

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        from diffusers.hooks import FirstBlockCacheConfig

        if self.threshold is None:
            raise ConfigError("fbcache is not fitted: call fit(problem, calib, nfe) first")
        transformer.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        return transformer.disable_cache

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        def at(t: float) -> torch.Tensor:
            self.threshold = t
            return self.sample(problem, calib.noise, calib.cond, calib.uncond).nfe

        self.threshold, self.calib_nfe = calibrate(at, nfe, 0.0, 0.5)


def magcache_schedule(steps: int, nfe: int) -> tuple[float, int]:
    """MagCache's ``(retention_ratio, max_skip_steps)`` for a budget: its FLUX retention 0.1 (less when K is
    small) and the smallest ``max_skip_steps >= 5`` (its FLUX value) that lets the threshold reach K - 1."""
    retained = min(int(0.1 * steps + 0.5), max(1, nfe // 2))
    ratio = (retained - 0.49) / steps  # int(ratio * steps + 0.5) == retained
    goal = max(nfe - 1, retained + 1)
    m = 5
    while retained + math.ceil((steps - retained) / (m + 1)) > goal and m < steps:
        m += 1
    return ratio, m


@dataclass
class MagCacheMethod(HookMethod):
    """diffusers' MagCache with magnitude ratios from its own calibration mode on the calibration set.

    The ratios are what its calibration mode prints at the end of a run (cond
    branch). Its schedule depends on the ratios only, so every input gets the
    same NFE; the threshold is bisected to the budget.
    """

    name: str = "magcache"
    ratios: list[float] | None = None
    threshold: float | None = None
    retention_ratio: float = 0.1
    max_skip_steps: int = 5
    calib_nfe: float | None = None
    _steps: int = 0

    def config(self, steps: int, calibrate: bool = False) -> Any:
        from diffusers.hooks import MagCacheConfig

        if calibrate:
            return MagCacheConfig(calibrate=True, num_inference_steps=steps)
        if self.ratios is None or self.threshold is None:
            raise ConfigError("magcache is not fitted: call fit(problem, calib, nfe) first")
        return MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                              retention_ratio=self.retention_ratio, num_inference_steps=steps,
                              mag_ratios=list(self.ratios))

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        transformer.enable_cache(self.config(self._steps))
        return transformer.disable_cache

    def calibrate(self, problem: Any, calib: Any) -> list[float]:
        """Run MagCache's calibration mode once over the calibration batch and read the ratios it prints."""
        tr = problem.transformer
        tr.enable_cache(self.config(problem.steps, calibrate=True))
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                _run_sampler(problem.make_sampler(None), calib.noise, calib.cond, calib.uncond)
        finally:
            tr.disable_cache()
        lists = []
        for line in buf.getvalue().splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]") and "MagCache" not in line:
                lists.append([float(v) for v in ast.literal_eval(line)])
        if not lists or len(lists[0]) != problem.steps:
            raise ConfigError(f"MagCache's calibration mode printed no ratios for {problem.steps} steps "
                              "(diffusers changed its calibration output?)")
        return lists[0]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        self._steps = problem.steps
        if self.ratios is None or len(self.ratios) != problem.steps:
            self.ratios = self.calibrate(problem, calib)
        self.retention_ratio, self.max_skip_steps = magcache_schedule(problem.steps, nfe)
        first = _select(calib.cond, torch.tensor([0]))
        one = (calib.noise[:1], first, _select(calib.uncond, torch.tensor([0])))

        def at(t: float) -> torch.Tensor:  # input-independent schedule: one element measures it
            self.threshold = t
            return self.generate(problem, *one).nfe

        self.threshold, _ = calibrate(at, nfe, 0.0, 0.5)
        self.calib_nfe = self.mean_nfe(problem, calib)


def taylorseer_count(steps: int, before: int, interval: int) -> int:
    """Computed steps of TaylorSeer's rule: ``s < before`` or ``(s - before - 1) % interval == 0``."""
    return sum(1 for s in range(steps) if s < before or (s - before - 1) % interval == 0)


@dataclass
class TaylorSeerMethod(HookMethod):
    """diffusers' TaylorSeer in lite mode (blocks skipped, output projection forecast to ``max_order``).

    Its schedule is static: the first ``before`` steps, then every
    ``interval``-th. ``fit`` tries every ``(before, interval)`` that computes
    exactly K steps and keeps the one with the lowest calibration loss
    (``loss``: the search's default, log-MSE, so both are picked by the same rule).
    """

    name: str = "taylorseer"
    kind: str = "static"
    before: int | None = None
    interval: int | None = None
    max_order: int = 1
    loss: str = "logmse"
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        from diffusers.hooks import TaylorSeerCacheConfig

        if self.before is None or self.interval is None:
            raise ConfigError("taylorseer is not fitted: call fit(problem, calib, nfe) first")
        transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=self.before, max_order=self.max_order,
            taylor_factors_dtype=torch.float32, use_lite_mode=True))
        return transformer.disable_cache

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        n = problem.steps
        options = []
        for before in range(1, nfe + 1):
            ivs = [i for i in range(1, n + 1) if taylorseer_count(n, before, i) == nfe]
            if ivs:
                options.append((before, min(ivs)))
        if not options:
            raise ConfigError(f"TaylorSeer's schedule cannot compute exactly {nfe} of {n} steps")
        self.candidates = []
        for before, interval in options:
            self.before, self.interval = before, interval
            run = self.sample(problem, calib.noise, calib.cond, calib.uncond)
            value = float(get_loss(self.loss)(run.latent.float(), calib.teacher.float()).mean())
            self.candidates.append({"before": before, "interval": interval, "loss": value})
        best = min(self.candidates, key=lambda c: c["loss"])
        self.before, self.interval = best["before"], best["interval"]


# ------------------------------------------------------------------------------ registry
def _cachedit_methods() -> dict[str, Callable[[], Any]]:
    import importlib

    try:
        cachedit = importlib.import_module(f"{__package__}.cachedit")
    except MissingExtraError:  # cache-dit is not installed
        return {}
    return cachedit.METHODS


#: Compare's own methods by name (factories); budcache.baselines.METHODS joins them in :func:`build_methods`.
OWN_METHODS: dict[str, Callable[[], Any]] = {
    **BUDCACHE_METHODS,
    "uniform": UniformMethod,
    "plain": PlainMethod,
    "fbcache": FirstBlockCacheMethod,
    "magcache": MagCacheMethod,
    "taylorseer": TaylorSeerMethod,
}


def available_methods() -> dict[str, Callable[[], Any]]:
    """Every method compare can run: its own, cache-dit's (when installed), then the baselines'."""
    out = dict(OWN_METHODS)
    out.update(_cachedit_methods())
    try:
        from . import METHODS as baseline_methods  # the re-implemented baselines, when present
    except ImportError:
        baseline_methods = {}
    for name, factory in baseline_methods.items():
        out.setdefault(name, factory)
    return out


def build_methods(names: Sequence[str], *, policies: dict[int, CachePolicy] | None = None,
                  search_kw: dict[str, Any] | None = None, search_loss: str = "logmse",
                  progress: bool = False) -> list[Any]:
    """Instantiate methods by name; given ``policies`` replace the search at their budget.

    A policy serves the budcache method of its mechanism (``meta["mechanism"]``,
    ``reuse`` when absent): ``budcache`` for reuse, ``budcache-forecast`` for
    forecast1; a policy whose method is not among ``names`` is an error, so a
    given policy is never silently ignored.
    """
    avail = available_methods()
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {sorted(avail)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods listed twice: {sorted(n for n in set(names) if list(names).count(n) > 1)}")
    routed: dict[str, dict[int, CachePolicy]] = {}
    for k, pol in (policies or {}).items():
        target = policy_method(pol)
        if target not in names:
            raise ConfigError(f"the policy for NFE {k} (mechanism {pol.meta.get('mechanism', 'reuse')!r}) runs as "
                              f"method {target!r}, which is not among the methods {list(names)}")
        routed.setdefault(target, {})[k] = pol
    out: list[Any] = []
    for n in names:
        if n in BUDCACHE_METHODS:
            out.append(BUDCACHE_METHODS[n](policies=routed.get(n, {}), search_kw=dict(search_kw or {}),
                                           loss=search_loss, progress=progress))
        else:
            out.append(avail[n]())
    return out
