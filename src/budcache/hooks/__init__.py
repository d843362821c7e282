"""Residual-cache hooks on a diffusers transformer's block stack.

This package is the one place that touches diffusers internals (its hook
registry, state manager and block registry). It follows the shape of
diffusers' own caches (``diffusers.hooks.first_block_cache``), per instance
and removable:

- :mod:`~budcache.hooks.config`: :class:`CacheConfig` (mechanism, depths,
  resolver) and the :class:`Decision` of one step;
- :mod:`~budcache.hooks.state`: :class:`CacheState` per ``cache_context``
  (CFG's passes keep separate caches) holding the immutable residual history,
  and the :class:`Cache` every hook of one installation shares (snapshot,
  restore, counters);
- :mod:`~budcache.hooks.blocks`: the block contracts (diffusers' registry plus
  :data:`BLOCK_CONTRACTS`, a table for block classes it does not know) and
  :func:`block_stack`, the one finder of a transformer's blocks;
- :mod:`~budcache.hooks.model_hook`: the transformer's hook resolves which
  batch elements compute this step (a :class:`Decision` from the sampler, or a
  resolver reading the scheduler's host state or the call's timestep);
- :mod:`~budcache.hooks.block_hooks`: the head block records the stack input
  ``(h, e)`` and, on a skipped step, returns ``(h + R_hat, e + R_hat_e)``; the
  other blocks pass through; the tail stores the residual ``R = out - in`` of
  a computed step, per element;
- :mod:`~budcache.hooks.apply`: :func:`apply_cache` installs them,
  :class:`CacheHandle` removes them, :func:`find_cache` finds them;
- :mod:`~budcache.hooks.probes`: :func:`probe_stack` reads a step's signals
  without running the whole stack (TeaCache's indicator, DiCache's probe).

``R_hat`` comes from the mechanism: ``reuse`` (``R_hat = R_j``, the last
computed step ``j``) or ``forecast`` (Newton extrapolation of the residual in
the step index from the last 2 or 3 computed steps, defined in
:mod:`budcache.estimators`), unless the step's :class:`Decision` carries its
own ``estimator``.
"""

from __future__ import annotations

from .apply import CacheHandle, apply_cache, find_cache
from .block_hooks import HeadBlockHook, PassThroughBlockHook
from .blocks import BLOCK_CONTRACTS, ArgumentNames, BlockContract, block_contract, block_stack
from .config import MECHANISMS, CacheConfig, Decision, Estimator, ResidualHistory
from .model_hook import ModelDecisionHook
from .probes import Probe, model_context, modulated_input, probe_stack, stack_size
from .state import Cache, CacheState, CacheStats

#: Former private name of :func:`block_stack`, kept for callers not yet moved to the public one.
_block_stack = block_stack

__all__ = [
    "BLOCK_CONTRACTS",
    "MECHANISMS",
    "ArgumentNames",
    "BlockContract",
    "Cache",
    "CacheConfig",
    "CacheHandle",
    "CacheState",
    "CacheStats",
    "Decision",
    "Estimator",
    "HeadBlockHook",
    "ModelDecisionHook",
    "PassThroughBlockHook",
    "Probe",
    "ResidualHistory",
    "apply_cache",
    "block_contract",
    "block_stack",
    "find_cache",
    "model_context",
    "modulated_input",
    "probe_stack",
    "stack_size",
]
