"""Estimators: how a skipped step is filled from the steps that computed. Each is defined once here.

A skipped step ``k`` gets an estimate of a quantity ``y`` from the values
``y_0, y_1, y_2`` (newest first) stored at the last computed steps, at times
``t_0 > ...`` in the estimator's time variable:

- **order 0** (reuse): ``y_hat = y_0``;
- **order 1**: ``y_hat = y_0 + d_1 (t - t_0)``, ``d_1 = (y_0 - y_1) / (t_0 - t_1)``;
- **order 2** (Newton): ``y_hat = y_0 + d_1 (t - t_0) + d_2 (t - t_0)(t - t_1)``,
  ``d_2 = (d_1 - (y_1 - y_2) / (t_1 - t_2)) / (t_0 - t_2)``.

An element with fewer stored values falls back to the order it has. The
estimate is exact for a trajectory that is a polynomial of degree ``<= order``
in the time variable, however unevenly the computed steps are spaced.

Two quantities and two time variables:

- ``residual``: the block stack's residual ``R = stack(h) - h`` (image and text
  streams), added to the skipped step's own stack input (hooks on the
  transformer). Because the Newton estimate is linear in the stored values,
  forecasting every block's residual and summing gives the same estimate as
  forecasting the stack's residual, so the whole stack is the one residual
  granularity stored.
- ``velocity``: the model output itself (after guidance), as TaylorSeer's lite
  mode forecasts its output projection; needs no hooks, so it also serves
  plain callables ``v(x, sigma, cond)``.
- time ``step`` (the step index ``k``; version-1 policies' ``forecast1``/``forecast2``)
  or ``sigma`` (the noise level ``sigma_k``, the solver's own time variable).

The same functions serve inference (hooks, sampler), the search, and the
differentiable alignment path (they are plain tensor arithmetic, so gradients
flow through the stored values and the sigmas).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .specs import CODES, COMPUTE, ESTIMATORS, NAMES, EstimatorSpec, get, residual_names, velocity_names

__all__ = ["CODES", "COMPUTE", "ESTIMATORS", "NAMES", "EstimatorSpec", "History", "get", "mixed", "newton",
           "residual_names", "velocity", "velocity_names"]


@dataclass(frozen=True)
class History:
    """Per-element values at the last computed steps, newest first (immutable).

    ``img[i]``/``txt[i]`` are (B, ...) tensors (``txt`` entries may be ``None``:
    a single stream); ``steps[i]`` (B,) is the step each element stored it at
    (-1 when the element has fewer entries). Residual caches keep the stack
    residual of both streams; the sampler keeps velocities in ``img``.
    """

    img: tuple[torch.Tensor, ...] = ()
    txt: tuple[torch.Tensor | None, ...] = ()
    steps: tuple[torch.Tensor, ...] = ()

    def push(self, idx: torch.Tensor | None, img: torch.Tensor, txt: torch.Tensor | None,
             step: int | torch.Tensor, batch: int, depth: int) -> History:
        """New history where elements ``idx`` (``None``: all, in order) gain the values of ``step``.

        ``img``/``txt`` hold the new values of those elements only; older
        entries move one level down and the oldest beyond ``depth`` is dropped.
        ``step`` may be a 0-d tensor (compiled hooks: no host read, no graph specialised on it).
        """
        full = idx is None
        if torch.is_tensor(step):
            steps_new = step.to(img.device, torch.get_default_dtype()).reshape(1).expand(img.shape[0]).clone()
        else:
            steps_new = torch.full((img.shape[0],), float(step), device=img.device)

        def shifted(old: tuple[torch.Tensor | None, ...], new: torch.Tensor | None, fill: float) -> tuple:
            if new is None:
                return (None,) * depth

            def level(i: int) -> torch.Tensor:
                if i < len(old) and old[i] is not None:
                    return old[i]
                return torch.full((batch, *new.shape[1:]), fill, dtype=new.dtype, device=new.device)

            if full:
                return (new, *(level(i - 1) for i in range(1, depth)))
            out = [level(0).index_copy(0, idx, new)]
            for i in range(1, depth):
                out.append(level(i).index_copy(0, idx, level(i - 1).index_select(0, idx)))
            return tuple(out)

        return History(img=shifted(self.img, img, 0.0), txt=shifted(self.txt, txt, 0.0),
                       steps=shifted(self.steps, steps_new, -1.0))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> History:
        """Apply ``fn`` to every stored tensor (e.g. select or tile batch elements)."""
        return History(tuple(fn(t) for t in self.img),
                       tuple(fn(t) if t is not None else None for t in self.txt),
                       tuple(fn(t) for t in self.steps))

    def estimate(self, step: int | torch.Tensor, order: int, sigmas: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both streams at ``step``: Newton extrapolation of ``order`` (module docstring).

        ``sigmas`` (N+1,) makes ``sigma`` the time variable; ``None`` uses the step index.
        """
        if not self.img:
            raise ConfigError("no computed step is cached yet: the first step of a generation must compute")
        txt = newton(self.txt, self.steps, step, order, sigmas) if self.txt and self.txt[0] is not None else None
        return newton(self.img, self.steps, step, order, sigmas), txt


