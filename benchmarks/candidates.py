"""How well the default search's candidates generalise: each candidate's policy, and budcache's mask alone, scored
on the calibration pairs, a validation split and the held-out pairs (mean log latent MSE, the search's loss).
Then the compare's metrics on the validation split, a second set of fresh pairs beside the compare's held-out
ones: the three candidates, TaylorSeer's best grid point and plain K steps.

Reads the policies a default search wrote (``policy_N28_K*_<mechanism>.json``, e.g. from ``python
benchmarks/regenerate.py --only default-search``) and draws the same pairs as that search (seed 0): its 32
calibration pairs, 32 pairs of the validation split and its held-out pairs, all disjoint.

With ``--wide N``, the compare's metrics also on N more pairs (seed 1's held-out split, disjoint from all of
those): the heavy-tailed means and medians need more pairs than the search's splits hold.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/candidates.py [--run runs/regenerate/default]
       [--nfe 6,8,10,14] [--pairs 32] [--wide 512 [--wide-only]]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch

from budcache import CachePolicy, tinyflow
from budcache.peers import taylorseer_grid_computes
from budcache.problems.data import calibration_pairs, split_pairs
from budcache.problems.metrics import gap_text, item_metrics, paired_gap
from budcache.problems.tinyflow import TinyflowProblem
from budcache.search.losses import latent_log_mse


def pair_log_mse(problem: TinyflowProblem, calib, policy: CachePolicy) -> np.ndarray:
    """The ``logmse`` search loss of ``policy`` on each item of a set: ``latent_log_mse`` against its teacher."""
    return latent_log_mse(problem.final_latents(calib, policy), calib.teacher).double().numpy()


def mean_log_mse(problem: TinyflowProblem, calib, policy: CachePolicy) -> float:
    """The ``logmse`` search loss of ``policy`` on a set: the mean over its items of ``latent_log_mse``."""
    return float(latent_log_mse(problem.final_latents(calib, policy), calib.teacher).mean())


def grid_policy(problem: TinyflowProblem, calib, k: int) -> CachePolicy:
    """TaylorSeer's best (warm-up, interval) grid schedule with exactly ``k`` computed steps, picked on ``calib``
    by the mean log latent MSE (as the search's start point, :func:`budcache.search.job.peer_grid_start`)."""
    policies = [CachePolicy(problem.steps, c, meta={"mechanism": "taylorseer"})
                for c in taylorseer_grid_computes(problem.steps, k)]
    return min(policies, key=lambda p: mean_log_mse(problem, calib, p))


def quality_table(problem: TinyflowProblem, calib, val, run: str, ks: list[int],
                  label: str = "validation pairs", gaps: bool = False) -> None:
    """Mean latent MSE, mean and median PSNR, SSIM and paired wins on ``val``, as ``budcache compare`` reports, for
    the three candidates (the kept one marked), TaylorSeer's best grid point and plain K steps; with ``gaps``, the
    kept candidate's median PSNR lead over each other row with its 95% paired bootstrap interval."""
    print(f"\nThe compare's metrics on the {len(val)} {label} (images decoded; wins: pairs where the row's "
          "PSNR is higher than TaylorSeer's best grid point's; the grid point is picked on the 32 calibration pairs "
          "by mean log latent MSE" + ("; median gap: the kept candidate's median PSNR minus the row's, with its 95% "
                                      "paired bootstrap interval over these pairs" if gaps else "") + "):\n")
    print("| K | method | latent MSE | PSNR (dB) | median PSNR | SSIM | wins against TaylorSeer's grid |"
          + (" median gap, kept - row [95% CI] |" if gaps else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if gaps else ""))
    for k in ks:
        kept = CachePolicy.load(f"{run}/policy_N28_K{k}.json").meta.get("candidate")
        rows: dict[str, CachePolicy | None] = {
            f"{label}{' (kept)' if m == kept else ''}": CachePolicy.load(f"{run}/policy_N28_K{k}_{m}.json")
            for m, label in (("vtaylor1", "vtaylor1"), ("taylorseer", "TaylorSeer's searched schedule"),
                             ("vtaylor1@taylorseer", "vtaylor1@taylorseer"))}
        rows.update({"TaylorSeer's best grid point": grid_policy(problem, calib, k), "plain K steps": None})
        q = {name: item_metrics(problem, problem.final_latents(val, pol, plain_steps=None if pol else k),
                                val.teacher) for name, pol in rows.items()}
        grid = q["TaylorSeer's best grid point"]["psnr"]
        kept_psnr = next((m["psnr"] for n, m in q.items() if n.endswith("(kept)")), None) if gaps else None
        best = {m: (min if m == "latent_mse" else max)(q, key=lambda n: q[n][m].mean()) for m in
                ("latent_mse", "psnr", "ssim")}
        best["median"] = max(q, key=lambda n: float(np.median(q[n]["psnr"])))
        for name, m in q.items():
            vals = {"latent_mse": f"{m['latent_mse'].mean():.3e}", "psnr": f"{m['psnr'].mean():.2f}",
                    "median": f"{float(np.median(m['psnr'])):.2f}", "ssim": f"{m['ssim'].mean():.4f}"}
            cells = [f"**{v}**" if best[key] == name else v for key, v in vals.items()]
            wins = "" if name.startswith("TaylorSeer's best") else f"{int((m['psnr'] > grid).sum())}/{len(val)}"
            gap = ""
            if gaps and kept_psnr is not None and not name.endswith("(kept)"):
                g = paired_gap(kept_psnr, m["psnr"], "median")
                gap = f" {gap_text(g.gap, None if g.low is None else (g.low, g.high))} |"
            elif gaps:
                gap = " |"
            print(f"| {k} | {name} | " + " | ".join(cells) + f" | {wins} |{gap}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/regenerate/default", help="directory of a default search's policies")
    ap.add_argument("--nfe", default="6,8,10,14")
    ap.add_argument("--pairs", type=int, default=32, help="validation and held-out pairs each")
    ap.add_argument("--wide", type=int, default=0,
                    help="then the compare's metrics on this many more pairs, the held-out split of seed 1 (disjoint "
                         "from the search's calibration, validation and held-out pairs); 0: none")
    ap.add_argument("--wide-only", action="store_true", help="print only the --wide table")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    problem = TinyflowProblem(tinyflow.load(), 28)
    prompts, seeds = calibration_pairs(problem, None, 0)
    ks = [int(x) for x in a.nfe.split(",")]
    if a.wide_only:
        print(f"### Candidates on {a.wide} more pairs ({datetime.date.today().isoformat()}, {platform.machine()}, "
              f"one thread, torch {torch.__version__})")
        wide_table(problem, problem.calibration(prompts, seeds), a)
        return
    sets = {"calibration": problem.calibration(prompts, seeds),
            "validation": problem.calibration(*split_pairs(problem, "validation", a.pairs, 0, prompts)),
            "held-out": problem.calibration(*split_pairs(problem, "heldout", a.pairs, 0, prompts))}
    print(f"### Candidates on fresh pairs ({datetime.date.today().isoformat()}, {platform.machine()}, one thread, "
          f"torch {torch.__version__})\n")
    print(f"Policies of `{a.run}`; mean log latent MSE against the 28-step output (lower is better) on the "
          f"{len(prompts)} calibration pairs, {a.pairs} validation pairs and {a.pairs} held-out pairs; in bold the "
          "best of the three candidates, marked `(kept)` the one `auto` kept at that budget (by its `--keep` "
          "rule, on the calibration pairs). `vtaylor1`: budcache's estimators on its own searched mask; `vtaylor1@taylorseer`: "
          "budcache's estimators chosen on TaylorSeer's searched schedule. `mask alone`: budcache's searched mask "
          "with vtaylor1 at every skipped step (before the per-step estimator choice).\n")
    names = ("vtaylor1", "taylorseer", "vtaylor1@taylorseer")
    print("| K | set | vtaylor1 | TaylorSeer's searched schedule | vtaylor1@taylorseer | budcache's mask alone |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        pols = [CachePolicy.load(f"{a.run}/policy_N28_K{k}_{m}.json") for m in names]
        kept = CachePolicy.load(f"{a.run}/policy_N28_K{k}.json").meta.get("candidate")
        alone = CachePolicy(28, pols[0].compute, meta={**pols[0].meta, "mechanism": "vtaylor1"})
        for name, s in sets.items():
            v = [mean_log_mse(problem, s, p) for p in (*pols, alone)]
            best = int(np.argmin(v[:3]))
            cells = [(f"**{x:.3f}**" if i == best else f"{x:.3f}") + (" (kept)" if names[i] == kept else "")
                     for i, x in enumerate(v[:3])]
            print(f"| {k} | {name} | " + " | ".join(cells) + f" | {v[3]:.3f} |", flush=True)
    quality_table(problem, sets["calibration"], sets["validation"], a.run, ks)
    if a.wide:
        wide_table(problem, sets["calibration"], a)


def wide_table(problem: TinyflowProblem, calib, a: argparse.Namespace) -> None:
    """The compare's metrics on ``a.wide`` pairs of seed 1's held-out split: a larger sample for the heavy-tailed
    metrics (mean latent MSE, median PSNR), disjoint from the pairs the search and the compare used."""
    prompts = list(calib.prompts)
    wide = problem.calibration(*split_pairs(problem, "heldout", a.wide, 1, prompts))
    if set(zip(wide.prompts, wide.seeds)) & (set(zip(calib.prompts, calib.seeds)) | {
            p for s in ("validation", "heldout") for p in zip(*split_pairs(problem, s, a.pairs, 0, prompts))}):
        raise SystemExit("the wide pairs overlap the search's pairs")
    quality_table(problem, calib, wide, a.run, [int(x) for x in a.nfe.split(",")],
                  label="pairs of seed 1's held-out split", gaps=True)


if __name__ == "__main__":
    main()
