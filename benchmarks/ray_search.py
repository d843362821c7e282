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

3. ``--tempering 1,2,8,32``: the same critical-path model for the parallel
   scheme (:mod:`budcache.search.parallel`; masks routed to the worker holding
   their longest prefix, :func:`budcache.search.local.route`): best loss so far
   against the critical path for each W, the critical path at which it first
   reaches the sequential search's final loss (as a fraction of the sequential
   critical path), and held-out paired wins of each policy against the
   sequential one (``--heldout`` pairs, disjoint from calibration).

Usage: flock /tmp/budcache-heavy.lock python benchmarks/ray_search.py [--calib 4] [--sa-iters 60]
       [--hc-rounds 10] [--paper-workers 8] [--eval-cost-s 4.75] [--json out.json]
       [--skip-wall] [--skip-paper] [--tempering 1,2,8,32] [--heldout 64]
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
from budcache.policy import CachePolicy
from budcache.problems.base import Shipped
from budcache.problems.data import pairs_for
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.search import SearchConfig, search
from budcache.search.distributed import RayEvaluator, make_evaluator, split_chunks
from budcache.search.evaluator import check_computes
from budcache.search.local import route
from budcache.search.parallel import TemperingConfig, search_tempering


class SimulatedWorkers:
    """W in-process evaluators fed like Ray workers; records each request's largest chunk of work."""

    def __init__(self, problem: TinyflowProblem, calib: Any, workers: int, affinity: bool = False) -> None:
        self.evs = [make_evaluator("inprocess", problem, calib) for _ in range(workers)]
        self.held: list[set] | None = [set() for _ in range(workers)] if affinity else None
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
            chunks = split_chunks(todo, self.steps, self.workers) if self.held is None else \
                route(todo, self.steps, self.held)
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


def tempering_curves(problem: TinyflowProblem, calib: Any, held: Any, workers: list[int], sa: int,
                     hc: int) -> dict[str, Any]:
    """Best loss so far against the critical path: the sequential search (1 worker) and tempering with each W."""
    cfg = SearchConfig(28, 10, sa_iters=sa, hc_rounds=hc, seed=0)
    runs: dict[str, Any] = {}

    def one(name: str, w: int, scheme: str) -> None:
        sim = SimulatedWorkers(problem, calib, w, affinity=scheme == "tempering")
        trace: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        hook = lambda e: trace.append((sim.critical_items, e["best_loss"]))  # noqa: E731
        res = search(sim.losses, cfg, on_step=hook) if scheme == "sequential" else \
            search_tempering(sim.losses, cfg, TemperingConfig(workers=w), on_step=hook)
        runs[name] = {"workers": w, "scheme": scheme, "compute": list(res.compute), "loss": res.loss,
                      "evaluations": sim.evaluations, "item_evaluations": sim.item_evaluations,
                      "requests": sim.requests, "critical_items": sim.critical_items, "trace": trace,
                      "wall_s": time.perf_counter() - t0}
        print(f"  {name}: loss {res.loss:.6e}, critical {sim.critical_items}, items {sim.item_evaluations}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    one("sequential", 1, "sequential")
    target, c1 = runs["sequential"]["loss"], runs["sequential"]["critical_items"]
    for w in workers:
        one(f"tempering W={w}", w, "tempering")
    ref_lat = None
    for r in runs.values():
        r["reached_at"] = next((c for c, b in r["trace"] if b <= target), None)
        r["fraction"] = None if r["reached_at"] is None else r["reached_at"] / c1
        lat = problem.final_latents(held, CachePolicy(28, tuple(r["compute"])))
        mse = (lat - held.teacher).pow(2).flatten(1).mean(1)
        ref_lat = mse if ref_lat is None else ref_lat
        r["heldout_mse"] = float(mse.mean())
        r["heldout_psnr_latent"] = float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())
        r["wins_vs_sequential"] = int((mse < ref_lat).sum())
        r["losses_vs_sequential"] = int((mse > ref_lat).sum())
    return {"target": target, "sequential_critical": c1, "runs": runs, "pairs": len(held)}


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
    ap.add_argument("--tempering", default="", help="worker counts for the parallel scheme, e.g. 1,2,8,32")
    ap.add_argument("--heldout", type=int, default=64)
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
    if a.tempering:
        hp, hs = pairs_for(tinyflow_prompts(a.heldout, seed=7_777_777), 1, 7_777_777)
        held = problem.calibration(hp, hs)
        print("parallel tempering, critical path:", flush=True)
        res["tempering"] = tempering_curves(problem, calib2, held, [int(v) for v in a.tempering.split(",")],
                                            a.paper_sa, a.paper_hc)
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
    if "tempering" in res:
        t = res["tempering"]
        c1 = t["sequential_critical"]
        print(f"\nParallel tempering against the sequential search (N=28, K=10, SA {a.paper_sa}, HC {a.paper_hc}, "
              f"2 calibration pairs; target: the sequential final loss {t['target']:.6e}; held-out: "
              f"{t['pairs']} pairs):\n")
        print("| search | masks scored | item evaluations | critical path (items) | reaches target at (items) | "
              "fraction of sequential | final loss | held-out latent MSE | wins / losses vs sequential | "
              "est. FLUX min |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in t["runs"].items():
            reach = "never" if r["reached_at"] is None else str(r["reached_at"])
            frac = "" if r["fraction"] is None else f"1/{1 / r['fraction']:.1f}" if r["fraction"] > 0 else "0"
            print(f"| {name} | {r['evaluations']} | {r['item_evaluations']} | {r['critical_items']} | {reach} | "
                  f"{frac} | {r['loss']:.6e} | {r['heldout_mse']:.4e} | {r['wins_vs_sequential']} / "
                  f"{r['losses_vs_sequential']} | {r['critical_items'] * unit / 60:.1f} |")
        print(f"\nSequential critical path: {c1} item evaluations.")

if __name__ == "__main__":
    main()
