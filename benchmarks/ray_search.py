"""Ray backend benchmark on tinyflow, and an on-paper estimate of the paper's FLUX search on 1 and 8 GPUs.

1. Wall time of one seeded search (N=28, K=10) in-process, with 1 Ray CPU
   worker and with 2 (local cluster; the item split, the default, and the mask
   split), whether each gives the in-process policy bit for bit, and the time
   at which its best loss reaches the in-process final loss (within 1e-4
   relative: an item split's smaller batches may round differently). Ray's
   start (cluster + actors loading the model) is reported apart from the search.
2. Evaluation counts of the paper's search (N=28, K=10, SA 200, HC 20, two
   calibration pairs as in the paper) from the evaluator's stats, with W
   simulated workers: the driver's requests are cut into chunks exactly as
   :class:`budcache.search.distributed.RayEvaluator` cuts them with the mask
   split (``benchmarks/item_split.py`` models the item split), each chunk is
   scored by its own in-process evaluator (its own prefix store, as a worker
   has), and the critical path counts, per request, the largest chunk's
   block-stack work. Multiplied by a per-evaluation cost, this gives the wall
   time on 1 and W GPUs.

Tempering and the item split have their own critical-path model in
``benchmarks/item_split.py``.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/ray_search.py [--calib 4] [--sa-iters 60]
       [--hc-rounds 10] [--paper-workers 8] [--eval-cost-s 4.75] [--json out.json]
       [--skip-wall] [--skip-paper]
Prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from typing import Any

import torch

from budcache import tinyflow
from budcache.problems.base import Shipped
from budcache.problems.data import pairs_for
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.search import SearchConfig, search
from budcache.search.distributed import RayEvaluator, make_evaluator, split_chunks
from budcache.search.evaluator import check_computes


class SimulatedWorkers:
    """W in-process evaluators fed like Ray workers; records each request's largest chunk of work."""

    def __init__(self, problem: TinyflowProblem, calib: Any, workers: int) -> None:
        self.evs = [make_evaluator("inprocess", problem, calib) for _ in range(workers)]
        self.workers = workers
        self.sa_batch = workers
        self.steps = problem.steps
        self.memo: dict[tuple[int, ...], float] = {}
        self.requests = 0
        self.critical_items = 0   # sum over requests of the largest chunk's item evaluations
        self.critical_masks = 0   # sum over requests of the largest chunk's mask count

    def losses(self, computes):
        keys = check_computes(computes, self.steps)
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if todo:
            self.requests += 1
            items, sizes = [], []
            chunks = split_chunks(todo, self.steps, self.workers)
            for ev, chunk in zip(self.evs, chunks):
                before = ev.stats.item_evaluations
                for k, v in zip(chunk, ev.losses(chunk)):
                    self.memo[k] = v
                items.append(ev.stats.item_evaluations - before)
                sizes.append(len(chunk))
            self.critical_items += max(items)
            self.critical_masks += max(sizes)
        return [self.memo[k] for k in keys]

    @property
    def evaluations(self) -> int:
        return sum(ev.stats.evaluations for ev in self.evs)

    @property
    def item_evaluations(self) -> int:
        return sum(ev.stats.item_evaluations for ev in self.evs)


def wall_times(problem: TinyflowProblem, calib: Any, cfg: SearchConfig) -> list[dict[str, Any]]:
    rows = []
    ref = None
    for name, workers, split in (("in-process", 0, ""), ("ray, 1 worker", 1, "auto"),
                                 ("ray, 2 workers, item split", 2, "items"),
                                 ("ray, 2 workers, mask split", 2, "masks")):
        t0 = time.perf_counter()
        ev = make_evaluator("inprocess", problem, calib) if workers == 0 else \
            RayEvaluator(Shipped(problem), calib, workers=workers, split=split)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        times: list[float] = []
        bests: list[float] = []

        def hook(e: dict[str, Any], t0: float = t0) -> None:
            times.append(time.perf_counter() - t0)
            bests.append(e["best_loss"])

        res = search(ev.losses, cfg, sa_batch=ev.sa_batch, on_step=hook)
        wall = time.perf_counter() - t0
        ev.close()
        ref = ref or res
        rows.append({"backend": name, "start_s": start, "search_s": wall, "evaluations": ev.stats.evaluations,
                     "best_s": min((t for t, b in zip(times, bests) if b <= ref.loss * (1 + 1e-4)), default=None),
                     "item_evaluations": ev.stats.item_evaluations, "compute": list(res.compute), "loss": res.loss,
                     "same_as_in_process": res.compute == ref.compute and res.loss == ref.loss,
                     "same_mask": res.compute == ref.compute})
        print(f"  {name}: start {start:.1f} s, search {wall:.1f} s, {ev.stats.evaluations} masks", flush=True)
    return rows


