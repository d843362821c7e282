"""Side-by-side comparison of step-caching methods at equal NFE (``budcache compare``).

The orchestration lives here (fitting, evaluation, metrics, tables, plots); the
methods themselves, and their registry, in :mod:`budcache.methods`.

>>> from budcache.compare import CompareConfig, run
>>> res = run("runs/compare", CompareConfig(nfes=(6, 10)))   # doctest: +SKIP
"""

from .harness import DEFAULT_METHODS, DEFAULT_NFES, CompareConfig, CompareResult, make_problem, run

__all__ = ["CompareConfig", "CompareResult", "run", "make_problem", "DEFAULT_NFES", "DEFAULT_METHODS"]
