"""ERTACache, re-implemented for budcache's sampler (arXiv 2508.21091; bytedance/ERTACache).

ERTACache caches the block-stack residual like TeaCache, but decides offline
and corrects what it reuses. Three parts, each fitted once per calibration set
on the full-step trajectory of the calibration pairs (:mod:`.profile`):

1. **Offline residual profiling -> static schedule.** The profile is
   ``e_k = mean_items rel-L1(R_k, R_{k-1})`` (``R_k`` the image-stream residual
   of step ``k``, conditional pass). The cache rule is TeaCache's accumulator
   run on the profile instead of on a live indicator: step 0 and the last
   step compute; otherwise ``acc += e_k`` and the step computes (and resets
   ``acc``) once ``acc >= delta``. The schedule is the same for every input.
2. **Closed-form residual rectification.** A skipped step ``t`` reuses the
   residual of the last computed step ``j``; the error of that reuse is
   modelled as linear in the reused residual, per channel ``d`` of the
   hidden dimension:

       R_hat_t[..., d] = a_t[d] R_j[..., d] + b_t[d]

   with ``a_t, b_t`` the least-squares fit of ``R_t`` on ``R_j`` over every
   calibration item and token (closed form: ``a = cov(R_j, R_t) / var(R_j)``,
   ``b = mean(R_t) - a mean(R_j)``; a channel with ``var(R_j) = 0`` keeps
   ``a = 1``). The text stream gets its own coefficients. Where the true
   residuals follow such a per-channel affine map the rectification is exact.
3. **Timestep adjustment.** On a skipped step the rectified velocity
   ``v_hat_t`` is applied over an adjusted interval ``phi_t (sigma_{t+1} -
   sigma_t)``; ``phi_t = <v_hat_t, v_t> / <v_hat_t, v_hat_t>`` is the
   least-squares factor that brings the step closest to the full-step one,
   with ``v_hat_t`` evaluated on the full-step latent ``x_t`` (one pass
   through the output layers per skipped step, no block runs), clipped to
   ``phi_range``. It is applied by scaling the velocity before the problem's
   own solver steps (for Euler exactly a stretched interval; for multistep
   solvers the scaled velocity also enters their history).

**Budget.** ``delta`` is bisected until the schedule computes exactly ``K``
steps. The count is not continuous in ``delta`` (the accumulator resets), so
when no ``delta`` gives exactly ``K`` the schedule with the fewest steps above
``K`` is taken and the computed steps (other than the first and the last) with
the smallest accumulated profile at their decision are made skipped until ``K``
remain. ``K = 1`` computes step 0 only. Every input computes exactly ``K``
steps, and the NFE counts nothing else (no probe).

Documented choices, where the paper or its code leaves room: the profile is
the residual's relative L1 change averaged over the calibration pairs; the
rectification is fitted per (skipped step, source step) pair of the final
schedule, teacher-forced on the full trajectory; with classifier-free guidance
the coefficients fitted on the conditional pass also rectify the
unconditional one; ``phi_range`` defaults to (0.5, 1.5).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..hooks import ResidualHistory, apply_cache
from ..policy import CachePolicy
from ..sampler import SamplerState, SignalController, StepSignals
from .base import MethodRun
from .common import MECHANISM, calib_key, check_budget, rel_l1
from .profile import StepSolver, Trajectory, record_trajectory, run_batches, solver_of


# ------------------------------------------------------------------------------ schedule
def accumulate_schedule(profile: Sequence[float], delta: float) -> tuple[tuple[int, ...], list[float]]:
    """Compute set of the accumulator rule on ``profile`` (``profile[0]`` unused) and ``acc`` at every decision."""
    n = len(profile)
    compute, accs = [0], [0.0]
    acc = 0.0
    for k in range(1, n):
        acc += float(profile[k])
        accs.append(acc)
        if k == n - 1 or acc >= delta:
            compute.append(k)
            acc = 0.0
    return tuple(compute), accs


def schedule_for_budget(profile: Sequence[float], k: int, iters: int = 80) -> tuple[tuple[int, ...], float]:
    """Exactly ``k`` computed steps: the accumulator's threshold bisected, then repaired (module docstring)."""
    n = len(profile)
    if not 1 <= k <= n:
        raise ConfigError(f"budget {k} must lie in 1..{n}")
    if k == 1:
        return (0,), float("inf")
    if k == n:
        return tuple(range(n)), 0.0
    lo, hi = 0.0, float(np.sum(profile[1:])) + 1.0   # count(lo) = n >= k > 2 = count(hi) (k < n here)
    best_above: tuple[tuple[int, ...], float] | None = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        comp, _ = accumulate_schedule(profile, mid)
        if len(comp) == k:
            return comp, mid
        if len(comp) > k:
            lo = mid
            if best_above is None or len(comp) < len(best_above[0]):
                best_above = (comp, mid)
        else:
            hi = mid
    if best_above is None:
        best_above = (accumulate_schedule(profile, lo)[0], lo)
    comp, delta = best_above
    _, accs = accumulate_schedule(profile, delta)
    inner = sorted((c for c in comp if 0 < c < n - 1), key=lambda c: (accs[c], c))
    drop = set(inner[:len(comp) - k])
    return tuple(c for c in comp if c not in drop), delta


