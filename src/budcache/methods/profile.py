"""Offline profiling shared by ERTACache, MeanCache and GCache: the full-step trajectory of the calibration pairs.

One run of budcache's sampler with every step computed (residual hooks
installed, so the block-stack residual of every step is visible) records, per
step ``k`` and calibration item:

- ``x[k]``: the latent before step ``k`` (``x[N]`` is the final latent);
- ``v[k]``: the velocity the solver used at step ``k`` (guided when guidance != 1);
- ``r_img[ctx][k]`` / ``r_txt[ctx][k]``: the block-stack residual of the image
  and text streams in each guidance context (``"cond"``, and ``"uncond"`` with guidance);
- optionally ``states[k]``: the sampler state before step ``k`` (to restart
  from the full trajectory at any step).

The recording costs one full-step pass over the calibration pairs; each method
keeps it per calibration set and reuses it for every budget. Also here: a
solver that rescales or replaces the velocity on chosen steps (ERTACache's
timestep adjustment, MeanCache's average velocity) around the problem's own
solver, and a batched runner for a sampler built by a method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..sampler import SamplerState, StaticMask
from ..sampler import run_batches as sampler_batches
from ..solvers import Solver, get_solver
from .common import MECHANISM


@dataclass
class Trajectory:
    """The full-step run of a calibration set (see the module docstring). Tensors are on the CPU, float32."""

    sigmas: torch.Tensor                        # (N+1,)
    x: torch.Tensor                             # (N+1, B, ...)
    v: torch.Tensor                             # (N, B, ...)
    r_img: dict[str, torch.Tensor]              # context -> (N, B, T, D)
    r_txt: dict[str, torch.Tensor | None]       # context -> (N, B, L, D) or None
    states: list[SamplerState] | None = None    # state before step k (batch = every item), when kept
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.v.shape[0]

    @property
    def items(self) -> int:
        return self.v.shape[1]


def solver_of(problem: Any) -> Solver:
    """The problem's solver as an object (the problem may name it)."""
    s = problem.solver
    return get_solver(s) if isinstance(s, str) else s


def record_trajectory(problem: Any, calib: Any, keep_states: bool = False) -> Trajectory:
    """Run every step of ``calib`` (one batch) and record latents, velocities and residuals per step."""
    n = problem.steps
    sampler = problem.make_sampler(StaticMask(torch.ones(n, dtype=torch.bool)), mechanism=MECHANISM)
    xs: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    r_img: dict[str, list[torch.Tensor]] = {}
    r_txt: dict[str, list[torch.Tensor | None]] = {}
    states: list[SamplerState] = []
    start = sampler.start(calib.noise)
    xs.append(start.x.detach().float().cpu())
    if keep_states:
        states.append(start)

    def after(st: SamplerState) -> None:
        xs.append(st.x.detach().float().cpu())
        vs.append(st.last_v.detach().float().cpu())
        for ctx, hist in (st.cache or {}).items():
            r_img.setdefault(ctx, []).append(hist.img[0].detach().float().cpu())
            txt = hist.txt[0] if hist.txt and hist.txt[0] is not None else None
            r_txt.setdefault(ctx, []).append(None if txt is None else txt.detach().float().cpu())
        if keep_states and st.step < n:
            states.append(st)

    with torch.no_grad():
        sampler.run(start, calib.cond, calib.uncond, callback=after)
    if "cond" not in r_img:
        raise ConfigError("the full-step run recorded no block-stack residual (the problem's sampler installs no "
                          "residual hooks?)")
    img = {c: torch.stack(v) for c, v in r_img.items()}
    txt = {c: (None if any(t is None for t in v) else torch.stack(v)) for c, v in r_txt.items()}
    return Trajectory(problem.sigmas().detach().float().cpu(), torch.stack(xs), torch.stack(vs), img, txt,
                      states if keep_states else None)


class StepSolver(Solver):
    """The problem's solver with the velocity of some steps changed before it steps.

    ``scale[k]`` multiplies the velocity of step ``k`` (ERTACache's timestep
    adjustment: with Euler, scaling the velocity by ``phi`` is stretching the
    step's interval ``sigma_{k+1} - sigma_k`` by ``phi``). ``replace(k, x, v,
    log)`` (optional) returns the velocity to use at step ``k`` from the run's
    log so far (MeanCache), or ``None`` to keep ``v``. The log
    (``x_before``, ``x_after``, ``v_used`` per step) restarts at step 0, so one
    solver object serves successive generations, one at a time.
    """

    def __init__(self, inner: Solver, scale: torch.Tensor | None = None, replace: Any = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.order = inner.order
        self.scale = scale
        self.replace = replace
        self.log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def step(self, x: torch.Tensor, v: torch.Tensor, k: int, sigmas: torch.Tensor,
             history: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if k == 0:
            self.log = []
        if self.replace is not None:
            alt = self.replace(k, x, v, self.log, sigmas)
            if alt is not None:
                v = alt
        if self.scale is not None:
            v = v * self.scale[k].to(v.dtype)
        x_next, hist = self.inner.step(x, v, k, sigmas, history)
        self.log.append((x, x_next, v))
        return x_next, hist

    def __repr__(self) -> str:
        return f"StepSolver({self.inner!r})"


def run_batches(make: Any, noise: torch.Tensor, cond: Any, uncond: Any = None,
                batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``noise`` in batches with samplers from ``make()`` (a fresh one per batch).

    Returns the final latents and the (N, B) decisions.
    """
    if batch < 1:
        raise ConfigError(f"batch must be >= 1 (got {batch})")
    with torch.no_grad():
        res = sampler_batches(make, noise, cond, uncond, batch)
    return res.latent, res.computed
