"""cache-dit's own caches, applied unchanged to the transformer inside budcache's sampler (optional extra).

- ``dbcache``: DBCache (``Fn=1, Bn=0``: the first block always runs as the
  probe, the rest is cached while the relative L1 change of the first
  block's residual stays under the threshold); the threshold is bisected to
  the budget's mean NFE on calibration inputs. Warm-up steps ``max(1, K//4)``
  (budcache's forced prefix), CFG branches cached separately.
- ``cachedit-steps``: DBCache driven by cache-dit's static steps mask
  (``cache_dit.steps_mask(compute_bins, cache_bins)``): a computed warm-up
  bin, then single computed steps separated by cache bins that grow towards
  the end, like cache-dit's predefined masks; the warm-up length is chosen on
  the calibration loss.
- ``cachedit-searched``: the same static steps mask, searched by budcache
  (annealing then hill climbing, exactly ``K'`` computed steps at every
  move, cache-dit's warm-up steps kept computed) from the best hand-set mask
  of ``cachedit-steps``; every candidate mask is one whole generation of the
  calibration items with cache-dit's own code, scored by the search loss.
- ``cachedit-dmd`` and ``cachedit-foca``: the same static steps mask with one
  of cache-dit's residual calibrators forecasting the cached residual on the
  cached steps instead of reusing it: ``DMDCalibratorConfig`` (dynamic mode
  decomposition of the last compute-step snapshots, exponential
  extrapolation; it falls back to a Taylor forecast with fewer than 4
  snapshots) and ``FoCaCalibratorConfig`` (FoCa: BDF2 predictor, Heun
  corrector), both at cache-dit 1.5.3's defaults, for the image and the text
  stream. cache-dit's own code runs unchanged; the mask's warm-up length is
  chosen on the calibration loss with the calibrator on.

cache-dit patches the forward methods of the transformer instance it is
applied to, and they stay patched after ``disable_cache`` (the outputs stay
the same, but budcache's and diffusers' block hooks no longer find the block
contracts they expect). compare therefore applies cache-dit to a private copy
of the transformer (same weights), never to the shared one.

Both run DBCache's probe block (the first block, a fraction ``f`` of the
stack's parameters) on cached steps, which the NFE counts. The static mask
therefore computes ``K' = floor((K - N f) / (1 - f))`` steps so that
``K' + (N - K') f <= K`` (at least 1: where even that exceeds K, the table
shows the larger realised NFE).
cache-dit is installed with ``pip install cache-dit`` (it keeps torch as is);
without it importing this module raises :class:`budcache.errors.MissingExtraError`
and the registry (:mod:`.registry`) leaves these methods out.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MissingExtraError
from ..search.anneal import SearchConfig, search
from ..search.job import PEER_SEARCH
from ..search.losses import get_loss
from .base import MethodRun
from .bisect import bisect_threshold
from .common import calib_mse
from .hooked import BlockWork, HookMethod

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # cache-dit logs every hook installation at info level


def _cache_dit() -> Any:
    try:
        import cache_dit
    except ImportError:
        raise MissingExtraError("the cache-dit methods need cache-dit: pip install cache-dit") from None
    return cache_dit


_cache_dit()  # fail at import: compare lists these methods only when cache-dit is installed


def steps_bins(steps: int, nfe: int, warmup: int) -> tuple[list[int], list[int]]:
    """cache-dit ``(compute_bins, cache_bins)`` with exactly ``nfe`` computed steps of ``steps``.

    ``warmup`` computed steps first, then ``nfe - warmup`` single computed
    steps (the last one the final step); the ``steps - nfe`` cached steps are
    split as evenly as possible between them, larger gaps later.
    """
    singles = nfe - warmup
    cached = steps - nfe
    if singles < 1:  # all computed steps in the warm-up bin
        return [nfe], [cached] if cached else []
    gaps = [cached // singles + (1 if i >= singles - cached % singles else 0) for i in range(singles)]
    compute, cache = [warmup], []
    for g in gaps:
        if g:
            cache.append(g)
            compute.append(1)
        else:
            compute[-1] += 1
    return compute, cache


def probe_fraction(transformer: torch.nn.Module) -> float:
    """Parameter share of the first block in call order (DBCache's ``Fn=1`` probe) in the whole stack."""
    with BlockWork(transformer) as work:
        total = sum(work.weights)
    lists = [getattr(transformer, n) for n in ("transformer_blocks", "blocks") if hasattr(transformer, n)]
    first = lists[0][0] if lists else work.blocks[0]  # cache-dit may reorder the children of a patched model
    return sum(p.numel() for p in first.parameters()) / total


class OnTransformer:
    """A view of a problem whose sampler runs ``transformer`` (a copy) instead of the problem's own."""

    def __init__(self, problem: Any, transformer: torch.nn.Module) -> None:
        self._problem = problem
        self.transformer = transformer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._problem, name)

    def denoiser(self) -> Any:
        den = copy.copy(self._problem.denoiser())
        den.transformer = self.transformer
        return den

    def make_sampler(self, controller: Any, steps: int | None = None, **kw: Any) -> Any:
        return type(self._problem).make_sampler(self, controller, steps, **kw)


