"""Peers' caches driven by a budcache compute schedule, their own estimator code unchanged.

diffusers' TaylorSeer decides whether a step computes in one method,
``TaylorSeerCacheHook._measure_should_compute`` (warm-up steps, then every
``cache_interval``-th). :class:`ScheduledTaylorSeerHook` overrides only that
method: the step counter advances as in diffusers, and the decision is read
from a static mask. Everything else (its Taylor factors, prediction, lite-mode
block skipping, state per cache context) is diffusers' own code.

:func:`apply_taylorseer_schedule` registers the hooks on the same modules and
under the same hook name as ``transformer.enable_cache(TaylorSeerCacheConfig(...))``;
the handle it returns removes them. :func:`peer_snapshot` and :func:`restore_peer`
copy the hooks' state after a step and put it back, so that a search can resume
a generation from a shared prefix of steps (bit for bit as one whole run).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import taylorseer_cache as _ts
from diffusers.hooks.hooks import HookRegistry, StateManager

from .errors import ConfigError
from .specs import PEER_MECHANISMS

__all__ = ["PEER_MECHANISMS", "PeerHooks", "PeerSnapshot", "ScheduledTaylorSeerHook", "apply_taylorseer_schedule",
           "peer_snapshot", "restore_peer", "scheduled_hooks", "taylorseer_grid_computes",
           "taylorseer_grid_mask"]


class ScheduledTaylorSeerHook(_ts.TaylorSeerCacheHook):
    """diffusers' TaylorSeer hook whose compute decision comes from a static mask.

    Args:
        mask: per step, True when the step computes (step 0 must).
        state_manager, taylor_factors_dtype: as for ``TaylorSeerCacheHook``.
    """

    def __init__(self, mask: Sequence[bool], taylor_factors_dtype: torch.dtype, state_manager: StateManager) -> None:
        super().__init__(cache_interval=1, disable_cache_before_step=0, taylor_factors_dtype=taylor_factors_dtype,
                         state_manager=state_manager)
        self.mask = tuple(bool(m) for m in mask)

    @torch.compiler.disable
    def _measure_should_compute(self) -> tuple[bool, Any]:
        state = self.state_manager.get_state()
        state.current_step += 1
        step = state.current_step
        if not 0 <= step < len(self.mask):
            raise ConfigError(f"TaylorSeer schedule: call for step {step} but the schedule has {len(self.mask)} "
                              "steps (a generation with another step count, or a hook not reset between "
                              "generations)")
        return self.mask[step], state


def apply_taylorseer_schedule(transformer: torch.nn.Module, mask: Sequence[bool], *, max_order: int = 1,
                              lite: bool = True, factors_dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """Install diffusers' TaylorSeer on ``transformer`` with ``mask`` as its compute schedule.

    Args:
        transformer: a diffusers transformer.
        mask: per step, True when it computes; ``mask[0]`` must be True.
        max_order: TaylorSeer's Taylor order (diffusers' default 1).
        lite: lite mode (skip every block, forecast the output projection), as budcache compare runs it.
        factors_dtype: dtype of the stored Taylor factors.

    Returns:
        A function that removes the hooks again.
    """
    mask = tuple(bool(m) for m in mask)
    if not mask or not mask[0]:
        raise ConfigError("TaylorSeer schedule: step 0 must compute")
    if lite:
        active, inactive = _ts._PROJ_OUT_IDENTIFIERS, _ts._BLOCK_IDENTIFIERS
    else:
        active, inactive = _ts._TRANSFORMER_BLOCK_IDENTIFIERS, ()
    hooked: list[torch.nn.Module] = []
    for name, sub in transformer.named_modules():
        is_inactive = any(re.fullmatch(p, name) for p in inactive)
        if not (is_inactive or any(re.fullmatch(p, name) for p in active)):
            continue
        manager = StateManager(_ts.TaylorSeerState, init_kwargs={
            "taylor_factors_dtype": factors_dtype, "max_order": max_order, "is_inactive": is_inactive})
        HookRegistry.check_if_exists_or_initialize(sub).register_hook(
            ScheduledTaylorSeerHook(mask, factors_dtype, manager), _ts._TAYLORSEER_CACHE_HOOK)
        hooked.append(sub)
    if not hooked:
        raise ConfigError(f"{type(transformer).__name__} has no module TaylorSeer hooks "
                          f"(patterns {list(active)})")
    # diffusers caches which sub-modules carry hooks (to set cache contexts); the new hooks stale it
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def remove() -> None:
        for sub in hooked:
            reg = getattr(sub, "_diffusers_hook", None)
            if reg is not None and reg.get_hook(_ts._TAYLORSEER_CACHE_HOOK) is not None:
                reg.remove_hook(_ts._TAYLORSEER_CACHE_HOOK, recurse=False)
        hooked.clear()
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    return remove


def taylorseer_grid_mask(steps: int, before: int, interval: int) -> tuple[bool, ...]:
    """TaylorSeer's own schedule as a mask: step ``s`` computes when ``s < before`` or
    ``(s - before - 1) % interval == 0``."""
    return tuple(s < before or (s - before - 1) % interval == 0 for s in range(steps))


def taylorseer_grid_computes(steps: int, nfe: int) -> list[tuple[int, ...]]:
    """The compute sets of TaylorSeer's (warm-up, interval) grid with exactly ``nfe`` of ``steps`` computed, one per
    warm-up length (its smallest such interval), without repeats; empty when none computes exactly ``nfe``."""
    options = []
    for before in range(1, nfe + 1):
        for interval in range(1, steps + 1):
            mask = taylorseer_grid_mask(steps, before, interval)
            if sum(mask) == nfe:
                options.append(tuple(k for k, m in enumerate(mask) if m))
                break
    return list(dict.fromkeys(options))


#: A transformer's scheduled TaylorSeer hooks: ``(module name, hook)`` in module order.
PeerHooks = list[tuple[str, "ScheduledTaylorSeerHook"]]


def scheduled_hooks(transformer: torch.nn.Module) -> PeerHooks:
    """The scheduled TaylorSeer hooks under ``transformer`` with their module names, in module order."""
    hooks = []
    for name, sub in transformer.named_modules():
        reg = getattr(sub, "_diffusers_hook", None)
        hook = reg.get_hook(_ts._TAYLORSEER_CACHE_HOOK) if reg is not None else None
        if isinstance(hook, ScheduledTaylorSeerHook):
            hooks.append((name, hook))
    return hooks


def _layout(hooks: PeerHooks) -> tuple[tuple[str, bool], ...]:
    """Which modules carry a hook, and whether each is inactive (lite mode's skipped blocks)."""
    return tuple((name, bool(h.state_manager._init_kwargs.get("is_inactive", False))) for name, h in hooks)


def _copy_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor], *, same_layout: bool = False) -> Any:
    """A copy of a ``TaylorSeerState`` with ``fn`` applied to its Taylor factors (and, unless ``same_layout``
    says ``fn`` keeps batch and device, to the batch size and device of the zeros an inactive module returns)."""
    new = copy.copy(state)
    new.taylor_factors = {i: {o: fn(t) for o, t in f.items()} for i, f in state.taylor_factors.items()}
    if same_layout:
        return new
    if state.inactive_shapes is not None:
        new.inactive_shapes = tuple((fn(torch.empty(s[0], 0)).shape[0], *s[1:]) if s else s
                                    for s in state.inactive_shapes)
    if state.device is not None:
        new.device = fn(torch.empty(0, device=state.device)).device
    return new


