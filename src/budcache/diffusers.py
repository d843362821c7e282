"""Apply a cache policy to a diffusers pipeline or transformer.

>>> import budcache.diffusers as bd
>>> handle = bd.apply(pipe, policy)          # or bd.apply(pipe, "uniform", nfe=10, steps=28)
>>> images = pipe(..., num_inference_steps=policy.steps).images
>>> bd.remove(pipe)

The step of each transformer call is found by matching its timestep to the
pipeline scheduler's timesteps (never by counting calls), so warm-up calls,
CFG's two passes and interrupted generations cannot shift it. A policy whose
step count differs from the pipeline's schedule is an error. State is kept per
``cache_context`` (separate caches for CFG's passes) and starts clean at step 0.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import estimators as est
from .errors import ConfigError, PolicyError
from .hooks import MECHANISMS, CacheHandle, Decision, apply_cache, find_cache
from .peers import PEER_MECHANISMS, apply_taylorseer_schedule
from .policy import CachePolicy


class _TimestepResolver:
    """Maps a call's timestep to the policy's step via the scheduler's timesteps."""

    def __init__(self, policy: CachePolicy, scheduler: Any, timestep_scale: float = 1000.0,
                 mechanism: str = "reuse") -> None:
        self.policy = policy
        self.scheduler = scheduler
        self.scale = timestep_scale
        self.mask = policy.mask_tensor()
        # the estimator of every step: legacy mechanisms run in the hooks as before; others per step
        names = [None if m else (policy.estimators[policy.skipped.index(k)] if policy.estimators is not None
                                 else mechanism) for k, m in enumerate(policy.mask)]
        self.specs = [None if n is None else est.get(n) for n in names]
        self.legacy = policy.estimators is None and mechanism in MECHANISMS
        self.sigmas: torch.Tensor | None = None  # host copy of the scheduler's sigmas, taken at step 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, state: Any) -> Decision:
        t = kwargs.get("timestep")
        if t is None:
            raise ConfigError(f"{type(module).__name__} was called without a 'timestep' keyword; budcache cannot "
                              "tell which step this is")
        sched = getattr(self.scheduler, "timesteps", None)
        if sched is None:
            raise ConfigError("the pipeline's scheduler has no timesteps yet (set_timesteps was not called)")
        n = len(sched)
        begin = getattr(self.scheduler, "begin_index", None)
        if begin not in (None, 0):
            raise PolicyError(f"policy field 'steps': the pipeline starts at step {begin} of {n} (img2img "
                              f"'strength'), so it runs {n - begin} steps, not the policy's {self.policy.steps}; "
                              f"search a policy for {n - begin} steps with that strength")
        if n != self.policy.steps:
            raise PolicyError(f"policy field 'steps': the policy is for {self.policy.steps} steps but the pipeline "
                              f"runs {n} (num_inference_steps, strength or custom sigmas); search a policy for "
                              f"{n} steps")
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
        compute = self.mask[k].expand(b).clone()
        spec = self.specs[k]
        if spec is None or self.legacy:
            return Decision(k, compute)
        if k == 0 or self.sigmas is None:
            sig = getattr(self.scheduler, "sigmas", None)
            if sig is None or len(sig) < n + 1:
                raise ConfigError("the pipeline's scheduler exposes no N+1 sigmas; budcache's forecasts in sigma "
                                  "need them (use a flow-matching scheduler)")
            self.sigmas = torch.as_tensor(sig).detach().to("cpu", torch.float64)[:n + 1]
        sigmas = self.sigmas if spec.time == "sigma" else None
        if spec.target == "velocity":
            def velocity(hist: Any, step: int, _o: int = spec.order) -> torch.Tensor:
                s = None if sigmas is None else sigmas.to(hist.img[0].device)
                return est.newton(hist.img, hist.steps, step, _o, s)
            return Decision(k, compute, velocity=velocity)

        def residual(hist: Any, step: int, _o: int = spec.order) -> Any:
            return hist.estimate(step, _o, None if sigmas is None else sigmas.to(hist.img[0].device))
        return Decision(k, compute, estimator=residual)


def _transformer_and_scheduler(target: Any) -> tuple[torch.nn.Module, Any]:
    tr = getattr(target, "transformer", None)
    if isinstance(tr, torch.nn.Module):
        sched = getattr(target, "scheduler", None)
        if sched is None:
            raise ConfigError(f"{type(target).__name__} has no scheduler")
        return tr, sched
    raise ConfigError(f"expected a diffusers pipeline with a .transformer; got {type(target).__name__} "
                      "(for a bare transformer, pass scheduler=...)")


def apply(target: Any, policy: CachePolicy | str | os.PathLike, *, nfe: int | None = None, steps: int | None = None,
          mechanism: str | None = None, scheduler: Any = None) -> CacheHandle:
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
    """
    if isinstance(policy, (str, os.PathLike)):
        if policy == "uniform":
            if nfe is None or steps is None:
                raise ConfigError("policy 'uniform' needs nfe=K and steps=N")
            policy = CachePolicy.uniform(steps, nfe, estimator=mechanism)
        else:
            policy = CachePolicy.load(policy)
    if not isinstance(policy, CachePolicy):
        raise ConfigError(f"policy must be a CachePolicy, a policy file or 'uniform'; got {type(policy).__name__}")
    if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler"):
        if scheduler is None:
            raise ConfigError("a bare transformer needs scheduler=... to map timesteps to steps")
        tr = target
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
        handle = PeerHandle(tr, apply_taylorseer_schedule(tr, policy.mask))
        tr._budcache_peer = handle
        return handle  # type: ignore[return-value]
    est.get(mechanism)
    resolver = _TimestepResolver(policy, scheduler, mechanism=mechanism)
    specs = [s for s in resolver.specs if s is not None]
    res_depth = max([s.depth for s in specs if s.target == "residual"], default=1)
    out_depth = max([s.depth for s in specs if s.target == "velocity"], default=0)
    legacy = mechanism if mechanism in MECHANISMS and policy.estimators is None else "reuse"
    return apply_cache(tr, legacy, resolver=resolver, depth=res_depth, output_depth=out_depth)


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
    tr = target if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler") else \
        _transformer_and_scheduler(target)[0]
    handle = find_cache(tr)
    if handle is not None:
        handle.remove()
    peer = getattr(tr, "_budcache_peer", None)
    if peer is not None:
        peer.remove()
