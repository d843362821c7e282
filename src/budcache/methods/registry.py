"""The one registry of compared methods: every name ``budcache compare --methods`` accepts, one row each.

A row (:class:`MethodSpec`) says how to build a fresh, unfitted method and
what compare needs to know about it: where its code comes from (``source``)
and which pip extra it needs. Rows keep the order ``--list-methods`` prints.
Adding a method is one module in ``budcache.methods`` plus one row here.

>>> from budcache.methods import REGISTRY, build_methods
>>> m = REGISTRY["teacache"]()                      # a fresh TeaCache    # doctest: +SKIP
>>> build_methods(["budcache", "plain"])            # what compare runs   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError, MissingExtraError
from .base import Method
from .budcache import (
    GivenPolicies,
    PlainMethod,
    UniformMethod,
    default_method,
    forecast_method,
    reuse_method,
    route_policies,
    taylorseer_searched_method,
)
from .dicache import DiCache
from .diffusers_peers import FirstBlockCacheMethod, MagCacheMethod, TaylorSeerMethod
from .ecad import ECAD
from .ertacache import ERTACache
from .gcache import GCache
from .lemica import LeMiCa
from .meancache import MeanCache
from .recache import ReCache
from .teacache import TeaCache

#: Where a method's code comes from. ``budcache``: a searched budcache policy (built with the search settings
#: and given policies); ``reference``: uniform mask, plain K steps; ``diffusers`` / ``cache-dit``: the peers' own
#: code, unchanged; ``reimplemented``: re-implemented by budcache from the paper and code.
Source = Literal["budcache", "reference", "diffusers", "cache-dit", "reimplemented"]

#: Optional extras: pip extra -> the budcache module that imports it (raising MissingExtraError without it).
EXTRAS: dict[str, str] = {"cachedit": f"{__package__}.cachedit"}


def extra_module(extra: str) -> Any:
    """The module of an optional extra (``EXTRAS``); :class:`MissingExtraError` when the extra is not installed."""
    if extra not in EXTRAS:
        raise ConfigError(f"unknown extra {extra!r}; choose from {sorted(EXTRAS)}")
    return importlib.import_module(EXTRAS[extra])


def extra_installed(extra: str) -> bool:
    """Whether the optional extra imports (checked on every call: an install or a test may change it)."""
    try:
        extra_module(extra)
    except MissingExtraError:
        return False
    return True


@dataclass(frozen=True)
class MethodSpec:
    """One row of the registry; calling it builds a fresh method (keyword arguments go to the factory).

    Args:
        name: the name ``budcache compare --methods`` takes; the built method's ``name``.
        source: where the method's code comes from (:data:`Source`).
        factory: builds the method; for a method of an optional ``extra``, the name of the factory in the
            extra's module (imported when the method is first built).
        extra: the pip extra the method needs (``budcache[cachedit]``), None when always available.
    """

    name: str
    source: Source
    factory: Callable[..., Method] | str
    extra: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.factory, str) and self.extra is None:
            raise ConfigError(f"method {self.name!r}: a factory given by name needs the extra whose module has it")

    @property
    def available(self) -> bool:
        """Whether the method can be built here (its extra, if any, is installed)."""
        return self.extra is None or extra_installed(self.extra)

    def __call__(self, **kw: Any) -> Method:
        factory = self.factory
        if isinstance(factory, str):
            factory = getattr(extra_module(self.extra), factory)
        return factory(**kw)


def _rows(*specs: MethodSpec) -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for s in specs:
        if s.name in out:
            raise ConfigError(f"method {s.name!r} is registered twice")
        out[s.name] = s
    return out


#: The registry: name -> row, in the order ``budcache compare --list-methods`` prints.
REGISTRY: dict[str, MethodSpec] = _rows(
    MethodSpec("budcache", "budcache", default_method),
    MethodSpec("budcache-reuse", "budcache", reuse_method),
    MethodSpec("budcache-forecast", "budcache", forecast_method),
    MethodSpec("taylorseer-searched", "budcache", taylorseer_searched_method),
    MethodSpec("uniform", "reference", UniformMethod),
    MethodSpec("plain", "reference", PlainMethod),
    MethodSpec("fbcache", "diffusers", FirstBlockCacheMethod),
    MethodSpec("magcache", "diffusers", MagCacheMethod),
    MethodSpec("taylorseer", "diffusers", TaylorSeerMethod),
    MethodSpec("dbcache", "cache-dit", "DBCacheMethod", extra="cachedit"),
    MethodSpec("cachedit-steps", "cache-dit", "CacheDitStepsMethod", extra="cachedit"),
    MethodSpec("cachedit-searched", "cache-dit", "CacheDitSearchedMethod", extra="cachedit"),
    MethodSpec("cachedit-dmd", "cache-dit", "dmd_method", extra="cachedit"),
    MethodSpec("cachedit-foca", "cache-dit", "foca_method", extra="cachedit"),
    MethodSpec("teacache", "reimplemented", TeaCache),
    MethodSpec("dicache", "reimplemented", DiCache),
    MethodSpec("lemica", "reimplemented", LeMiCa),
    MethodSpec("recache", "reimplemented", ReCache),
    MethodSpec("ertacache", "reimplemented", ERTACache),
    MethodSpec("meancache", "reimplemented", MeanCache),
    MethodSpec("gcache", "reimplemented", GCache),
    MethodSpec("ecad", "reimplemented", ECAD),
)


def methods_from(*sources: Source) -> dict[str, MethodSpec]:
    """The rows of the given sources, in registry order (available or not)."""
    return {n: s for n, s in REGISTRY.items() if s.source in sources}


#: The methods budcache re-implements (TeaCache, DiCache, LeMiCa, ReCache, ERTACache, MeanCache, GCache, ECAD).
BASELINES: dict[str, MethodSpec] = methods_from("reimplemented")


def available_methods() -> dict[str, MethodSpec]:
    """Every method compare can run here: the registry less the methods of extras that are not installed."""
    return {n: s for n, s in REGISTRY.items() if s.available}


def build_methods(names: Sequence[str], *, policies: GivenPolicies | None = None,
                  search_kw: dict[str, Any] | None = None, search_loss: str = "logmse",
                  progress: bool = False) -> list[Method]:
    """Fresh methods by name; given ``policies`` replace budcache's search at their budget.

    A policy serves the budcache method of its mechanism (:func:`~.budcache.policy_method`);
    a policy whose method is not among ``names`` is an error, so a given policy is never silently ignored, and
    so are two policies of one budget that run as the same method.

    Args:
        names: registry names, each at most once.
        policies: budget -> policy (or policies, each for a different method) to run instead of searching at
            that budget.
        search_kw: :class:`~budcache.search.anneal.SearchConfig` fields for budcache's searches.
        search_loss: the loss budcache's searches minimise (``budcache.search.losses.LOSSES``).
        progress: show the searches' progress bars.
    """
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {sorted(available_methods())}")
    missing = [n for n in names if not REGISTRY[n].available]
    if missing:
        extras = sorted({str(REGISTRY[n].extra) for n in missing})
        raise MissingExtraError(f"method(s) {missing} need the optional extra(s) {extras}: "
                                f"pip install 'budcache[{','.join(extras)}]'")
    if len(set(names)) != len(names):
        raise ConfigError(f"methods listed twice: {sorted(n for n in set(names) if list(names).count(n) > 1)}")
    routed = route_policies(policies)
    for target, by_k in routed.items():
        if target not in names:
            k, pol = next(iter(by_k.items()))
            raise ConfigError(f"the policy for NFE {k} (mechanism {pol.meta.get('mechanism', 'reuse')!r}) runs as "
                              f"method {target!r}, which is not among the methods {list(names)}")
    out: list[Method] = []
    for n in names:
        spec = REGISTRY[n]
        if spec.source == "budcache":
            out.append(spec(policies=routed.get(n, {}), search_kw=dict(search_kw or {}), loss=search_loss,
                            progress=progress))
        else:
            out.append(spec())
    return out
