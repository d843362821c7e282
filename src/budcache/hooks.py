"""Residual-cache hooks on a diffusers transformer's block stack.

This is the one module that touches diffusers internals (its hook registry,
state manager and block registry). The hooks are per instance and removable,
in the style of ``diffusers.hooks.first_block_cache``:

- a *model* hook on the transformer itself resolves, for every call, which
  batch elements compute this step (a :class:`Decision` handed over by the
  sampler, or a resolver that reads the call's timestep);
- the *head* block hook records the stack input ``(h, e)`` (image and text
  streams) and, on a skipped step, returns ``(h + R_hat, e + R_hat_e)``;
- the other blocks pass through on a skipped step;
- the *tail* block hook stores the stack residual ``R = out - in`` of a
  computed step, per element, in the per-``cache_context`` state.

When only some elements of a batch compute (several candidate masks run as one
batch), the stack runs on that subset alone and the tail scatters the results
back. ``R_hat`` comes from the mechanism: ``reuse`` (``R_hat = R_j``, the last
computed step ``j``) or ``forecast`` (Newton/Taylor extrapolation of the
residual in the step index from the last 2 or 3 computed steps, defined in
:mod:`budcache.estimators`), unless the step's :class:`Decision` carries its
own ``estimator`` (the sampler's per-step estimators, DiCache's trajectory
alignment).

:func:`probe_stack` reads signals of a step without running the whole stack
(the stack input, the first block's timestep embedding, the output of the
first ``m`` blocks): it calls the model with any budcache cache bypassed and
stops right after block ``m-1`` (TeaCache's indicator, DiCache's probe).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .errors import ConfigError
from .estimators import History

_MODEL_HOOK = "budcache_model"
_HEAD_HOOK = "budcache_head"
_BLOCK_HOOK = "budcache_block"
_DEFAULT_CONTEXT = "default"

#: Residual mechanisms the hooks implement, with their extrapolation order.
MECHANISMS: dict[str, int] = {"reuse": 0, "forecast1": 1, "forecast2": 2}


#: ``estimator(history, step) -> (R_hat_img, R_hat_txt)``: a step's own residual estimate for skipped elements.
Estimator = Callable[["ResidualHistory", int], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class Decision:
    """Which elements compute at ``step``: ``compute`` is a bool tensor (B,).

    ``estimator`` (optional) replaces the mechanism's ``R_hat`` for the
    skipped elements of this step. ``resume`` (optional) is a :class:`Probe`
    of this step's call in context ``resume_context``: there, the computing
    elements take its output of the first ``probe.blocks`` blocks instead of
    running them again (other contexts run every block).
    """

    step: int
    compute: torch.Tensor
    estimator: Estimator | None = None
    resume: Probe | None = None
    resume_context: str = "cond"
    #: Host-side facts of a static policy, so no hook reads ``compute`` back: ``True`` every element computes,
    #: ``False`` none does (``compute`` then need not match the batch). ``None``: read ``compute``.
    computes: bool | None = None
    #: ``step`` as a 0-d tensor on the model's device: compiled hooks use it in tensor math instead of the int,
    #: so no graph is specialised on the step.
    at: torch.Tensor | None = None
    #: Every element skipped with a velocity estimator: forecast the model's whole output from the outputs
    #: stored at computed steps; the model does not run (pipelines; budcache's sampler forecasts velocities itself).
    velocity: Callable[[History, Any], torch.Tensor] | None = None


#: The per-element residual history of a cache context (see :class:`budcache.estimators.History`).
ResidualHistory = History


class _State(BaseState):
    """Per-``cache_context`` state shared by the hooks of one transformer."""

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


class _Arguments:
    """Maps a block's positional and keyword arguments to names, once per class."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.names = [p for p in inspect.signature(fn).parameters if p != "self"]

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        out = dict(zip(self.names, args))
        out.update(kwargs)
        return out


def _slice(v: Any, idx: torch.Tensor, batch: int) -> Any:
    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch:
        return v.index_select(0, idx)
    return v


