"""Tests for budcache.diffusers: cache policies applied to tinyflow's real diffusers FluxPipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import budcache.diffusers as bd
from budcache import tinyflow
from budcache.errors import ConfigError, PolicyError
from budcache.hooks import find_cache
from budcache.policy import CachePolicy
from helpers import StackRuns

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two squares"]
SEEDS = [0, 1]
N, K = 8, 3
POLICY = CachePolicy.uniform(N, K)  # computes steps 0, 2, 5


def generate(env, prompts=PROMPTS, seeds=SEEDS, guidance=1.0, steps=N, **kw) -> torch.Tensor:
    out = env.pipe(**env.tf.pipeline_inputs(prompts, guidance, seeds), num_inference_steps=steps,
                   output_type="latent", **kw)
    return out.images


@pytest.fixture(scope="module")
def env():
    tf = tinyflow.load()
    pipe = tf.pipeline()
    e = SimpleNamespace(tf=tf, pipe=pipe, never_hooked={})
    with torch.no_grad():
        # outputs of the pipeline before any cache was ever installed on it
        for g in (1.0, 3.0):
            e.never_hooked[g] = generate(e, guidance=g)
    return e


@pytest.fixture(autouse=True)
def _clean(env):
    with torch.no_grad():
        yield
    bd.remove(env.pipe)


# ----------------------------------------------------------------------------- pipeline == sampler
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_uncached_pipeline_matches_the_sampler(env, guidance):
    out = env.never_hooked[guidance]
    assert out.shape == (2, 64, 48)
    ref = env.tf.sample(PROMPTS, SEEDS, steps=N, guidance=guidance)
    # guidance multiplies the rounding difference of the two branches (v_u + g (v_c - v_u)): scale atol with it
    torch.testing.assert_close(out, ref.latent, atol=1e-5 * guidance, rtol=0)


@pytest.mark.parametrize("mechanism", ["reuse", "forecast2"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_pipeline_matches_the_sampler_and_runs_k_times(env, guidance, mechanism):
    passes = 2 if guidance != 1.0 else 1
    ref = env.tf.sample(PROMPTS, SEEDS, steps=N, guidance=guidance, policy=POLICY, mechanism=mechanism)
    handle = bd.apply(env.pipe, POLICY, mechanism=mechanism)
    assert find_cache(env.pipe.transformer) is handle
    with StackRuns(env.tf.transformer) as runs:
        out = generate(env, guidance=guidance)
    torch.testing.assert_close(out, ref.latent, atol=1e-5 * guidance, rtol=0)
    assert runs.count == K * passes  # K per branch per generation
    assert handle.stats.stack_runs == K * passes
    assert handle.stats.calls == N * passes
    assert handle.stats.elements_computed == K * passes * len(PROMPTS)
    # the cache is really in use
    assert not torch.allclose(out, env.never_hooked[guidance], atol=1e-4)


@pytest.mark.parametrize("estimator", ["vforecast1", "vforecast2"])
def test_step_index_velocity_forecasts_match_the_sampler(env, estimator):
    """A policy naming a velocity forecast in the step index (``vforecast1`` is TaylorSeer lite's) runs the same
    on the pipeline as in budcache's sampler, K stack runs, and differs from the forecast in sigma."""
    policy = CachePolicy.uniform(N, K, estimator=estimator)
    ref = env.tf.sample(PROMPTS, SEEDS, steps=N, policy=policy)
    sigma = env.tf.sample(PROMPTS, SEEDS, steps=N, policy=policy.with_estimators("vtaylor" + estimator[-1]))
    bd.apply(env.pipe, policy)
    with StackRuns(env.tf.transformer) as runs:
        out = generate(env)
    torch.testing.assert_close(out, ref.latent, atol=1e-5, rtol=0)
    assert runs.count == K
    assert not torch.allclose(out, sigma.latent, atol=1e-4)


def test_sampler_refuses_a_transformer_with_an_applied_cache(env):
    bd.apply(env.pipe, POLICY)
    with pytest.raises(ConfigError, match="already carries a budcache cache"):
        env.tf.sample(PROMPTS, SEEDS, steps=N, policy=POLICY)


# ----------------------------------------------------------------------------- policies and arguments
def test_policy_for_another_step_count_is_a_policy_error(env):
    bd.apply(env.pipe, CachePolicy.uniform(10, 4))
    with StackRuns(env.tf.transformer) as runs, \
            pytest.raises(PolicyError, match=r"'steps'.*for 10 steps but the pipeline runs 8"):
        generate(env)
    assert runs.count == 0


def test_apply_uniform_by_name(env):
    handle = bd.apply(env.pipe, POLICY)
    by_policy = generate(env)
    bd.remove(env.pipe)
    assert find_cache(env.pipe.transformer) is None
    handle = bd.apply(env.pipe, "uniform", nfe=K, steps=N)
    with StackRuns(env.tf.transformer) as runs:
        by_name = generate(env)
    assert runs.count == K and handle.stats.stack_runs == K
    assert torch.equal(by_name, by_policy)


def test_apply_uniform_needs_nfe_and_steps(env):
    with pytest.raises(ConfigError, match="needs nfe=K and steps=N"):
        bd.apply(env.pipe, "uniform", nfe=K)
    assert find_cache(env.pipe.transformer) is None


def test_apply_a_policy_file(env, tmp_path):
    path = POLICY.save(tmp_path / "policy.json")
    bd.apply(env.pipe, POLICY)
    by_policy = generate(env)
    bd.remove(env.pipe)
    bd.apply(env.pipe, str(path))
    assert torch.equal(generate(env), by_policy)


def test_apply_twice_is_an_error(env):
    bd.apply(env.pipe, POLICY)
    with pytest.raises(ConfigError, match="already applied"):
        bd.apply(env.pipe, POLICY)


def test_bare_transformer_needs_a_scheduler(env):
    with pytest.raises(ConfigError, match="scheduler="):
        bd.apply(env.pipe.transformer, POLICY)
    assert find_cache(env.pipe.transformer) is None
    bd.apply(env.pipe, POLICY)
    via_pipe = generate(env)
    bd.remove(env.pipe)
    bd.apply(env.pipe.transformer, POLICY, scheduler=env.pipe.scheduler)
    assert torch.equal(generate(env), via_pipe)
    bd.remove(env.pipe.transformer)
    assert find_cache(env.pipe.transformer) is None


# ----------------------------------------------------------------------------- robustness
class Stop(Exception):
    pass


@pytest.mark.parametrize("where", ["callback", "transformer"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_generation_after_an_interrupted_one_equals_a_fresh_run(env, where, guidance):
    handle = bd.apply(env.pipe, POLICY)
    fresh = generate(env, guidance=guidance)

    kw = {}
    hook = None
    if where == "callback":
        def stop_at_3(pipe, i, t, callback_kwargs):
            if i == 3:
                raise Stop
            return callback_kwargs
        kw["callback_on_step_end"] = stop_at_3
    else:
        calls = []

        def stop_inside(module, args):
            calls.append(1)
            if len(calls) == 4:  # mid-generation, inside a transformer call
                raise Stop
        hook = env.tf.transformer.single_transformer_blocks[0].register_forward_pre_hook(stop_inside)
    try:
        with pytest.raises(Stop):
            generate(env, guidance=guidance, **kw)
    finally:
        if hook is not None:
            hook.remove()

    with StackRuns(env.tf.transformer) as runs:
        again = generate(env, guidance=guidance)
    assert torch.equal(again, fresh)
    assert runs.count == K * (2 if guidance != 1.0 else 1)
    assert find_cache(env.pipe.transformer) is handle


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_remove_gives_never_hooked_outputs(env, guidance):
    bd.apply(env.pipe, POLICY)
    hooked = generate(env, guidance=guidance)
    assert not torch.equal(hooked, env.never_hooked[guidance])
    bd.remove(env.pipe)
    assert find_cache(env.pipe.transformer) is None
    with StackRuns(env.tf.transformer) as runs:
        out = generate(env, guidance=guidance)
    assert torch.equal(out, env.never_hooked[guidance])
    assert runs.count == N * (2 if guidance != 1.0 else 1)
    bd.remove(env.pipe)  # removing again is a no-op


def test_batch_size_can_change_between_generations(env):
    one = (["a red circle"], [0])
    three = (["two squares", "a blue triangle", "a small circle in the top left"], [1, 2, 3])
    refs = {len(p): env.tf.sample(p, s, steps=N, policy=POLICY).latent for p, s in (one, three)}
    handle = bd.apply(env.pipe, POLICY)
    for prompts, seeds in (one, three, one):
        with StackRuns(env.tf.transformer) as runs:
            out = generate(env, prompts, seeds)
        assert runs.count == K
        torch.testing.assert_close(out, refs[len(prompts)], atol=1e-5, rtol=0)
    assert handle.stats.stack_runs == 3 * K
    assert handle.stats.elements_computed == K * (1 + 3 + 1)


# ----------------------------------------------------------------------------- schedule bookkeeping
def _direct_call(env, sigma: float):
    cond = env.tf.encode(["a circle"])
    den = env.tf.denoiser()
    return den(env.tf.noise([0]), torch.tensor([sigma]), cond, "cond")


def test_two_calls_at_one_step_in_one_context_are_an_error(env):
    generate(env)  # sets the scheduler's timesteps
    bd.apply(env.pipe, POLICY, step_from="timestep")
    s0 = float(env.pipe.scheduler.sigmas[0])
    _direct_call(env, s0)
    with pytest.raises(ConfigError, match="cache_context"):
        _direct_call(env, s0)


def test_img2img_strength_is_a_clear_policy_error(env):
    generate(env)
    bd.apply(env.pipe, POLICY)
    env.pipe.scheduler.set_begin_index(3)  # what img2img pipelines do for strength < 1
    try:
        with pytest.raises(PolicyError, match="strength"):
            _direct_call(env, float(env.pipe.scheduler.sigmas[3]))
    finally:
        env.pipe.scheduler.set_begin_index(0)


def test_a_jump_in_steps_starts_a_new_generation(env):
    """A generation interrupted at step 2 and a new one entered at step 5 must not share residuals."""
    generate(env)
    sig = env.pipe.scheduler.sigmas
    pol = CachePolicy.from_steps(N, [0, 1, 2, 5])
    bd.apply(env.pipe, pol, step_from="timestep")
    for k in (0, 1, 2):
        _direct_call(env, float(sig[k]))
    with pytest.raises(ConfigError, match="first step of a generation must compute"):
        _direct_call(env, float(sig[6]))  # 6 is cached, but the step-5 residual of this generation never ran


def test_policy_with_learned_sigmas_needs_those_sigmas(env):
    base = env.tf.sigmas(N)
    learned = CachePolicy.uniform(N, K).with_sigmas((base * 0.98 + 0.02 * torch.linspace(1, 0, N + 1)).tolist())
    bd.apply(env.pipe, learned)
    with pytest.raises(PolicyError, match="sigmas"):
        generate(env)


def test_mechanism_defaults_to_the_policys(env):
    pol = CachePolicy.uniform(N, K)
    handle = bd.apply(env.pipe, pol.with_meta(mechanism="forecast2"))
    assert handle.mechanism == "forecast2"
    by_meta = generate(env)
    bd.remove(env.pipe)
    outs = {}
    for mechanism in ("forecast2", "reuse"):
        bd.apply(env.pipe, pol, mechanism=mechanism)
        outs[mechanism] = generate(env)
        bd.remove(env.pipe)
    # the images are the forecast's, not those of the default mechanism
    assert torch.equal(by_meta, outs["forecast2"])
    assert not torch.allclose(by_meta, outs["reuse"])


@torch.no_grad()
def test_check_finite_names_the_step_where_the_model_returns_nan():
    from budcache.errors import ModelOutputError

    tf = tinyflow.load()
    pipe = tf.pipeline()
    bd.apply(pipe, CachePolicy.uniform(6, 3), check_finite=True)
    try:
        out = pipe(**tf.pipeline_inputs(["a red circle"], seeds=[0]), num_inference_steps=6,
                   output_type="latent").images
        assert torch.isfinite(out).all()  # a healthy model passes
        blocks = pipe.transformer.single_transformer_blocks
        last = blocks[len(blocks) - 1]
        handle = last.register_forward_hook(lambda m, args, out: tuple(t * float("nan") for t in out))
        try:
            with pytest.raises(ModelOutputError, match=r"the model returned NaN or Inf at step 0"):
                pipe(**tf.pipeline_inputs(["a red circle"], seeds=[0]), num_inference_steps=6, output_type="latent")
        finally:
            handle.remove()
    finally:
        bd.remove(pipe)
    with pytest.raises(ConfigError, match="check_finite is not available"):
        bd.apply(pipe, CachePolicy.uniform(6, 3, meta={"mechanism": "taylorseer"}), check_finite=True)
