"""Critical-path model of the item split (``--split items``): W workers, each scoring every mask on its own share
of the calibration items, alone and combined with tempering.

Every simulated worker is an in-process evaluator with one torch thread and its
own prefix store, fed exactly as :class:`budcache.search.local.LocalEvaluator`
feeds its workers: with ``P`` proposal groups and ``S`` item shares
(``W = P x S`` workers), a request's new masks are routed across the ``P``
groups (:func:`budcache.search.local.route`, as the mask split routes them;
``P = 1``: all to one group), and every worker of a group scores its group's
masks on its share (:func:`budcache.search.local.item_shares`). The loss of a
mask is the float32 mean of the per-item losses in item order
(:func:`budcache.search.losses.mean_of_items`), as the local backend takes it.
The critical path adds, per request, the largest worker's block-stack work
(item evaluations). "Reaches target" is the critical path at which the best
loss so far first reaches the loss of the one-worker sequential search's
policy, as that configuration scores the policy's mask (shares of other sizes
can round a loss differently in the last bits, which accumulate over the
steps: the same mask can score 1e-4 apart).

Two configurations:

- ``paper``: the paper's search (N=28, K=10, SA 200, HC 20, mechanism
  ``reuse``, loss MSE, two calibration pairs, seed 0): at most 2 shares, so
  W = 8 and 32 combine the item split with tempering (4 x 2, 16 x 2: the
  layout of ``--split hybrid``, the default when W > C, with one tempering
  proposal per group and round) or run tempering on the mask split (8 x 1,
  32 x 1: ``--split masks``);
- ``default``: the mask search of the default ``budcache search`` at K = 10
  (32 calibration pairs of seed 0, estimator ``vtaylor1``, loss ``logmse``,
  SA 200, HC 20, seed 0): the sequential search with S = 1, 2, 8, 32 shares.

Held-out: ``--heldout`` pairs disjoint from calibration; latent MSE and PSNR of
each policy (its mask with the configuration's estimator) against the 28-step
output, and paired wins against the one-worker sequential policy.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/item_split.py [--configs paper,default]
       [--default-shares 1,2,8,32] [--heldout 64] [--json out.json]
Prints a Markdown section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from typing import Any

import torch

from budcache import tinyflow
from budcache.policy import CachePolicy
from budcache.problems.data import calibration_pairs, pairs_for, split_pairs
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.search import SearchConfig, search
from budcache.search.distributed import align_weights, item_shares, to_device
from budcache.search.evaluator import Evaluator, check_computes
from budcache.search.local import route
from budcache.search.losses import get_loss, mean_of_items
from budcache.search.parallel import TemperingConfig, search_tempering


class SplitWorkers:
    """``P x S`` in-process evaluators fed like local workers with the item split; counts the critical path."""

    def __init__(self, problem: TinyflowProblem, calib: Any, *, groups: int, shares: int, loss: Any,
                 estimator: str | None) -> None:
        align_weights(problem.transformer)
        self.shares = item_shares(len(calib), shares)
        parts = [to_device(calib.items(a, b), "cpu") for a, b in self.shares]
        self.evs = [[Evaluator(problem.make_sampler, part, loss=loss, batch_candidates=False, threads=1,
                               estimator=estimator, keep_items=True) for part in parts] for _ in range(groups)]
        self.held: list[set[Any]] = [set() for _ in range(groups)]
        self.steps = problem.steps
        self.memo: dict[tuple[int, ...], float] = {}
        self.requests = 0
        self.critical_items = 0
        self.evaluations = 0

    def losses(self, computes: Any) -> list[float]:
        keys = check_computes(computes, self.steps)
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if todo:
            self.requests += 1
            chunks = route(todo, self.steps, self.held) if len(self.evs) > 1 else [todo]
            work = []
            for group, chunk in zip(self.evs, chunks):
                if not chunk:
                    continue
                per = []
                for ev in group:
                    before = ev.stats.item_evaluations
                    per.append(ev.item_losses(chunk))
                    work.append(ev.stats.item_evaluations - before)
                for j, k in enumerate(chunk):
                    self.memo[k] = mean_of_items([p[j] for p in per])
                self.evaluations += len(chunk)
            self.critical_items += max(work)
        return [self.memo[k] for k in keys]

    @property
    def item_evaluations(self) -> int:
        return sum(ev.stats.item_evaluations for group in self.evs for ev in group)


def run(problem: TinyflowProblem, calib: Any, cfg: SearchConfig, *, groups: int, shares: int, loss: Any,
        estimator: str | None, reference: list[int] | None = None, sequential: bool = False) -> dict[str, Any]:
    """One search: sequential for one group or with ``sequential`` (then ``sa_batch = groups`` speculative
    proposals per request, as the backends run it), tempering with ``groups`` proposals per round otherwise.

    ``target`` is the loss of ``reference`` (the one-worker sequential policy; default: this run's own) as
    this configuration scores it: shares of other sizes may round that mask's loss differently.
    """
    sim = SplitWorkers(problem, calib, groups=groups, shares=shares, loss=loss, estimator=estimator)
    trace: list[tuple[int, float]] = []
    hook = lambda e: trace.append((sim.critical_items, e["best_loss"]))  # noqa: E731
    t0 = time.perf_counter()
    res = search(sim.losses, cfg, on_step=hook, sa_batch=groups) if groups == 1 or sequential else \
        search_tempering(sim.losses, cfg, TemperingConfig(workers=groups), on_step=hook)
    out = {"groups": groups, "shares": shares, "workers": groups * shares, "compute": list(res.compute),
           "loss": res.loss, "evaluations": sim.evaluations, "item_evaluations": sim.item_evaluations,
           "requests": sim.requests, "critical_items": sim.critical_items, "trace": trace,
           "wall_s": time.perf_counter() - t0}
    out["target"] = sim.losses([reference])[0] if reference is not None else res.loss  # scored after the search
    print(f"  {groups} x {shares}: loss {res.loss:.6e}, critical {sim.critical_items}, items "
          f"{sim.item_evaluations}, {out['wall_s']:.0f} s, {list(res.compute)}", flush=True)
    return out


def score(problem: TinyflowProblem, held: Any, runs: dict[str, Any], estimator: str | None) -> None:
    """Held-out latent MSE / PSNR of each run's policy, and paired wins against the first run's."""
    ref = None
    for r in runs.values():
        pol = CachePolicy(problem.steps, tuple(r["compute"]))
        if estimator is not None:
            pol = pol.with_estimators(estimator)
        lat = problem.final_latents(held, pol)
        mse = (lat - held.teacher).pow(2).flatten(1).mean(1)
        ref = mse if ref is None else ref
        r["heldout_mse"] = float(mse.mean())
        r["heldout_psnr"] = float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())
        r["wins"], r["losses"] = int((mse < ref).sum()), int((mse > ref).sum())


def finish(runs: dict[str, Any]) -> tuple[float, int]:
    first = next(iter(runs.values()))
    target, c1 = first["loss"], first["critical_items"]
    for r in runs.values():
        r["reached_at"] = next((c for c, b in r["trace"] if b <= r["target"]), None)
        r["fraction"] = None if r["reached_at"] is None else r["reached_at"] / c1
    return target, c1


def table(title: str, runs: dict[str, Any], target: float, c1: int, pairs: int) -> None:
    print(f"\n{title} (target: the one-worker sequential policy's loss {target:.6e}, as each configuration "
          f"scores that mask; held-out: {pairs} pairs)\n")
    print("| search | workers (groups x shares) | masks scored | item evaluations | critical path (items) | "
          "reaches target at (items) | fraction of the sequential critical path | final loss | same policy | "
          "held-out latent MSE | latent PSNR | wins / losses vs sequential |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    first = next(iter(runs.values()))
    for name, r in runs.items():
        reach = "never" if r["reached_at"] is None else str(r["reached_at"])
        frac = "" if r["fraction"] is None else f"{r['fraction']:.3f} (1/{1 / r['fraction']:.1f})"
        same = "yes" if r["compute"] == first["compute"] and r["loss"] == first["loss"] else \
            ("same mask" if r["compute"] == first["compute"] else "no")
        print(f"| {name} | {r['workers']} ({r['groups']} x {r['shares']}) | {r['evaluations']} | "
              f"{r['item_evaluations']} | {r['critical_items']} | {reach} | {frac} | {r['loss']:.6e} | {same} | "
              f"{r['heldout_mse']:.4e} | {r['heldout_psnr']:.2f} | {r['wins']} / {r['losses']} |")
    marks = sorted({round(c1 * f) for f in (0.03, 0.05, 0.083, 0.125, 0.2, 0.3, 0.5, 0.75, 1.0)})
    print("\nBest loss so far against the critical path (item evaluations):\n")
    print("| critical path | " + " | ".join(str(m) for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for name, r in runs.items():
        cells = []
        for m in marks:
            seen = [b for c, b in r["trace"] if c <= m]
            cell = f"{seen[-1]:.4g}" if seen else "-"
            cells.append(cell + (" (ended)" if r["critical_items"] < m else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def spread(a: argparse.Namespace) -> None:
    """The paper configuration over several search seeds: the fraction of the sequential critical path at which
    each run first reaches the one-worker sequential policy's loss of the same seed (same calibration pairs)."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    problem = TinyflowProblem(tinyflow.load(), steps=28, mechanism="reuse")
    prompts, seeds = pairs_for(tinyflow_prompts(2, seed=0), 1, 0)
    calib = problem.calibration(prompts, seeds)
    hp, hs = pairs_for(tinyflow_prompts(a.heldout, seed=7_777_777), 1, 7_777_777)
    held = problem.calibration(hp, hs)
    specs = [tuple(int(v) for v in spec.split("x")) for spec in a.paper_runs.split(",")]
    if specs[0] != (1, 1):
        raise SystemExit("--spread-seeds needs 1x1 (the sequential reference) first in --paper-runs")
    rows = []
    for seed in parse_seeds(a.spread_seeds):
        cfg = SearchConfig(28, 10, sa_iters=200, hc_rounds=20, seed=seed)
        print(f"seed {seed}:", flush=True)
        runs: dict[str, Any] = {}
        for g, s in specs:
            seq = runs["1x1"]["compute"] if runs else None
            runs[f"{g}x{s}"] = run(problem, calib, cfg, groups=g, shares=s, loss=get_loss("mse"), estimator=None,
                                   reference=seq)
        score(problem, held, runs, None)
        finish(runs)
        rows.append((seed, runs))
    names = [f"{g}x{s}" for g, s in specs[1:]]
    target = {w: 0.2 if w <= 8 else 1 / 12 for w in (g * s for g, s in specs[1:])}
    print(f"\n### Tempering over search seeds ({datetime.date.today().isoformat()}, {platform.machine()}, one torch "
          f"thread per simulated worker, torch {torch.__version__}, no GPU)\n")
    print("Paper's search (N=28, K=10, SA 200, HC 20, `reuse`, loss MSE, 2 calibration pairs), the search's seed "
          "varied. Each cell: the fraction of the one-worker sequential critical path at which the run first reaches "
          "the sequential policy's loss of the same seed (`never (final loss)` when it ends above it), then its "
          f"held-out wins / losses against the sequential policy on {len(held)} pairs.\n")
    print("| seed | sequential final loss | " + " | ".join(f"{n.replace('x', ' x ')}" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for seed, runs in rows:
        cells = []
        for n in names:
            r = runs[n]
            f = "never ({:.3e})".format(r["loss"]) if r["fraction"] is None else f"{r['fraction']:.3f}"
            cells.append(f"{f}; {r['wins']} / {r['losses']}")
        print(f"| {seed} | {runs['1x1']['loss']:.4e} | " + " | ".join(cells) + " |")
    fr = {n: sorted(r[n]["fraction"] if r[n]["fraction"] is not None else float("inf") for _, r in rows)
          for n in names}
    ws = [int(n.split("x")[0]) * int(n.split("x")[1]) for n in names]
    print("| target | | " + " | ".join(f"{target[w]:.3g}" for w in ws) + " |")
    print("| seeds meeting it | | " + " | ".join(
        f"{sum(f <= target[w] for f in fr[n])} of {len(rows)}" for n, w in zip(names, ws)) + " |")
    print("| median fraction | | " + " | ".join(f"{statistics.median(fr[n]):.3f}" for n in names) + " |")
    print("| ended at or below the sequential loss | | " + " | ".join(
        f"{sum(r[n]['loss'] <= r[n]['target'] for _, r in rows)} of {len(rows)}" for n in names) + " |")
    print("| held-out wins / losses, all seeds | | " + " | ".join(
        f"{sum(r[n]['wins'] for _, r in rows)} / {sum(r[n]['losses'] for _, r in rows)}" for n in names) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="paper,default")
    ap.add_argument("--paper-runs", default="1x1,1x2,8x1,4x2,32x1,16x2",
                    help="groups x shares of the paper configuration (1 group: sequential; more: tempering; "
                         "a trailing s, e.g. 4x2s: the sequential annealing with one speculative proposal per group)")
    ap.add_argument("--default-shares", default="1,2,8,32")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the search's seed (the calibration pairs stay seed 0's)")
    ap.add_argument("--spread-seeds", default=None,
                    help="e.g. 0-15: run the paper configuration once per search seed and print the spread table")
    a = ap.parse_args()
    if a.spread_seeds:
        spread(a)
        return
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    configs = a.configs.split(",")
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(),
                           "machine": f"{platform.machine()}, one torch thread per simulated worker, "
                                      f"torch {torch.__version__}"}
    if "paper" in configs:
        problem = TinyflowProblem(tinyflow.load(), steps=28, mechanism="reuse")
        prompts, seeds = pairs_for(tinyflow_prompts(2, seed=0), 1, 0)
        calib = problem.calibration(prompts, seeds)
        hp, hs = pairs_for(tinyflow_prompts(a.heldout, seed=7_777_777), 1, 7_777_777)
        held = problem.calibration(hp, hs)
        cfg = SearchConfig(28, 10, sa_iters=200, hc_rounds=20, seed=a.seed)
        print("paper configuration:", flush=True)
        runs = {}
        for spec in a.paper_runs.split(","):
            sequential = spec.endswith("s")  # e.g. 4x2s: the sequential annealing on that layout
            g, s = (int(v) for v in spec.rstrip("s").split("x"))
            name = ("sequential" if g == 1 else f"sequential, {g} speculative proposals" if sequential else
                    f"tempering, {g} proposals per round") + \
                ((", items split" if g == 1 else f", hybrid ({g} groups x {s} shares)") if s > 1 else "")
            seq = next(iter(runs.values()))["compute"] if runs else None
            runs[name] = run(problem, calib, cfg, groups=g, shares=s, loss=get_loss("mse"), estimator=None,
                             reference=seq, sequential=sequential)
        score(problem, held, runs, None)
        res["paper"] = {"runs": runs, "pairs": len(held)}
    if "default" in configs:
        problem = TinyflowProblem(tinyflow.load(), steps=28)
        prompts, seeds = calibration_pairs(problem, None, 0)
        calib = problem.calibration(prompts, seeds)
        hp, hs = split_pairs(problem, "heldout", a.heldout, 0, prompts)
        held = problem.calibration(hp, hs)
        cfg = SearchConfig(28, 10, sa_iters=200, hc_rounds=20, seed=a.seed)
        print("default configuration:", flush=True)
        runs = {}
        for s in (int(v) for v in a.default_shares.split(",")):
            seq = next(iter(runs.values()))["compute"] if runs else None
            runs["sequential" + (f", items split in {s}" if s > 1 else "")] = run(
                problem, calib, cfg, groups=1, shares=s, loss=get_loss("logmse"), estimator="vtaylor1",
                reference=seq)
        score(problem, held, runs, "vtaylor1")
        res["default"] = {"runs": runs, "pairs": len(held)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"\n### Item split: critical path with W workers ({res['date']}, {res['machine']}, no GPU)")
    if "paper" in res:
        target, c1 = finish(res["paper"]["runs"])
        table("Paper's search (N=28, K=10, SA 200, HC 20, `reuse`, loss MSE, 2 calibration pairs, seed 0)",
              res["paper"]["runs"], target, c1, res["paper"]["pairs"])
    if "default" in res:
        target, c1 = finish(res["default"]["runs"])
        table("Default mask search (N=28, K=10, SA 200, HC 20, `vtaylor1`, loss `logmse`, 32 calibration pairs, "
              "seed 0)", res["default"]["runs"], target, c1, res["default"]["pairs"])


if __name__ == "__main__":
    main()