def newton(values: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], k: int | torch.Tensor, order: int,
           sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Newton extrapolation to step ``k`` of per-element ``values`` stored at ``steps`` (newest first).

    The time of step ``j`` is ``j`` itself, or ``sigmas[j]`` when ``sigmas`` is
    given. ``k`` may be a 0-d tensor (compiled hooks). Elements whose older
    entries are missing (step -1) use the order they have.
    """
    out = values[0]
    if order < 1 or len(values) < 2:
        return out
    view = (-1,) + (1,) * (values[0].dim() - 1)
    dtype = values[0].dtype

    def time(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = steps[i].view(view)
        if sigmas is None:
            return s.to(dtype), s >= 0
        return sigmas.to(values[0].device)[s.clamp_min(0).long()].to(dtype), s >= 0

    if sigmas is None:
        t = k
    else:
        sig = sigmas.to(values[0].device)
        # a 0-d tensor step is gathered, not used as a Python index (which reads it back: a graph break)
        t = (sig.index_select(0, k.long().reshape(1)).reshape(()) if torch.is_tensor(k) else sig[k]).to(dtype)
    s0, _ = time(0)
    s1, have1 = time(1)
    d1 = (values[0] - values[1]) / torch.where(have1, s0 - s1, torch.ones_like(s0))
    first = out + d1 * (t - s0)
    out = torch.where(have1, first, out)
    if order < 2 or len(values) < 3:
        return out
    s2, have2 = time(2)
    d1b = (values[1] - values[2]) / torch.where(have2, s1 - s2, torch.ones_like(s1))
    d2 = (d1 - d1b) / torch.where(have2, s0 - s2, torch.ones_like(s0))
    return torch.where(have2, first + d2 * (t - s0) * (t - s1), out)


def mixed(history: History, step: int, codes: torch.Tensor, sigmas: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-element estimates: element ``b`` uses the estimator of code ``codes[b]``.

    Codes of velocity estimators (or ``COMPUTE``) give order 0 (their value is
    not used by the caller). Each distinct estimator is evaluated once on the
    whole batch, then the rows are picked.
    """
    present = sorted(set(int(c) for c in codes.tolist()))
    out_img: torch.Tensor | None = None
    out_txt: torch.Tensor | None = None
    for code in present:
        spec = ESTIMATORS[NAMES[code]] if code in NAMES else ESTIMATORS["reuse"]
        if spec.target != "residual":
            spec = ESTIMATORS["reuse"]
        img, txt = history.estimate(step, spec.order, sigmas if spec.time == "sigma" else None)
        if out_img is None:
            out_img, out_txt = img, txt
            continue
        sel = (codes == code).to(img.device).view((-1,) + (1,) * (img.dim() - 1))
        out_img = torch.where(sel, img, out_img)
        if txt is not None and out_txt is not None:
            out_txt = torch.where(sel.view((-1,) + (1,) * (txt.dim() - 1)), txt, out_txt)
    assert out_img is not None
    return out_img, out_txt


def velocity(history: History, step: int, codes: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-element velocity estimates (codes of residual estimators get order 0; unused by the caller)."""
    present = sorted(set(int(c) for c in codes.tolist()))
    out: torch.Tensor | None = None
    for code in present:
        spec = ESTIMATORS.get(NAMES.get(code, ""), ESTIMATORS["output"])
        if spec.target != "velocity":
            spec = ESTIMATORS["output"]
        v = newton(history.img, history.steps, step, spec.order, sigmas if spec.time == "sigma" else None)
        if out is None:
            out = v
            continue
        sel = (codes == code).to(v.device).view((-1,) + (1,) * (v.dim() - 1))
        out = torch.where(sel, v, out)
    assert out is not None
    return out
