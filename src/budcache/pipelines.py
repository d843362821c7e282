"""Apply a cache policy to a diffusers pipeline or transformer.

(``budcache.diffusers`` re-exports this module's public names, so ``bd`` below may be either.)

>>> import budcache.pipelines as bd
>>> handle = bd.apply(pipe, policy)          # or bd.apply(pipe, "uniform", nfe=10, steps=28)
>>> images = pipe(..., num_inference_steps=policy.steps).images
>>> bd.remove(pipe)

The step of each transformer call comes from host-side state: the pipeline's
``cache_context(..., step_index=i)`` when it passes one, else the scheduler's
own ``step_index`` (``None`` before its first ``step``: the generation's start),
read when the pipeline enters ``transformer.cache_context(name)``, before the
call and outside any compiled region. No device tensor is read back during a
generation and the hooked forward never branches on the step number, so
``torch.compile(pipe.transformer, fullgraph=True)`` keeps one graph per
variant (compute, skip). The schedule is still checked on the host: a policy
whose step count differs from the scheduler's, an img2img ``strength`` (a
scheduler that begins past step 0) and, at step 0, a learned schedule the
scheduler does not run are errors. State is kept per ``cache_context``
(separate caches for CFG's passes) and starts clean at step 0.

``step_from="timestep"`` keeps the former resolver for loops that call the
transformer without stepping the scheduler: it matches each call's timestep
against the scheduler's timesteps, which reads a device tensor back per call
(a host sync, and a graph break under ``torch.compile``).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch

from . import estimators as est
from .errors import ConfigError, PolicyError
from .hooks import MECHANISMS, CacheHandle, Decision, apply_cache, find_cache
from .peers import PEER_MECHANISMS, apply_taylorseer_schedule
from .policy import CachePolicy


class _Estimators:
    """The estimator of every step of a policy on a pipeline, as the fields a :class:`Decision` carries.

    Version-1 mechanisms run in the hooks exactly as before (no per-step
    field); other estimators get a per-step residual ``estimator`` or a
    ``velocity`` forecast (the transformer call is then skipped). Forecasts in
    sigma use a host copy of the scheduler's sigmas, taken once per
    generation at step 0 (flow-matching schedulers keep them on the CPU).
    """

    def __init__(self, policy: CachePolicy, scheduler: Any, mechanism: str) -> None:
        self.scheduler = scheduler
        names = [None if m else (policy.estimators[policy.skipped.index(k)] if policy.estimators is not None
                                 else mechanism) for k, m in enumerate(policy.mask)]
        self.specs = [None if n is None else est.get(n) for n in names]
        self.legacy = policy.estimators is None and mechanism in MECHANISMS
        self.sigmas: torch.Tensor | None = None

    def fields(self, k: int, n: int) -> dict[str, Any]:
        spec = self.specs[k]
        if spec is None or self.legacy:
            return {}
        if k == 0 or self.sigmas is None:
            sig = getattr(self.scheduler, "sigmas", None)
            if sig is None or len(sig) < n + 1:
                raise ConfigError("the pipeline's scheduler exposes no N+1 sigmas; budcache's forecasts in sigma "
                                  "need them (use a flow-matching scheduler)")
            self.sigmas = torch.as_tensor(sig).detach().to("cpu", torch.float64)[:n + 1]
        sigmas = self.sigmas if spec.time == "sigma" else None
        order = spec.order
        if spec.target == "velocity":
            def velocity(hist: Any, step: Any) -> torch.Tensor:
                s = None if sigmas is None else sigmas.to(hist.img[0].device)
                return est.newton(hist.img, hist.steps, step, order, s)
            return {"velocity": velocity}

        def residual(hist: Any, step: Any) -> Any:
            return hist.estimate(step, order, None if sigmas is None else sigmas.to(hist.img[0].device))
        return {"estimator": residual}

    @property
    def depths(self) -> tuple[int, int]:
        """(residual depth, output depth) the hooks must keep."""
        specs = [s for s in self.specs if s is not None]
        return (max([s.depth for s in specs if s.target == "residual"], default=1),
                max([s.depth for s in specs if s.target == "velocity"], default=0))


def check_step_count(policy: CachePolicy, scheduler: Any) -> Any:
    """The scheduler's timesteps, once they agree with the policy: set, starting at step 0 (no img2img
    ``strength``), and exactly ``policy.steps`` of them; otherwise an error naming the fix."""
    ts = getattr(scheduler, "timesteps", None)
    if ts is None:
        raise ConfigError("the pipeline's scheduler has no timesteps yet (set_timesteps was not called)")
    n = len(ts)
    begin = getattr(scheduler, "begin_index", None)
    if begin not in (None, 0):
        raise PolicyError(f"policy field 'steps': the pipeline starts at step {begin} of {n} (img2img "
                          f"'strength'), so it runs {n - begin} steps, not the policy's {policy.steps}; "
                          f"search a policy for {n - begin} steps with that strength")
    if n != policy.steps:
        raise PolicyError(f"policy field 'steps': the policy is for {policy.steps} steps but the pipeline "
                          f"runs {n} (num_inference_steps, strength or custom sigmas); search a policy for "
                          f"{n} steps")
    return ts


class _TimestepResolver:
    """Maps a call's timestep to the policy's step via the scheduler's timesteps."""

    def __init__(self, policy: CachePolicy, scheduler: Any, timestep_scale: float = 1000.0,
                 mechanism: str = "reuse") -> None:
        self.policy = policy
        self.scheduler = scheduler
        self.scale = timestep_scale
        self.mask = policy.mask_tensor()
        self.estimators = _Estimators(policy, scheduler, mechanism)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, state: Any) -> Decision:
        t = kwargs.get("timestep")
        if t is None:
            raise ConfigError(f"{type(module).__name__} was called without a 'timestep' keyword; budcache cannot "
                              "tell which step this is")
        sched = check_step_count(self.policy, self.scheduler)
        n = len(sched)
        t0 = t.flatten()[0].to(torch.float64) if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)
        ts = sched.to(torch.float64).to(t0.device)
        # FLUX-style models take t/1000; SD3/Wan take t itself: match whichever fits.
        cand = torch.stack([(ts - t0 * self.scale).abs(), (ts - t0).abs()])
        err, which = cand.min(dim=1)
        row = int(err.argmin())
        k = int(which[row])
        tol = 1e-3 * max(1.0, float(ts.abs().max()))
        if float(err[row]) > tol:
            raise ConfigError(f"timestep {float(t0):.6g} is not on the scheduler's schedule; budcache cannot "
                              "match it to a step")
        if k == 0 and self.policy.sigmas is not None:
            want = torch.tensor(self.policy.sigmas[:-1], dtype=torch.float64)
            have = getattr(self.scheduler, "sigmas", torch.zeros(0)).to(torch.float64).cpu()[:n]
            if have.shape != want.shape or not torch.allclose(have, want, atol=1e-4):
                raise PolicyError("policy field 'sigmas': the policy carries a learned schedule but the pipeline's "
                                  "scheduler runs another one; configure the scheduler so its sigmas equal the "
                                  "policy's (custom sigmas with any resolution shift disabled)")
        b = kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else 1
        return Decision(k, self.mask[k].expand(b).clone(), **self.estimators.fields(k, n))


