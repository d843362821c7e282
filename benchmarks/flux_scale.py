"""Time ratio of a budcache policy on a FLUX.1-sized transformer (random weights), for a GPU.

tinyflow's steps are too cheap on a GPU for a cache to show its saving (host
work dominates). This builds diffusers' ``FluxTransformer2DModel`` with
FLUX.1-dev's configuration (19 double-stream and 38 single-stream blocks,
hidden size 3072, about 12B parameters) with random weights in bf16, wraps it
in a ``FluxPipeline`` with no VAE or text encoders (random prompt embeddings of
FLUX's shapes), and times, at 1024x1024 (4096 image tokens, 512 text tokens):

- all N steps, no hooks;
- a K of N policy (``CachePolicy.uniform``, reuse) with ``budcache.diffusers.apply``;
- a policy that computes step 0 only (prices a skipped step, for the ideal ratio).

Random weights give the same compute per step as trained ones; quality is not measured. Timings interleave the
configurations and take medians, with a device synchronise around each generation.

Usage: python benchmarks/flux_scale.py [--device cuda] [--steps 28] [--nfe 10] [--repeats 3] [--size 1024]
       [--compile] [--tiny]   (--tiny: a 2-block config, to check the script on a CPU)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Any

import torch

import budcache.diffusers as bd
from budcache import CachePolicy

FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
TINY = dict(FLUX1_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _generate(pipe: Any, inputs: dict, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    pipe(**inputs, num_inference_steps=steps, output_type="latent")
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True), inductor")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.set_grad_enabled(False)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if a.tiny else FLUX1_DEV
    torch.manual_seed(0)
    with device:
        tr = FluxTransformer2DModel(**cfg).to(dtype).eval()
    params = sum(p.numel() for p in tr.parameters())
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = (a.size // 16) ** 2
    inputs = dict(prompt_embeds=torch.randn(1, 512, cfg["joint_attention_dim"], generator=g).to(device, dtype),
                  pooled_prompt_embeds=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
                  latents=torch.randn(1, tokens, 64, generator=g).to(device, dtype), height=a.size, width=a.size,
                  guidance_scale=3.5)
    n, k = a.steps, a.nfe
    configs: dict[str, CachePolicy | None] = {f"all {n} steps": None, f"budcache K={k} of {n}": CachePolicy.uniform(n, k),
                                              "budcache step 0 only": CachePolicy.from_steps(n, [0])}
    kinds = ["eager"] + (["compiled"] if a.compile else [])
    times: dict[tuple[str, str], list[float]] = {(kind, name): [] for kind in kinds for name in configs}
    first: dict[tuple[str, str], float] = {}
    for kind in kinds:
        for name, policy in configs.items():
            if policy is not None:
                bd.apply(pipe, policy)
            if kind == "compiled":
                torch._dynamo.reset()
                if policy is not None:
                    bd.compile(pipe)
                else:
                    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
            try:
                first[(kind, name)] = _generate(pipe, inputs, n, device)  # warm-up (and compile)
                for _ in range(a.repeats):
                    times[(kind, name)].append(_generate(pipe, inputs, n, device))
            finally:
                bd.remove(pipe)
                pipe.transformer = tr
    med = {key: statistics.median(v) for key, v in times.items()}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"### A FLUX.1-sized transformer, random weights ({datetime.date.today().isoformat()}, "
          f"{platform.machine()}, {where}, torch {torch.__version__})\n")
    extra = " --compile" if a.compile else ""
    print(f"Command: `python benchmarks/flux_scale.py --device {a.device} --steps {n} --nfe {k} --repeats {a.repeats} "
          f"--size {a.size}{extra}{' --tiny' if a.tiny else ''}` ({params / 1e9:.2f}B parameters, {dtype}, "
          f"{a.size}x{a.size}: {tokens} image and 512 text tokens, batch 1, FluxPipeline, medians of "
          f"{a.repeats})\n")
    print("| mode | configuration | median (s) | s / step | first run (s) |\n|---|---|---|---|---|")
    for kind, name in times:
        print(f"| {kind} | {name} | {med[(kind, name)]:.3f} | {med[(kind, name)] / n:.4f} "
              f"| {first[(kind, name)]:.1f} |")
    for kind in kinds:
        full, part, one = (med[(kind, x)] for x in configs)
        skip_frac = (one - full / n) / (n - 1) / (full / n)
        ideal = k / n + (n - k) / n * skip_frac
        print(f"\n{kind.capitalize()}: K={k} of {n} takes **{part / full:.3f}** of all {n} steps; ideal {ideal:.3f} "
              f"({k}/{n} = {k / n:.3f} plus the skipped steps at {skip_frac:.1%} of a computed step each).", end="")
    print()


if __name__ == "__main__":
    main()
