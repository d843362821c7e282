"""budcache: budget-exact step caching for diffusion and flow-matching transformers.

A static cache policy says which K of N solver steps run the full block stack;
the others reuse (or forecast) the residual cached at the last computed step.
The latency is fixed in advance: exactly K full evaluations per image.

>>> import budcache
>>> from budcache.problems import TinyflowProblem
>>> problem = TinyflowProblem(steps=28)                                          # doctest: +SKIP
>>> outcome, = budcache.search("runs/search", nfes=[10], problem=problem)        # doctest: +SKIP
>>> job = budcache.align("runs/align", policy=outcome.policy, problem=problem)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import BudcacheError, ConfigError, MissingExtraError, ModelOutputError, PolicyError
from .policy import CachePolicy

if TYPE_CHECKING:
    from .sampler import ComputeAll, Sampler, SampleResult, SamplerState, StaticMask, sample

__version__ = "0.1.0"

# The sampler needs torch; it is imported on first use so that reading a policy (and ``budcache --help``,
# ``budcache show``) starts without the model stack.
_SAMPLER_NAMES = ("ComputeAll", "SampleResult", "Sampler", "SamplerState", "StaticMask", "sample")


#: Stages and sub-packages loaded on first use: ``budcache.search(...)``, ``budcache.align(...)`` and
#: ``budcache.compare(...)`` run the jobs (each package is callable); ``budcache.problems`` holds the problems.
_SUBPACKAGES = ("search", "align", "compare", "problems", "diffusers", "tinyflow")


def __getattr__(name: str) -> Any:
    if name in _SAMPLER_NAMES:
        from . import sampler

        return getattr(sampler, name)
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'budcache' has no attribute {name!r}")

__all__ = [
    "align", "compare", "problems", "search",
    "BudcacheError", "CachePolicy", "ComputeAll", "ConfigError", "MissingExtraError", "ModelOutputError",
    "PolicyError", "SampleResult", "Sampler", "SamplerState", "StaticMask", "sample", "__version__",
]