class _SchedulerSteps:
    """The step of each call from the scheduler's host state (``step_index``, ``begin_index``, ``len(timesteps)``).

    ``host_decision`` runs when a ``cache_context`` is entered (or at the call,
    for pipelines without one) and reads no device tensor: a schedule's length
    is its shape, the indices are Python ints, and the learned-sigmas check at
    step 0 reads the scheduler's ``sigmas``, which diffusers' flow-matching
    schedulers keep on the CPU.
    """

    def __init__(self, policy: CachePolicy, scheduler: Any, mechanism: str = "reuse") -> None:
        self.policy = policy
        self.scheduler = scheduler
        self.mask = tuple(bool(c) for c in policy.mask_tensor().tolist())
        self.estimators = _Estimators(policy, scheduler, mechanism)
        self._flags = {True: torch.ones(1, dtype=torch.bool), False: torch.zeros(1, dtype=torch.bool)}

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, state: Any) -> Decision:
        raise AssertionError("host resolver: the hooks call host_decision")  # pragma: no cover

    def host_decision(self, context: Any) -> Decision:
        sched = self.scheduler
        ts = check_step_count(self.policy, sched)
        n = len(ts)
        k = getattr(context, "step_index", None)
        if k is None:
            if not hasattr(sched, "step_index"):
                raise ConfigError(f"{type(sched).__name__} keeps no step_index, so budcache cannot tell the step "
                                  "on the host; apply with step_from='timestep'")
            k = sched.step_index
            if k is None:  # before the scheduler's first step() of this generation (begin_index is 0 here)
                k = 0
        k = int(k)
        if not 0 <= k < n:
            raise ConfigError(f"the scheduler is at step {k} of {n}: budcache takes each call's step from the "
                              "scheduler's step_index, so call the transformer from the denoising loop (or apply "
                              "with step_from='timestep')")
        if k == 0 and self.policy.sigmas is not None:
            self._check_sigmas(n)
        c = self.mask[k]
        return Decision(k, self._flags[c], computes=c, **self.estimators.fields(k, n))

    def _check_sigmas(self, n: int) -> None:
        want = torch.tensor(self.policy.sigmas[:-1], dtype=torch.float64)
        have = getattr(self.scheduler, "sigmas", None)
        # once per generation, at step 0; diffusers' flow-matching schedulers keep sigmas on the CPU
        have = torch.zeros(0) if have is None else have.detach().to("cpu", torch.float64)[:n]
        if have.shape != want.shape or not torch.allclose(have, want, atol=1e-4):
            raise PolicyError("policy field 'sigmas': the policy carries a learned schedule but the pipeline's "
                              "scheduler runs another one; configure the scheduler so its sigmas equal the "
                              "policy's (custom sigmas with any resolution shift disabled)")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself under a ``torch.compile`` wrapper: hooks go on it, and the compiled wrapper traces them."""
    return getattr(module, "_orig_mod", module)


def _transformer_and_scheduler(target: Any) -> tuple[torch.nn.Module, Any]:
    tr = getattr(target, "transformer", None)
    if isinstance(tr, torch.nn.Module):
        tr = _unwrap(tr)
        sched = getattr(target, "scheduler", None)
        if sched is None:
            raise ConfigError(f"{type(target).__name__} has no scheduler")
        return tr, sched
    raise ConfigError(f"expected a diffusers pipeline with a .transformer; got {type(target).__name__} "
                      "(for a bare transformer, pass scheduler=...)")


def apply(target: Any, policy: CachePolicy | str | os.PathLike, *, nfe: int | None = None, steps: int | None = None,
          mechanism: str | None = None, scheduler: Any = None, step_from: str = "scheduler",
          check_finite: bool = False) -> CacheHandle:
    """Install ``policy`` on a pipeline's transformer (or a transformer with ``scheduler=``).

    ``policy`` is a :class:`CachePolicy`, a path to a policy JSON file, or
    ``"uniform"`` with ``nfe`` and ``steps`` (a budget without a search).
    A policy runs with the estimators it names (version 2) or was searched
    with (``meta["mechanism"]``); ``mechanism`` applies only to a policy that
    names none (default ``"reuse"``). Velocity estimators skip the whole
    transformer call and forecast its output; a ``taylorseer`` policy installs
    diffusers' TaylorSeer with the policy's mask as its schedule. A policy with learned sigmas must run with
    those sigmas (the scheduler's sigmas must equal them; mind pipelines that
    shift custom sigmas by resolution): another schedule is an error at step 0.

    ``step_from``: ``"scheduler"`` (default) takes each call's step from the
    scheduler's host state, with no device read and no graph break;
    ``"timestep"`` matches the call's timestep against the scheduler's
    timesteps (a device read per call), for loops that never step the scheduler.

    ``check_finite=True`` checks every call's output (computed or forecast) for NaN and Inf and raises
    :class:`~budcache.errors.ModelOutputError` naming the step, at the cost of one device read per call.
    """
    if step_from not in ("scheduler", "timestep"):
        raise ConfigError(f"step_from must be 'scheduler' or 'timestep' (got {step_from!r})")
    if not isinstance(policy, (CachePolicy, str, os.PathLike)):
        raise ConfigError(f"policy must be a CachePolicy, a path to a policy JSON file or 'uniform'; got "
                          f"{type(policy).__name__}")
    if isinstance(policy, (str, os.PathLike)):
        if policy == "uniform":
            if nfe is None or steps is None:
                raise ConfigError("policy 'uniform' needs nfe=K and steps=N")
            policy = CachePolicy.uniform(steps, nfe, estimator=mechanism)
        else:
            policy = CachePolicy.load(policy)
    if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler"):
        if scheduler is None:
            raise ConfigError("a bare transformer needs scheduler=... to map timesteps to steps")
        tr = _unwrap(target)
    else:
        tr, sched = _transformer_and_scheduler(target)
        scheduler = scheduler or sched
    if find_cache(tr) is not None or getattr(tr, "_budcache_peer", None) is not None:
        raise ConfigError("a budcache cache is already applied; call budcache.diffusers.remove first")
    stated = policy.estimator
    if stated is not None and stated != "mixed":
        mechanism = stated
    mechanism = mechanism or "reuse"
    if mechanism in PEER_MECHANISMS:
        if check_finite:
            raise ConfigError(f"check_finite is not available for {mechanism!r} policies (the peer's own hooks run)")
        handle = PeerHandle(tr, apply_taylorseer_schedule(tr, policy.mask))
        tr._budcache_peer = handle
        return handle  # type: ignore[return-value]
    est.get(mechanism)
    resolver = _SchedulerSteps(policy, scheduler, mechanism) if step_from == "scheduler" else \
        _TimestepResolver(policy, scheduler, mechanism=mechanism)
    res_depth, out_depth = resolver.estimators.depths
    legacy = mechanism if mechanism in MECHANISMS and policy.estimators is None else "reuse"
    return apply_cache(tr, legacy, resolver=resolver, depth=res_depth, output_depth=out_depth,
                       check_finite=check_finite)


_COMPILED: weakref.WeakSet = weakref.WeakSet()  # transformers compiled by :func:`compile`
_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes whose inductor captures CUDA graphs


def compile(target: Any, *, backend: str = "inductor", mode: str | None = None, fullgraph: bool = True,
            own_memory: bool | None = None, **kwargs: Any) -> torch.nn.Module:
    """``torch.compile`` a pipeline's transformer with its budcache policy applied; returns the compiled module.

    The same as ``pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, ...)``,
    plus one thing CUDA graphs need: their outputs are overwritten by the next
    replay, so after each call, outside the compiled region, the cache copies
    the residuals it keeps into memory of its own (one copy of the stack
    residual per computed step; nothing on a skipped step).

    Args:
        target: a diffusers pipeline (its ``.transformer`` is replaced) or a bare transformer, with
            :func:`apply` already called on it.
        backend: ``torch.compile`` backend.
        mode: ``torch.compile`` mode; ``"reduce-overhead"`` and ``"max-autotune"`` capture CUDA graphs.
        fullgraph: refuse graph breaks (a static policy has none).
        own_memory: copy the kept residuals out after each call (``None``: when ``mode`` captures CUDA graphs
            or ``options["triton.cudagraphs"]`` is set).
        kwargs: passed on to ``torch.compile`` (``dynamic``, ``options``).
    """
    pipeline = not (isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler"))
    tr = _transformer_and_scheduler(target)[0] if pipeline else _unwrap(target)
    handle = find_cache(tr)
    if handle is None and getattr(tr, "_budcache_peer", None) is None:
        raise ConfigError("no budcache policy is applied to this transformer; call budcache.diffusers.apply first")
    if own_memory is None:
        own_memory = mode in _GRAPH_MODES or bool((kwargs.get("options") or {}).get("triton.cudagraphs"))
    compiled = torch.compile(tr, backend=backend, mode=mode, fullgraph=fullgraph, **kwargs)
    if own_memory and handle is not None:
        cache = handle.cache
        compiled.register_forward_hook(lambda *_: cache.own_memory())  # runs eagerly, after the graph
    _COMPILED.add(compiled)
    if pipeline:
        target.transformer = compiled
    return compiled


class PeerHandle:
    """A peer's cache installed by :func:`apply` (``taylorseer`` policies); :meth:`remove` takes it off."""

    def __init__(self, transformer: torch.nn.Module, remove: Any) -> None:
        self.transformer = transformer
        self._remove = remove

    def remove(self) -> None:
        self._remove()
        if getattr(self.transformer, "_budcache_peer", None) is self:
            del self.transformer._budcache_peer


def remove(target: Any) -> None:
    """Remove budcache's hooks from a pipeline or transformer (no-op if none)."""
    tr = _unwrap(target) if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler") else \
        _transformer_and_scheduler(target)[0]
    handle = find_cache(tr)
    if handle is not None:
        handle.remove()
    peer = getattr(tr, "_budcache_peer", None)
    if peer is not None:
        peer.remove()
    if hasattr(target, "scheduler") and getattr(target, "transformer", None) in _COMPILED:
        target.transformer = tr  # a pipeline compiled by :func:`compile`: back to the plain module
