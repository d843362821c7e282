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

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .denoisers import Denoiser, as_denoiser
from .errors import ConfigError, ModelOutputError
from .hooks import MECHANISMS, CacheHandle, Estimator, Probe, ResidualHistory, apply_cache, find_cache, probe_stack
from .policy import CachePolicy
from .solvers import Solver, get_solver

#: Every cache mechanism: residual ones (hooks on a transformer) and velocity reuse.
ALL_MECHANISMS = (*MECHANISMS, "output")


# ------------------------------------------------------------------------------ controllers
class Controller:
    """Decides per step which batch elements compute; ``decide`` returns a bool tensor (B,)."""

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ComputeAll(Controller):
    """Every step computes (the uncached sampler)."""

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:
        return torch.ones(state.x.shape[0], dtype=torch.bool)


class StaticMask(Controller):
    """A static mask: (N,) shared by the batch, or (B, N), one mask per element (candidate masks).

    Step 0 must compute for every element (nothing is cached before it).
    """

    def __init__(self, mask: torch.Tensor | Sequence[bool] | CachePolicy) -> None:
        if isinstance(mask, CachePolicy):
            mask = mask.mask_tensor()
        m = torch.as_tensor(mask, dtype=torch.bool)
        if m.dim() not in (1, 2) or m.shape[-1] < 1:
            raise ConfigError(f"mask must have shape (N,) or (B, N); got {tuple(m.shape)}")
        if not bool(m[..., 0].all()):
            raise ConfigError("mask: step 0 must be computed for every element")
        self.mask = m
        self.steps = m.shape[-1]

    def decide(self, step: int, state: SamplerState) -> torch.Tensor:
        b = state.x.shape[0]
        col = self.mask[..., step]
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
                 controller: Controller | CachePolicy | torch.Tensor | None = None, mechanism: str = "reuse",
                 guidance: float = 1.0, check_finite: bool = True) -> None:
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
        self.cached = not isinstance(self.controller, ComputeAll)
        if self.cached and mechanism in MECHANISMS and getattr(denoiser, "transformer", None) is None:
            raise ConfigError(f"mechanism {mechanism!r} needs a diffusers transformer; a plain callable "
                              "supports only 'output' (velocity reuse)")

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
        handle = self._install()
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
        return state

    def _install(self) -> CacheHandle | None:
        if not (self.cached and self.mechanism in MECHANISMS):
            return None
        tr = self.denoiser.transformer
        if find_cache(tr) is not None:
            raise ConfigError("this transformer already carries a budcache cache (budcache.diffusers.apply); "
                              "remove it before sampling with budcache's sampler")
        return apply_cache(tr, self.mechanism, depth=getattr(self.controller, "residual_depth", None))

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
        if handle is not None:
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
                       computed=(*state.computed, compute), last_v=v, cache=cache)

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
        v_sub = self._velocity(state.x.index_select(0, idx), sigma.index_select(0, idx), _select(cond, idx),
                               _select(uncond, idx))
        return state.last_v.index_copy(0, idx, v_sub)

    def result(self, state: SamplerState) -> SampleResult:
        """Package a finished state."""
        if state.step != self.steps:
            raise ConfigError(f"state is at step {state.step} of {self.steps}: run it to the end first")
        return SampleResult(state.x, state.nfe, torch.stack(state.computed) if state.computed else
                            torch.zeros(0, state.x.shape[0], dtype=torch.bool))


def map_state(state: SamplerState, fn: Any) -> SamplerState:
    """Apply ``fn`` to every per-element tensor of a state (select, tile, clone, move)."""
    cache = None if state.cache is None else {k: h.map(fn) for k, h in state.cache.items()}
    return replace(state, x=fn(state.x), history=tuple(fn(h) for h in state.history), nfe=fn(state.nfe),
                   computed=tuple(fn(c) for c in state.computed),
                   last_v=None if state.last_v is None else fn(state.last_v), cache=cache)


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


def _select(cond: Any, idx: torch.Tensor) -> Any:
    if cond is None:
        return None
    if hasattr(cond, "select") and not torch.is_tensor(cond):
        return cond.select(idx)
    if torch.is_tensor(cond):
        return cond.index_select(0, idx)
    raise ConfigError(f"cannot take a subset of conditioning of type {type(cond).__name__}; "
                      "give it a select(idx) method or use a tensor")


def sample(model: Any, noise: torch.Tensor, cond: Any, sigmas: torch.Tensor, *, solver: Solver | str = "euler",
           policy: CachePolicy | Controller | torch.Tensor | None = None, mechanism: str = "reuse",
           guidance: float = 1.0, uncond: Any = None, progress: bool = False, **geometry: Any) -> SampleResult:
    """Sample from ``noise`` with one call: ``sample(model, noise, cond, sigmas, policy=...)``.

    ``model`` is a diffusers transformer (with ``geometry`` for its adapter, e.g.
    ``rows``/``cols`` for FLUX), a denoiser, or a callable ``v(x, sigma, cond)``.
    If the policy carries learned sigmas, they replace ``sigmas``.
    """
    den = as_denoiser(model, **geometry)
    sampler = Sampler(den, sigmas, solver, policy, mechanism, guidance)
    return sampler.result(sampler.run(sampler.start(noise), cond, uncond, progress=progress))
