"""Stage 1: search the cache mask of exactly K computed steps that keeps the output closest to full steps.

``budcache.search.run_search(out, nfes=[10], problem=...)`` is the whole job
(calibrate, search each budget, evaluate, report); :func:`search` is the
annealing and hill climbing over any loss function. The names below load on
first use (PEP 562), so the CLI starts without the model stack.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..stages import make_callable

make_callable(__name__, f"{__name__}.job", "run_search")  # budcache.search(out, nfes=..., ...)

_EXPORTS = {
    "SearchConfig": "anneal", "SearchResult": "anneal", "fit_budget": "anneal", "hc_neighbourhood": "anneal",
    "random_init": "anneal", "sa_proposal": "anneal", "search": "anneal", "refine_estimators": "anneal",
    "get_loss": "losses", "latent_mse": "losses", "LOSSES": "losses",
    "Evaluator": "evaluator", "EvaluatorStats": "evaluator", "compute_of": "evaluator",
    "mask_of": "evaluator", "PeerScheduleEvaluator": "evaluator", "plan_of": "evaluator",
    "run_search": "job", "BudgetOutcome": "job", "DEFAULT_MECHANISM": "job", "DEFAULT_REFINE": "job",
    "make_evaluator": "distributed", "RayEvaluator": "distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
