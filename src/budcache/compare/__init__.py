"""Side-by-side comparison of step-caching methods at equal NFE (``budcache compare``).

>>> from budcache.compare import CompareConfig, run_compare
>>> res = run_compare("runs/compare", CompareConfig(nfes=(6, 10)))   # doctest: +SKIP
"""

from ..stages import make_callable
from .harness import DEFAULT_METHODS, DEFAULT_NFES, CompareConfig, CompareResult, make_problem, run_compare
from .methods import (
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

make_callable(__name__, f"{__name__}.harness", "run_compare")  # budcache.compare(out, CompareConfig(...))

__all__ = ["CompareConfig", "CompareResult", "run_compare", "make_problem", "DEFAULT_NFES", "DEFAULT_METHODS",
           "BlockWork", "BudcacheMethod", "forecast_method", "UniformMethod", "PlainMethod", "FirstBlockCacheMethod",
           "MagCacheMethod", "TaylorSeerMethod", "available_methods", "bisect_threshold", "build_methods"]
