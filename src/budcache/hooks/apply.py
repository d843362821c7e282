"""Installing a residual cache on a transformer instance, and taking it off again.

:func:`apply_cache` registers, in diffusers' hook registry of that one
instance, a :class:`~budcache.hooks.model_hook.ModelDecisionHook` on the
transformer, a :class:`~budcache.hooks.block_hooks.HeadBlockHook` on the first
block and a :class:`~budcache.hooks.block_hooks.PassThroughBlockHook` on every
other block (the last one stores the residual). :class:`CacheHandle` removes
them and gives access to the shared :class:`~budcache.hooks.state.Cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from diffusers.hooks.hooks import HookRegistry, StateManager

from ..errors import ConfigError
from .block_hooks import HeadBlockHook, PassThroughBlockHook
from .blocks import block_stack
from .config import CacheConfig, Decision, Estimator, Probe, ResidualHistory
from .model_hook import ModelDecisionHook
from .state import Cache, CacheStats

__all__ = ["CacheHandle", "apply_cache", "find_cache"]

_MODEL_HOOK = "budcache_model"
_BLOCK_HOOK = "budcache_block"


class CacheHandle:
    """A residual cache installed on one transformer; :meth:`remove` takes it off.

    Decisions come from :meth:`set_decision` (the sampler, before each call) or
    from the config's resolver (pipelines). The cache itself (context states,
    counters, decisions) is :attr:`cache`; the methods below reach it.

    Args:
        transformer: a diffusers transformer whose blocks :func:`~budcache.hooks.block_stack` finds.
        config: what the cache does (:class:`~budcache.hooks.config.CacheConfig`).
    """

    def __init__(self, transformer: torch.nn.Module, config: CacheConfig) -> None:
        self.transformer = transformer
        self.config = config
        self.cache = Cache(transformer, config)
        self._blocks = block_stack(transformer)
        self._installed = False

    # -- installation ------------------------------------------------------------------
    def install(self) -> CacheHandle:
        """Register the hooks on the transformer instance."""
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        if registry.get_hook(_MODEL_HOOK) is not None:
            raise ConfigError(f"{type(self.transformer).__name__} already has a budcache cache; remove it first")
        registry.register_hook(ModelDecisionHook(self.cache, owner=self), _MODEL_HOOK)
        last = len(self._blocks) - 1
        for i, (_, block) in enumerate(self._blocks):
            hook_cls = HeadBlockHook if i == 0 else PassThroughBlockHook
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                hook_cls(self.cache, i, is_tail=i == last), _BLOCK_HOOK)
        self._installed = True
        return self

    def remove(self) -> None:
        """Take every hook off; the transformer behaves exactly as before."""
        if not self._installed:
            return
        for _, block in self._blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(_BLOCK_HOOK, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(_MODEL_HOOK, recurse=False)
        self._installed = False
        self.cache.state_manager.reset()

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the cache ---------------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        return self.config.mechanism

    @property
    def order(self) -> int:
        return self.cache.order

    @property
    def depth(self) -> int:
        return self.cache.depth

    @property
    def output_depth(self) -> int:
        return self.cache.output_depth

    @property
    def resolver(self) -> object:
        return self.cache.resolver

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    @property
    def state_manager(self) -> StateManager:
        return self.cache.state_manager

    @property
    def bypass(self) -> bool:
        return self.cache.bypass

    def reset(self) -> None:
        """Forget every cached residual (all contexts)."""
        self.cache.reset()

    def set_decision(self, step: int, compute: torch.Tensor, estimator: Estimator | None = None,
                     resume: Probe | None = None) -> None:
        """Decision for the next call(s) of the transformer (kept until replaced)."""
        self.cache.set_decision(step, compute, estimator, resume)

    def bypassed(self) -> AbstractContextManager[None]:
        """Calls inside run the plain model: no decision, no cache read or written."""
        return self.cache.bypassed()

    def snapshot(self) -> dict[str, ResidualHistory]:
        """The residual history of every context (immutable values; cheap)."""
        return self.cache.snapshot()

    def restore(self, snap: dict[str, ResidualHistory] | None) -> None:
        """Replace the cached residuals by a :meth:`snapshot` (``None``: empty)."""
        self.cache.restore(snap)


def apply_cache(transformer: torch.nn.Module, mechanism: str = "reuse",
                resolver: Callable[..., Decision] | None = None, depth: int | None = None,
                output_depth: int = 0, check_finite: bool = False) -> CacheHandle:
    """Install a residual cache on ``transformer`` (per instance, removable).

    Args:
        transformer: a diffusers transformer (see :func:`~budcache.hooks.block_stack`).
        mechanism, depth, output_depth, resolver, check_finite: as in :class:`~budcache.hooks.config.CacheConfig`;
            ``output_depth`` > 0 also keeps that many model outputs per context for velocity forecasts.

    Returns:
        The :class:`CacheHandle`; ``handle.remove()`` (or a ``with`` block) takes the hooks off.
    """
    config = CacheConfig(mechanism=mechanism, depth=depth, output_depth=output_depth, resolver=resolver,
                         check_finite=check_finite)
    return CacheHandle(transformer, config).install()


def find_cache(transformer: torch.nn.Module) -> CacheHandle | None:
    """The budcache cache installed on ``transformer``, if any."""
    reg = getattr(transformer, "_diffusers_hook", None)
    hook = reg.get_hook(_MODEL_HOOK) if reg is not None else None
    return hook.owner if hook is not None else None


