"""Foundation benchmark on tinyflow: fitness for purpose, curvature and speed.

Measures, on held-out prompt x seed pairs (disjoint from training's seeds):
- checker accuracy at 28 Euler steps, no caching (fully specified and free prompts apart);
- curvature: PSNR of plain K-step Euler against the 28-step output, K = 4, 7, 10, 14;
- spread of 20 random residual-reuse masks at K = 10 of 28 (best minus worst PSNR);
- wall time of one 28-step batch of 8, and the time ratio of K computed of 28 vs all 28
  for K = 7, 10, 14 next to the ideal (K/28 plus the embed/head cost of skipped steps).

Usage: python benchmarks/foundation.py [--pairs 256] [--json out.json]
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

from budcache import CachePolicy
from budcache.tinyflow import DEFAULT_GUIDANCE, checker, grammar, load


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: ``10 log10(1 / mse)``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return torch.stack([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)])


def timed(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--random-masks", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None,
                    help="tinyflow weights directory (default: the shipped ones), e.g. a checkpoint exported with "
                         "budcache train-tinyflow --export DIR")
    ap.add_argument("--accuracy-only", action="store_true", help="only the checker accuracy of 28-step samples")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale of every sample (default: tinyflow's DEFAULT_GUIDANCE)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tf = load(a.model)
    guidance = DEFAULT_GUIDANCE if a.guidance is None else a.guidance
    pairs = grammar.heldout_pairs(a.pairs)
    prompts = [p for p, _ in pairs]
    seeds = [s for _, s in pairs]

    def run(steps: int, policy: CachePolicy | None = None) -> torch.Tensor:
        outs = []
        for i in range(0, len(prompts), a.batch):
            r = tf.sample(prompts[i:i + a.batch], seeds[i:i + a.batch], steps=steps, policy=policy, guidance=guidance)
            outs.append(tf.images(r.latent))
        return torch.cat(outs)

    res: dict = {}
    t0 = time.perf_counter()
    full = run(28)
    res["full_28_wall_s"] = time.perf_counter() - t0
    specs = [grammar.parse_prompt(p) for p in prompts]
    ok = np.array([checker.check_spec(s, im).ok for s, im in zip(specs, full)])
    fully = np.array([s.fully_specified for s in specs])
    tmpl = np.array([s.template for s in specs])
    res["accuracy"] = {"all": ok.mean(), "fully_specified": ok[fully].mean(), "free": ok[~fully].mean(),
                       **{t: ok[tmpl == t].mean() for t in ("single", "pair", "count")},
                       "n_fully_specified": int(fully.sum()), "n_free": int((~fully).sum())}
    if a.accuracy_only:
        acc = res["accuracy"]
        print(f"Checker accuracy ({a.model or 'shipped weights'}), {a.pairs} held-out pairs, 28 Euler steps, "
              f"guidance {guidance:g}: **{acc['all']:.1%}** (fully specified {acc['fully_specified']:.1%}, free {acc['free']:.1%}; single "
              f"{acc['single']:.1%}, pair {acc['pair']:.1%}, count {acc['count']:.1%}); "
              f"{res['full_28_wall_s']:.0f} s")
        return
    res["plain_psnr"] = {}
    for k in (4, 7, 10, 14):
        res["plain_psnr"][k] = float(psnr(run(k), full).mean())
    rng = np.random.default_rng(0)
    spread = []
    for _ in range(a.random_masks):
        rest = rng.choice(np.arange(1, 28), size=9, replace=False)
        pol = CachePolicy.from_steps(28, [0, *rest.tolist()])
        spread.append(float(psnr(run(28, pol), full).mean()))
    res["random_masks_k10"] = {"best": max(spread), "worst": min(spread), "median": float(np.median(spread)),
                               "uniform": float(psnr(run(28, CachePolicy.uniform(28, 10)), full).mean())}

    p8, s8 = prompts[:8], seeds[:8]
    t_full = timed(lambda: tf.sample(p8, s8, steps=28))
    res["batch8_28steps_s"] = t_full
    # Cost of a skipped step = embed + head only: time a 28-step run where only step 0 computes.
    t_one = timed(lambda: tf.sample(p8, s8, steps=28, policy=CachePolicy.from_steps(28, [0])))
    skip_cost = (t_one - t_full / 28) / 27 / (t_full / 28)
    res["skipped_step_cost_frac"] = skip_cost
    res["ratios"] = {}
    for k in (7, 10, 14):
        t_k = timed(lambda: tf.sample(p8, s8, steps=28, policy=CachePolicy.uniform(28, k)))
        ideal = k / 28 + (28 - k) / 28 * skip_cost
        res["ratios"][k] = {"measured": t_k / t_full, "ideal": ideal, "k_over_n": k / 28}
    res["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    res["date"] = datetime.date.today().isoformat()

    acc = res["accuracy"]
    print(f"### Foundation ({res['date']}, {res['machine']})\n")
    print(f"Command: `python benchmarks/foundation.py --pairs {a.pairs}`\n")
    print(f"Checker accuracy, {a.pairs} held-out pairs, 28 Euler steps, no caching: **{acc['all']:.1%}** "
          f"(fully specified {acc['fully_specified']:.1%} of {acc['n_fully_specified']}, free {acc['free']:.1%} "
          f"of {acc['n_free']}; single {acc['single']:.1%}, pair {acc['pair']:.1%}, count {acc['count']:.1%})\n")
    print("| plain Euler steps | 4 | 7 | 10 | 14 |\n|---|---|---|---|---|")
    print("| PSNR vs 28 steps (dB) | " + " | ".join(f"{res['plain_psnr'][k]:.2f}" for k in (4, 7, 10, 14)) + " |\n")
    rm = res["random_masks_k10"]
    print(f"K=10 of 28, {a.random_masks} random residual-reuse masks: best {rm['best']:.2f} dB, worst "
          f"{rm['worst']:.2f} dB (spread {rm['best'] - rm['worst']:.2f} dB), median {rm['median']:.2f}; "
          f"uniform mask {rm['uniform']:.2f} dB\n")
    print(f"One 28-step batch of 8: {t_full:.3f} s; a skipped step costs {skip_cost:.1%} of a computed one\n")
    print("| K of 28 | measured time ratio | ideal (K/28 + skipped embed/head) | K/28 |\n|---|---|---|---|")
    for k, r in res["ratios"].items():
        print(f"| {k} | {r['measured']:.3f} | {r['ideal']:.3f} | {r['k_over_n']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2, default=float)


if __name__ == "__main__":
    main()
