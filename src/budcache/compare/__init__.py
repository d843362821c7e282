"""Side-by-side comparison of step-caching methods at equal NFE (``budcache compare``).

The orchestration lives here (``harness``: fitting, evaluation, metrics;
``report``: tables, plots, grids); the methods themselves, and their registry,
in :mod:`budcache.methods`. The package is callable: ``budcache.compare(out, cfg)``
is :func:`run_compare`.

>>> from budcache.compare import CompareConfig, run_compare
>>> res = run_compare("runs/compare", CompareConfig(nfes=(6, 10)))   # doctest: +SKIP
"""

from ..stages import make_callable
from .harness import DEFAULT_METHODS, DEFAULT_NFES, CompareConfig, make_problem, run_compare
from .report import CompareResult, load_result, markdown, merge_results

make_callable(__name__, f"{__name__}.harness", "run_compare")  # budcache.compare(out, CompareConfig(...))

__all__ = ["CompareConfig", "CompareResult", "run_compare", "make_problem", "load_result", "merge_results",
           "markdown", "DEFAULT_NFES", "DEFAULT_METHODS"]
