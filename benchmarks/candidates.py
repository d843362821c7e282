"""How well the default search's candidates generalise: each candidate's policy, and budcache's mask alone, scored
on the calibration pairs, a validation split and the held-out pairs (mean log latent MSE, the search's loss).

Reads the policies a default search wrote (``policy_N28_K*_<mechanism>.json``, e.g. from ``python
benchmarks/regenerate.py --only default-search``) and draws the same pairs as that search (seed 0): its 32
calibration pairs, 32 pairs of the validation split and its held-out pairs, all disjoint.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/candidates.py [--run runs/regenerate/default]
       [--nfe 6,8,10,14] [--pairs 32]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch

from budcache import CachePolicy, tinyflow
from budcache.problems.data import calibration_pairs, split_pairs
from budcache.problems.tinyflow import TinyflowProblem
from budcache.search.losses import latent_log_mse


def mean_log_mse(problem: TinyflowProblem, calib, policy: CachePolicy) -> float:
    """The ``logmse`` search loss of ``policy`` on a set: the mean over its items of ``latent_log_mse``."""
    return float(latent_log_mse(problem.final_latents(calib, policy), calib.teacher).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/regenerate/default", help="directory of a default search's policies")
    ap.add_argument("--nfe", default="6,8,10,14")
    ap.add_argument("--pairs", type=int, default=32, help="validation and held-out pairs each")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    problem = TinyflowProblem(tinyflow.load(), 28)
    prompts, seeds = calibration_pairs(problem, None, 0)
    sets = {"calibration": problem.calibration(prompts, seeds),
            "validation": problem.calibration(*split_pairs(problem, "validation", a.pairs, 0, prompts)),
            "held-out": problem.calibration(*split_pairs(problem, "heldout", a.pairs, 0, prompts))}
    print(f"### Candidates on fresh pairs ({datetime.date.today().isoformat()}, {platform.machine()}, one thread, "
          f"torch {torch.__version__})\n")
    print(f"Policies of `{a.run}`; mean log latent MSE against the 28-step output (lower is better) on the "
          f"{len(prompts)} calibration pairs, {a.pairs} validation pairs and {a.pairs} held-out pairs. "
          "`mask alone`: budcache's searched mask with vtaylor1 at every skipped step (before the per-step "
          "estimator choice).\n")
    print("| K | set | budcache (kept by calibration loss) | TaylorSeer's searched schedule | budcache's mask alone |")
    print("|---|---|---|---|---|")
    for k in (int(x) for x in a.nfe.split(",")):
        own = CachePolicy.load(f"{a.run}/policy_N28_K{k}_vtaylor1.json")
        peer = CachePolicy.load(f"{a.run}/policy_N28_K{k}_taylorseer.json")
        alone = CachePolicy(28, own.compute, meta={**own.meta, "mechanism": "vtaylor1"})
        for name, s in sets.items():
            v = [mean_log_mse(problem, s, p) for p in (own, peer, alone)]
            best = int(np.argmin(v[:2]))
            cells = [f"**{x:.3f}**" if i == best else f"{x:.3f}" for i, x in enumerate(v[:2])]
            print(f"| {k} | {name} | {cells[0]} | {cells[1]} | {v[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
