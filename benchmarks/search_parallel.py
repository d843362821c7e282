"""Wall and CPU time of the default ``budcache search`` (or with extra options) and its held-out quality against a
reference policy (e.g. that of ``--backend inprocess``, or of ``--scheme tempering``).

Runs ``python -m budcache.cli search --nfe K --out OUT [EXTRA...]`` as its own process, as a user would, timing
it from start to exit. Its CPU time is the whole machine's busy time over the run (``/proc/stat``: the driver,
the workers' fork server and the workers, which are not all children of the driver; run it under the lock with
nothing else running). Then scores the new policy and the reference policy on the same held-out pairs (the
search's own held-out draw: ``--heldout`` pairs, disjoint from calibration) and counts paired wins on latent
MSE.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/search_parallel.py --out runs/par --reference
       runs/seq/policy_N28_K10.json [--nfe 10] [--compare-only] [-- EXTRA search options]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

from budcache import CachePolicy, tinyflow
from budcache.problems.data import calibration_pairs, split_pairs
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", default=None, help="policy JSON to compare with on the held-out pairs")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--compare-only", action="store_true", help="skip the search: compare the policy in --out")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    if not a.compare_only:
        run(a)
    if a.reference is not None:
        compare(a)


def busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run(a: argparse.Namespace) -> None:
    """Run and time the search as a process of its own."""
    cmd = [sys.executable, "-m", "budcache.cli", "search", "--nfe", str(a.nfe), "--heldout", str(a.heldout),
           "--out", a.out, "--quiet", "--force", *a.extra]
    b0, t0 = busy_seconds(), time.perf_counter()
    rc = subprocess.run(cmd).returncode
    wall, cpu = time.perf_counter() - t0, busy_seconds() - b0
    print(f"search rc {rc}: wall {wall:.1f} s, CPU of the machine over the run {cpu:.1f} s "
          f"({cpu / wall:.2f} cores busy)", flush=True)
    if rc:
        sys.exit(rc)


def compare(a: argparse.Namespace) -> None:
    """The new policy against the reference on the search's held-out pairs, with paired wins."""
    torch.set_grad_enabled(False)
    new = CachePolicy.load(os.path.join(a.out, f"policy_N28_K{a.nfe}.json"))
    ref = CachePolicy.load(a.reference)
    problem = TinyflowProblem(tinyflow.load(), 28)
    prompts, _ = calibration_pairs(problem, None, 0)  # the search's calibration pairs (seed 0)
    hp, hs = split_pairs(problem, "heldout", a.heldout, 0, prompts)  # its held-out pairs, disjoint from them
    held = problem.calibration(hp, hs)
    q = {name: item_metrics(problem, problem.final_latents(held, pol), held.teacher) for name, pol in
         (("new", new), ("reference", ref))}
    wins = int((q["new"]["latent_mse"] < q["reference"]["latent_mse"]).sum())
    losses = int((q["new"]["latent_mse"] > q["reference"]["latent_mse"]).sum())
    print("| policy | plan | held-out latent MSE | median latent MSE | PSNR (dB) | median PSNR (dB) | SSIM |\n"
          "|---|---|---|---|---|---|---|")
    for name, pol in (("new", new), ("reference", ref)):
        m = q[name]
        ssim = f"{m['ssim'].mean():.4f}" if "ssim" in m else ""
        print(f"| {name} | `{pol.estimator_strip()}` | {m['latent_mse'].mean():.4e} | "
              f"{float(np.median(m['latent_mse'])):.4e} | {m['psnr'].mean():.2f} | "
              f"{float(np.median(m['psnr'])):.2f} | {ssim} |")
    print(f"\nnew vs reference, paired on {len(held)} held-out pairs: {wins} wins, {losses} losses, "
          f"{len(held) - wins - losses} ties")


if __name__ == "__main__":
    main()
