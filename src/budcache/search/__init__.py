"""Stage 1: search the cache mask of exactly K computed steps that keeps the output closest to full steps.

The names below load on first use (PEP 562), so the CLI can read the shared options in
:mod:`budcache.search.options` without importing the model stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchConfig": "anneal", "SearchResult": "anneal", "fit_budget": "anneal", "hc_neighbourhood": "anneal",
    "random_init": "anneal", "sa_proposal": "anneal", "search": "anneal", "refine_estimators": "anneal",
    "CalibrationSet": "calibration", "get_loss": "calibration", "latent_mse": "calibration",
    "read_prompt_file": "calibration", "tinyflow_prompts": "calibration",
    "Evaluator": "evaluator", "EvaluatorStats": "evaluator", "compute_of": "evaluator",
    "make_calibration": "evaluator", "mask_of": "evaluator", "PeerScheduleEvaluator": "evaluator",
    "plan_of": "evaluator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
