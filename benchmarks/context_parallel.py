"""Context-parallel benchmark: a budcache policy under diffusers' Ulysses attention, 2 gloo processes on CPU.

Per generation and rank: collectives issued (by kind, and by budcache's own
code), time, and the largest difference to the single-process output; for
the plain model (all steps) and a K of N policy. CPU-only hosts need one shim:
diffusers picks the rank's device as ``rank % torch.accelerator.device_count()``
(0 without an accelerator), so the script sets that count to 1.

Usage: python benchmarks/context_parallel.py [--batch 2] [--steps 28] [--nfe 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

import budcache.diffusers as bd
from budcache import CachePolicy, tinyflow
from budcache.align.distributed import spawn
from budcache.tinyflow import grammar

COLLECTIVES = {
    "torch.distributed": ["all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all", "all_to_all_single",
                          "broadcast", "reduce_scatter", "reduce_scatter_tensor", "barrier", "send", "recv"],
    "torch.distributed._functional_collectives": [
        "all_gather_tensor", "all_gather_single", "all_to_all_single", "all_reduce", "broadcast",
        "reduce_scatter_tensor", "permute_tensor"],
}


class Collectives:
    def __init__(self) -> None:
        import importlib

        self.calls: Counter[str] = Counter()
        self.by_budcache = 0
        self._saved = []
        for mod_name, names in COLLECTIVES.items():
            mod = importlib.import_module(mod_name)
            for name in names:
                fn = getattr(mod, name, None)
                if fn is not None:
                    self._saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            issuer = next((f.filename for f in reversed(traceback.extract_stack()[:-1])
                           if "/torch/" not in f.filename.replace("\\", "/")), "")
            self.by_budcache += "/budcache/" in issuer.replace("\\", "/")
            return fn(*args, **kwargs)
        return counted

    def close(self) -> None:
        for mod, name, fn in self._saved:
            setattr(mod, name, fn)


def _inputs(tf, batch: int) -> dict:
    pairs = grammar.heldout_pairs(batch)
    return tf.pipeline_inputs([p for p, _ in pairs], seeds=[s for _, s in pairs])


def _worker(out_dir: str, batch: int, steps: int, nfe: int, repeats: int) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    torch.set_grad_enabled(False)
    rank = dist.get_rank()
    tf = tinyflow.load()
    pipe = tf.pipeline()
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    tf.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    inputs = _inputs(tf, batch)
    res = {}
    for name, policy in (("all steps", None), (f"budcache K={nfe} of {steps}", CachePolicy.uniform(steps, nfe))):
        if policy is not None:
            bd.apply(pipe, policy)
        pipe(**inputs, num_inference_steps=steps, output_type="latent")  # warm-up
        coll = Collectives()
        try:
            latent = pipe(**inputs, num_inference_steps=steps, output_type="latent").images
        finally:
            coll.close()
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            pipe(**inputs, num_inference_steps=steps, output_type="latent")
            times.append(time.perf_counter() - t0)
        res[name] = {"calls": dict(coll.calls), "by_budcache": coll.by_budcache, "time": statistics.median(times),
                     "latent": latent.double().tolist()}
        if policy is not None:
            bd.remove(pipe)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tf = tinyflow.load()
    pipe = tf.pipeline()
    inputs = _inputs(tf, a.batch)
    single = {}
    configs = (("all steps", None), (f"budcache K={a.nfe} of {a.steps}", CachePolicy.uniform(a.steps, a.nfe)))
    for name, policy in configs:
        if policy is not None:
            bd.apply(pipe, policy)
        single[name] = pipe(**inputs, num_inference_steps=a.steps, output_type="latent").images.double()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            pipe(**inputs, num_inference_steps=a.steps, output_type="latent")
            times.append(time.perf_counter() - t0)
        single[name + " time"] = statistics.median(times)
        if policy is not None:
            bd.remove(pipe)
    with tempfile.TemporaryDirectory() as d:
        spawn(_worker, 2, d, a.batch, a.steps, a.nfe, a.repeats)
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in (0, 1)]
    date = datetime.date.today().isoformat()
    print(f"#### Context parallelism on 2 gloo processes ({date}, {platform.machine()}, 1 thread per process, "
          f"torch {torch.__version__})\n")
    print(f"Command: `python benchmarks/context_parallel.py --batch {a.batch} --steps {a.steps} --nfe {a.nfe} "
          f"--repeats {a.repeats}` (diffusers `ContextParallelConfig(ulysses_degree=2)`, native attention, "
          f"tinyflow FluxPipeline, batch {a.batch})\n")
    print("| configuration | collectives per generation and rank | issued by budcache | ranks' calls equal "
          "| max abs diff to 1 process | 2-process median (s) | 1-process median (s) |\n|---|---|---|---|---|---|---|")
    for name in ranks[0]:
        r0, r1 = ranks[0][name], ranks[1][name]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r0["calls"].items()))
        diff = max(float((torch.tensor(r["latent"], dtype=torch.float64) - single[name]).abs().max()) for r in (r0, r1))
        print(f"| {name} | {calls} | {r0['by_budcache'] + r1['by_budcache']} | {r0['calls'] == r1['calls']} "
              f"| {diff:.2e} | {max(r0['time'], r1['time']):.3f} | {single[name + ' time']:.3f} |")


if __name__ == "__main__":
    main()
