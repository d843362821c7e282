"""Compile benchmark: budcache's hooks under torch.compile(fullgraph=True) on tinyflow's FluxPipeline, on CPU.

Part 1 (``--backend``, default inductor): time of the compiled pipeline for
all 28 steps, a K=10 of 28 budcache policy, and a policy that computes step 0
only (to price a skipped step, for the ideal ratio), next to the same three
uncompiled; graphs compiled per generation and compile time.

Part 2 (``--break-backend``, default eager: graph breaks and recompilations
are dynamo's, decided before any backend runs): budcache and diffusers'
FirstBlockCache, MagCache and TaylorSeer under the same
``torch.compile(transformer, fullgraph=True)`` call (does it compile?), then
with ``fullgraph=False``: graph breaks, graphs compiled in generation 1 and in
generation 2 (recompilations), and block-stack runs of an uncompiled generation.

Each configuration has its own transformer instance, compiled once; timings
interleave the configurations and take the median of ``--repeats`` rounds.

On CUDA (``--device cuda``) each timed generation ends with a device
synchronise, and ``--mode reduce-overhead`` makes inductor capture CUDA graphs.

Usage: python benchmarks/compile.py [--batch 2] [--repeats 5] [--backend inductor] [--break-backend eager]
       [--parts 12] [--only NAME] [--device cpu|cuda] [--mode default|reduce-overhead|max-autotune]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import platform
import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import budcache.diffusers as bd
from budcache import CachePolicy, tinyflow
from budcache.methods.diffusers_peers import magcache_schedule, taylorseer_count
from budcache.tinyflow import grammar


class _Runs:
    """Block-stack runs: the first block's attention runs only on a computed step (eager only)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.n = 0
        self._h = transformer.transformer_blocks[0].attn.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.n += 1

    def close(self) -> None:
        self._h.remove()


def _setup(tf: Any, how: Any) -> Any:
    """A fresh pipeline on its own copy of the transformer, with ``how`` (a policy or a diffusers config)."""
    fresh = tinyflow.load(device=tf.device)
    pipe = fresh.pipeline()
    if isinstance(how, CachePolicy):
        bd.apply(pipe, how)
    elif how is not None:
        pipe.transformer.enable_cache(how)
    return pipe


def _magcache_ratios(tf: Any, inputs: dict, steps: int) -> list[float]:
    from diffusers.hooks import MagCacheConfig

    pipe = _setup(tf, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pipe(**inputs, num_inference_steps=steps, output_type="latent")
    for line in buf.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            return [float(v) for v in line.strip("[]").split(",")]
    raise RuntimeError("MagCache's calibration mode printed no ratios")


def _generate(pipe: Any, inputs: dict, steps: int) -> float:
    cuda = pipe.transformer.device.type == "cuda" if hasattr(pipe.transformer, "device") else False
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe(**inputs, num_inference_steps=steps, output_type="latent")
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def part1(tf: Any, inputs: dict, a: argparse.Namespace) -> None:
    n, k = a.steps, a.nfe
    configs = {f"all {n} steps": None, f"budcache K={k} of {n}": CachePolicy.uniform(n, k),
               "budcache step 0 only": CachePolicy.from_steps(n, [0])}
    torch._dynamo.reset()
    counters.clear()
    eager = {name: _setup(tf, how) for name, how in configs.items()}
    compiled = {name: _setup(tf, how) for name, how in configs.items()}
    graphs: dict[str, list[int]] = {}
    first: dict[str, float] = {}
    for name, pipe in compiled.items():
        if isinstance(configs[name], CachePolicy):  # copies the kept residuals out of CUDA graphs' memory
            bd.compile(pipe, backend=a.backend, mode=a.mode)
        else:
            pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=a.backend, mode=a.mode)
        graphs[name] = []
        for g in range(2):
            before = counters["stats"]["unique_graphs"]
            t = _generate(pipe, inputs, n)
            graphs[name].append(counters["stats"]["unique_graphs"] - before)
            if g == 0:
                first[name] = t
    for pipe in eager.values():  # warm-up
        _generate(pipe, inputs, n)
    times: dict[str, list[float]] = {f"{kind} {name}": [] for kind in ("eager", "compiled") for name in configs}
    for _ in range(a.repeats):
        for name in configs:
            times[f"eager {name}"].append(_generate(eager[name], inputs, n))
            times[f"compiled {name}"].append(_generate(compiled[name], inputs, n))
    med = {key: statistics.median(v) for key, v in times.items()}
    breaks = sum(counters["graph_break"].values())
    mode = "" if a.mode is None else f', mode="{a.mode}"'
    print(f"Backend `{a.backend}`, `budcache.diffusers.compile(pipe{mode})` (the policies) and "
          f"`torch.compile(pipe.transformer, fullgraph=True{mode})` (all steps) on {a.device}; "
          f"graph breaks: {breaks}.\n")
    print("| configuration | eager median (s) | compiled median (s) | compiled / eager | graphs in generation 1 "
          "| graphs in generation 2 | generation 1 incl. compile (s) |\n|---|---|---|---|---|---|---|")
    for name in configs:
        e, c = med[f"eager {name}"], med[f"compiled {name}"]
        print(f"| {name} | {e:.3f} | {c:.3f} | {c / e:.3f} | {graphs[name][0]} | {graphs[name][1]} "
              f"| {first[name]:.1f} |")
    for kind in ("eager", "compiled"):
        full, part, one = (med[f"{kind} {x}"] for x in configs)
        skip_frac = (one - full / n) / (n - 1) / (full / n)
        ideal = k / n + (n - k) / n * skip_frac
        print(f"\n{kind.capitalize()}: K={k} of {n} takes **{part / full:.3f}** of all {n} steps; ideal {ideal:.3f} "
              f"({k}/{n} = {k / n:.3f} plus the skipped steps at {skip_frac:.1%} of a computed step each).", end="")
    print()


