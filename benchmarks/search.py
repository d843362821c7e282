"""Search benchmark on tinyflow.

1. Evaluator cost: the default seeded search at N=28, K=10 run twice, once with
   prefix sharing + batching and once with the naive one-by-one evaluator:
   item-level block-stack evaluations, wall time and final loss of both.
2. Held-out quality at K = 7, 10, 14 of 28: the searched policy against the
   uniform policy, the median of 20 random masks and the plain K-step sampler,
   on held-out prompt x seed pairs disjoint from calibration, with paired win
   counts.

Usage: python benchmarks/search.py [--calib 32] [--heldout 64] [--sa-iters 200] [--skip-naive]
Prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
import torch

from budcache import CachePolicy, tinyflow
from budcache.problems.data import pairs_for
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.search import Evaluator, SearchConfig, search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--sa-iters", type=int, default=200)
    ap.add_argument("--hc-rounds", type=int, default=20)
    ap.add_argument("--budgets", default="7,10,14")
    ap.add_argument("--random-masks", type=int, default=20)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    problem = TinyflowProblem(tinyflow.load(), steps=28)
    prompts, seeds = pairs_for(tinyflow_prompts(a.calib, seed=0), 1, 0)
    calib = problem.calibration(prompts, seeds)
    hp, hs = pairs_for(tinyflow_prompts(a.heldout, seed=7_777_777), 1, 7_777_777)
    held = problem.calibration(hp, hs)
    res: dict = {"date": datetime.date.today().isoformat(),
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}

    # 1. evaluator cost, same seeded search
    cfg = SearchConfig(28, 10, sa_iters=a.sa_iters, hc_rounds=a.hc_rounds, seed=0)
    runs = {}
    for name, kw in (("shared", {}), ("naive", {"prefix_sharing": False, "batch_candidates": False})):
        if name == "naive" and a.skip_naive:
            continue
        ev = Evaluator(problem.make_sampler, calib, **kw)
        t0 = time.perf_counter()
        r = search(ev.losses, cfg)
        runs[name] = {"wall_s": time.perf_counter() - t0, "loss": r.loss, "compute": list(r.compute),
                      "masks": ev.stats.evaluations, "item_evaluations": ev.stats.item_evaluations,
                      "stack_calls": ev.stats.stack_calls}
    res["evaluator"] = runs

    # 2. held-out quality per budget
    res["heldout"] = {}
    rng = np.random.default_rng(0)
    ev = Evaluator(problem.make_sampler, calib)
    prev = None
    for k in [int(v) for v in a.budgets.split(",")]:
        r = search(ev.losses, SearchConfig(28, k, sa_iters=a.sa_iters, hc_rounds=a.hc_rounds, seed=0), init=prev)
        prev = r.compute
        pol = CachePolicy(28, r.compute)
        q = {"budcache": item_metrics(problem, problem.final_latents(held, pol), held.teacher),
             "uniform": item_metrics(problem, problem.final_latents(held, CachePolicy.uniform(28, k)), held.teacher),
             "plain": item_metrics(problem, problem.final_latents(held, None, plain_steps=k), held.teacher)}
        rand = []
        for _ in range(a.random_masks):
            rest = rng.choice(np.arange(1, 28), size=k - 1, replace=False)
            rand.append(item_metrics(problem, problem.final_latents(held, CachePolicy.from_steps(28, [0, *rest.tolist()])),
                                held.teacher))
        order = np.argsort([m["latent_mse"].mean() for m in rand])
        q["random median"] = rand[order[len(order) // 2]]
        row = {}
        for name, m in q.items():
            row[name] = {"latent_mse": float(m["latent_mse"].mean()), "psnr": float(m["psnr"].mean()),
                         "wins": int((q["budcache"]["latent_mse"] < m["latent_mse"]).sum())}
        row["mask"] = pol.strip()
        res["heldout"][k] = row

    print(f"### Search ({res['date']}, {res['machine']})\n")
    print(f"Command: `python benchmarks/search.py --calib {a.calib} --heldout {a.heldout} --sa-iters {a.sa_iters}`\n")
    if runs:
        print("| evaluator (N=28, K=10, seed 0) | masks scored | item block-stack evaluations | batched stack calls "
              "| wall (s) | final loss |\n|---|---|---|---|---|---|")
        for name, r in runs.items():
            print(f"| {name} | {r['masks']} | {r['item_evaluations']} | {r['stack_calls']} | {r['wall_s']:.1f} | "
                  f"{r['loss']:.6e} |")
        if "naive" in runs:
            print(f"\nItem evaluations, shared / naive: "
                  f"**{runs['shared']['item_evaluations'] / runs['naive']['item_evaluations']:.3f}x**; "
                  f"wall time ratio {runs['shared']['wall_s'] / runs['naive']['wall_s']:.3f}x\n")
    print(f"Held-out ({a.heldout} pairs, disjoint from the {a.calib} calibration pairs), mean over pairs; "
          "wins = pairs where budcache's latent MSE is lower:\n")
    print("| K | method | latent MSE | PSNR (dB) | budcache wins |\n|---|---|---|---|---|")
    for k, row in res["heldout"].items():
        for name in ("budcache", "uniform", "random median", "plain"):
            r = row[name]
            w = "" if name == "budcache" else f"{r['wins']}/{a.heldout}"
            label = f"{name} `{row['mask']}`" if name == "budcache" else name
            print(f"| {k} | {label} | {r['latent_mse']:.4e} | {r['psnr']:.2f} | {w} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2, default=float)


if __name__ == "__main__":
    main()
