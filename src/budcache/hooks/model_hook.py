"""The hook on the transformer itself: it sets the cache context and resolves each call's step decision.

A resolver with ``host_decision(context) -> Decision`` (a static policy)
decides on the host when a ``cache_context`` is entered: the forward then
reads only the step's variant (compute or skip), never the step number, a
counter or a device tensor, so a compiled transformer keeps one graph per
variant. Other resolvers run inside the forward. With a velocity estimator
the hook returns the forecast output and the model does not run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from diffusers.hooks.hooks import CacheContext, ModelHook, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..errors import ConfigError, ModelOutputError
from ..estimators import History
from .config import ResidualHistory
from .state import Cache, CacheState

__all__ = ["DEFAULT_CONTEXT", "ModelDecisionHook"]

#: The context of a call made outside any ``cache_context``.
DEFAULT_CONTEXT = "default"


class _ContextWatch(StateManager):
    """Sees each ``cache_context`` enter and exit, on the host and outside any compiled region.

    diffusers' ``cache_context`` sets the context on every ``StateManager`` a
    stateful hook holds; the model hook holds this one, so a host resolver
    decides the step before the (possibly compiled) transformer call begins.
    """

    def __init__(self, hook: ModelDecisionHook) -> None:
        super().__init__(CacheState)
        self._hook = hook

    def set_context(self, context: CacheContext | None) -> None:
        super().set_context(context)
        self._hook._context_changed(context)


class ModelDecisionHook(ModelHook):
    """Hook of the transformer: sets the context and resolves the step decision (module docstring).

    ``owner`` is the object :func:`budcache.hooks.find_cache` returns for this transformer.
    """

    _is_stateful = True

    def __init__(self, cache: Cache, owner: Any = None) -> None:
        super().__init__()
        self.cache = cache
        self.owner = owner
        self.state_manager = cache.state_manager
        self.host = callable(getattr(cache.resolver, "host_decision", None))
        self._open: CacheState | None = None  # the state whose host decision awaits its call's end
        self.watch = _ContextWatch(self) if self.host else None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module

    # -- host side (outside any compiled region) ------------------------------------------------
    def _state_of(self, name: str) -> CacheState:
        cache = self.state_manager._state_cache
        if name not in cache:
            cache[name] = CacheState()
        return cache[name]

    def _context_changed(self, context: CacheContext | None) -> None:
        self._finish()
        if context is not None and not self.cache.bypass:
            self._resolve(self._state_of(context.name), context)

    def _resolve(self, st: CacheState, context: CacheContext) -> None:
        d = self.cache.resolver.host_decision(context)
        if d.step != 0 and d.step == st.last_step:
            raise ConfigError(
                f"{type(self.cache.transformer).__name__} was called twice at step {d.step} in one cache context; "
                "wrap each pass (e.g. CFG's conditional and unconditional) in transformer.cache_context(name)")
        if d.step == 0 or d.step != st.last_step + 1:
            st.reset()  # a generation is a run of consecutive steps; anything else starts clean
        if d.at is None:
            d = replace(d, at=self.cache.step_tensor(d.step))
        st.decision, st.called = d, False
        self._open = st

    def _finish(self) -> None:
        """Count the call a host decision was made for, once it has run (host ints only)."""
        st, self._open = self._open, None
        if st is None or not st.called:
            return
        st.called = False
        st.last_step = st.decision.step
        stats = self.cache.stats
        stats.calls += 1
        if st.decision.computes:
            stats.stack_runs += 1
            stats.elements_computed += st.batch
        else:
            stats.skipped_calls += 1

    # -- forward (traced when the transformer is compiled) --------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.cache.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        own_context = self.state_manager._context is None
        if own_context:
            self.state_manager.set_context(CacheContext(DEFAULT_CONTEXT))
        try:
            st: CacheState = self.state_manager.get_state()
            x = kwargs.get("hidden_states", args[0] if args else None)
            sig = (tuple(x.shape), x.dtype, x.device) if torch.is_tensor(x) else None
            if self.host:
                if own_context:  # no cache_context around the call: decide here (a compiled graph sees the step)
                    self._resolve(st, self.state_manager.context)
                if st.decision is None or st.called:
                    raise ConfigError(
                        f"{type(module).__name__} was called twice in one cache context; wrap each call (e.g. CFG's "
                        "conditional and unconditional pass) in its own transformer.cache_context(name)")
                if st.signature is not None and sig != st.signature:
                    st.history = ResidualHistory()  # a new batch size or resolution: no residual carries over
                    st.outputs = History()
                st.signature = sig
                try:
                    return self._run(st, args, kwargs)
                finally:
                    if own_context:
                        self._finish()
            decision = self.cache.take_decision(module, st, args, kwargs)
            if self.cache.resolver is not None:
                # Pipelines: a generation is a run of consecutive steps on one input shape; anything
                # else (step 0, a jump, a new batch size or resolution) starts clean.
                if decision.step == st.last_step and sig == st.signature:
                    raise ConfigError(
                        f"{type(module).__name__} was called twice at step {decision.step} in one cache context; "
                        "wrap each pass (e.g. CFG's conditional and unconditional) in transformer.cache_context(name)")
                if decision.step == 0 or decision.step != st.last_step + 1 or sig != st.signature:
                    st.reset()
                st.signature = sig
            elif decision.step == 0:
                st.reset()  # a new generation starts clean
            st.decision = decision
            st.last_step = decision.step
            return self._run(st, args, kwargs)
        finally:
            if own_context:
                self.state_manager.set_context(None)

    def _check(self, out: torch.Tensor, step: Any, what: str) -> None:
        """NaN or Inf in ``out`` is a :class:`ModelOutputError` naming the step (only with ``check_finite``)."""
        if self.cache.config.check_finite and not bool(torch.isfinite(out).all()):
            raise ModelOutputError(f"{what} returned NaN or Inf at step {int(step)} (budcache.diffusers.apply "
                                   "with check_finite=True); the pipeline's output would be invalid")

    def _run(self, st: CacheState, args: tuple, kwargs: dict) -> Any:
        """The call itself: the model, or (velocity estimators) its forecast output; stores outputs when asked."""
        d = st.decision
        step = d.at if d.at is not None else d.step
        if d.velocity is not None:
            if not st.outputs.img:
                raise ConfigError("no computed step is cached yet: the first step of a generation must compute")
            if self.host:
                st.called = True  # counted as a skipped call on the host
            else:
                self.cache.stats.calls += 1
                self.cache.stats.skipped_calls += 1
            out: Any = d.velocity(st.outputs, step)
            self._check(out, step, "the velocity forecast")
            if st.output_list:  # the model returns one tensor per element (Z-Image): so does the forecast
                out = list(out.unbind(0))
            return (out,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=out)
        result = self.fn_ref.original_forward(*args, **kwargs)
        if self.cache.config.check_finite:
            sample = result[0] if isinstance(result, tuple) else result.sample
            self._check(torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample, step, "the model")
        if self.cache.output_depth and (d.computes if d.computes is not None else bool(d.compute.all())):
            sample = result[0] if isinstance(result, tuple) else result.sample
            st.output_list = isinstance(sample, (list, tuple))
            if st.output_list:
                sample = torch.stack(list(sample))
            st.outputs = st.outputs.push(None, sample.detach(), None, step, sample.shape[0], self.cache.output_depth)
        return result
