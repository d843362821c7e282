"""Side-by-side comparison of step-caching methods at equal NFE (``budcache compare``).

>>> from budcache.compare import CompareConfig, run
>>> res = run("runs/compare", CompareConfig(nfes=(6, 10)))   # doctest: +SKIP
"""

from ..methods.diffusers_peers import (
                      BlockWork,
                      BudcacheMethod,
                      FirstBlockCacheMethod,
                      MagCacheMethod,
                      PlainMethod,
                      TaylorSeerMethod,
                      UniformMethod,
                      available_methods,
                      bisect_threshold,
                      build_methods,
                      forecast_method,
)
from .harness import DEFAULT_METHODS, DEFAULT_NFES, CompareConfig, CompareResult, make_problem, run

__all__ = ["CompareConfig", "CompareResult", "run", "make_problem", "DEFAULT_NFES", "DEFAULT_METHODS",
           "BlockWork", "BudcacheMethod", "forecast_method", "UniformMethod", "PlainMethod", "FirstBlockCacheMethod",
           "MagCacheMethod", "TaylorSeerMethod", "available_methods", "bisect_threshold", "build_methods"]
