"""Re-implemented baselines on tinyflow: offline fitting cost, realised NFE and held-out quality.

For each budget, every re-implemented method of :mod:`budcache.methods` (and TeaCache with
the original FLUX polynomial instead of the refitted one) is fitted on
calibration pairs and sampled on held-out pairs disjoint from them. Reported:
fit wall time (LeMiCa's edge errors are measured once for all budgets and
shown on its first budget), realised NFE mean/min/max on the held-out pairs,
latent MSE and image PSNR against the full-step output.

Usage: python benchmarks/baselines.py [--calib 8] [--heldout 16] [--budgets 6,10,14] [--steps 28]
Prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from budcache import tinyflow
from budcache.methods import REGISTRY, TeaCache
from budcache.problems.data import pairs_for
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--budgets", default="6,10,14")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--recache-iters", type=int, default=40)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    budgets = [int(b) for b in args.budgets.split(",")]
    problem = TinyflowProblem(tinyflow.load(), steps=args.steps)
    cp, cs = pairs_for(tinyflow_prompts(args.calib, seed=0), 1, 0)
    hp, hs = pairs_for(tinyflow_prompts(args.heldout, seed=7_777_777), 1, 7_777_777)
    calib = problem.calibration(cp, cs)
    held = problem.calibration(hp, hs)
    methods = {
        "teacache (refit)": REGISTRY["teacache"](),
        "teacache (FLUX poly)": TeaCache(refit=False),
        "dicache": REGISTRY["dicache"](),
        "lemica": REGISTRY["lemica"](),
        "recache": REGISTRY["recache"](iterations=args.recache_iters),
    }
    rows = []
    for k in budgets:
        for label, m in methods.items():
            t0 = time.perf_counter()
            try:
                m.fit(problem, calib, k)
            except Exception as exc:  # a budget below a method's forced steps: reported, not fatal
                rows.append(f"| {k} | {label} | - | - | - | - | {type(exc).__name__}: {exc} |")
                continue
            fit_s = time.perf_counter() - t0
            run = m.sample(problem, held.noise, held.cond, held.uncond)
            q = item_metrics(problem, run.latent, held.teacher)
            nfe = run.nfe
            note = ""
            if getattr(m, "calibration", None) is not None:
                c = m.calibration
                note = f"threshold {c.threshold:.4g}, calib NFE {c.mean:.2f} ({c.evaluations} runs)"
            elif getattr(m, "policy", None) is not None:
                note = f"`{''.join('x' if s else '.' for s in m.policy.mask)}`"
            rows.append(f"| {k} | {label} | {fit_s:.1f} | {float(nfe.mean()):.2f} / {float(nfe.min()):.2f} / "
                        f"{float(nfe.max()):.2f} | {float(q['latent_mse'].mean()):.3e} | {float(q['psnr'].mean()):.2f} "
                        f"| {note} |")
            print(rows[-1], flush=True)
    print(f"\n### Re-implemented baselines ({datetime.date.today()}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})\n")
    print(f"tinyflow, {args.steps} Euler steps, {args.calib} calibration pairs, {args.heldout} held-out pairs.\n")
    print("| NFE | method | fit (s) | held-out NFE mean / min / max | latent MSE | PSNR (dB) | notes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
