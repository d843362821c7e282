"""Problems: a model with its sampler settings, prompts, noise, conditioning and calibration data.

Every stage takes a :class:`Problem`: :class:`TinyflowProblem` (the embedded
default model) or :class:`PipelineProblem` (a diffusers pipeline of a family
in :data:`FAMILIES`). :class:`SamplerSettings` is the one source of truth for
N, the solver, the estimator and guidance; :func:`calibration_pairs` and
:func:`split_pairs` draw every stage's (prompt, seed) pairs by split name.

The names load on first use (PEP 562), so the CLI's argument parsing does not import the model stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SamplerSettings": "settings", "DEFAULT_MECHANISM": "settings",
    "Problem": "base", "ProblemBase": "base", "Shipped": "base",
    "CalibrationSet": "data", "SPLITS": "data", "calibration_pairs": "data", "split_pairs": "data",
    "pairs_for": "data", "read_prompt_file": "data", "make_calibration": "data", "run_items": "data",
    "weights_digest": "data",
    "item_metrics": "metrics", "latent_psnr": "metrics", "paired_gap": "metrics", "PairedGap": "metrics",
    "gap_text": "metrics",
    "TinyflowProblem": "tinyflow", "TinyflowReplica": "tinyflow", "tinyflow_prompts": "tinyflow",
    "PipelineProblem": "pipeline", "load_pipeline": "pipeline", "save_embeddings": "pipeline",
    "load_embeddings": "pipeline",
    "FAMILIES": "families", "Family": "families", "family_of": "families",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
