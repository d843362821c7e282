"""Alignment benchmark on tinyflow: stage 2 at tight budgets (K = 5, 6, 7 of 28).

For every budget, on held-out prompt x seed pairs disjoint from calibration:
latent MSE and image PSNR against the 28-step output, and checker accuracy
(budcache.tinyflow.checker), for

- plain K steps, and plain K steps aligned ("Original-Opt", the control);
- the uniform K-of-28 mask, and the same mask aligned;
- budcache (the mask searched by budcache.search), and budcache aligned
  (exact gradient), plus budcache aligned with the reference's truncated
  gradient (cached residuals detached);
- joint: search and alignment alternated until a validation set (disjoint
  from both) stops improving; round 0 is budcache aligned.

Also a finite-difference check of both gradients on one searched mask.

Usage: python benchmarks/align.py [--budgets 5,6,7] [--calib 24] [--heldout 64] [--epochs 3] [--lr 0.05]
Prints a Markdown section for BENCHMARKS.md (and writes --json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
import torch

from budcache import CachePolicy, tinyflow
from budcache.align import AlignConfig, align, policy_loss, student_sampler
from budcache.align.joint import JointRound, joint
from budcache.align.params import make_schedule
from budcache.align.trainer import final_latents, release
from budcache.problems.data import pairs_for
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.search import Evaluator, SearchConfig, search
from budcache.search.losses import get_loss, latent_mse
from budcache.tinyflow import checker


def measure(problem, held, policy, plain_steps=None) -> dict:
    lat = final_latents(problem, held, policy, plain_steps=plain_steps)
    q = item_metrics(problem, lat, held.teacher)
    acc = checker.accuracy(held.prompts, problem.tf.images(lat))
    return {"latent_mse": float(q["latent_mse"].mean()), "psnr": float(q["psnr"].mean()), "accuracy": acc,
            "per_item": q["latent_mse"].tolist()}


def fd_check(problem, calib, compute, kind="ld3", h=1e-3) -> dict:
    """Loss change along -g/|g| for the exact and the truncated gradient, against the first-order prediction."""
    mask = [k in compute for k in range(28)]
    out = {}
    for name, exact in (("exact", True), ("detached", False)):
        sched = make_schedule(kind, problem.sigmas(28), mask)

        def loss(grad=False):
            s = student_sampler(problem, mask, sched(), True, exact)
            with torch.set_grad_enabled(grad):
                v = latent_mse(s.run(s.start(calib.noise), calib.cond).x, calib.teacher).mean()
                if grad:
                    v.backward()
            release(s)
            return float(v.detach())

        l0 = loss(True)
        g = sched.theta.grad.clone()
        with torch.no_grad():
            sched.theta -= h * g / g.norm()
        out[name] = {"predicted": -h * float(g.norm()), "measured": loss() - l0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="5,6,7")
    ap.add_argument("--calib", type=int, default=24)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--parametrisation", default="ld3", help="of every aligned cached sampler (ld3, offset, segment)")
    ap.add_argument("--plain-parametrisation", default="ld3",
                    help="of the plain K-step control (segment has nothing to learn there: every step computes)")
    ap.add_argument("--plain-lr", type=float, default=None, help="learning rate of the plain control (default --lr)")
    ap.add_argument("--mechanism", default="forecast1", help="cache mechanism of every cached sampler "
                    "(default forecast1, as budcache search; reuse: the paper's)")
    ap.add_argument("--search-loss", default="logmse", help="the search's per-item loss (default logmse, as "
                    "budcache search; mse: the paper's). Alignment always minimises the latent MSE")
    ap.add_argument("--sa-iters", type=int, default=100)
    ap.add_argument("--hc-rounds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--select", action="store_true",
                    help="aligned runs keep the epoch with the lowest validation loss (start included)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    problem = TinyflowProblem(tinyflow.load(), steps=28, mechanism=a.mechanism)
    with torch.no_grad():
        calib = problem.calibration(*pairs_for(tinyflow_prompts(a.calib, seed=0), 1, 0))
        val = problem.calibration(*pairs_for(tinyflow_prompts(a.val, seed=3_333_333), 1, 3_333_333))
        held = problem.calibration(*pairs_for(tinyflow_prompts(a.heldout, seed=7_777_777), 1, 7_777_777))
    acfg = AlignConfig(parametrisation=a.parametrisation, lr=a.lr, epochs=a.epochs, accumulation=a.accumulation,
                       micro_batch=a.micro_batch)
    ref = AlignConfig(**{**acfg.__dict__, "residual_grad": False})
    pcfg = AlignConfig(**{**acfg.__dict__, "parametrisation": a.plain_parametrisation,
                          "lr": a.lr if a.plain_lr is None else a.plain_lr})
    res: dict = {"date": datetime.date.today().isoformat(), "args": vars(a),
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
                 "teacher_accuracy": checker.accuracy(held.prompts, problem.tf.images(held.teacher)), "budgets": {}}
    sel = {"validation": val} if a.select else {}
    ev = Evaluator(problem.make_sampler, calib, loss=get_loss(a.search_loss))
    prev = None
    for k in [int(v) for v in a.budgets.split(",")]:
        t0 = time.perf_counter()
        rows, wall = {}, {}
        scfg = SearchConfig(28, k, sa_iters=a.sa_iters, hc_rounds=a.hc_rounds, seed=0)
        with torch.no_grad():
            found = search(ev.losses, scfg, init=prev)
        prev = found.compute
        wall["search"] = time.perf_counter() - t0
        bud = CachePolicy(28, found.compute)
        uni = CachePolicy.uniform(28, k)
        rows["plain"] = measure(problem, held, None, plain_steps=k)
        t = time.perf_counter()
        rows["plain aligned"] = measure(problem, held,
                                        align(problem, calib, CachePolicy.full(k), pcfg, **sel).policy)
        wall["plain aligned"] = time.perf_counter() - t
        rows["uniform"] = measure(problem, held, uni)
        t = time.perf_counter()
        rows["uniform aligned"] = measure(problem, held, align(problem, calib, uni, acfg, **sel).policy)
        wall["uniform aligned"] = time.perf_counter() - t
        rows["budcache"] = measure(problem, held, bud)
        t = time.perf_counter()
        bal = align(problem, calib, bud, acfg, **sel)
        wall["budcache aligned"] = time.perf_counter() - t
        rows["budcache aligned"] = measure(problem, held, bal.policy)
        t = time.perf_counter()
        rows["budcache aligned, detached residuals"] = measure(problem, held,
                                                               align(problem, calib, bud, ref, **sel).policy)
        wall["budcache aligned, detached residuals"] = time.perf_counter() - t
        t = time.perf_counter()
        r0 = JointRound(0, found.compute, found.loss, policy_loss(problem, val, bal.policy), bal.policy)
        jr = joint(problem, calib, val, scfg, acfg, max_rounds=a.rounds, later_sa_iters=0, first=r0,
                   select=a.select)
        wall["joint (rounds >= 1)"] = time.perf_counter() - t
        rows["joint"] = measure(problem, held, jr.policy)
        base = np.array(rows["budcache"]["per_item"])
        for name, row in rows.items():
            row["wins_vs_budcache"] = int((np.array(row["per_item"]) < base).sum())
        res["budgets"][k] = {"mask": bud.strip(), "rows": {n: {kk: v for kk, v in r.items() if kk != "per_item"}
                                                           for n, r in rows.items()},
                             "joint": {"rounds": [{"round": r.round, "mask": CachePolicy(28, r.compute).strip(),
                                                   "val_loss": r.aligned_loss} for r in jr.rounds],
                                       "best": jr.best, "stopped": jr.stopped},
                             "wall_s": wall}
        print(f"K={k} done in {time.perf_counter() - t0:.0f} s", flush=True)
    res["fd_check"] = fd_check(problem, calib, res_mask(res, a), a.parametrisation)
    res["total_wall_s"] = time.perf_counter() - t_all
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(markdown(res, a))


def res_mask(res: dict, a) -> tuple[int, ...]:
    k = [int(v) for v in a.budgets.split(",")][-1]
    return tuple(i for i, c in enumerate(res["budgets"][k]["mask"]) if c == "C")


def markdown(res: dict, a) -> str:
    lines = [f"### Alignment ({res['date']}, {res['machine']})", "",
             f"Command: `python benchmarks/align.py --budgets {a.budgets} --calib {a.calib} --val {a.val} "
             f"--heldout {a.heldout} --epochs {a.epochs} --lr {a.lr} --accumulation {a.accumulation} "
             f"--micro-batch {a.micro_batch} --sa-iters {a.sa_iters} --hc-rounds {a.hc_rounds} --rounds {a.rounds} "
             f"--mechanism {a.mechanism} --search-loss {a.search_loss} --parametrisation {a.parametrisation} "
             f"--plain-parametrisation {a.plain_parametrisation}"
             f"{'' if a.plain_lr is None else f' --plain-lr {a.plain_lr}'}"
             f"{' --select' if a.select else ''}` "
             f"(total {res['total_wall_s'] / 60:.1f} min)", "",
             f"Alignment: {a.parametrisation} (plain control: {a.plain_parametrisation}, lr "
             f"{a.lr if a.plain_lr is None else a.plain_lr}), {a.epochs} epochs over {a.calib} calibration pairs (fresh noise after "
             f"the first), {a.micro_batch} x {a.accumulation} items per update, AdamW lr {a.lr}, wd 1e-4, clip 1, "
             f"cosine with 5% warm-up. Held-out: {a.heldout} pairs; checker accuracy of the 28-step teacher on "
             f"them: {100 * res['teacher_accuracy']:.1f}%. Cached samplers use the {a.mechanism} mechanism; the "
             f"search minimises the {a.search_loss} loss. Wins: held-out pairs with lower latent MSE than "
             "budcache (the searched mask, base schedule).", "",
             "| K | method | latent MSE | PSNR (dB) | checker acc. | wins vs budcache |", "|---|---|---|---|---|---|"]
    n = a.heldout
    for k, b in res["budgets"].items():
        for name, r in b["rows"].items():
            w = "" if name == "budcache" else f"{r['wins_vs_budcache']}/{n}"
            lines.append(f"| {k} | {name} | {r['latent_mse']:.4e} | {r['psnr']:.2f} | {100 * r['accuracy']:.1f}% "
                         f"| {w} |")
    lines.append("")
    for k, b in res["budgets"].items():
        j = b["joint"]
        rounds = "; ".join(f"round {r['round']} `{r['mask']}` val {r['val_loss']:.4e}" for r in j["rounds"])
        lines.append(f"- K={k}: searched mask `{b['mask']}`; joint: {rounds}; best round {j['best']} "
                     f"({j['stopped']}). Wall (s): " + ", ".join(f"{n} {v:.0f}" for n, v in b["wall_s"].items()))
    fd = res["fd_check"]
    lines += ["", f"Gradient check ({a.parametrisation} at the base schedule, last budget's searched mask, "
              "calibration loss, step 1e-3 along -g/|g|): " + "; ".join(f"{n}: predicted {v['predicted']:+.3e}, measured {v['measured']:+.3e}"
                                               for n, v in fd.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
