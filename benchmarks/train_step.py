"""Time tinyflow's training step with and without ``--compile``, through the trainer itself.

Each mode runs ``budcache.tinyflow.train.train`` for ``warmup + steps`` steps into a temporary
checkpoint and reads the per-step time between its log entries at ``warmup`` and ``warmup + steps``
(so compiling, which happens in the first steps, is not counted). A step is everything the trainer
does: rendering the batch, forward, backward, AdamW and the EMA update.

Usage: python benchmarks/train_step.py [--batch 64] [--steps 40] [--warmup 10]
Prints seconds per step of each mode, measured in one run (the ratio is the figure to trust).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch

from budcache.tinyflow.train import TrainConfig, train


def seconds_per_step(compile: bool, batch: int, steps: int, warmup: int) -> float:
    """Mean wall time of the trainer's steps ``warmup+1 .. warmup+steps``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt"
        cfg = TrainConfig(iters=warmup + steps, batch=batch, warmup=1)
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints every log entry
            train(out, cfg, progress=False, log_every=1, save_every_s=float("inf"), compile=compile)
        log = {e["step"]: e["elapsed_s"] for e in json.loads((out / "state.json").read_text())["log"]}
    return (log[warmup + steps] - log[warmup]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps not timed (compiling happens here)")
    a = ap.parse_args()
    plain = seconds_per_step(False, a.batch, a.steps, a.warmup)
    compiled = seconds_per_step(True, a.batch, a.steps, a.warmup)
    print(f"tinyflow training step, batch {a.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}: "
          f"plain {plain:.3f} s, compiled {compiled:.3f} s (ratio {compiled / plain:.2f})")


if __name__ == "__main__":
    main()
