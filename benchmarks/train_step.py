"""Time one tinyflow training step (forward, backward, AdamW) with and without ``torch.compile``.

Usage: python benchmarks/train_step.py [--batch 64] [--steps 10]
Prints seconds per step of each mode, measured in one run (the ratio is the figure to trust).
"""

from __future__ import annotations

import argparse
import time

import torch

from budcache.tinyflow.model import TinyTextEncoder, image_ids, image_to_latent, new_transformer, text_ids
from budcache.tinyflow.render import render_params
from budcache.tinyflow.train import make_batch


def seconds_per_step(compile: bool, batch: int, steps: int, warmup: int = 3) -> float:
    """Mean wall time of ``steps`` training steps after ``warmup`` (which include compiling)."""
    torch.manual_seed(0)
    t, e = new_transformer(), TinyTextEncoder()
    opt = torch.optim.AdamW(list(t.parameters()) + list(e.parameters()), lr=1e-4)
    fwd = torch.compile(t) if compile else t
    ids, sp = make_batch(batch, 0, 0)
    x0 = image_to_latent(render_params(sp) * 2 - 1)
    ii, ti = image_ids(), text_ids()

    def step() -> None:
        s = torch.rand(batch)
        eps = torch.randn_like(x0)
        xs = (1 - s)[:, None, None] * x0 + s[:, None, None] * eps
        tok, pooled = e(ids)
        v = fwd(hidden_states=xs, encoder_hidden_states=tok, pooled_projections=pooled, timestep=s,
                img_ids=ii, txt_ids=ti, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    plain = seconds_per_step(False, a.batch, a.steps)
    compiled = seconds_per_step(True, a.batch, a.steps)
    print(f"tinyflow training step, batch {a.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
          f"plain {plain:.3f} s, compiled {compiled:.3f} s (ratio {compiled / plain:.2f})")


if __name__ == "__main__":
    main()
