"""Progress of long phases (teacher outputs, held-out evaluation), counted in sampler item-steps."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

_PHASE: contextvars.ContextVar[Any] = contextvars.ContextVar("budcache_phase", default=None)


@contextlib.contextmanager
def phase(desc: str | None, total: int | None = None) -> Iterator[None]:
    """A progress bar labelled ``desc`` (``None``: none) over the sampler steps run inside, counted per item
    (``total`` of them, when known).

    Long phases of a job show progress without threading a flag through every problem class.
    """
    if desc is None:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=total, unit=" item-steps", unit_scale=True, dynamic_ncols=True)
    token = _PHASE.set(bar)
    try:
        yield
    finally:
        _PHASE.reset(token)
        bar.close()


def step_counter(items: int) -> Callable[[Any], Any] | None:
    """A sampler ``callback`` that advances the current :func:`phase`'s bar by ``items`` per step (or None)."""
    bar = _PHASE.get()
    if bar is None:
        return None
    return lambda state: bar.update(items)
