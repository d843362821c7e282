"""The one sampling loop every method in budcache runs through.

For steps ``k = 0 .. N-1`` with sigmas ``s_0 > ... > s_N``:

1. the controller decides which batch elements compute at step ``k``;
2. the denoiser gives the velocity: computed elements run the whole block
   stack, the others are approximated by the cache mechanism (residual
   ``reuse``/``forecast1``/``forecast2`` inside the block-stack hooks, or
   ``output``: reuse the last velocity);
3. with classifier-free guidance ``v = v_u + g (v_c - v_u)`` (separate caches
   for the two passes);
4. the solver advances ``x`` from ``s_k`` to ``s_{k+1}``.

A :class:`SignalController` (TeaCache, DiCache) decides from the current
step's signals instead: the sampler hands it a :class:`StepSignals` with the
latent, sigma, conditioning and a lazy probe of the first blocks, and the
controller may attach its own residual estimate for the skipped elements.

The state is an explicit immutable value (:class:`SamplerState`): running
steps ``0..j``, keeping the state and continuing later equals one run, which
is what prefix sharing in the search relies on. Every tensor operation on the
sigmas is differentiable. ``nfe`` counts, per element, the steps that ran the
full block stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import estimators as est
from .denoisers import Denoiser, as_denoiser
from .errors import ConfigError, ModelOutputError
from .hooks import MECHANISMS, CacheHandle, Estimator, Probe, ResidualHistory, apply_cache, find_cache, probe_stack
from .peers import (
    PEER_MECHANISMS,
    PeerHooks,
    PeerSnapshot,
    apply_taylorseer_schedule,
    peer_snapshot,
    restore_peer,
    scheduled_hooks,
)
from .policy import CachePolicy
from .solvers import Solver, get_solver

#: Every mechanism a sampler accepts: budcache's estimators (see :mod:`budcache.estimators`) and the peers'
#: caches that a static schedule drives (:mod:`budcache.peers`).
ALL_MECHANISMS = (*est.ESTIMATORS, *PEER_MECHANISMS)


# ------------------------------------------------------------------------------ controllers
class Controller:
    """Decides per step which batch elements compute; ``decide`` returns a bool tensor (B,).

    A controller may also name each skipped element's estimator: ``codes(step, state)`` returns
    estimator codes (B,) (:data:`budcache.estimators.CODES`), or ``None`` for the sampler's mechanism.
    """

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def codes(self, step: int, state: SamplerState) -> torch.Tensor | None:
        return None

    def estimator_codes(self) -> set[int]:
        """Every estimator code the controller may name (for the sampler's set-up)."""
        return set()


class ComputeAll(Controller):
    """Every step computes (the uncached sampler)."""

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:
        return torch.ones(state.x.shape[0], dtype=torch.bool)


def policy_plan(policy: CachePolicy) -> torch.Tensor:
    """A policy as a plan (N,) of codes: 0 computes, ``c > 0`` skips with estimator ``NAMES[c]``."""
    if policy.estimators is None:
        raise ConfigError("this policy names no estimator per step (a version-1 policy)")
    plan = torch.zeros(policy.steps, dtype=torch.long)
    for k, name in zip(policy.skipped, policy.estimators):
        plan[k] = est.CODES[name]
    return plan


class StaticMask(Controller):
    """A static mask: (N,) shared by the batch, or (B, N), one mask per element (candidate masks).

    ``plan`` (same shape, integer codes; see :meth:`from_plan`) names each
    skipped step's estimator: 0 computes, a code ``c > 0`` skips with
    ``budcache.estimators.NAMES[c]``. A policy with per-step estimators
    brings its plan. Step 0 must compute for every element
    (nothing is cached before it).
    """

    def __init__(self, mask: torch.Tensor | Sequence[bool] | CachePolicy, plan: torch.Tensor | None = None) -> None:
        if isinstance(mask, CachePolicy):
            plan = policy_plan(mask) if mask.estimators is not None else None
            mask = mask.mask_tensor()
        m = torch.as_tensor(mask, dtype=torch.bool)
        if m.dim() not in (1, 2) or m.shape[-1] < 1:
            raise ConfigError(f"mask must have shape (N,) or (B, N); got {tuple(m.shape)}")
        if not bool(m[..., 0].all()):
            raise ConfigError("mask: step 0 must be computed for every element")
        if plan is not None:
            plan = torch.as_tensor(plan, dtype=torch.long)
            if plan.shape != m.shape or bool(((plan == est.COMPUTE) != m).any()):
                raise ConfigError("plan and mask disagree on which steps compute")
            if int(plan.min()) < 0 or int(plan.max()) > max(est.NAMES):
                raise ConfigError(f"plan codes must lie in 0..{max(est.NAMES)}")
        self.mask = m
        self.plan = plan
        self.steps = m.shape[-1]

    @classmethod
    def from_plan(cls, plan: torch.Tensor | Sequence[int]) -> StaticMask:
        """A plan (N,) or (B, N) of codes: 0 computes, ``c > 0`` skips with estimator ``NAMES[c]``."""
        p = torch.as_tensor(plan, dtype=torch.long)
        return cls(p == est.COMPUTE, p)

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:
        return self._column(self.mask, step, state)

    def codes(self, step: int, state: SamplerState) -> torch.Tensor | None:
        return None if self.plan is None else self._column(self.plan, step, state)

    def estimator_codes(self) -> set[int]:
        return set() if self.plan is None else set(int(c) for c in self.plan.unique().tolist()) - {est.COMPUTE}

    @staticmethod
    def _column(table: torch.Tensor, step: int, state: SamplerState) -> torch.Tensor:
        b = state.x.shape[0]
        col = table[..., step]
        if col.dim() == 0:
            return col.expand(b).clone()
        if col.shape[0] != b:
            raise ConfigError(f"mask has {col.shape[0]} rows but the batch has {b} elements")
        return col


class StepSignals:
    """What a :class:`SignalController` may read at one step before deciding.

    ``x`` (B, ...) and ``sigma`` (B,) are the step's latent and noise level,
    ``cond`` its conditioning. :meth:`probe` runs the first ``m`` blocks of the
    conditional pass (cached per ``m``; any cache bypassed); :meth:`set_estimator`
    gives the skipped elements a residual estimate of the controller's own;
    :meth:`resume_from` lets the computing elements start from a probe's
    output instead of running its blocks again.
    """

    def __init__(self, sampler: Sampler, step: int, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> None:
        self.sampler = sampler
        self.step = step
        self.x = x
        self.sigma = sigma
        self.cond = cond
        self.estimator: Estimator | None = None
        self.resume: Probe | None = None
        self._probes: dict[int, Probe] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        tr = getattr(self.sampler.denoiser, "transformer", None)
        if tr is None:
            raise ConfigError("this controller probes the block stack: it needs a diffusers transformer, "
                              "not a plain callable")
        return tr

    def probe(self, blocks: int) -> Probe:
        """Signals of the conditional pass after the first ``blocks`` blocks (0: the stack input)."""
        if blocks not in self._probes:
            den = self.sampler.denoiser
            self._probes[blocks] = probe_stack(
                self.transformer, lambda: den(self.x, self.sigma, self.cond, "cond"), blocks)
        return self._probes[blocks]

    def set_estimator(self, estimator: Estimator | None) -> None:
        """Residual estimate ``estimator(history, step) -> (R_img, R_txt)`` for this step's skipped elements."""
        self.estimator = estimator

    def resume_from(self, blocks: int) -> None:
        """Computing elements resume from :meth:`probe` ``(blocks)`` (conditional pass only; exact)."""
        self.resume = self.probe(blocks) if blocks > 0 else None


class SignalController(Controller):
    """A controller that reads the step's signals (:class:`StepSignals`) before deciding.

    ``residual_depth``: computed residuals the cache keeps per element (an
    estimator may need more than the mechanism's ``order + 1``).
    """

    residual_depth: int = 1

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:
        raise ConfigError(f"{type(self).__name__} decides from the step's signals; run it through budcache's Sampler")

    def decide_with(self, step: int, state: SamplerState, signals: StepSignals) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def as_controller(policy: CachePolicy | Controller | torch.Tensor | Sequence[bool] | None) -> Controller:
    """Controller of a policy, mask or controller (``None``: compute every step)."""
    if policy is None:
        return ComputeAll()
    if isinstance(policy, Controller):
        return policy
    return StaticMask(policy)


# ------------------------------------------------------------------------------ state
@dataclass(frozen=True)
class SamplerState:
    """Everything the loop carries between steps; copying it and resuming equals one run."""

    x: torch.Tensor                       # (B, ...) current latent at sigmas[step]
    step: int                             # next step to take
    history: tuple[torch.Tensor, ...]     # the solver's own history
    nfe: torch.Tensor                     # (B,) full evaluations so far (on the CPU, like the decisions)
    computed: tuple[torch.Tensor, ...]    # per past step: (B,) bool, which elements computed
    last_v: torch.Tensor | None = None    # last velocity (for the ``output`` mechanism)
    cache: dict[str, ResidualHistory] | None = None  # residual caches per CFG context
    velocities: est.History | None = None  # velocities of the last computed steps (velocity forecasts)
    peer: PeerSnapshot | None = None      # a peer mechanism's hook state after this step (resumes its run)


@dataclass(frozen=True)
class SampleResult:
    """Final latent, exact NFE per element, and which elements computed at every step."""

    latent: torch.Tensor
    nfe: torch.Tensor
    computed: torch.Tensor  # (N, B) bool

    @property
    def nfe_max(self) -> int:
        return int(self.nfe.max())

    @property
    def nfe_min(self) -> int:
        return int(self.nfe.min())


# ------------------------------------------------------------------------------ sampler
class Sampler:
    """One cached sampling loop: denoiser, sigmas, solver, controller, mechanism, guidance."""

    def __init__(self, denoiser: Denoiser, sigmas: torch.Tensor, solver: Solver | str = "euler",
                 controller: Controller | CachePolicy | torch.Tensor | None = None, mechanism: str | None = None,
                 guidance: float = 1.0, check_finite: bool = True) -> None:
        mechanism = resolve_mechanism(controller, mechanism)
        if mechanism not in ALL_MECHANISMS:
            raise ConfigError(f"mechanism {mechanism!r} is unknown; choose one of {list(ALL_MECHANISMS)}")
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ConfigError(f"sigmas must be a 1-D tensor of N+1 values; got shape {tuple(sigmas.shape)}")
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.steps = sigmas.numel() - 1
        self.solver = get_solver(solver) if isinstance(solver, str) else solver
        if isinstance(controller, CachePolicy) and controller.sigmas is not None:
            # a policy with a learned schedule runs with it
            self.sigmas = sigmas = torch.tensor(controller.sigmas, dtype=sigmas.dtype, device=sigmas.device)
            self.steps = sigmas.numel() - 1
        self.controller = as_controller(controller)
        if isinstance(self.controller, StaticMask) and self.controller.steps != self.steps:
            raise ConfigError(f"the policy or mask is for {self.controller.steps} steps but the sampler has "
                              f"{self.steps}")
        self.mechanism = mechanism
        self.guidance = float(guidance)
        self.check_finite = check_finite
        self._peer_hooks: PeerHooks = []  # a peer's hooks while run() has them installed
        self.cached = not isinstance(self.controller, ComputeAll)
        self.peer = mechanism in PEER_MECHANISMS
        if self.peer:
            if not isinstance(self.controller, (StaticMask, ComputeAll)) or (
                    isinstance(self.controller, StaticMask) and self.controller.mask.dim() != 1):
                raise ConfigError(f"mechanism {mechanism!r} runs one static mask (N,) shared by the batch")
            if getattr(denoiser, "transformer", None) is None:
                raise ConfigError(f"mechanism {mechanism!r} needs a diffusers transformer")
            mechanism = "reuse"  # no budcache estimator runs: the peer's hooks fill the skipped steps
        names = {mechanism} | {est.NAMES[c] for c in self.controller.estimator_codes()}
        specs = [est.ESTIMATORS[n] for n in names]
        self.residual_depth = max([s.depth for s in specs if s.target == "residual"], default=0)
        self.velocity_depth = max([s.depth for s in specs if s.target == "velocity"], default=0)
        # the legacy paths (one version-1 mechanism, no per-step plan) run exactly as before
        self.legacy = not self.controller.estimator_codes() and mechanism in (*MECHANISMS, "output")
        if self.cached and self.residual_depth and getattr(denoiser, "transformer", None) is None:
            bad = sorted(n for n in names if est.ESTIMATORS[n].target == "residual")
            raise ConfigError(f"mechanism {bad[0]!r} needs a diffusers transformer; a plain callable "
                              f"supports only velocity estimators {list(est.velocity_names())}")
        if self.cached and not self.legacy:
            # A state is resumed by plans with other estimators (the search's prefix sharing), so it keeps what
            # any estimator needs: the deepest histories of both kinds, whatever this plan uses.
            deepest = max(spec.depth for spec in est.ESTIMATORS.values())
            self.velocity_depth = deepest
            if getattr(denoiser, "transformer", None) is not None:
                self.residual_depth = deepest

    def start(self, noise: torch.Tensor) -> SamplerState:
        """The state before step 0, at ``x = noise``."""
        b = noise.shape[0]
        return SamplerState(x=noise, step=0, history=(), nfe=torch.zeros(b, dtype=torch.long), computed=())

    # The loop ----------------------------------------------------------------------------
    def run(self, state: SamplerState, cond: Any, uncond: Any = None, until: int | None = None,
            progress: bool = False, callback: Any = None) -> SamplerState:
        """Advance ``state`` to step ``until`` (default: the end); ``callback(state)`` after every step."""
        until = self.steps if until is None else until
        if not state.step <= until <= self.steps:
            raise ConfigError(f"until={until} must lie in [{state.step}, {self.steps}]")
        if self.guidance != 1.0 and uncond is None:
            raise ConfigError("guidance != 1 needs the unconditional conditioning (uncond)")
        if self.peer and self.cached and state.step != 0 and state.peer is None:
            raise ConfigError("a peer mechanism's state lives in its own hooks: resume only a state this sampler's "
                              "mechanism produced (it carries the hooks' state), or start at step 0")
        handle = self._install()
        remove_peer = None
        if self.peer and self.cached:
            remove_peer = apply_taylorseer_schedule(self.denoiser.transformer, self.controller.mask.tolist())
            self._peer_hooks = scheduled_hooks(self.denoiser.transformer)
            if state.step != 0:
                try:
                    restore_peer(self._peer_hooks, state.peer, step=state.step,
                                 contexts=("cond", "uncond") if self.guidance != 1.0 else ("cond",))
                except BaseException:
                    remove_peer()
                    self._peer_hooks = []
                    raise
        try:
            steps = range(state.step, until)
            if progress:
                from tqdm import tqdm
                steps = tqdm(steps, desc="sampling", leave=False)
            for _ in steps:
                state = self._step(state, cond, uncond, handle)
                if callback is not None:
                    callback(state)
        finally:
            if handle is not None:
                handle.remove()
            if remove_peer is not None:
                remove_peer()
                self._peer_hooks = []
        return state

    def _install(self) -> CacheHandle | None:
        if not (self.cached and self.residual_depth) or self.peer:
            return None
        tr = self.denoiser.transformer
        if find_cache(tr) is not None:
            raise ConfigError("this transformer already carries a budcache cache (budcache.diffusers.apply); "
                              "remove it before sampling with budcache's sampler")
        mech = self.mechanism if self.mechanism in MECHANISMS else "reuse"
        depth = max(self.residual_depth, getattr(self.controller, "residual_depth", 1) or 1)
        return apply_cache(tr, mech, depth=depth)

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any) -> torch.Tensor:
        v = self.denoiser(x, sigma, cond, "cond")
        if self.guidance != 1.0:
            vu = self.denoiser(x, sigma, uncond, "uncond")
            v = vu + self.guidance * (v - vu)
        return v

    def _step(self, state: SamplerState, cond: Any, uncond: Any, handle: CacheHandle | None) -> SamplerState:
        k = state.step
        x = state.x
        b = x.shape[0]
        # The decision stays on the CPU (a static mask needs no device sync); sigma keeps the schedule's
        # dtype so adapters can form the timestep exactly as pipelines do.
        sigma = self.sigmas[k].expand(b)
        estimator = resume = None
        if isinstance(self.controller, SignalController):
            signals = StepSignals(self, k, x, sigma, cond)
            compute = self.controller.decide_with(k, state, signals).to(dtype=torch.bool)
            estimator, resume = signals.estimator, signals.resume
        else:
            compute = self.controller.decide(k, state).to(dtype=torch.bool)
        cache = state.cache
        velocities = state.velocities
        peer = None
        if self.peer:
            v = self._velocity(x, sigma, cond, uncond)  # the peer's hooks skip or compute inside
            if self.cached and k + 1 < self.steps:  # a final state is never resumed
                peer = peer_snapshot(self._peer_hooks)
        elif self.cached and not self.legacy:
            v, cache, velocities = self._planned(state, compute, sigma, cond, uncond, handle, estimator, resume)
        elif handle is not None:
            handle.restore(cache)
            handle.set_decision(k, compute, estimator, resume)
            v = self._velocity(x, sigma, cond, uncond)
            cache = handle.snapshot()
        elif self.mechanism == "output" and self.cached:
            v = self._output_reuse(state, compute, sigma, cond, uncond, k)
        else:
            v = self._velocity(x, sigma, cond, uncond)
        if self.check_finite and not bool(torch.isfinite(v).all()):
            raise ModelOutputError(f"the model returned NaN or Inf at step {k} (sigma={float(self.sigmas[k]):.4f})")
        x_next, history = self.solver.step(x, v, k, self.sigmas, state.history)
        return replace(state, x=x_next, step=k + 1, history=history, nfe=state.nfe + compute.long(),
                       computed=(*state.computed, compute), last_v=v, cache=cache, velocities=velocities, peer=peer)

    def _planned(self, state: SamplerState, compute: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any,
                 handle: CacheHandle | None, estimator: Estimator | None, resume: Probe | None
                 ) -> tuple[torch.Tensor, dict[str, ResidualHistory] | None, est.History | None]:
        """One step with per-element estimators (:mod:`budcache.estimators`).

        Computing elements run the stack; residual-estimated ones go through the
        hooks with their own estimator; velocity-estimated ones take a forecast
        of the stored velocities (the model is not called for a step where no
        element needs it).
        """
        k, x = state.step, state.x
        b = x.shape[0]
        codes = self.controller.codes(k, state) if estimator is None else None
        if codes is None:
            codes = torch.full((b,), est.CODES[self.mechanism], dtype=torch.long)
        codes = torch.where(compute, torch.zeros_like(codes), codes)
        is_vel = torch.tensor([False] + [est.ESTIMATORS[est.NAMES[c]].target == "velocity"
                                         for c in range(1, max(est.NAMES) + 1)])
        vel = is_vel[codes] & ~compute
        res = ~compute & ~vel
        n_comp = int(compute.sum())
        cache, velocities = state.cache, state.velocities
        if vel.any() and velocities is None:
            raise ConfigError(f"step {k} forecasts a velocity but no step has computed yet")
        v: torch.Tensor | None = None
        if handle is not None and (n_comp or bool(res.any())):
            handle.restore(cache)
            if estimator is None:
                sig = self.sigmas.detach()

                def estimator(hist: ResidualHistory, step: int, _c: torch.Tensor = codes) -> Any:
                    return est.mixed(hist, step, _c, sig)
            handle.set_decision(k, compute, estimator, resume)
            v = self._velocity(x, sigma, cond, uncond)
            cache = handle.snapshot()
        elif n_comp == b:
            v = self._velocity(x, sigma, cond, uncond)
        elif n_comp:
            idx = torch.nonzero(compute).squeeze(1).to(x.device)
            v_sub = self._velocity(x.index_select(0, idx), sigma.index_select(0, idx), select_items(cond, idx),
                                   select_items(uncond, idx))
            v = torch.zeros_like(x).index_copy(0, idx, v_sub)
        if vel.any():
            v_hat = est.velocity(velocities, k, codes, self.sigmas)
            v = v_hat if v is None else torch.where(vel.to(x.device).view((-1,) + (1,) * (x.dim() - 1)), v_hat, v)
        assert v is not None
        if self.velocity_depth and n_comp:
            if n_comp == b:
                velocities = (velocities or est.History()).push(None, v, None, k, b, self.velocity_depth)
            else:
                idx = torch.nonzero(compute).squeeze(1).to(x.device)
                velocities = (velocities or est.History()).push(idx, v.index_select(0, idx), None, k, b,
                                                                 self.velocity_depth)
        return v, cache, velocities

    def _output_reuse(self, state: SamplerState, compute: torch.Tensor, sigma: torch.Tensor, cond: Any,
                      uncond: Any, k: int) -> torch.Tensor:
        n = int(compute.sum())
        if n == compute.numel():
            return self._velocity(state.x, sigma, cond, uncond)
        if state.last_v is None:
            raise ConfigError(f"step {k} reuses a velocity but no step has computed yet")
        if n == 0:
            return state.last_v
        idx = torch.nonzero(compute).squeeze(1).to(state.x.device)
        v_sub = self._velocity(state.x.index_select(0, idx), sigma.index_select(0, idx), select_items(cond, idx),
                               select_items(uncond, idx))
        return state.last_v.index_copy(0, idx, v_sub)

    def result(self, state: SamplerState) -> SampleResult:
        """Package a finished state."""
        if state.step != self.steps:
            raise ConfigError(f"state is at step {state.step} of {self.steps}: run it to the end first")
        return SampleResult(state.x, state.nfe, torch.stack(state.computed) if state.computed else
                            torch.zeros(0, state.x.shape[0], dtype=torch.bool))


def run_batches(sampler: Sampler | Callable[[], Sampler], noise: torch.Tensor, cond: Any, uncond: Any = None,
                batch: int = 64, callback: Callable[[int, int], Any] | None = None) -> SampleResult:
    """Sample ``noise`` (B, ...) ``batch`` items at a time: the one batched loop every stage uses.

    Args:
        sampler: a sampler, or a factory called once per batch (for controllers that keep state).
        noise: initial latents (B, ...).
        cond, uncond: their conditioning (tensors, or objects with ``select(idx)``).
        batch: items per batch (>= 1).
        callback: ``callback(offset, size)`` -> a per-step callback for the batch starting at item
            ``offset`` (or ``None``).

    Returns:
        the final latents (B, ...), NFE (B,) and decisions (N, B), batches concatenated.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1 (got {batch!r})")
    latents, nfes, computed = [], [], []
    for i in range(0, noise.shape[0], batch):
        idx = torch.arange(i, min(i + batch, noise.shape[0]), device=noise.device)
        s = sampler if isinstance(sampler, Sampler) else sampler()
        st = s.run(s.start(noise.index_select(0, idx)), select_items(cond, idx), select_items(uncond, idx),
                   callback=None if callback is None else callback(i, len(idx)))
        res = s.result(st)
        latents.append(res.latent)
        nfes.append(res.nfe)
        computed.append(res.computed)
    return SampleResult(torch.cat(latents), torch.cat(nfes), torch.cat(computed, dim=1))


def map_state(state: SamplerState, fn: Any) -> SamplerState:
    """Apply ``fn`` to every per-element tensor of a state (select, tile, clone, move)."""
    cache = None if state.cache is None else {k: h.map(fn) for k, h in state.cache.items()}
    return replace(state, x=fn(state.x), history=tuple(fn(h) for h in state.history), nfe=fn(state.nfe),
                   computed=tuple(fn(c) for c in state.computed),
                   last_v=None if state.last_v is None else fn(state.last_v), cache=cache,
                   velocities=None if state.velocities is None else state.velocities.map(fn),
                   peer=None if state.peer is None else state.peer.map(fn))


def tile_state(state: SamplerState, n: int) -> SamplerState:
    """The batch repeated ``n`` times, candidate-major: element ``i*B + b`` is element ``b``."""
    return map_state(state, lambda t: t.repeat(n, *([1] * (t.dim() - 1))))


def slice_state(state: SamplerState, start: int, stop: int, clone: bool = False) -> SamplerState:
    """Elements ``start:stop`` of a state (copied when ``clone``)."""
    return map_state(state, (lambda t: t[start:stop].clone()) if clone else (lambda t: t[start:stop]))


def tile_cond(cond: Any, n: int) -> Any:
    """Conditioning repeated ``n`` times, candidate-major (matches :func:`tile_state`)."""
    if cond is None or n == 1:
        return cond
    if hasattr(cond, "tile"):
        return cond.tile(n)
    if torch.is_tensor(cond):
        return cond.repeat(n, *([1] * (cond.dim() - 1)))
    raise ConfigError(f"cannot tile conditioning of type {type(cond).__name__}; give it a tile(n) method")


def select_items(cond: Any, idx: torch.Tensor) -> Any:
    """The rows ``idx`` of a batch of conditioning: a tensor, ``None``, or an object with ``select(idx)``."""
    if cond is None:
        return None
    if hasattr(cond, "select") and not torch.is_tensor(cond):
        return cond.select(idx)
    if torch.is_tensor(cond):
        return cond.index_select(0, idx)
    raise ConfigError(f"cannot take a subset of conditioning of type {type(cond).__name__}; "
                      "give it a select(idx) method or use a tensor")


def resolve_mechanism(policy: Any, mechanism: str | None) -> str:
    """The default estimator of a sampler: the policy's own, else the caller's, else ``reuse``.

    A policy that states its estimator (version 2's per-step names, or a version-1
    file's ``meta["mechanism"]``) is run with it whatever the caller's mechanism:
    ``mechanism`` only fills in for policies, masks and controllers that say
    nothing. To run a policy with another estimator on purpose, make that
    policy: ``policy.with_estimators(name)``.
    """
    stated = policy.estimator if isinstance(policy, CachePolicy) else None
    if stated is not None and stated != "mixed":
        return stated
    return mechanism or "reuse"


def sample(model: Any, noise: torch.Tensor, cond: Any, sigmas: torch.Tensor, *, solver: Solver | str = "euler",
           policy: CachePolicy | Controller | torch.Tensor | None = None, mechanism: str | None = None,
           guidance: float = 1.0, uncond: Any = None, progress: bool = False, **geometry: Any) -> SampleResult:
    """Sample from ``noise`` with one call: ``sample(model, noise, cond, sigmas, policy=...)``.

    ``model`` is a diffusers transformer (with ``geometry`` for its adapter, e.g.
    ``rows``/``cols`` for FLUX), a denoiser, or a callable ``v(x, sigma, cond)``.
    If the policy carries learned sigmas, they replace ``sigmas``.
    """
    den = as_denoiser(model, **geometry)
    sampler = Sampler(den, sigmas, solver, policy, mechanism, guidance)
    return sampler.result(sampler.run(sampler.start(noise), cond, uncond, progress=progress))
