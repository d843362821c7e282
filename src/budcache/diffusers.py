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

from .errors import ConfigError, PolicyError
from .hooks import CacheHandle, Decision, apply_cache, find_cache
from .policy import CachePolicy


class _TimestepResolver:
    """Maps a call's timestep to the policy's step via the scheduler's timesteps."""

    def __init__(self, policy: CachePolicy, scheduler: Any, timestep_scale: float = 1000.0) -> None:
        self.policy = policy
        self.scheduler = scheduler
        self.scale = timestep_scale
        self.mask = policy.mask_tensor()

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
        return Decision(k, self.mask[k].expand(b).clone())


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
    ``mechanism`` defaults to the one the policy was searched with (its
    ``meta``), else ``"reuse"``. A policy with learned sigmas must run with
    those sigmas (the scheduler's sigmas must equal them; mind pipelines that
    shift custom sigmas by resolution): another schedule is an error at step 0.
    """
    if not isinstance(policy, (CachePolicy, str, os.PathLike)):
        raise ConfigError(f"policy must be a CachePolicy, a path to a policy JSON file or 'uniform'; got "
                          f"{type(policy).__name__}")
    if isinstance(policy, (str, os.PathLike)):
        if policy == "uniform":
            if nfe is None or steps is None:
                raise ConfigError("policy 'uniform' needs nfe=K and steps=N")
            policy = CachePolicy.uniform(steps, nfe)
        else:
            policy = CachePolicy.load(policy)
    if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler"):
        if scheduler is None:
            raise ConfigError("a bare transformer needs scheduler=... to map timesteps to steps")
        tr = target
    else:
        tr, sched = _transformer_and_scheduler(target)
        scheduler = scheduler or sched
    if find_cache(tr) is not None:
        raise ConfigError("a budcache cache is already applied; call budcache.diffusers.remove first")
    if mechanism is None:
        mechanism = str(policy.meta.get("mechanism", "reuse"))
    return apply_cache(tr, mechanism, resolver=_TimestepResolver(policy, scheduler))


def remove(target: Any) -> None:
    """Remove budcache's hooks from a pipeline or transformer (no-op if none)."""
    tr = target if isinstance(target, torch.nn.Module) and not hasattr(target, "scheduler") else \
        _transformer_and_scheduler(target)[0]
    handle = find_cache(tr)
    if handle is not None:
        handle.remove()
