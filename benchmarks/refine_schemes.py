"""Per-step estimator choice: ``sweep`` (the default) against ``steepest`` descent on the default search's masks.

For each budget K, takes the mask that ``budcache search`` found for budcache's own candidate (its checkpoint in
``--run``, e.g. the ``default-search`` section's ``runs/regenerate/default``), chooses the per-step estimators
with each scheme in this process (one torch thread, the search's 32 calibration pairs, seed 0), and reports the
calibration loss, the plans scored and the wall time, then the held-out quality of both plans on the search's
held-out draw (``--heldout`` pairs, disjoint from calibration) with paired wins of ``sweep`` on latent MSE.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/refine_schemes.py --run runs/regenerate/default
       [--nfe 6,8,10] [--heldout 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from budcache import CachePolicy
from budcache import estimators as est
from budcache.problems.data import calibration_pairs, split_pairs
from budcache.problems.metrics import item_metrics
from budcache.problems.settings import SamplerSettings
from budcache.problems.tinyflow import TinyflowProblem
from budcache.search.anneal import refine_estimators
from budcache.search.backends import make_backend
from budcache.search.evaluator import plan_names, plan_of
from budcache.search.job import DEFAULT_MECHANISM, DEFAULT_REFINE
from budcache.search.losses import get_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a default budcache search's --out (its checkpoints give the masks)")
    ap.add_argument("--nfe", default="6,8,10")
    ap.add_argument("--heldout", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    problem = TinyflowProblem(settings=SamplerSettings(mechanism=DEFAULT_MECHANISM))
    prompts, seeds = calibration_pairs(problem, None, 0)  # the search's calibration pairs (seed 0)
    calib = problem.calibration(prompts, seeds)
    calib.info["loss"] = "logmse"  # as the search records it (part of the digest its checkpoints hold)
    hp, hs = split_pairs(problem, "heldout", a.heldout, 0, prompts)
    held = problem.calibration(hp, hs)
    choices = [est.CODES[n] for n in DEFAULT_REFINE]
    print("| K | scheme | calibration loss | plans scored | wall (s) | held-out latent MSE | PSNR | median PSNR | "
          "SSIM | sweep wins / losses | plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in (int(v) for v in a.nfe.split(",")):
        ckpt = json.loads((Path(a.run) / f"checkpoint_N28_K{k}.json").read_text())
        if ckpt["digest"] != calib.digest:
            raise SystemExit(f"{a.run}: its K={k} search used other calibration pairs or settings than the default")
        state = ckpt["state"]
        start = plan_of(28, state["best"], DEFAULT_MECHANISM)
        rows = {}
        for scheme in ("steepest", "sweep"):
            ev = make_backend("inprocess", problem, calib, loss=get_loss("logmse"), workers=1, estimator=DEFAULT_MECHANISM,
                              mechanism=DEFAULT_MECHANISM)  # as the search scores plans: the same loss bits
            t0 = time.perf_counter()
            res = refine_estimators(ev.plan_losses, start, choices, scheme=scheme)
            wall = time.perf_counter() - t0
            pol = CachePolicy(28, state["best"], meta={"mechanism": DEFAULT_MECHANISM},
                              estimators=plan_names(res.plan))
            rows[scheme] = (res, wall, pol, item_metrics(problem, problem.final_latents(held, pol), held.teacher))
        ref = rows["sweep"][3]["latent_mse"]
        for scheme, (res, wall, pol, m) in rows.items():
            other = m["latent_mse"]
            wins = "" if scheme == "sweep" else f"{int((ref < other).sum())} / {int((ref > other).sum())}"
            print(f"| {k} | {scheme} | {res.loss:.4f} | {res.evaluations} | {wall:.1f} | "
                  f"{other.mean():.4e} | {m['psnr'].mean():.2f} | {np.median(m['psnr']):.2f} | "
                  f"{m['ssim'].mean():.4f} | {wins} | `{pol.estimator_strip()}` |", flush=True)


if __name__ == "__main__":
    main()
