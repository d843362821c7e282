"""On TaylorSeer's searched schedule, which estimator should fill the skipped steps, and where should the per-step
choice start? Each variant scored on fresh pairs with the compare's metrics.

TaylorSeer's lite mode forecasts the model output linearly in the step index, which is budcache's ``vforecast1``
(the two give the same output on a schedule: ``tests/test_sampler.py``); budcache's default forecasts it linearly
in sigma (``vtaylor1``). The default search's third candidate (``vtaylor1@taylorseer``) chooses an estimator per
skipped step on TaylorSeer's searched schedule, starting from ``vtaylor1`` everywhere. Starting from TaylorSeer's own
estimator instead (``vforecast1`` everywhere, then the same single sweep over ``vforecast1, vtaylor1, vtaylor2,
output``) makes that candidate's calibration loss never worse than TaylorSeer's. This script measures whether that
start gives better images.

Reads TaylorSeer's searched schedules and the search's candidate from a default search's folder (e.g. ``python
benchmarks/regenerate.py --only default-search``), draws its 32 calibration pairs (seed 0) and scores on its
held-out split (``--pairs``, seed 0) and on ``--wide`` more pairs (seed 1's held-out split), all disjoint.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/peer_estimator.py [--run runs/regenerate/default]
       [--nfe 6,8,10,14] [--pairs 128] [--wide 512]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np
import torch

from budcache import CachePolicy
from budcache import estimators as est
from budcache.problems.data import CalibrationSet, calibration_pairs, split_pairs
from budcache.problems.metrics import item_metrics
from budcache.problems.settings import SamplerSettings
from budcache.problems.tinyflow import TinyflowProblem
from budcache.search.anneal import refine_estimators
from budcache.search.distributed import make_evaluator
from budcache.search.evaluator import plan_names, plan_of
from budcache.search.job import DEFAULT_REFINE, PEER_MASK_SWEEPS
from budcache.search.losses import get_loss

#: TaylorSeer lite's own estimator, as budcache names it.
PEER_OWN = "vforecast1"


def start_from_peer(problem: TinyflowProblem, calib: CalibrationSet, compute: tuple[int, ...]) -> tuple[CachePolicy, float, int]:
    """The search's per-step choice on ``compute``, started from :data:`PEER_OWN` at every skipped step:
    ``(policy, calibration loss, plans scored)``."""
    p = problem.with_settings(mechanism=PEER_OWN)
    ev = make_evaluator("inprocess", p, calib, loss=get_loss("logmse"), naive=False, estimator=PEER_OWN)
    res = refine_estimators(ev.plan_losses, plan_of(problem.steps, compute, PEER_OWN),
                            [est.CODES[n] for n in dict.fromkeys([PEER_OWN, *DEFAULT_REFINE])],
                            rounds=PEER_MASK_SWEEPS)
    pol = CachePolicy(problem.steps, compute, estimators=plan_names(res.plan), meta={"mechanism": PEER_OWN})
    return pol, res.loss, res.evaluations


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/regenerate/default", help="directory of a default search's policies")
    ap.add_argument("--nfe", default="6,8,10,14")
    ap.add_argument("--pairs", type=int, default=128, help="held-out pairs (the search's split, seed 0)")
    ap.add_argument("--wide", type=int, default=512, help="more pairs (seed 1's held-out split)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ks = [int(x) for x in a.nfe.split(",")]
    problem = TinyflowProblem(settings=SamplerSettings(mechanism="vtaylor1"))
    prompts, seeds = calibration_pairs(problem, None, 0)
    calib = problem.calibration(prompts, seeds)
    calib.info["loss"] = "logmse"
    rows: dict[int, dict[str, tuple[CachePolicy, str]]] = {}
    losses: dict[int, dict[str, float]] = {}
    for k in ks:
        ts = CachePolicy.load(f"{a.run}/policy_N28_K{k}_taylorseer.json")
        hybrid = CachePolicy.load(f"{a.run}/policy_N28_K{k}_vtaylor1@taylorseer.json")
        if ts.meta.get("calibration_digest") != calib.digest:
            raise SystemExit(f"{a.run}: its K={k} search used other calibration pairs or settings than the default")
        started, loss, plans = start_from_peer(problem, calib, ts.compute)
        skipped = problem.steps - k
        rows[k] = {
            "TaylorSeer (its own hooks)": (ts, "taylorseer"),
            f"`{PEER_OWN}` everywhere": (CachePolicy(28, ts.compute, estimators=[PEER_OWN] * skipped), PEER_OWN),
            "`vtaylor1` everywhere": (CachePolicy(28, ts.compute, estimators=["vtaylor1"] * skipped), "vtaylor1"),
            "choice from `vtaylor1` (the search's)": (hybrid, "vtaylor1"),
            f"choice from `{PEER_OWN}`": (started, PEER_OWN)}
        losses[k] = {"choice from `vtaylor1` (the search's)": float(hybrid.meta["search_loss"]),
                     f"choice from `{PEER_OWN}`": loss, "TaylorSeer (its own hooks)": float(ts.meta["search_loss"])}
        print(f"K={k}: {plans} plans from {PEER_OWN}, loss {loss:.4f}", flush=True)
    sets = {f"{a.pairs} held-out pairs": problem.calibration(*split_pairs(problem, "heldout", a.pairs, 0, prompts))}
    if a.wide:
        sets[f"{a.wide} more pairs"] = problem.calibration(*split_pairs(problem, "heldout", a.wide, 1, prompts))
    print(f"### TaylorSeer's schedule, other estimators ({datetime.date.today().isoformat()}, "
          f"{platform.machine()}, one thread, torch {torch.__version__})\n")
    print(f"Command: `python benchmarks/peer_estimator.py --run {a.run} --nfe {a.nfe} --pairs {a.pairs} --wide "
          f"{a.wide}`. Every row runs TaylorSeer's searched schedule of `{a.run}`; only the estimator of the skipped "
          f"steps differs. `choice from vtaylor1`: the policy the search wrote for this candidate (one sweep of the "
          f"per-step choice among {', '.join(DEFAULT_REFINE)}, started from vtaylor1 at every skipped step); "
          f"`choice from {PEER_OWN}`: one sweep among {PEER_OWN}, {', '.join(DEFAULT_REFINE)}, started from "
          f"{PEER_OWN} at every skipped step. Calibration: the mean "
          "log latent MSE on the 32 calibration pairs (lower is better). Wins: pairs where the row's latent MSE is "
          "lower than the search's candidate's (`choice from vtaylor1`).\n")
    print("| K | pairs | estimator | calibration | latent MSE | PSNR (dB) | median PSNR | SSIM | wins |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        for label, s in sets.items():
            q = {}
            for name, (pol, mech) in rows[k].items():
                pp = problem.with_settings(mechanism=mech)
                q[name] = item_metrics(pp, pp.final_latents(s, pol), s.teacher)
            ref = q["choice from `vtaylor1` (the search's)"]["latent_mse"]
            for name, m in q.items():
                cal = f"{losses[k][name]:.3f}" if name in losses[k] else ""
                wins = "" if name.endswith("(the search's)") else f"{int((m['latent_mse'] < ref).sum())}/{len(ref)}"
                print(f"| {k} | {label} | {name} | {cal} | {m['latent_mse'].mean():.3e} | {m['psnr'].mean():.2f} | "
                      f"{np.median(m['psnr']):.2f} | {m['ssim'].mean():.4f} | {wins} |", flush=True)
    print(f"\nTotal {(time.perf_counter() - t0) / 60:.1f} min.")


if __name__ == "__main__":
    main()