def part2(tf: Any, inputs: dict, a: argparse.Namespace) -> None:
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        TaylorSeerCacheConfig,
    )

    n, k = a.steps, a.nfe
    ratio, max_skip = magcache_schedule(n, k)
    before, interval = next((b, i) for b in range(1, k + 1) for i in range(1, n + 1)
                            if taylorseer_count(n, b, i) == k)
    configs = {
        f"budcache K={k} of {n}": lambda: CachePolicy.uniform(n, k),
        f"FirstBlockCache (threshold {a.fbc_threshold})": lambda: FirstBlockCacheConfig(threshold=a.fbc_threshold),
        f"MagCache (threshold {a.mag_threshold}, own calibration)": lambda: MagCacheConfig(
            threshold=a.mag_threshold, max_skip_steps=max_skip, retention_ratio=ratio, num_inference_steps=n,
            mag_ratios=_magcache_ratios(tf, inputs, n)),
        f"TaylorSeer (lite, before {before}, interval {interval})": lambda: TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=before, max_order=1,
            taylor_factors_dtype=torch.float32, use_lite_mode=True),
    }
    print(f"Backend `{a.break_backend}`. fullgraph: does `torch.compile(transformer, fullgraph=True)` run a "
          "generation? Breaks and graphs: the same with `fullgraph=False`, per generation.\n")
    print("| cache | block-stack runs (eager) | fullgraph=True | graph breaks, generation 1 | graph breaks, "
          "generation 2 | graphs compiled, generation 1 | graphs compiled, generation 2 | break reasons |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, make in configs.items():
        if a.only and a.only.lower() not in name.lower():
            continue
        how = make()
        pipe = _setup(tf, how)
        runs = _Runs(pipe.transformer)
        pipe(**inputs, num_inference_steps=n, output_type="latent")
        runs.close()
        # fullgraph=True
        torch._dynamo.reset()
        counters.clear()
        tr = pipe.transformer
        pipe.transformer = torch.compile(tr, fullgraph=True, backend=a.break_backend)
        try:
            _generate(pipe, inputs, n)
            full = "compiles and runs"
        except Exception as e:  # noqa: BLE001 - reported in the table
            msg = str(e).strip().splitlines()[0][:110].replace("|", "/")
            full = f"fails: `{type(e).__name__}: {msg}`"
        # fullgraph=False
        pipe.transformer = tr
        torch._dynamo.reset()
        counters.clear()
        pipe.transformer = torch.compile(tr, fullgraph=False, backend=a.break_backend)
        per: list[tuple[int, int]] = []
        reasons: Counter[str] = Counter()
        for _ in range(2):
            b0, g0 = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
            _generate(pipe, inputs, n)
            per.append((sum(counters["graph_break"].values()) - b0, counters["stats"]["unique_graphs"] - g0))
        for r, c in counters["graph_break"].items():
            reasons[r.splitlines()[0][:70].replace("|", "/")] += c
        top = "; ".join(f"{r} ({c})" for r, c in reasons.most_common(3)) or "none"
        print(f"| {name} | {runs.n} | {full} | {per[0][0]} | {per[1][0]} | {per[0][1]} | {per[1][1]} | {top} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--break-backend", default="eager")
    ap.add_argument("--fbc-threshold", type=float, default=0.05)
    ap.add_argument("--mag-threshold", type=float, default=0.06)
    ap.add_argument("--parts", default="12")
    ap.add_argument("--only", default="", help="part 2: only the caches whose name contains this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch._dynamo.config.recompile_limit = 64  # the diffusers caches recompile; let them, and count it
    tf = tinyflow.load(device=a.device)
    pairs = grammar.heldout_pairs(a.batch)
    inputs = tf.pipeline_inputs([p for p, _ in pairs], seeds=[s for _, s in pairs])
    date = datetime.date.today().isoformat()
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"### Compile and multi-GPU ({date}, {platform.machine()}, {where}, torch {torch.__version__})\n")
    extra = (f" --device {a.device}" if a.device != "cpu" else "") + (f" --mode {a.mode}" if a.mode else "")
    print(f"Command: `python benchmarks/compile.py --batch {a.batch} --repeats {a.repeats} --backend {a.backend} "
          f"--break-backend {a.break_backend} --parts {a.parts}{extra}` (tinyflow FluxPipeline, batch {a.batch}, "
          f"{a.steps} steps)\n")
    if "1" in a.parts:
        part1(tf, inputs, a)
        print()
    if "2" in a.parts:
        part2(tf, inputs, a)


if __name__ == "__main__":
    main()
