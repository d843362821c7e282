"""Two-object prompts: checker accuracy and what goes wrong, on prompts apart from the held-out set.

Draws ``--n`` two-object (prompt, seed) pairs with a seed disjoint from training's and from
``grammar.heldout_pairs``' (so the 75 two-object pairs of the held-out set are not re-counted), samples
each at 28 Euler steps and sorts every failure into one kind:

- count: the checker does not find exactly two objects;
- shape: two objects, but not the two stated shapes (e.g. "a circle and a square" drawn as two circles);
- attribute: the two stated shapes, but a stated colour or size on the wrong object or missing.

    python benchmarks/pairs.py [--n 320] [--model DIR] [--guidance G]

Prints one Markdown table row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from budcache.tinyflow import DEFAULT_GUIDANCE, checker, grammar, load

#: Seed of the prompt draw: disjoint from training's (seed, batch index) streams and from heldout_pairs'.
SEED = 2_000_003


def failure_kind(prompt: str, verdict: checker.Verdict) -> str:
    """'ok', 'count', 'shape' or 'attribute' for one judged two-object image."""
    if verdict.ok:
        return "ok"
    if len(verdict.found) != 2:
        return "count"
    want = sorted(o.shape for o in grammar.parse_prompt(prompt).objects)
    return "shape" if want != sorted(f.shape for f in verdict.found) else "attribute"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--model", default=None, help="weights directory (default: the shipped weights)")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tf = load(a.model)
    mix = grammar.TemplateMix(empty=0.0, single=0.0, pair=1.0, count=0.0)
    pairs = grammar.heldout_pairs(a.n, seed=SEED, mix=mix)
    kinds: collections.Counter[str] = collections.Counter()
    t0 = time.perf_counter()
    for i in range(0, a.n, a.batch):
        chunk = pairs[i:i + a.batch]
        prompts = [p for p, _ in chunk]
        r = tf.sample(prompts, [s for _, s in chunk], steps=28, guidance=a.guidance)
        for p, im in zip(prompts, tf.images(r.latent)):
            kinds[failure_kind(p, checker.check(p, im))] += 1
    print("| weights | guidance | pairs | pass | count wrong | shape wrong | attribute wrong | time |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.model or 'shipped'} | {a.guidance:g} | {a.n} | {kinds['ok'] / a.n:.1%} | {kinds['count']} | "
          f"{kinds['shape']} | {kinds['attribute']} | {time.perf_counter() - t0:.0f} s |")


if __name__ == "__main__":
    main()
