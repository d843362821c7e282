"""Errors raised by budcache.

Every error a user can trigger with bad input derives from :class:`BudcacheError`
and names the offending field and the values that would be accepted.
"""

from __future__ import annotations


class BudcacheError(Exception):
    """Base class of every error budcache raises on purpose."""


class PolicyError(BudcacheError, ValueError):
    """A cache policy (object or file) is invalid; the message names the field."""


class ConfigError(BudcacheError, ValueError):
    """An argument or option has a value outside the accepted set."""


class ModelOutputError(BudcacheError, RuntimeError):
    """The model produced NaN or Inf; the message names the step."""


class MissingExtraError(BudcacheError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


def require(module: str, extra: str) -> object:
    """Import ``module`` or raise :class:`MissingExtraError` naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"this feature needs the optional dependency {module!r}: "
            f"pip install 'budcache[{extra}]'"
        ) from exc