@dataclass(frozen=True)
class PeerSnapshot:
    """The state of a transformer's scheduled TaylorSeer hooks after a step: per hooked module (in module
    order), per cache context, a copy of diffusers' ``TaylorSeerState`` (step counter, last update, factors).
    ``layout`` names the hooked modules and which are inactive, so it restores only into the same hooks."""

    states: tuple[dict[str, Any], ...]
    layout: tuple[tuple[str, bool], ...]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PeerSnapshot:
        """``fn`` (select, tile, clone, move) applied to every per-element tensor."""
        return PeerSnapshot(tuple({name: _copy_state(st, fn) for name, st in hook.items()} for hook in self.states),
                            self.layout)


def peer_snapshot(hooks: PeerHooks) -> PeerSnapshot:
    """A copy of the state of the scheduled TaylorSeer hooks ``hooks`` (from :func:`scheduled_hooks`; factors
    cloned)."""
    return PeerSnapshot(tuple({name: _copy_state(st, torch.clone, same_layout=True)
                               for name, st in h.state_manager._state_cache.items()} for _, h in hooks), _layout(hooks))


def restore_peer(hooks: PeerHooks, snapshot: PeerSnapshot, *, step: int, contexts: Sequence[str]) -> None:
    """Put ``snapshot`` back into ``hooks`` (freshly installed by :func:`apply_taylorseer_schedule`), so the next
    call continues that run at ``step``. It must come from the same hooked modules, after step ``step - 1``, with
    a state for each of ``contexts`` (the sampler's ``cond``, and ``uncond`` under CFG)."""
    if _layout(hooks) != snapshot.layout:
        raise ConfigError(f"a TaylorSeer state of {len(snapshot.layout)} hooked modules cannot resume hooks on "
                          f"{len(hooks)} other or differently configured modules")
    for (name, _), states in zip(hooks, snapshot.states):
        if set(states) != set(contexts):
            raise ConfigError(f"a TaylorSeer state with contexts {sorted(states)} cannot resume a run with "
                              f"{sorted(contexts)} (another guidance setting)")
        for st in states.values():
            if st.current_step != step - 1:
                raise ConfigError(f"a TaylorSeer state of step {st.current_step + 1} cannot resume a run at "
                                  f"step {step} (module {name!r})")
    for (_, hook), states in zip(hooks, snapshot.states):
        # the snapshot stays reusable: diffusers replaces the factor dicts on update and never writes a tensor
        hook.state_manager._state_cache = {name: _copy_state(st, lambda t: t, same_layout=True)
                                           for name, st in states.items()}
