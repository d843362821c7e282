"""Stage packages that can be called: ``budcache.search(...)``, ``budcache.align(...)``, ``budcache.compare(...)``.

Each stage is a package (its parts stay importable, e.g. ``budcache.search.anneal``)
whose module object is also callable and runs the stage's job function.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _Stage(types.ModuleType):
    """A module whose call runs ``<module>.<__stage_job__>``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, name = self.__dict__["__stage_job__"]
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


def make_callable(module_name: str, job_module: str, job_name: str) -> None:
    """Make the module ``module_name`` callable as ``job_module.job_name`` (imported on the first call)."""
    mod = sys.modules[module_name]
    mod.__stage_job__ = (job_module, job_name)
    mod.__class__ = _Stage
