"""budcache.diffusers.apply on Wan and SD3 pipelines built from tiny random configs (no download)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import budcache.diffusers as bd
from budcache import CachePolicy, ConfigError, PolicyError
from helpers import make_sd3_pipeline, make_wan_pipeline

torch.set_num_threads(1)
STEPS = 10


def _wan():
    pipe = make_wan_pipeline()
    t = pipe.transformer
    g = torch.Generator().manual_seed(1)
    inputs = dict(prompt_embeds=torch.randn(2, 8, 16, generator=g), negative_prompt_embeds=torch.randn(2, 8, 16, generator=g),
                  height=16, width=16, num_frames=1, guidance_scale=3.0, output_type="latent")
    latents = torch.randn(2, 4, 1, 8, 8, generator=g)
    return pipe, t.blocks[0].attn1, inputs, latents, "frames"


def _sd3():
    pipe = make_sd3_pipeline()
    t = pipe.transformer
    g = torch.Generator().manual_seed(1)
    inputs = dict(prompt_embeds=torch.randn(2, 6, 16, generator=g), pooled_prompt_embeds=torch.randn(2, 8, generator=g),
                  negative_prompt_embeds=torch.randn(2, 6, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(2, 8, generator=g),
                  height=8 * pipe.vae_scale_factor, width=8 * pipe.vae_scale_factor, guidance_scale=3.0,
                  output_type="latent")
    latents = torch.randn(2, 4, 8, 8, generator=g)
    return pipe, t.transformer_blocks[0].attn, inputs, latents, "images"


@pytest.fixture(params=["wan", "sd3"], scope="module")
def model(request):
    return {"wan": _wan, "sd3": _sd3}[request.param]()


def _generate(model, steps=STEPS, **kw):
    pipe, _, inputs, latents, field = model
    with torch.no_grad():
        return getattr(pipe(**inputs, latents=latents.clone(), num_inference_steps=steps, **kw), field)


class _Counter:
    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))

    def close(self):
        self.h.remove()


def test_all_compute_policy_is_bit_identical_and_remove_restores(model):
    ref = _generate(model)
    bd.apply(model[0], CachePolicy.full(STEPS))
    try:
        assert torch.equal(_generate(model), ref)
    finally:
        bd.remove(model[0])
    assert torch.equal(_generate(model), ref)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_block_stack_runs_exactly_k_times_per_branch(model, k):
    pipe, attn, *_ = model
    # Wan runs CFG as two calls ("cond"/"uncond"), SD3 as one batched call: count block runs per generation.
    calls_per_step = 2 if isinstance(pipe, WanPipeline) else 1
    counter = _Counter(attn)
    bd.apply(pipe, CachePolicy.uniform(STEPS, k))
    try:
        out = _generate(model)
    finally:
        bd.remove(pipe)
        counter.close()
    assert counter.n == k * calls_per_step
    assert torch.isfinite(out).all()


def test_policy_for_another_step_count_is_an_error(model):
    bd.apply(model[0], CachePolicy.uniform(STEPS + 2, 4))
    try:
        with pytest.raises(PolicyError, match="steps"):
            _generate(model)
    finally:
        bd.remove(model[0])


def test_interrupted_generation_does_not_leak_into_the_next(model):
    pipe = model[0]
    bd.apply(pipe, CachePolicy.uniform(STEPS, 4))
    try:
        fresh = _generate(model)

        def boom(p, i, t, kw):
            if i == 5:
                raise RuntimeError("interrupted")
            return {}

        with pytest.raises(RuntimeError, match="interrupted"):
            _generate(model, callback_on_step_end=boom)
        assert torch.equal(_generate(model), fresh)
    finally:
        bd.remove(pipe)


def test_forecast_mechanism_and_uniform_shortcut(model):
    pipe, attn, *_ = model
    calls_per_step = 2 if isinstance(pipe, WanPipeline) else 1
    outs, runs = {}, {}
    for mechanism in ("reuse", "forecast2"):
        counter = _Counter(attn)
        bd.apply(pipe, "uniform", nfe=5, steps=STEPS, mechanism=mechanism)
        try:
            outs[mechanism] = _generate(model)
        finally:
            bd.remove(pipe)
            counter.close()
        runs[mechanism] = counter.n
    # the shortcut is the uniform 5-of-10 policy: 5 block-stack runs per branch, whatever the mechanism
    assert runs == {"reuse": 5 * calls_per_step, "forecast2": 5 * calls_per_step}
    ref = CachePolicy.uniform(STEPS, 5)
    bd.apply(pipe, ref, mechanism="reuse")
    try:
        assert torch.equal(_generate(model), outs["reuse"])
    finally:
        bd.remove(pipe)
    # the forecast really extrapolates: its output differs from plain reuse of the same mask
    assert torch.isfinite(outs["forecast2"]).all()
    assert not torch.allclose(outs["forecast2"], outs["reuse"])


def test_unsupported_transformer_is_named():
    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    class Pipe:
        transformer = Blocks()
        scheduler = FlowMatchEulerDiscreteScheduler()

    with pytest.raises(ConfigError, match="Blocks"):
        bd.apply(Pipe(), CachePolicy.full(4))