def residual_profile(traj: Trajectory) -> np.ndarray:
    """``e_k = mean_items rel-L1(R_k, R_{k-1})`` of the conditional image residual (``e_0 = 0``)."""
    r = traj.r_img["cond"]
    out = np.zeros(r.shape[0])
    for k in range(1, r.shape[0]):
        out[k] = float(rel_l1(r[k], r[k - 1]).double().mean())
    return out


# ------------------------------------------------------------------------------ rectification
def fit_affine(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per last-dim channel least squares ``dst ~ a * src + b`` over every other dimension: ``(a, b)`` (D,) each."""
    if src.shape != dst.shape:
        raise ConfigError(f"rectification needs equal shapes; got {tuple(src.shape)} and {tuple(dst.shape)}")
    s = src.double().reshape(-1, src.shape[-1])
    d = dst.double().reshape(-1, dst.shape[-1])
    ms, md = s.mean(0), d.mean(0)
    var = (s - ms).pow(2).mean(0)
    cov = ((s - ms) * (d - md)).mean(0)
    tiny = var <= 1e-12 * var.max().clamp_min(1e-30)
    a = torch.where(tiny, torch.ones_like(var), cov / torch.where(tiny, torch.ones_like(var), var))
    b = md - a * ms
    return a.float(), b.float()


def rectify(r: torch.Tensor, coef: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    a, b = coef
    return r * a.to(r.device, r.dtype) + b.to(r.device, r.dtype)


def sources(compute: Sequence[int], steps: int) -> dict[int, int]:
    """Skipped step -> the computed step whose residual it reuses."""
    comp = set(compute)
    out, last = {}, 0
    for k in range(steps):
        if k in comp:
            last = k
        else:
            out[k] = last
    return out


class ERTAController(SignalController):
    """A static schedule whose skipped steps reuse the last residual rectified per step (module docstring)."""

    def __init__(self, mask: torch.Tensor, coef_img: dict[int, tuple], coef_txt: dict[int, tuple | None]) -> None:
        self.mask = mask.to(torch.bool)
        self.coef_img = coef_img
        self.coef_txt = coef_txt

    def decide_with(self, step: int, state: SamplerState, signals: StepSignals) -> torch.Tensor:
        b = state.x.shape[0]
        compute = self.mask[step].expand(b).clone()
        if not bool(self.mask[step]):
            ci, ct = self.coef_img[step], self.coef_txt.get(step)

            def estimate(hist: ResidualHistory, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
                img = rectify(hist.img[0], ci)
                txt = hist.txt[0] if hist.txt else None
                if txt is not None and ct is not None:
                    txt = rectify(txt, ct)
                return img, txt

            signals.set_estimator(estimate)
        return compute


# ------------------------------------------------------------------------------ the method
class ERTACache:
    """ERTACache as a compared method: profile once per calibration set, schedule + rectification per budget."""

    name = "ertacache"
    kind = "static"

    def __init__(self, *, rectify: bool = True, adjust_timesteps: bool = True,
                 phi_range: tuple[float, float] = (0.5, 1.5), batch: int = 64) -> None:
        if not 0 < phi_range[0] <= 1 <= phi_range[1]:
            raise ConfigError(f"phi_range must satisfy 0 < low <= 1 <= high (got {phi_range})")
        self.rectify = rectify
        self.adjust_timesteps = adjust_timesteps
        self.phi_range = (float(phi_range[0]), float(phi_range[1]))
        self.batch = batch
        self.policy: CachePolicy | None = None
        self.delta: float | None = None
        self.coef_img: dict[int, tuple] = {}
        self.coef_txt: dict[int, tuple | None] = {}
        self.phi: torch.Tensor | None = None
        self.profile: np.ndarray | None = None
        self.fit_s = 0.0
        self._traj: dict[tuple, Trajectory] = {}

    def trajectory(self, problem: Any, calib: Any) -> Trajectory:
        key = calib_key(problem, calib)
        if key not in self._traj:
            self._traj[key] = record_trajectory(problem, calib)
        return self._traj[key]

    def fit(self, problem: Any, calib: Any, nfe: int) -> None:
        check_budget(problem, nfe)
        t0 = time.perf_counter()
        n = problem.steps
        traj = self.trajectory(problem, calib)
        self.profile = residual_profile(traj)
        compute, self.delta = schedule_for_budget(self.profile, nfe)
        src = sources(compute, n)
        self.coef_img, self.coef_txt = {}, {}
        for t, j in src.items():
            if self.rectify:
                self.coef_img[t] = fit_affine(traj.r_img["cond"][j], traj.r_img["cond"][t])
                rt = traj.r_txt.get("cond")
                self.coef_txt[t] = None if rt is None else fit_affine(rt[j], rt[t])
            else:
                d = traj.r_img["cond"].shape[-1]
                self.coef_img[t] = (torch.ones(d), torch.zeros(d))
                self.coef_txt[t] = None
        self.phi = torch.ones(n)
        if self.adjust_timesteps and src:
            self.phi = self.fit_phi(problem, calib, traj, src)
        self.policy = CachePolicy(n, compute, meta={"method": "ertacache", "budget": nfe,
                                                    "delta": self.delta if np.isfinite(self.delta) else None,
                                                    "phi": [round(float(p), 6) for p in self.phi]})
        self.fit_s = time.perf_counter() - t0

    def fit_phi(self, problem: Any, calib: Any, traj: Trajectory, src: dict[int, int]) -> torch.Tensor:
        """``phi_t`` per skipped step from the rectified velocity on the full-step latent (module docstring)."""
        n = problem.steps
        phi = torch.ones(n)
        den = problem.denoiser()
        tr = problem.transformer
        g = float(problem.guidance)
        sig = problem.sigmas()
        handle = apply_cache(tr, MECHANISM)
        b = traj.items
        try:
            with torch.no_grad():
                for t, j in src.items():
                    snap = {}
                    for ctx, r in traj.r_img.items():
                        rt = traj.r_txt.get(ctx)
                        snap[ctx] = ResidualHistory(
                            img=(r[j].to(calib.noise.device),),
                            txt=(None if rt is None else rt[j].to(calib.noise.device),),
                            steps=(torch.full((b,), float(j), device=calib.noise.device),))
                    handle.restore(snap)
                    ci, ct = self.coef_img[t], self.coef_txt.get(t)

                    def estimate(hist: ResidualHistory, k: int, ci=ci, ct=ct) -> tuple:
                        txt = hist.txt[0] if hist.txt else None
                        return rectify(hist.img[0], ci), (rectify(txt, ct) if (txt is not None and ct is not None)
                                                          else txt)

                    handle.set_decision(t, torch.zeros(b, dtype=torch.bool), estimator=estimate)
                    x = traj.x[t].to(calib.noise.device, calib.noise.dtype)
                    sigma = sig[t].expand(b)
                    v = den(x, sigma, calib.cond, "cond")
                    if g != 1.0:
                        vu = den(x, sigma, calib.uncond, "uncond")
                        v = vu + g * (v - vu)
                    v_hat = v.double().cpu()
                    v_true = traj.v[t].double()
                    num, dd = float((v_hat * v_true).sum()), float((v_hat * v_hat).sum())
                    phi[t] = min(max(num / dd if dd > 0 else 1.0, self.phi_range[0]), self.phi_range[1])
        finally:
            handle.remove()
        return phi

    def controller(self) -> ERTAController:
        if self.policy is None:
            raise ConfigError("ERTACache has no schedule yet: call fit(problem, calib, nfe)")
        return ERTAController(self.policy.mask_tensor(), self.coef_img, self.coef_txt)

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        ctl = self.controller()
        solver = StepSolver(solver_of(problem), scale=self.phi)
        latent, computed = run_batches(lambda: problem.make_sampler(ctl, mechanism=MECHANISM, solver=solver),
                                       noise, cond, uncond, self.batch)
        return MethodRun(latent, computed.sum(0).double(), {"computed": computed, "compute": list(self.policy.compute),
                                                            "phi": self.phi.tolist()})
