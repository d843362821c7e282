"""Baselines compared with budcache at equal NFE, all run through budcache's one sampler.

Re-implemented here because no library ships them: TeaCache, DiCache,
LeMiCa, a ReCache-style REINFORCE policy, ERTACache, MeanCache, GCache and
ECAD (each module's docstring states its rule and its documented choices;
:mod:`.profile` holds the full-step trajectory recorder several of them
share), plus :func:`calibrate_threshold`, the
generic bisection that tunes any threshold method to a mean NFE.

``METHODS`` maps a name to a factory of a :class:`~budcache.baselines.base.Method`.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Method, MethodRun
from .bisect import ThresholdFit, calibrate_threshold
from .dicache import DiCache, DiCacheController
from .ecad import ECAD
from .ertacache import ERTACache
from .gcache import GCache
from .lemica import LeMiCa, brute_force_path, lexminimax_path
from .meancache import MeanCache
from .recache import ReCache
from .teacache import TeaCache, TeaCacheController

#: name -> factory (keyword arguments go to the method's constructor).
METHODS: dict[str, Callable[..., Method]] = {
    "teacache": TeaCache,
    "dicache": DiCache,
    "lemica": LeMiCa,
    "recache": ReCache,
    "ertacache": ERTACache,
    "meancache": MeanCache,
    "gcache": GCache,
    "ecad": ECAD,
}

__all__ = [
    "ECAD",
    "METHODS",
    "DiCache",
    "DiCacheController",
    "ERTACache",
    "GCache",
    "LeMiCa",
    "MeanCache",
    "Method",
    "MethodRun",
    "ReCache",
    "TeaCache",
    "TeaCacheController",
    "ThresholdFit",
    "brute_force_path",
    "calibrate_threshold",
    "lexminimax_path",
]
