"""Every method ``budcache compare`` runs, behind one registry and one threshold bisection.

- :mod:`.registry`: ``REGISTRY`` (name -> :class:`MethodSpec`), ``available_methods``, ``build_methods``;
- :mod:`.base`: the :class:`Method` protocol (``fit``, ``sample``) and :class:`MethodRun`;
- :mod:`.bisect`: :func:`calibrate_threshold`, the bisection that tunes any threshold method to a mean NFE;
- :mod:`.budcache`: budcache's own static policies (searched, uniform, plain);
- peers' own code, unchanged: :mod:`.diffusers_peers` (FirstBlockCache, MagCache, TaylorSeer) and
  :mod:`.cachedit` (cache-dit, optional extra), both through :mod:`.hooked`;
- re-implemented because no library ships them, one module each: :mod:`.teacache`, :mod:`.dicache`,
  :mod:`.lemica`, :mod:`.recache`, :mod:`.ertacache`, :mod:`.meancache`, :mod:`.gcache`, :mod:`.ecad`
  (:mod:`.profile` holds the full-step trajectory recorder several of them share, :mod:`.common` the rest).

A new method is one module here plus one row in ``REGISTRY``.
"""

from __future__ import annotations

from .base import Method, MethodRun
from .bisect import NFE_TOLERANCE, ThresholdFit, bisect_threshold, calibrate_threshold
from .budcache import (
    BudcacheMethod,
    GivenPolicies,
    PlainMethod,
    StaticMethod,
    UniformMethod,
    forecast_method,
    given_lists,
    policy_method,
    route_policies,
)
from .dicache import DiCache, DiCacheController
from .diffusers_peers import FirstBlockCacheMethod, MagCacheMethod, TaylorSeerMethod
from .ecad import ECAD
from .ertacache import ERTACache
from .gcache import GCache
from .hooked import BlockWork, HookMethod
from .lemica import LeMiCa, brute_force_path, lexminimax_path
from .meancache import MeanCache
from .recache import ReCache
from .registry import BASELINES, REGISTRY, MethodSpec, available_methods, build_methods, methods_from
from .teacache import TeaCache, TeaCacheController

__all__ = [
    "BASELINES",
    "ECAD",
    "NFE_TOLERANCE",
    "REGISTRY",
    "BlockWork",
    "BudcacheMethod",
    "DiCache",
    "DiCacheController",
    "ERTACache",
    "FirstBlockCacheMethod",
    "GCache",
    "HookMethod",
    "LeMiCa",
    "MagCacheMethod",
    "MeanCache",
    "Method",
    "MethodRun",
    "MethodSpec",
    "PlainMethod",
    "ReCache",
    "StaticMethod",
    "TaylorSeerMethod",
    "TeaCache",
    "TeaCacheController",
    "ThresholdFit",
    "UniformMethod",
    "available_methods",
    "bisect_threshold",
    "brute_force_path",
    "build_methods",
    "calibrate_threshold",
    "forecast_method",
    "given_lists",
    "GivenPolicies",
    "lexminimax_path",
    "methods_from",
    "policy_method",
    "route_policies",
]
