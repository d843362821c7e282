"""Pipeline benchmark: budcache's hooks on tinyflow's diffusers FluxPipeline, on CPU.

- overhead of the hooks with an all-compute policy vs. no hooks (target < 3%);
- time ratio of a K=10 of 28 policy to 28 full steps, next to the ideal
  (10/28 plus the embed/head cost of the 18 skipped steps, measured with a
  policy that computes step 0 only).

Timings interleave the configurations and take the median of ``--repeats``
rounds, so drift on a noisy machine hits all of them alike.

Usage: python benchmarks/pipeline.py [--batch 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import budcache.diffusers as bd
from budcache import CachePolicy, tinyflow
from budcache.tinyflow import grammar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tf = tinyflow.load()
    pipe = tf.pipeline()
    pairs = grammar.heldout_pairs(a.batch)
    inputs = tf.pipeline_inputs([p for p, _ in pairs], seeds=[s for _, s in pairs])

    configs = {"no hooks": None, "all-compute policy": CachePolicy.full(a.steps),
               f"K={a.nfe} of {a.steps}": CachePolicy.uniform(a.steps, a.nfe),
               "step 0 only": CachePolicy.from_steps(a.steps, [0])}

    def once(policy: CachePolicy | None) -> float:
        if policy is not None:
            bd.apply(pipe, policy)
        try:
            t0 = time.perf_counter()
            pipe(**inputs, num_inference_steps=a.steps, output_type="latent")
            return time.perf_counter() - t0
        finally:
            if policy is not None:
                bd.remove(pipe)

    for pol in configs.values():  # warm-up
        once(pol)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(a.repeats):
        for name, pol in configs.items():
            times[name].append(once(pol))
    med = {k: statistics.median(v) for k, v in times.items()}
    full = med["no hooks"]
    skip_frac = (med["step 0 only"] - full / a.steps) / (a.steps - 1) / (full / a.steps)
    ideal = a.nfe / a.steps + (a.steps - a.nfe) / a.steps * skip_frac
    date = datetime.date.today().isoformat()
    print(f"### Pipeline hooks ({date}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__})\n")
    print(f"Command: `python benchmarks/pipeline.py --batch {a.batch} --repeats {a.repeats}` "
          f"(tinyflow FluxPipeline, batch {a.batch}, {a.steps} steps, median of {a.repeats} interleaved rounds)\n")
    print("| configuration | median time (s) | ratio to no hooks |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / full:.3f} |")
    print(f"\nHook overhead with an all-compute policy: **{(med['all-compute policy'] / full - 1) * 100:+.1f}%**. "
          f"K={a.nfe} of {a.steps}: measured ratio **{med[f'K={a.nfe} of {a.steps}'] / full:.3f}**, ideal "
          f"{ideal:.3f} ({a.nfe}/{a.steps} = {a.nfe / a.steps:.3f} plus skipped steps at {skip_frac:.1%} of a "
          "computed step each).")


if __name__ == "__main__":
    main()
