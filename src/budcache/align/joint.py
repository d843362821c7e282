"""Joint optimisation of the mask and the schedule: alternate search and alignment.

Round 0 is search-then-align: search the mask ``m_0`` under the base schedule,
then align the sigmas ``sigma_0`` to it. Round ``r >= 1`` searches the mask
under the current sigmas (the evaluator's sampler runs on ``sigma_{r-1}``, the
teacher stays the full-step output; the search starts from ``m_{r-1}``), then
aligns the sigmas to the new mask, starting from ``sigma_{r-1}``. It stops when
the held-out loss no longer improves by a relative ``tol``, when the search
returns the mask it started from (a fixed point: another alignment would only
be more training of the same mask), or after ``max_rounds``; the result is the
round with the best held-out loss.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..policy import CachePolicy
from ..problems.data import CalibrationSet
from ..search.anneal import SearchConfig, search
from ..search.evaluator import Evaluator
from ..search.losses import get_loss
from .trainer import AlignConfig, align, policy_loss


@dataclass
class JointRound:
    """One search + alignment round."""

    round: int
    compute: tuple[int, ...]
    search_loss: float             # calibration loss of the mask under the round's starting sigmas
    aligned_loss: float            # held-out loss after aligning
    policy: CachePolicy
    search_evaluations: int = 0
    wall_s: float = 0.0


@dataclass
class JointResult:
    """Every round, the best one (by held-out loss) and why the alternation stopped."""

    rounds: list[JointRound] = field(default_factory=list)
    best: int = 0
    stopped: str = ""

    @property
    def policy(self) -> CachePolicy:
        return self.rounds[self.best].policy

    @property
    def search_then_align(self) -> JointRound:
        """Round 0: the mask searched on the base schedule, then aligned."""
        return self.rounds[0]


def _digest(calib: CalibrationSet, sigmas: torch.Tensor | None) -> str:
    """Calibration digest extended by the schedule the search runs on."""
    h = hashlib.sha256(calib.digest.encode())
    if sigmas is not None:
        h.update(json.dumps([float(v) for v in sigmas.detach().cpu().double().tolist()]).encode())
    return h.hexdigest()[:16]


def joint(problem: Any, calib: CalibrationSet, heldout: CalibrationSet, search_cfg: SearchConfig,
          align_cfg: AlignConfig = AlignConfig(), *, max_rounds: int = 4, tol: float = 1e-3,
          later_sa_iters: int | None = None, init: Sequence[int] | None = None, out: str | Path | None = None,
          resume: bool = False, progress: bool = False, first: JointRound | None = None, select: bool = False,
          on_round: Callable[[JointRound], None] | None = None) -> JointResult:
    """Alternate mask search and schedule alignment at ``search_cfg.nfe`` of ``search_cfg.steps`` steps.

    ``heldout`` decides when to stop (and which round is returned); keep it
    disjoint from the set the result is finally judged on. ``later_sa_iters``
    sets the annealing length of rounds >= 1 (they start from the last mask;
    ``0`` means hill climbing only). ``out`` keeps each round's search and
    alignment checkpoints, so ``resume`` continues a killed run.
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ConfigError(f"max_rounds must be an int >= 1 (got {max_rounds!r})")
    if not tol >= 0:
        raise ConfigError(f"tol must be >= 0 (got {tol!r})")
    if heldout.teacher is None or calib.teacher is None:
        raise ConfigError("calibration and held-out sets need teacher outputs (problem.calibration)")
    loss_fn = get_loss(align_cfg.loss)
    outdir = Path(out) if out is not None else None
    steps, k = search_cfg.steps, search_cfg.nfe
    res = JointResult()
    sigmas: torch.Tensor | None = None
    prev = tuple(init) if init is not None else None
    best_loss = float("inf")
    for r in range(max_rounds):
        t0 = time.perf_counter()
        if r == 0 and first is not None:
            if first.policy.sigmas is None or first.policy.nfe != k or first.policy.steps != steps:
                raise ConfigError(f"round 0 must be an aligned policy of {k} of {steps} steps")
            res.rounds.append(first)
            best_loss, res.best = first.aligned_loss, 0
            ref = problem.sigmas(steps)
            sigmas = torch.tensor(first.policy.sigmas, dtype=ref.dtype, device=ref.device)
            prev = tuple(first.compute)
            continue
        cur = sigmas

        def make_sampler(controller: Any, _s: torch.Tensor | None = cur) -> Any:
            return problem.make_sampler(controller, steps, sigmas=_s)

        cfg = search_cfg if (r == 0 or later_sa_iters is None) else replace(search_cfg, sa_iters=later_sa_iters)
        with torch.no_grad():
            ev = Evaluator(make_sampler, calib, loss=loss_fn)
            found = search(ev.losses, cfg, init=prev,
                           checkpoint=outdir / f"joint_K{k}_round{r}_search.json" if outdir else None,
                           resume=resume, digest=_digest(calib, cur), progress=progress)
        if r > 0 and found.compute == prev:
            res.stopped = f"round {r}: the search under the aligned sigmas kept the mask (fixed point)"
            break
        base = CachePolicy(steps, found.compute, meta={"budget": k, "search_loss": found.loss, "joint_round": r})
        al = align(problem, calib, base, align_cfg, init_sigmas=cur,
                   checkpoint=outdir / f"joint_K{k}_round{r}_align.safetensors" if outdir else None,
                   resume=resume, progress=progress, validation=heldout if select else None)
        val = policy_loss(problem, heldout, al.policy, loss=align_cfg.loss)
        pol = al.policy.with_meta(joint={"round": r, "heldout_loss": val, "heldout_pairs": len(heldout)})
        rnd = JointRound(r, found.compute, found.loss, val, pol, ev.stats.evaluations, time.perf_counter() - t0)
        res.rounds.append(rnd)
        if on_round is not None:
            on_round(rnd)
        if val < best_loss * (1.0 - tol):
            best_loss, res.best = val, len(res.rounds) - 1
        else:
            res.stopped = f"round {r}: held-out loss {val:.4e} did not improve on {best_loss:.4e}"
            break
        sigmas, prev = al.sigmas, found.compute
    else:
        res.stopped = f"reached {max_rounds} rounds"
    return res
