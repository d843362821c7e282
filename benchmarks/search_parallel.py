"""Wall time of the default ``budcache search`` (local workers, tempering) and its held-out quality against a
reference policy (e.g. the sequential search's, ``--scheme sequential --backend inprocess``).

Runs ``budcache search --nfe K --out OUT [EXTRA...]`` in this process, timing it, then scores the new policy and
the reference policy on the same held-out pairs (the search's own held-out draw: ``--heldout`` pairs, disjoint
from calibration) and counts paired wins on latent MSE.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/search_parallel.py --out runs/par --reference
       runs/seq/policy_N28_K10.json [--nfe 10] [-- EXTRA search options]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from budcache import CachePolicy, tinyflow
from budcache.cli import main as cli
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", default=None, help="policy JSON to compare with on the held-out pairs")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    t0 = time.perf_counter()
    c0 = os.times()
    rc = cli(["search", "--nfe", str(a.nfe), "--heldout", str(a.heldout), "--out", a.out, "--quiet", "--force",
              *a.extra])
    wall = time.perf_counter() - t0
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + \
        (c1.children_system - c0.children_system)
    print(f"search rc {rc}: wall {wall:.1f} s, CPU (driver + workers) {cpu:.1f} s", flush=True)
    if a.reference is None:
        return
    torch.set_grad_enabled(False)
    new = CachePolicy.load(os.path.join(a.out, f"policy_N28_K{a.nfe}.json"))
    ref = CachePolicy.load(a.reference)
    problem = TinyflowProblem(tinyflow.load(), 28)
    prompts = [problem.default_prompts(32, 0)]  # the search's calibration prompts (seed 0), held-out disjoint
    hp, hs = problem.heldout_pairs(a.heldout, 0, prompts[0])
    held = problem.calibration(hp, hs)
    q = {name: item_metrics(problem, problem.final_latents(held, pol), held.teacher) for name, pol in
         (("new", new), ("reference", ref))}
    wins = int((q["new"]["latent_mse"] < q["reference"]["latent_mse"]).sum())
    losses = int((q["new"]["latent_mse"] > q["reference"]["latent_mse"]).sum())
    print("| policy | plan | held-out latent MSE | PSNR (dB) | SSIM |\n|---|---|---|---|---|")
    for name, pol in (("new", new), ("reference", ref)):
        m = q[name]
        ssim = f"{m['ssim'].mean():.4f}" if "ssim" in m else ""
        print(f"| {name} | `{pol.estimator_strip()}` | {m['latent_mse'].mean():.4e} | {m['psnr'].mean():.2f} | "
              f"{ssim} |")
    print(f"\nnew vs reference, paired on {len(held)} held-out pairs: {wins} wins, {losses} losses, "
          f"{len(held) - wins - losses} ties")


if __name__ == "__main__":
    main()
