"""budcache: budget-exact step caching for diffusion and flow-matching transformers.

A static cache policy says which K of N solver steps run the full block stack;
the others reuse (or forecast) the residual cached at the last computed step.
The latency is fixed in advance: exactly K full evaluations per image.
"""

from __future__ import annotations

from .errors import BudcacheError, ConfigError, MissingExtraError, ModelOutputError, PolicyError
from .policy import CachePolicy
from .sampler import ComputeAll, SampleResult, Sampler, SamplerState, StaticMask, sample

__version__ = "0.1.0"

__all__ = [
    "BudcacheError", "CachePolicy", "ComputeAll", "ConfigError", "MissingExtraError", "ModelOutputError",
    "PolicyError", "SampleResult", "Sampler", "SamplerState", "StaticMask", "sample", "__version__",
]
