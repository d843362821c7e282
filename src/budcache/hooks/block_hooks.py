"""Hooks on the blocks of the stack: the head block decides, the others pass through, the tail stores.

On a step where every element computes, the head records the stack input
``(h, e)`` and the tail stores the stack residual ``R = stack(h, e) - (h, e)``
of both streams. On a skipped step the head returns ``(h + R_hat, e + R_hat_e)``
without running and every other block returns its input. When only some
elements compute (candidate masks run as one batch), the stack runs on that
subset and the tail scatters its output into the skipped elements' estimate.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from ..errors import ConfigError
from .blocks import ArgumentNames, BlockContract, block_contract
from .state import Cache, CacheState

__all__ = ["HeadBlockHook", "PassThroughBlockHook"]


def _slice(v: Any, idx: torch.Tensor, batch: int) -> Any:
    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch:
        return v.index_select(0, idx)
    return v


class _StackBlockHook(ModelHook):
    """What every block hook does: read and write the streams, run the block, store the residual at the tail."""

    _is_stateful = True

    def __init__(self, cache: Cache, index: int, is_tail: bool) -> None:
        super().__init__()
        self.cache = cache
        self.state_manager = cache.state_manager
        self.index = index  # position in the stack
        self.is_tail = is_tail
        self.contract: BlockContract | None = None
        self.args: ArgumentNames | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.contract = block_contract(module.__class__)
        self.args = ArgumentNames(module.forward)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module

    # -- streams ---------------------------------------------------------------------------------
    def _streams(self, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.contract
        h = kw[c.hidden_arg]
        e = kw.get(c.encoder_arg) if c.encoder_out is not None else None
        return h, e

    def _pack(self, h: torch.Tensor, e: torch.Tensor | None) -> Any:
        c = self.contract
        if c.encoder_out is None:
            return h
        out: list[Any] = [None, None]
        out[c.hidden_out] = h
        out[c.encoder_out] = e
        return tuple(out)

    def _unpack(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(output, tuple):
            c = self.contract
            h = output[c.hidden_out]
            e = output[c.encoder_out] if c.encoder_out is not None else None
            return h, e
        return output, None

    # -- computing ---------------------------------------------------------------------------------
    def _compute(self, st: CacheState, kw: dict[str, Any]) -> Any:
        """Run the block (or take a probe's output of it), then, at the tail, store the residual."""
        resume = st.decision.resume
        if resume is not None and self.state_manager.context.name != st.decision.resume_context:
            resume = None
        if resume is not None and self.index < resume.blocks:
            if self.index < resume.blocks - 1:  # already run by the probe: pass the stream on unchanged
                return self._pack(*self._streams(kw))
            output = resume.output
            if st.mode == "subset":
                output = tuple(_slice(v, st.idx, st.batch) for v in output) if isinstance(output, tuple) else \
                    _slice(output, st.idx, st.batch)
        else:
            output = self.fn_ref.original_forward(**kw)
        if self.is_tail:
            output = self._end(st, output)
        return output

    def _end(self, st: CacheState, output: Any) -> Any:
        """Store ``R = out - in`` of the computing elements; a subset's output is scattered into the estimate."""
        h_out, e_out = self._unpack(output)
        h_in, e_in = st.head_in
        if st.mode == "subset":
            h_in_s, e_in_s = h_in.index_select(0, st.idx), (e_in.index_select(0, st.idx) if e_in is not None else None)
        else:
            h_in_s, e_in_s = h_in, e_in
        joined = self.contract.joined and e_in_s is not None
        if joined:  # the stream is cat([e, h], dim=1): split it by the text length the first block saw
            if h_out.shape[1] != e_in_s.shape[1] + h_in_s.shape[1]:
                raise ConfigError(f"{type(self.cache.transformer).__name__}: the last block returns a joined stream "
                                  f"of {h_out.shape[1]} tokens but the first block took {e_in_s.shape[1]} text and "
                                  f"{h_in_s.shape[1]} image tokens (extra tokens, such as reference images, are "
                                  "not supported), so budcache has no stack residual for it")
            t = e_in_s.shape[1]
            e_out, h_out = h_out[:, :t], h_out[:, t:]
        if h_out.shape != h_in_s.shape:
            raise ConfigError(f"{type(self.cache.transformer).__name__}: the last block returns an image stream of "
                              f"shape {tuple(h_out.shape)} but the first block took {tuple(h_in_s.shape)} (the model "
                              "re-lays its streams between block lists), so budcache has no stack residual for it")
        r_img = (h_out - h_in_s).detach()
        r_txt = (e_out - e_in_s).detach() if (e_out is not None and e_in_s is not None) else None
        idx = st.idx
        depth = self.cache.depth
        step = st.decision.at if st.decision.at is not None else st.decision.step
        if st.mode == "subset":
            est_img, est_txt = self.cache.estimate(st)
            full_h = (h_in + est_img.to(h_in.dtype)).index_copy(0, st.idx, h_out)
            full_e = None
            if e_out is not None:
                base = e_in + est_txt.to(e_in.dtype) if est_txt is not None else e_in
                full_e = base.index_copy(0, st.idx, e_out)
            st.history = st.history.push(idx, r_img, r_txt, step, st.batch, depth)
            st.head_in = None
            if joined:
                return torch.cat([full_e, full_h], dim=1)
            return self._pack(full_h, full_e)
        st.history = st.history.push(idx, r_img, r_txt, step, st.batch, depth)
        st.head_in = None
        return output


class HeadBlockHook(_StackBlockHook):
    """The first block: decides the call's variant (all, skip, subset) and, on a skip, adds ``R_hat``."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.cache.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        st: CacheState = self.state_manager.get_state()
        kw = self.args.bind(args, kwargs)
        self._begin(st, kw)
        if st.mode == "skip":
            h, e = self._streams(kw)
            r_img, r_txt = self.cache.estimate(st)
            h = h + r_img.to(h.dtype)
            e = e + r_txt.to(e.dtype) if (e is not None and r_txt is not None) else e
            return self._pack(h, e)
        if st.mode == "subset":  # every per-element argument: the streams, the time embedding, masks
            kw = {k: _slice(v, st.idx, st.batch) for k, v in kw.items()}
        return self._compute(st, kw)

    def _begin(self, st: CacheState, kw: dict[str, Any]) -> None:
        d = st.decision
        if d is None:
            raise ConfigError("budcache: the transformer was called without a step decision")
        h, e = self._streams(kw)
        st.batch = h.shape[0]
        stats = self.cache.stats
        host = d.computes is not None
        if host:
            # a static policy: every element computes or none does, known on the host; the model hook counts
            # this call on the host once it is done (no Python counter changes inside a compiled graph)
            n = st.batch if d.computes else 0
            st.called = True
        else:
            if d.compute.shape[0] != st.batch:
                raise ConfigError(f"decision covers {d.compute.shape[0]} elements but the batch has {st.batch}")
            n = int(d.compute.sum())
            stats.calls += 1
        if n != st.batch and not st.history.img:
            raise ConfigError(f"budcache: step {d.step} skips elements that have no cached residual yet "
                              "(the first step of a generation must compute)")
        if st.history.img and st.history.img[0].shape != h.shape:
            raise ConfigError(f"budcache: cached residual has shape {tuple(st.history.img[0].shape)} but the "
                              f"stack input has {tuple(h.shape)}; a new batch size or resolution starts at step 0")
        if n == st.batch:
            st.mode, st.idx = "all", None
            st.head_in = (h, e)
        elif n == 0:
            st.mode, st.idx = "skip", None
            if not host:
                stats.skipped_calls += 1
            return
        else:
            st.mode = "subset"
            st.idx = torch.nonzero(d.compute, as_tuple=False).squeeze(1).to(h.device)
            st.head_in = (h, e)
        if not host:
            stats.stack_runs += 1
            stats.elements_computed += n


class PassThroughBlockHook(_StackBlockHook):
    """Every other block: returns its input on a skipped step, runs on the computing elements otherwise."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.cache.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        st: CacheState = self.state_manager.get_state()
        kw = self.args.bind(args, kwargs)
        if st.mode == "skip":
            return self._pack(*self._streams(kw))
        if st.mode == "subset":  # the streams arrive subset already; the other per-element arguments do not
            kw = {k: _slice(v, st.idx, st.batch) for k, v in kw.items()}
        return self._compute(st, kw)
