"""Stage 1: search the cache mask of exactly K computed steps that keeps the output closest to full steps."""

from __future__ import annotations

from .anneal import SearchConfig, SearchResult, fit_budget, hc_neighbourhood, random_init, sa_proposal, search
from .calibration import CalibrationSet, get_loss, latent_mse, read_prompt_file, tinyflow_prompts
from .evaluator import Evaluator, EvaluatorStats, compute_of, make_calibration, mask_of

__all__ = [
    "CalibrationSet", "Evaluator", "EvaluatorStats", "SearchConfig", "SearchResult", "compute_of", "fit_budget",
    "get_loss", "hc_neighbourhood", "latent_mse", "make_calibration", "mask_of", "random_init",
    "read_prompt_file", "sa_proposal", "search", "tinyflow_prompts",
]
