"""Estimators on fixed masks: mean / median PSNR of every estimator on the uniform mask and TaylorSeer's grid masks.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/estimators.py [--pairs 16] [--nfe 6,10]
       [--estimators forecast1,taylor1,taylor2,output,vtaylor1,vtaylor2]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from budcache import CachePolicy, tinyflow
from budcache.peers import taylorseer_grid_mask
from budcache.problems.data import pairs_for
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--nfe", default="6,10")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--estimators", default="forecast1,taylor1,taylor2,output,vtaylor1,vtaylor2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    n = a.steps
    pb = TinyflowProblem(tinyflow.load(), steps=n)
    prompts, seeds = pairs_for(tinyflow_prompts(a.pairs, seed=99), 1, 99)
    calib = pb.calibration(prompts, seeds)
    names = a.estimators.split(",")
    print("| K | mask | " + " | ".join(f"{e} mean / median PSNR" for e in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for k in (int(v) for v in a.nfe.split(",")):
        masks = {"uniform": CachePolicy.uniform(n, k).compute}
        for before in range(1, k + 1):
            for interval in range(1, n + 1):
                m = taylorseer_grid_mask(n, before, interval)
                if sum(m) == k:
                    masks[f"grid {before}/{interval}"] = tuple(i for i, c in enumerate(m) if c)
                    break
        for label, comp in masks.items():
            cells = []
            for e in names:
                q = item_metrics(pb, pb.final_latents(calib, CachePolicy(n, comp).with_estimators(e)), calib.teacher)
                cells.append(f"{q['psnr'].mean():.1f} / {float(np.median(q['psnr'])):.1f}")
            print(f"| {k} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
