"""The state of a residual cache: per ``cache_context`` (:class:`CacheState`) and per transformer (:class:`Cache`).

The residual history is an immutable value (:class:`budcache.estimators.History`):
a computed step replaces it by a new one, so :meth:`Cache.snapshot` is a cheap
copy of references and :meth:`Cache.restore` puts an earlier state back
(prefix sharing in the search resumes many masks from one stored prefix).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, StateManager

from ..errors import ConfigError
from ..estimators import History
from .config import CacheConfig, Decision, Estimator, Probe, ResidualHistory

__all__ = ["Cache", "CacheState", "CacheStats"]


class CacheState(BaseState):
    """Per-``cache_context`` state shared by the hooks of one transformer (CFG's passes keep one each)."""

    def __init__(self) -> None:
        self.history = ResidualHistory()
        self.decision: Decision | None = None
        self.mode = "all"  # "all" | "skip" | "subset"
        self.idx: torch.Tensor | None = None
        self.batch = 0
        self.head_in: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.last_step = -1
        self.signature: tuple | None = None  # (shape, dtype, device) of the latest input
        self.called = False  # a host-resolved decision was used by a call (set in the forward, read on the host)
        self.outputs = History()  # model outputs of computed steps (velocity estimators on pipelines)
        self.output_list = False  # the model returns a list of per-element tensors (stacked in outputs)
        self.owned: tuple[History | None, History | None] = (None, None)  # histories already copied out

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.__init__()


@dataclass
class CacheStats:
    """Counters a test or benchmark can read: block-stack runs and elements computed."""

    stack_runs: int = 0
    elements_computed: int = 0
    skipped_calls: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.stack_runs = self.elements_computed = self.skipped_calls = self.calls = 0


class Cache:
    """What every hook of one installation shares: the config, the context states, counters and decisions."""

    def __init__(self, transformer: torch.nn.Module, config: CacheConfig) -> None:
        self.transformer = transformer
        self.config = config
        self.order = config.order
        self.depth = config.residual_depth
        self.output_depth = int(config.output_depth)
        self.resolver = config.resolver
        self.bypass = False
        self.state_manager = StateManager(CacheState)
        self.stats = CacheStats()
        self.pending: Decision | None = None
        self._steps: dict[tuple[int, torch.device], torch.Tensor] = {}

    # -- decisions -------------------------------------------------------------------------------
    def set_decision(self, step: int, compute: torch.Tensor, estimator: Estimator | None = None,
                     resume: Probe | None = None) -> None:
        """Decision for the next call(s) of the transformer (kept until replaced)."""
        self.pending = Decision(step, compute, estimator, resume)

    def take_decision(self, module: torch.nn.Module, st: CacheState, args: tuple, kwargs: dict) -> Decision:
        """The decision of a call: the resolver's, else the pending one."""
        if self.resolver is not None:
            return self.resolver(module, args, kwargs, st)
        if self.pending is None:
            raise ConfigError("budcache: call set_decision(step, compute) before calling the transformer")
        return self.pending

    def step_tensor(self, step: int) -> torch.Tensor:
        """``step`` as a 0-d tensor on the transformer's device, made once per step and device, then reused."""
        p = next(self.transformer.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        t = self._steps.get((step, dev))
        if t is None:
            t = self._steps[(step, dev)] = torch.full((), float(step), dtype=torch.get_default_dtype(), device=dev)
        return t

    def estimate(self, st: CacheState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(R_hat_img, R_hat_txt)`` of the skipped elements: the step's own estimator, else the mechanism's."""
        d = st.decision
        if d.estimator is not None:
            if not st.history.img:
                raise ConfigError("no computed step is cached yet: the first step of a generation must compute")
            return d.estimator(st.history, d.at if d.at is not None else d.step)
        return st.history.estimate(d.at if d.at is not None else d.step, self.order)

    # -- state -----------------------------------------------------------------------------------
    def own_memory(self) -> None:
        """Copy the tensors stored by the last call into memory of the cache's own.

        CUDA graphs (``torch.compile`` modes ``reduce-overhead`` and
        ``max-autotune``) return tensors that live in the graph's memory pool
        and are overwritten by the next replay; a residual kept for later steps
        must not. Run on the host after each call, outside the compiled region
        (:func:`budcache.pipelines.compile` does); a history already copied is
        left alone, so a skipped step copies nothing.
        """
        for st in self.state_manager._state_cache.values():
            hist, outs = st.owned
            if st.history is not hist and st.history.img:
                st.history = st.history.map(torch.clone)
            if st.outputs is not outs and st.outputs.img:
                st.outputs = st.outputs.map(torch.clone)
            st.owned = (st.history, st.outputs)

    def reset(self) -> None:
        """Forget every cached residual (all contexts)."""
        self.state_manager.reset()
        self.pending = None

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Calls inside run the plain model: no decision, no cache read or written."""
        before, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = before

    def snapshot(self) -> dict[str, ResidualHistory]:
        """The residual history of every context (immutable values; cheap)."""
        return {name: st.history for name, st in self.state_manager._state_cache.items()}

    def restore(self, snap: dict[str, ResidualHistory] | None) -> None:
        """Replace the cached residuals by a :meth:`snapshot` (``None``: empty)."""
        self.state_manager._state_cache.clear()
        for name, hist in (snap or {}).items():
            st = CacheState()
            st.history = hist
            self.state_manager._state_cache[name] = st