_COPIES: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}


def private_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """One deep copy per transformer (kept while the original lives) for cache-dit to patch."""
    hit = _COPIES.get(id(transformer))
    if hit is None or hit[0] is not transformer:
        hit = (transformer, copy.deepcopy(transformer))
        _COPIES[id(transformer)] = hit
    return hit[1]


@dataclass
class DBCacheMethod(HookMethod):
    """cache-dit's DBCache (dynamic, threshold bisected to the budget)."""

    name: str = "dbcache"
    per_element: bool = True
    threshold: float | None = None
    warmup: int = 1
    mask: list[int] | None = None
    calib_nfe: float | None = None
    _steps: int = 0
    _separate_cfg: bool = False

    def config(self) -> Any:
        cd = _cache_dit()
        kw: dict[str, Any] = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=self.warmup,
                                  num_inference_steps=self._steps, enable_separate_cfg=self._separate_cfg)
        if self.mask is not None:
            kw.update(steps_computation_mask=list(self.mask), steps_computation_policy="static")
        else:
            kw.update(residual_diff_threshold=self.threshold)
        return cd.DBCacheConfig(**kw)

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        cd = _cache_dit()
        cd.enable_cache(transformer, cache_config=self.config())
        return lambda: cd.disable_cache(transformer)

    def generate(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        """One generation on the private copy of the transformer (cache-dit patches what it touches)."""
        if isinstance(problem, OnTransformer):
            return super().generate(problem, noise, cond, uncond)
        return super().generate(OnTransformer(problem, private_copy(problem.transformer)), noise, cond, uncond)

    def _setup(self, problem: Any, nfe: int) -> None:
        self._steps = problem.steps
        self._separate_cfg = float(problem.guidance) != 1.0
        self.warmup = max(1, nfe // 4)

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        self._setup(problem, nfe)

        def at(t: float) -> torch.Tensor:
            self.threshold = t
            return self.sample(problem, calib.noise, calib.cond, calib.uncond).nfe

        self.threshold, self.calib_nfe = bisect_threshold(at, nfe, 0.0, 0.5)


@dataclass
class CacheDitStepsMethod(DBCacheMethod):
    """cache-dit's static steps mask with exactly K computed steps (warm-up length fitted on calibration)."""

    name: str = "cachedit-steps"
    kind: str = "static"
    per_element: bool = False
    candidates: list[dict[str, Any]] = field(default_factory=list)

    computed: int | None = None

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        cd = _cache_dit()
        self._setup(problem, nfe)
        f = probe_fraction(problem.transformer)
        n = problem.steps
        k = max(1, min(nfe, int((nfe - n * f) / (1 - f) + 1e-9)))
        self.computed = k
        self.candidates = []
        for warmup in sorted({max(1, k // 4), max(1, k // 2), max(1, (3 * k) // 4)}):
            compute, cache = steps_bins(n, k, warmup)
            self.mask = [int(v) for v in cd.steps_mask(compute_bins=compute, cache_bins=cache,
                                                       total_steps=problem.steps)]
            self.warmup = warmup
            run = self.sample(problem, calib.noise, calib.cond, calib.uncond)
            self.candidates.append({"warmup": warmup, "mask": self.mask, "computed": sum(self.mask),
                                    "loss": calib_mse(run.latent, calib)})
        best = min(self.candidates, key=lambda c: c["loss"])
        self.warmup, self.mask = best["warmup"], best["mask"]


@dataclass
class CacheDitSearchedMethod(CacheDitStepsMethod):
    """cache-dit's static steps mask searched by budcache, from the best hand-set mask (see the module doc).

    Args:
        loss: the search loss (``logmse``: budcache's default, so both are scored alike).
        search_kw: :class:`~budcache.search.anneal.SearchConfig` fields (default: the peer settings of
            :data:`budcache.search.job.PEER_SEARCH`, every mask being a whole generation).
    """

    name: str = "cachedit-searched"
    loss: str = "logmse"
    search_kw: dict[str, Any] = field(default_factory=dict)
    start_loss: float | None = None
    search_loss: float | None = None
    evaluations: int = 0

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        super().fit(problem, calib, nfe)  # the hand-set masks; the best one is the start
        n, loss_fn = problem.steps, get_loss(self.loss)
        start = tuple(i for i, m in enumerate(self.mask) if m)
        memo: dict[tuple[int, ...], float] = {}

        def losses(computes: Any) -> list[float]:
            for c in map(tuple, computes):
                if c not in memo:
                    self.mask = [int(i in c) for i in range(n)]
                    run = self.sample(problem, calib.noise, calib.cond, calib.uncond)
                    memo[c] = float(loss_fn(run.latent.float(), calib.teacher.float()).mean())
            return [memo[tuple(c)] for c in computes]

        kw = {**PEER_SEARCH, "prefix": min(self.warmup, len(start)), **self.search_kw}
        res = search(losses, SearchConfig(steps=n, nfe=len(start), **kw), init=start)
        self.mask = [int(i in res.compute) for i in range(n)]
        self.start_loss, self.search_loss, self.evaluations = memo[start], res.loss, len(memo)


@dataclass
class CacheDitCalibratedMethod(CacheDitStepsMethod):
    """cache-dit's static steps mask with one of its calibrators (``dmd`` or ``foca``) on the cached steps."""

    name: str = "cachedit-dmd"
    calibrator: str = "dmd"

    def calibrator_config(self) -> Any:
        cd = _cache_dit()
        configs = {"dmd": "DMDCalibratorConfig", "foca": "FoCaCalibratorConfig"}
        if self.calibrator not in configs:
            raise MissingExtraError(f"cache-dit calibrator {self.calibrator!r} is not one of {sorted(configs)}")
        cls = getattr(cd, configs[self.calibrator], None)
        if cls is None:
            raise MissingExtraError(f"this cache-dit ({getattr(cd, '__version__', '?')}) has no "
                                    f"{configs[self.calibrator]}; cache-dit 1.5.3 ships it")
        return cls()

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:
        cd = _cache_dit()
        cd.enable_cache(transformer, cache_config=self.config(), calibrator_config=self.calibrator_config())
        return lambda: cd.disable_cache(transformer)


def dmd_method() -> CacheDitCalibratedMethod:
    """cache-dit's steps mask with its DMD calibrator."""
    return CacheDitCalibratedMethod(name="cachedit-dmd", calibrator="dmd")


def foca_method() -> CacheDitCalibratedMethod:
    """cache-dit's steps mask with its FoCa calibrator."""
    return CacheDitCalibratedMethod(name="cachedit-foca", calibrator="foca")