def paper_counts(problem: TinyflowProblem, calib: Any, workers: int, sa: int, hc: int) -> dict[str, Any]:
    cfg = SearchConfig(28, 10, sa_iters=sa, hc_rounds=hc, seed=0)
    out = {}
    for w in (1, workers):
        sim = SimulatedWorkers(problem, calib, w)
        t0 = time.perf_counter()
        res = search(sim.losses, cfg, sa_batch=sim.sa_batch)
        out[w] = {"evaluations": sim.evaluations, "item_evaluations": sim.item_evaluations,
                  "requests": sim.requests, "critical_items": sim.critical_items,
                  "critical_masks": sim.critical_masks, "compute": list(res.compute), "loss": res.loss,
                  "wall_s": time.perf_counter() - t0}
        print(f"  simulated {w} worker(s): {out[w]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--sa-iters", type=int, default=60)
    ap.add_argument("--hc-rounds", type=int, default=10)
    ap.add_argument("--paper-workers", type=int, default=8)
    ap.add_argument("--paper-sa", type=int, default=200)
    ap.add_argument("--paper-hc", type=int, default=20)
    ap.add_argument("--eval-cost-s", type=float, default=2027 / 427,
                    help="seconds per mask evaluation on one GPU (default: the paper's Table 8, R2 SA100 at "
                         "10 NFE: 33 min 47 s for 427 evaluations)")
    ap.add_argument("--skip-wall", action="store_true")
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    problem = TinyflowProblem(tinyflow.load(), steps=28)
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(),
                           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread per evaluator, "
                                      f"torch {torch.__version__}"}
    if not a.skip_wall:
        prompts, seeds = pairs_for(tinyflow_prompts(a.calib, seed=0), 1, 0)
        calib = problem.calibration(prompts, seeds)
        cfg = SearchConfig(28, 10, sa_iters=a.sa_iters, hc_rounds=a.hc_rounds, seed=0)
        print("wall times:", flush=True)
        res["wall"] = wall_times(problem, calib, cfg)
    prompts, seeds = pairs_for(tinyflow_prompts(2, seed=0), 1, 0)
    calib2 = problem.calibration(prompts, seeds)
    c, k = 2, 10
    unit = a.eval_cost_s / (c * k)  # seconds per (item, computed step): one from-scratch evaluation = C*K units
    if not a.skip_paper:
        print("paper-config evaluation counts:", flush=True)
        counts = paper_counts(problem, calib2, a.paper_workers, a.paper_sa, a.paper_hc)
        res["paper"] = counts
        one, many = counts[1], counts[a.paper_workers]
        res["estimate"] = {"unit_s": unit, "gpu1_naive_s": one["evaluations"] * a.eval_cost_s,
                           "gpu1_s": one["item_evaluations"] * unit,
                           f"gpu{a.paper_workers}_s": many["critical_items"] * unit}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)

    print(f"\n### Ray backend ({res['date']}, {res['machine']}, 2 CPU cores shared, no GPU)\n")
    if "wall" in res:
        print(f"Seeded search, tinyflow N=28, K=10, SA {a.sa_iters}, HC {a.hc_rounds}, {a.calib} calibration pairs:\n")
        print("| backend | start (s) | search (s) | reaches the in-process loss (s) | masks scored | item evaluations "
              "| same policy and loss bits as in-process |")
        print("|---|---|---|---|---|---|---|")
        for r in res["wall"]:
            reach = "never" if r["best_s"] is None else f"{r['best_s']:.1f}"
            print(f"| {r['backend']} | {r['start_s']:.1f} | {r['search_s']:.1f} | {reach} | {r['evaluations']} | "
                  f"{r['item_evaluations']} | {'yes' if r['same_as_in_process'] else 'same mask' if r['same_mask'] else 'no'} |")
    if "paper" in res:
        w, est = a.paper_workers, res["estimate"]
        print(f"\nPaper's search (N=28, K=10, SA {a.paper_sa}, HC {a.paper_hc}, 2 calibration pairs) on tinyflow, "
              "counted:\n")
        print("| workers (mask split) | masks scored | item evaluations | requests | critical path (item evaluations) |")
        print("|---|---|---|---|---|")
        for n, r in res["paper"].items():
            print(f"| {n} | {r['evaluations']} | {r['item_evaluations']} | {r['requests']} | {r['critical_items']} |")
        print(f"\nAt {a.eval_cost_s:.2f} s per from-scratch evaluation ({unit:.3f} s per item x computed step): "
              f"1 GPU naive {est['gpu1_naive_s'] / 60:.1f} min, 1 GPU with prefix sharing {est['gpu1_s'] / 60:.1f} "
              f"min, {w} GPUs {est[f'gpu{w}_s'] / 60:.1f} min.")


if __name__ == "__main__":
    main()
