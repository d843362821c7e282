"""Which candidate a rule would keep: the default search's three candidates compared pair by pair.

``budcache search --mechanism auto`` keeps one candidate per budget by its calibration losses (per-pair log latent
MSE on its 32 calibration pairs). The per-pair errors are heavy-tailed, so a mean can turn on a few pairs.
This script reads the policies of a default search (``policy_N28_K*_<candidate>.json``), scores each candidate
pair by pair on the search's calibration pairs and on fresh pairs (the validation split of the search's seed,
disjoint from calibration), and prints, for each budget:

- each candidate's mean loss and its paired wins and losses against every other candidate, on both sets;
- the candidate that each of three rules keeps on the calibration pairs: ``mean`` (``--keep mean``), ``1-SE``
  (the least-searched candidate whose mean is within one paired standard error of the lowest; TaylorSeer's
  schedule is searched least, then budcache's estimators on it, then budcache's own mask) and ``pairs`` (the
  candidate that beats each other one on more calibration pairs than it loses; the mean rule where none does: the
  search's default, ``--keep pairs``), and the one the search's policy file keeps;
- the candidate with the lowest mean loss on the fresh pairs, and the one that beats each other on most fresh pairs.

It changes nothing: it measures the shipped rule against alternatives on the shipped policies.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/candidate_rules.py [--run runs/regenerate/default]
       [--nfe 6,8,10,14] [--pairs 128] [--seed 0]
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
from budcache.search.job import pair_wins, paired_winner
from candidates import pair_log_mse  # this folder's candidates.py: the search's loss on each pair

#: The candidates, least searched first (the order the 1-SE rule prefers).
CANDIDATES = ("taylorseer", "vtaylor1@taylorseer", "vtaylor1")


def keep_mean(losses: dict[str, np.ndarray]) -> str:
    """The search's rule: the lowest mean (ties, which the search breaks by its own order: the first here)."""
    return min(losses, key=lambda m: float(losses[m].mean()))


def keep_one_se(losses: dict[str, np.ndarray]) -> str:
    """The least-searched candidate within one paired standard error of the lowest mean."""
    best = keep_mean(losses)
    for m in CANDIDATES:
        d = losses[m] - losses[best]
        if m == best or d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
            return m
    return best


def keep_pairs(losses: dict[str, np.ndarray]) -> str:
    """The search's rule (``--keep pairs``, :func:`budcache.search.job.paired_winner`), else the mean rule."""
    return paired_winner(losses) or keep_mean(losses)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/regenerate/default", help="directory of a default search's policies")
    ap.add_argument("--nfe", default="6,8,10,14")
    ap.add_argument("--pairs", type=int, default=128, help="fresh pairs (the validation split of --seed)")
    ap.add_argument("--seed", type=int, default=0, help="the search's --seed (its calibration pairs and splits)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    problem = TinyflowProblem(tinyflow.load(), 28)
    prompts, seeds = calibration_pairs(problem, None, a.seed)
    sets = {"calibration": problem.calibration(prompts, seeds),
            "fresh": problem.calibration(*split_pairs(problem, "validation", a.pairs, a.seed, prompts))}
    print(f"### Keeping a candidate: three rules (seed {a.seed}) ({datetime.date.today().isoformat()}, "
          f"{platform.machine()}, one thread, torch {torch.__version__})\n")
    print(f"Command: `python benchmarks/candidate_rules.py --run {a.run} --nfe {a.nfe} --pairs {a.pairs}"
          f"{f' --seed {a.seed}' if a.seed else ''}`. Mean "
          f"log latent MSE per candidate (lower is better) on the {len(prompts)} calibration pairs and on "
          f"{a.pairs} fresh pairs (the validation split); `wins / losses`: pairs where the row's loss is lower / "
          "higher than each other candidate's, in the order of the columns' candidates (TaylorSeer's searched "
          "schedule, vtaylor1@taylorseer, vtaylor1). Then the candidate each rule keeps on the calibration pairs, "
          "and the best on the fresh pairs.\n")
    print("| K | candidate | calibration | wins / losses (calibration) | fresh | wins / losses (fresh) |")
    print("|---|---|---|---|---|---|")
    ks = [int(x) for x in a.nfe.split(",")]
    kept: list[tuple[int, dict[str, str]]] = []
    for k in ks:
        pols = {m: CachePolicy.load(f"{a.run}/policy_N28_K{k}_{m}.json") for m in CANDIDATES}
        losses = {s: {m: pair_log_mse(problem, pairs, p) for m, p in pols.items()} for s, pairs in sets.items()}

        wins = {s: pair_wins(v) for s, v in losses.items()}

        def record(s: str, m: str) -> str:
            return ", ".join(f"{wins[s][m][o]} / {wins[s][o][m]}" if o != m else "-" for o in CANDIDATES)

        for m in CANDIDATES:
            print(f"| {k} | {m} | {losses['calibration'][m].mean():.3f} | {record('calibration', m)} | "
                  f"{losses['fresh'][m].mean():.3f} | {record('fresh', m)} |", flush=True)
        cal = losses["calibration"]
        search = CachePolicy.load(f"{a.run}/policy_N28_K{k}.json").meta
        kept.append((k, {"mean": keep_mean(cal), "1-SE": keep_one_se(cal), "pairs": keep_pairs(cal),
                         "search": f"{search.get('candidate')} ({search.get('keep', 'mean')})",
                         "fresh": keep_mean(losses["fresh"]), "fresh pairs": paired_winner(losses["fresh"]) or "none"}))
    print("\n| K | kept by the mean | by 1-SE | by pairs | kept by the search (its rule) | lowest mean on the fresh "
          "pairs | beats each other on most fresh pairs |")
    print("|---|---|---|---|---|---|---|")
    for k, r in kept:
        print(f"| {k} | {r['mean']} | {r['1-SE']} | {r['pairs']} | {r['search']} | {r['fresh']} | {r['fresh pairs']} |")


if __name__ == "__main__":
    main()