class _BlockHook(ModelHook):
    """Hook of every block of the stack (head and tail included)."""

    _is_stateful = True

    def __init__(self, cache: CacheHandle, role: str, index: int = 0) -> None:
        super().__init__()
        self.cache = cache
        self.state_manager = cache.state_manager
        self.role = role  # "head" | "middle" | "tail" | "only"
        self.index = index  # position in the stack
        self.meta = None
        self.args: _Arguments | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.meta = TransformerBlockRegistry.get(module.__class__)
        self.args = _Arguments(module.forward)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module

    # -- helpers -----------------------------------------------------------------------
    def _streams(self, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = kw[self.meta.hidden_states_argument_name]
        has_txt = self.meta.return_encoder_hidden_states_index is not None
        e = kw.get(self.meta.encoder_hidden_states_argument_name) if has_txt else None
        return h, e

    def _pack(self, h: torch.Tensor, e: torch.Tensor | None) -> Any:
        if self.meta.return_encoder_hidden_states_index is None:
            return h
        out: list[Any] = [None, None]
        out[self.meta.return_hidden_states_index] = h
        out[self.meta.return_encoder_hidden_states_index] = e
        return tuple(out)

    def _unpack(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(output, tuple):
            h = output[self.meta.return_hidden_states_index]
            i_txt = self.meta.return_encoder_hidden_states_index
            e = output[i_txt] if i_txt is not None else None
            return h, e
        return output, None

    # -- forward -----------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.cache.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        st: _State = self.state_manager.get_state()
        kw = self.args.bind(args, kwargs)
        if self.role in ("head", "only"):
            self._begin(st, kw)
        if st.mode == "skip":
            h, e = self._streams(kw)
            if self.role in ("head", "only"):
                r_img, r_txt = self.cache._estimate(st)
                h = h + r_img.to(h.dtype)
                e = e + r_txt.to(e.dtype) if (e is not None and r_txt is not None) else e
            return self._pack(h, e)
        if st.mode == "subset" and self.role in ("head", "only"):
            names = (self.meta.hidden_states_argument_name, self.meta.encoder_hidden_states_argument_name, "temb")
            kw = {k: (_slice(v, st.idx, st.batch) if k in names else v) for k, v in kw.items()}
        elif st.mode == "subset":
            kw = {k: (_slice(v, st.idx, st.batch) if k == "temb" else v) for k, v in kw.items()}
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
        if self.role in ("tail", "only"):
            output = self._end(st, output)
        return output

    def _begin(self, st: _State, kw: dict[str, Any]) -> None:
        d = st.decision
        if d is None:
            raise ConfigError("budcache: the transformer was called without a step decision")
        h, e = self._streams(kw)
        st.batch = h.shape[0]
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
            self.cache.stats.calls += 1
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
                self.cache.stats.skipped_calls += 1
            return
        else:
            st.mode = "subset"
            st.idx = torch.nonzero(d.compute, as_tuple=False).squeeze(1).to(h.device)
            st.head_in = (h, e)
        if not host:
            self.cache.stats.stack_runs += 1
            self.cache.stats.elements_computed += n

    def _end(self, st: _State, output: Any) -> Any:
        h_out, e_out = self._unpack(output)
        h_in, e_in = st.head_in
        if st.mode == "subset":
            h_in_s, e_in_s = h_in.index_select(0, st.idx), (e_in.index_select(0, st.idx) if e_in is not None else None)
        else:
            h_in_s, e_in_s = h_in, e_in
        r_img = (h_out - h_in_s).detach()
        r_txt = (e_out - e_in_s).detach() if (e_out is not None and e_in_s is not None) else None
        idx = st.idx
        depth = self.cache.depth
        step = st.decision.at if st.decision.at is not None else st.decision.step
        if st.mode == "subset":
            est_img, est_txt = self.cache._estimate(st)
            full_h = (h_in + est_img.to(h_in.dtype)).index_copy(0, st.idx, h_out)
            full_e = None
            if e_out is not None:
                base = e_in + est_txt.to(e_in.dtype) if est_txt is not None else e_in
                full_e = base.index_copy(0, st.idx, e_out)
            st.history = st.history.push(idx, r_img, r_txt, step, st.batch, depth)
            st.head_in = None
            return self._pack(full_h, full_e)
        st.history = st.history.push(idx, r_img, r_txt, step, st.batch, depth)
        st.head_in = None
        return output


class _ContextWatch(StateManager):
    """Sees each ``cache_context`` enter and exit, on the host and outside any compiled region.

    diffusers' ``cache_context`` sets the context on every ``StateManager`` a
    stateful hook holds; the model hook holds this one, so a host resolver
    decides the step before the (possibly compiled) transformer call begins.
    """

    def __init__(self, hook: _ModelHook) -> None:
        super().__init__(_State)
        self._hook = hook

    def set_context(self, context: CacheContext | None) -> None:
        super().set_context(context)
        self._hook._context_changed(context)


class _ModelHook(ModelHook):
    """Hook of the transformer: sets the context and resolves the step decision.

    A resolver with ``host_decision(context) -> Decision`` (a static policy)
    decides on the host when a ``cache_context`` is entered: the forward then
    reads only the step's variant (compute or skip), never the step number, a
    counter or a device tensor, so a compiled transformer keeps one graph per
    variant. Other resolvers run inside the forward.
    """

    _is_stateful = True

    def __init__(self, cache: CacheHandle) -> None:
        super().__init__()
        self.cache = cache
        self.state_manager = cache.state_manager
        self.host = callable(getattr(cache.resolver, "host_decision", None))
        self._open: _State | None = None  # the state whose host decision awaits its call's end
        self.watch = _ContextWatch(self) if self.host else None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module

    # -- host side (outside any compiled region) ------------------------------------------------
    def _state_of(self, name: str) -> _State:
        cache = self.state_manager._state_cache
        if name not in cache:
            cache[name] = _State()
        return cache[name]

    def _context_changed(self, context: CacheContext | None) -> None:
        self._finish()
        if context is not None and not self.cache.bypass:
            self._resolve(self._state_of(context.name), context)

    def _resolve(self, st: _State, context: CacheContext) -> None:
        d = self.cache.resolver.host_decision(context)
        if d.step != 0 and d.step == st.last_step:
            raise ConfigError(
                f"{type(self.cache.transformer).__name__} was called twice at step {d.step} in one cache context; "
                "wrap each pass (e.g. CFG's conditional and unconditional) in transformer.cache_context(name)")
        if d.step == 0 or d.step != st.last_step + 1:
            st.reset()  # a generation is a run of consecutive steps; anything else starts clean
        if d.at is None:
            d = replace(d, at=self.cache._step_tensor(d.step))
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
            self.state_manager.set_context(CacheContext(_DEFAULT_CONTEXT))
        try:
            st: _State = self.state_manager.get_state()
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
            decision = self.cache._take_decision(module, st, args, kwargs)
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

    def _run(self, st: _State, args: tuple, kwargs: dict) -> Any:
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
            out = d.velocity(st.outputs, step)
            return (out,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=out)
        result = self.fn_ref.original_forward(*args, **kwargs)
        if self.cache.output_depth and (d.computes if d.computes is not None else bool(d.compute.all())):
            sample = result[0] if isinstance(result, tuple) else result.sample
            st.outputs = st.outputs.push(None, sample.detach(), None, step, sample.shape[0], self.cache.output_depth)
        return result


class CacheHandle:
    """A residual cache installed on one transformer; :meth:`remove` takes it off.

    Decisions come from :meth:`set_decision` (the sampler, before each call) or
    from ``resolver(module, args, kwargs, state) -> Decision`` (pipelines: the step
    comes from the call's timestep, and a generation must run consecutive steps).
    ``depth`` keeps at least that many computed residuals per element (the
    mechanism needs ``order + 1``; an estimator may need more).
    """

    def __init__(self, transformer: torch.nn.Module, mechanism: str = "reuse",
                 resolver: Callable[..., Decision] | None = None, depth: int | None = None,
                 output_depth: int = 0) -> None:
        if mechanism not in MECHANISMS:
            raise ConfigError(f"mechanism {mechanism!r} is not a residual mechanism; choose one of {list(MECHANISMS)}")
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise ConfigError(f"residual depth must be an integer >= 1 (got {depth!r})")
        self.transformer = transformer
        self.mechanism = mechanism
        self.order = MECHANISMS[mechanism]
        self.depth = max(self.order + 1, depth or 1)
        self.output_depth = int(output_depth)  # model outputs kept per context (0: none)
        self.bypass = False
        self.resolver = resolver
        self.state_manager = StateManager(_State)
        self.stats = CacheStats()
        self._pending: Decision | None = None
        self._steps: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._blocks = _block_stack(transformer)
        self._installed = False

    # -- installation ------------------------------------------------------------------
    def install(self) -> CacheHandle:
        """Register the hooks on the transformer instance."""
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        if registry.get_hook(_MODEL_HOOK) is not None:
            raise ConfigError(f"{type(self.transformer).__name__} already has a budcache cache; remove it first")
        registry.register_hook(_ModelHook(self), _MODEL_HOOK)
        n = len(self._blocks)
        for i, (_, block) in enumerate(self._blocks):
            role = "only" if n == 1 else "head" if i == 0 else "tail" if i == n - 1 else "middle"
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self, role, i), _BLOCK_HOOK)
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
        self.state_manager.reset()

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached residual (all contexts)."""
        self.state_manager.reset()
        self._pending = None

    def set_decision(self, step: int, compute: torch.Tensor, estimator: Estimator | None = None,
                     resume: Probe | None = None) -> None:
        """Decision for the next call(s) of the transformer (kept until replaced)."""
        self._pending = Decision(step, compute, estimator, resume)

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Calls inside run the plain model: no decision, no cache read or written."""
        before, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = before

    def _estimate(self, st: _State) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = st.decision
        if d.estimator is not None:
            if not st.history.img:
                raise ConfigError("no computed step is cached yet: the first step of a generation must compute")
            return d.estimator(st.history, d.at if d.at is not None else d.step)
        return st.history.estimate(d.at if d.at is not None else d.step, self.order)

    def _step_tensor(self, step: int) -> torch.Tensor:
        """``step`` as a 0-d tensor on the transformer's device, made once per step and device, then reused."""
        p = next(self.transformer.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        t = self._steps.get((step, dev))
        if t is None:
            t = self._steps[(step, dev)] = torch.full((), float(step), dtype=torch.get_default_dtype(), device=dev)
        return t

    def snapshot(self) -> dict[str, ResidualHistory]:
        """The residual history of every context (immutable values; cheap)."""
        return {name: st.history for name, st in self.state_manager._state_cache.items()}

    def restore(self, snap: dict[str, ResidualHistory] | None) -> None:
        """Replace the cached residuals by a :meth:`snapshot` (``None``: empty)."""
        self.state_manager._state_cache.clear()
        for name, hist in (snap or {}).items():
            st = _State()
            st.history = hist
            self.state_manager._state_cache[name] = st

    def _take_decision(self, module: torch.nn.Module, st: _State, args: tuple, kwargs: dict) -> Decision:
        if self.resolver is not None:
            return self.resolver(module, args, kwargs, st)
        if self._pending is None:
            raise ConfigError("budcache: call set_decision(step, compute) before calling the transformer")
        return self._pending


def _block_stack(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The transformer's blocks in call order, each known to diffusers' block registry."""
    blocks: list[tuple[str, torch.nn.Module]] = []
    for name, sub in transformer.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(sub, torch.nn.ModuleList):
            blocks += [(f"{name}.{i}", b) for i, b in enumerate(sub)]
    if not blocks:
        raise ConfigError(
            f"{type(transformer).__name__} has no block stack that budcache recognises "
            f"(expected a ModuleList named one of {sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)})")
    for name, b in blocks:
        try:
            TransformerBlockRegistry.get(b.__class__)
        except ValueError:
            raise ConfigError(
                f"{type(transformer).__name__}: block {name} ({type(b).__name__}) is not in diffusers' "
                "transformer block registry, so budcache cannot cache it") from None
    return blocks


def apply_cache(transformer: torch.nn.Module, mechanism: str = "reuse",
                resolver: Callable[..., Decision] | None = None, depth: int | None = None,
                output_depth: int = 0) -> CacheHandle:
    """Install a residual cache on ``transformer`` (per instance, removable); ``output_depth`` > 0 also
    keeps that many model outputs per context for velocity forecasts."""
    return CacheHandle(transformer, mechanism, resolver, depth, output_depth).install()


def find_cache(transformer: torch.nn.Module) -> CacheHandle | None:
    """The budcache cache installed on ``transformer``, if any."""
    reg = getattr(transformer, "_diffusers_hook", None)
    hook = reg.get_hook(_MODEL_HOOK) if reg is not None else None
    return hook.cache if hook is not None else None


# ------------------------------------------------------------------------------ probes
@dataclass(frozen=True)
class Probe:
    """Signals of one model call, read without running the whole block stack.

    ``h_in`` (B, T, D): image stream entering the stack; ``temb`` (B, D): the
    timestep/text embedding the blocks get; ``h_out`` (B, T, D): image stream
    after the first ``blocks`` blocks (``None`` when ``blocks`` is 0);
    ``output``: that block's whole output (every stream), so a computed step
    can resume from it.
    """

    h_in: torch.Tensor
    temb: torch.Tensor | None
    h_out: torch.Tensor | None
    blocks: int
    stack_size: int
    output: Any = None


class _ProbeDone(Exception):
    """Raised inside a hook to stop the model call once the probe has what it needs."""


def probe_stack(transformer: torch.nn.Module, call: Callable[[], Any], blocks: int) -> Probe:
    """Run ``call()`` (which calls ``transformer``) up to the end of block ``blocks - 1`` and stop.

    Any budcache cache on the transformer is bypassed, so the probe reads the
    plain model and leaves cached residuals untouched. ``blocks = 0`` stops at
    the stack input. Runs without autograd.
    """
    stack = _block_stack(transformer)
    if not 0 <= blocks <= len(stack):
        raise ConfigError(f"probe depth {blocks} must lie in 0..{len(stack)} (blocks in the stack)")
    head = stack[0][1]
    meta_head = TransformerBlockRegistry.get(head.__class__)
    head_args = _Arguments(type(head).forward)
    seen: dict[str, Any] = {}

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kw = head_args.bind(args, kwargs)
        seen["h_in"] = kw[meta_head.hidden_states_argument_name]
        seen["temb"] = kw.get("temb")
        if blocks == 0:
            raise _ProbeDone

    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        meta = TransformerBlockRegistry.get(module.__class__)
        seen["h_out"] = output[meta.return_hidden_states_index] if isinstance(output, tuple) else output
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
    head = _block_stack(transformer)[0][1]
    norm = getattr(head, "norm1", None)
    if norm is None or probe.temb is None:
        raise ConfigError(f"{type(head).__name__} has no AdaLN 'norm1' fed by a timestep embedding; "
                          "TeaCache's indicator needs one")
    with torch.no_grad():
        out = norm(probe.h_in, emb=probe.temb)
    return out[0] if isinstance(out, tuple) else out


def stack_size(transformer: torch.nn.Module) -> int:
    """Number of blocks in the transformer's stack (for counting partial work)."""
    return len(_block_stack(transformer))


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
    from diffusers.hooks.hooks import _set_cache_context

    _set_cache_context(transformer, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)
