"""How a skipped step is approximated matters: the uniform policy and the plain K-step sampler per mechanism.

For each cache mechanism (residual ``reuse``, residual ``forecast1``/``forecast2``,
velocity reuse ``output``) and budget K of 28 steps, the held-out latent MSE
and PSNR of tinyflow's uniform K-step policy against the 28-step output,
next to the plain K-step sampler (fewer steps, no cache).

    python benchmarks/mechanisms.py [--heldout 64] [--budgets 7,10,14]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from budcache import CachePolicy, tinyflow
from budcache.problems.data import split_pairs
from budcache.problems.metrics import item_metrics
from budcache.problems.tinyflow import TinyflowProblem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--budgets", default="7,10,14")
    ap.add_argument("--mechanisms", default="reuse,output,forecast1,forecast2")
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tf = tinyflow.load()
    budgets = [int(v) for v in a.budgets.split(",")]
    rows = []
    plain: dict[int, dict[str, float]] = {}
    for mech in a.mechanisms.split(","):
        pb = TinyflowProblem(tf, 28, "euler", mech, 1.0)
        held = pb.calibration(*split_pairs(pb, "heldout", a.heldout, 0))
        for k in budgets:
            q = item_metrics(pb, pb.final_latents(held, CachePolicy.uniform(28, k)), held.teacher)
            if k not in plain:
                qp = item_metrics(pb, pb.final_latents(held, None, plain_steps=k), held.teacher)
                plain[k] = {"latent_mse": float(qp["latent_mse"].mean()), "psnr": float(qp["psnr"].mean())}
            rows.append({"mechanism": mech, "nfe": k, "latent_mse": float(q["latent_mse"].mean()),
                         "psnr": float(q["psnr"].mean())})
    print(f"date {datetime.date.today().isoformat()}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{a.heldout} held-out pairs, N=28, Euler\n")
    print("| K | " + " | ".join(f"uniform, {m}" for m in a.mechanisms.split(",")) + " | plain K steps |")
    print("|---|" + "---|" * (len(a.mechanisms.split(",")) + 1))
    for k in budgets:
        cells = [f"{r['psnr']:.2f} dB / {r['latent_mse']:.3e}" for r in rows if r["nfe"] == k]
        print(f"| {k} | " + " | ".join(cells) + f" | {plain[k]['psnr']:.2f} dB / {plain[k]['latent_mse']:.3e} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "plain": plain}, f, indent=1)


if __name__ == "__main__":
    main()
