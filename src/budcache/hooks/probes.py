"""Signals of a model call read without running the whole block stack, and the cache context of a call.

:func:`probe_stack` reads a step's stack input, the first block's timestep
embedding and the output of the first ``m`` blocks: it calls the model with
any budcache cache bypassed and stops right after block ``m-1`` (TeaCache's
indicator, DiCache's probe).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from ..errors import ConfigError
from .apply import find_cache
from .blocks import ArgumentNames, block_contract, block_stack
from .config import Probe

__all__ = ["Probe", "model_context", "modulated_input", "probe_stack", "stack_size"]


class _ProbeDone(Exception):
    """Raised inside a hook to stop the model call once the probe has what it needs."""


def probe_stack(transformer: torch.nn.Module, call: Callable[[], Any], blocks: int) -> Probe:
    """Run ``call()`` (which calls ``transformer``) up to the end of block ``blocks - 1`` and stop.

    Any budcache cache on the transformer is bypassed, so the probe reads the
    plain model and leaves cached residuals untouched. ``blocks = 0`` stops at
    the stack input. Runs without autograd.
    """
    stack = block_stack(transformer)
    if not 0 <= blocks <= len(stack):
        raise ConfigError(f"probe depth {blocks} must lie in 0..{len(stack)} (blocks in the stack)")
    head = stack[0][1]
    contract_head = block_contract(head.__class__)
    head_args = ArgumentNames(type(head).forward)
    seen: dict[str, Any] = {}

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kw = head_args.bind(args, kwargs)
        seen["h_in"] = kw[contract_head.hidden_arg]
        seen["temb"] = kw.get("temb")
        if blocks == 0:
            raise _ProbeDone

    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        contract = block_contract(module.__class__)
        seen["h_out"] = output[contract.hidden_out] if isinstance(output, tuple) else output
        seen["output"] = output
        raise _ProbeDone

    handles = [head.register_forward_pre_hook(pre, with_kwargs=True)]
    if blocks > 0:
        handles.append(stack[blocks - 1][1].register_forward_hook(post, with_kwargs=True))
    cache = find_cache(transformer)
    guard = cache.bypassed() if cache is not None else contextlib.nullcontext()
    try:
        with guard, torch.no_grad():
            call()
    except _ProbeDone:
        pass
    finally:
        for h in handles:
            h.remove()
    if "h_in" not in seen or (blocks > 0 and "h_out" not in seen):
        raise ConfigError(f"{type(transformer).__name__}: the probe call never reached block {max(blocks - 1, 0)}")
    return Probe(seen["h_in"], seen["temb"], seen.get("h_out"), blocks, len(stack), seen.get("output"))


def modulated_input(transformer: torch.nn.Module, probe: Probe) -> torch.Tensor:
    """The first block's AdaLN-modulated image input ``LN(h) (1 + scale_msa) + shift_msa`` (B, T, D)."""
    head = block_stack(transformer)[0][1]
    norm = getattr(head, "norm1", None)
    if norm is None or probe.temb is None:
        raise ConfigError(f"{type(head).__name__} has no AdaLN 'norm1' fed by a timestep embedding; "
                          "TeaCache's indicator needs one")
    with torch.no_grad():
        out = norm(probe.h_in, emb=probe.temb)
    return out[0] if isinstance(out, tuple) else out


def stack_size(transformer: torch.nn.Module) -> int:
    """Number of blocks in the transformer's stack (for counting partial work)."""
    return len(block_stack(transformer))


@contextlib.contextmanager
def model_context(transformer: torch.nn.Module, name: str) -> Iterator[None]:
    """``transformer.cache_context(name)``, also for models without diffusers' CacheMixin (e.g. SD3).

    Every cache keeps separate state per context (CFG's two passes); a model
    class that lacks the mixin still carries a hook registry, so the context is
    set on it the same way the mixin does.
    """
    if hasattr(transformer, "cache_context"):
        with transformer.cache_context(name):
            yield
        return
    _set_cache_context(transformer, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)
