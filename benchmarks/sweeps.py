"""How many sweeps the per-step estimator choice needs: each sweep's plan scored on fresh pairs.

For each budget, the default search's two searched masks (budcache's own, ``policy_N28_K*_vtaylor1.json``, and
TaylorSeer's searched schedule, ``policy_N28_K*_taylorseer.json``) start with vtaylor1 at every skipped step; the
sweep refinement then runs up to ``--rounds`` sweeps on the search's 32 calibration pairs (``logmse``, one thread
in one process; the teachers are built once per process). The plan after each sweep is scored on the validation
and held-out pairs (mean log latent MSE, lower is better; all three sets disjoint). A sweep without a move ends
the run early.

The default search takes 2 sweeps on budcache's mask and 1 (``budcache.search.job.PEER_MASK_SWEEPS``) on
TaylorSeer's schedule; this table is the measurement behind those numbers.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/sweeps.py [--run runs/regenerate/default]
       [--nfe 6,8,10,14] [--pairs 128] [--rounds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from budcache import CachePolicy
from budcache import estimators as est
from budcache.problems.data import calibration_pairs, split_pairs
from budcache.problems.settings import SamplerSettings
from budcache.problems.tinyflow import TinyflowProblem
from budcache.search.anneal import refine_estimators
from budcache.search.distributed import make_evaluator
from budcache.search.evaluator import plan_names, plan_of
from budcache.search.job import DEFAULT_MECHANISM, DEFAULT_REFINE
from budcache.search.losses import get_loss
from candidates import mean_log_mse  # this folder's candidates.py: the search's loss of a policy on a set

MASKS = {"vtaylor1": "budcache's own mask", "taylorseer": "TaylorSeer's searched schedule"}
#: The search's candidate that chose estimators on each mask.
CANDIDATE = {"vtaylor1": "vtaylor1", "taylorseer": "vtaylor1@taylorseer"}


_SETS: dict[str, Any] = {}


def setup(pairs: int) -> None:
    """Each worker process: one thread, the problem, the search's 32 calibration pairs and the fresh pairs."""
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    problem = TinyflowProblem(settings=SamplerSettings(mechanism=DEFAULT_MECHANISM))
    prompts, seeds = calibration_pairs(problem, None, 0)  # the search's calibration pairs (seed 0)
    calib = problem.calibration(prompts, seeds)
    calib.info["loss"] = "logmse"  # as the search records it (part of the digest its policies hold)
    _SETS.update(problem=problem, calib=calib, fresh={
        s: problem.calibration(*split_pairs(problem, s, pairs, 0, prompts)) for s in ("validation", "heldout")})


def one(run: str, k: int, source: str, rounds: int) -> list[dict[str, Any]]:
    """Budget ``k``, mask of candidate ``source``: one row per sweep (0: before the first)."""
    problem, calib, fresh = _SETS["problem"], _SETS["calib"], _SETS["fresh"]
    searched = CachePolicy.load(f"{run}/policy_N28_K{k}_{CANDIDATE[source]}.json")
    if searched.meta.get("calibration_digest") != calib.digest:
        raise SystemExit(f"{run}: its K={k} search used other calibration pairs or settings than the default")
    compute = searched.compute
    ev = make_evaluator("inprocess", problem, calib, loss=get_loss("logmse"), naive=False,
                        estimator=DEFAULT_MECHANISM)
    t0 = time.perf_counter()
    res = refine_estimators(ev.plan_losses, plan_of(28, compute, DEFAULT_MECHANISM),
                            [est.CODES[n] for n in DEFAULT_REFINE], rounds=rounds)
    wall = time.perf_counter() - t0
    rows = []
    for h in res.history:
        names = plan_names(tuple(h["plan"]))
        pol = CachePolicy(28, compute, estimators=names, meta={"mechanism": DEFAULT_MECHANISM})
        row = {"k": k, "source": source, "round": h["round"], "calibration": h["loss"],
               "plans": res.evaluations, "wall": wall, "policy": tuple(names) == tuple(searched.estimators or ())}
        for name, s in fresh.items():
            row[name] = mean_log_mse(problem, s, pol)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/regenerate/default", help="directory of a default search's policies")
    ap.add_argument("--nfe", default="6,8,10,14")
    ap.add_argument("--pairs", type=int, default=128, help="validation and held-out pairs each")
    ap.add_argument("--rounds", type=int, default=3, help="the most sweeps")
    ap.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    a = ap.parse_args()
    tasks = [(a.run, int(k), src, a.rounds) for k in a.nfe.split(",") for src in MASKS]
    with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn"), initializer=setup,
                             initargs=(a.pairs,)) as pool:
        results = list(pool.map(one, *zip(*tasks)))
    print(f"### Sweeps of the estimator choice ({datetime.date.today().isoformat()}, {platform.machine()}, one "
          f"thread per job, torch {torch.__version__})\n")
    print(f"Command: `python benchmarks/sweeps.py --run {a.run} --nfe {a.nfe} --pairs {a.pairs} --rounds "
          f"{a.rounds}`. Mean log latent MSE after each sweep on the 32 calibration pairs, {a.pairs} validation "
          f"and {a.pairs} held-out pairs (sweep 0: vtaylor1 at every skipped step); `plans` and `wall`: the whole "
          "run (the last sweep made no move when the run stopped before the limit); `policy`: the plan the "
          "search wrote for that candidate (2 sweeps on budcache's mask, 1 on TaylorSeer's). The search scores "
          "budcache's own mask on two worker processes of 16 pairs each and this script in one process, so a "
          "near-tie may round the other way there.\n")
    print("| K | mask | sweep | calibration | validation | held-out | plans | wall (s) | policy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in results:
        for r in rows:
            print(f"| {r['k']} | {MASKS[r['source']]} | {r['round']} | {r['calibration']:.3f} | "
                  f"{r['validation']:.3f} | {r['heldout']:.3f} | {r['plans']} | {r['wall']:.0f} | "
                  f"{'yes' if r['policy'] else ''} |")


if __name__ == "__main__":
    main()
