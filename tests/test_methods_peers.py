"""Peers' own caches (diffusers hooks) inside budcache's sampler: same output as in FluxPipeline, exact NFE."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from budcache import tinyflow
from budcache.methods import BlockWork, FirstBlockCacheMethod, MagCacheMethod, TaylorSeerMethod, available_methods
from budcache.methods.diffusers_peers import magcache_schedule, taylorseer_count
from budcache.policy import CachePolicy
from budcache.problems.tinyflow import TinyflowProblem
from helpers import StackRuns

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two squares"]
SEEDS = [3, 4]
N = 10
ATOL = 5e-4  # the outputs are O(1); a different decision on any step moves them by > 1e-2


@pytest.fixture(scope="module")
def env():
    tf = tinyflow.load()
    return SimpleNamespace(tf=tf, pipe=tf.pipeline())


def problem(env, guidance: float = 1.0, steps: int = N) -> TinyflowProblem:
    return TinyflowProblem(env.tf, steps, "euler", "reuse", guidance)


def inputs(env, guidance: float):
    cond = env.tf.encode(PROMPTS)
    uncond = env.tf.encode([""] * len(PROMPTS)) if guidance != 1.0 else None
    return env.tf.noise(SEEDS), cond, uncond


def magcache(env) -> MagCacheMethod:
    m = MagCacheMethod(threshold=0.3, max_skip_steps=3, retention_ratio=0.2)
    p = problem(env)
    noise, cond, _ = inputs(env, 1.0)
    m.ratios = m.calibrate(p, SimpleNamespace(noise=noise, cond=cond, uncond=None))
    m._steps = N
    return m


def hooked_methods(env):
    return {"fbcache": FirstBlockCacheMethod(threshold=0.3),
            "magcache": magcache(env),
            "taylorseer": TaylorSeerMethod(before=2, interval=3)}


def pipeline_output(env, method, guidance: float) -> tuple[torch.Tensor, list[int]]:
    """The peer's hook applied to tinyflow's FluxPipeline, as a user of diffusers would; and the block runs."""
    remove = method.install(env.pipe.transformer)
    try:
        with BlockWork(env.pipe.transformer) as work:
            out = env.pipe(**env.tf.pipeline_inputs(PROMPTS, guidance, SEEDS), num_inference_steps=N,
                           output_type="latent").images
    finally:
        remove()
    return out, work.runs


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("name", ["fbcache", "magcache", "taylorseer"])
@torch.no_grad()
def test_hook_in_budcache_sampler_equals_hook_in_flux_pipeline(env, name, guidance):
    method = hooked_methods(env)[name]
    with BlockWork(env.tf.transformer) as work:
        ours = method.generate(problem(env, guidance), *inputs(env, guidance))
    theirs, their_runs = pipeline_output(env, method, guidance)
    # the same decisions on every block, and the same latents up to the float32 rounding by which budcache's
    # Euler step and the pipeline's scheduler step differ even without any cache (about 1e-5 here, amplified
    # by guidance and by the cache's reuse)
    assert work.runs == their_runs
    assert torch.allclose(ours.latent, theirs, atol=ATOL, rtol=0), (ours.latent - theirs).abs().max()
    # and it did cache: fewer full stack runs than steps, and a different output from the uncached sampler
    assert ours.extra["full_runs"] < N
    full = problem(env, guidance).make_sampler(None)
    ref = full.run(full.start(inputs(env, guidance)[0]), *inputs(env, guidance)[1:]).x
    assert not torch.allclose(ours.latent, ref, atol=1e-4)


@pytest.mark.parametrize("name", ["fbcache", "magcache", "taylorseer"])
@torch.no_grad()
def test_every_generation_starts_fresh(env, name):
    """A second generation equals the first: no hook state leaks across generations."""
    m = hooked_methods(env)[name]
    a = m.generate(problem(env), *inputs(env, 1.0))
    b = m.generate(problem(env), *inputs(env, 1.0))
    assert torch.equal(a.latent, b.latent) and torch.equal(a.nfe, b.nfe)
    assert not getattr(env.tf.transformer, "_cache_config", None), "hooks must be removed after a generation"


@torch.no_grad()
def test_taylorseer_left_installed_without_reset_drifts(env):
    """Why hooks are installed per generation: TaylorSeer's step counter would run on into the next image."""
    m = TaylorSeerMethod(before=2, interval=3)
    remove = m.install(env.tf.transformer)
    try:
        s = problem(env).make_sampler(None)
        noise, cond, _ = inputs(env, 1.0)
        first, second = (s.run(s.start(noise), cond).x for _ in range(2))
    finally:
        remove()
    assert not torch.allclose(first, second, atol=1e-2)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@torch.no_grad()
def test_nfe_of_stack_skipping_hooks_equals_counted_stack_runs(env, guidance):
    """MagCache and TaylorSeer skip the whole stack: NFE = first-block runs per pass, an integer."""
    passes = 2 if guidance != 1.0 else 1
    for m in (magcache(env), TaylorSeerMethod(before=2, interval=3)):
        with StackRuns(env.tf.transformer) as runs:
            res = m.generate(problem(env, guidance), *inputs(env, guidance))
        assert res.nfe.tolist() == [runs.count / passes] * len(PROMPTS)
        assert float(res.nfe[0]).is_integer() and 1 <= res.nfe[0] < N
    ts = TaylorSeerMethod(before=2, interval=3)
    assert float(ts.generate(problem(env), *inputs(env, 1.0)).nfe[0]) == taylorseer_count(N, 2, 3)


@torch.no_grad()
def test_fbcache_nfe_counts_its_probe_block(env):
    """FirstBlockCache runs block 0 on every step: NFE = full + (N - full) * w0 / W (parameter weights)."""
    tr = env.tf.transformer
    last = tr.single_transformer_blocks[-1]
    full_runs: list[int] = []
    h = last.proj_out.register_forward_hook(lambda *a: full_runs.append(1))
    try:
        with StackRuns(tr) as probe:
            res = FirstBlockCacheMethod(threshold=0.3).generate(problem(env), *inputs(env, 1.0))
    finally:
        h.remove()
    full = len(full_runs)
    assert probe.count == N and full < N
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    w = [sum(p.numel() for p in b.parameters()) for b in blocks]
    expected = full + (N - full) * w[0] / sum(w)
    assert math.isclose(float(res.nfe[0]), expected, rel_tol=1e-12)


@torch.no_grad()
def test_block_work_of_the_uncached_sampler_is_n(env):
    p = problem(env)
    with BlockWork(env.tf.transformer) as work:
        s = p.make_sampler(None)
        s.run(s.start(inputs(env, 1.0)[0]), inputs(env, 1.0)[1])
    assert work.runs == [N] * len(work.runs) and work.work == pytest.approx(N) and work.full_runs == N


@pytest.mark.parametrize("cls,target", [(FirstBlockCacheMethod, 5), (MagCacheMethod, 5)])
@torch.no_grad()
def test_threshold_calibration_hits_the_target_mean_nfe(env, cls, target):
    p = problem(env, steps=12)
    calib = p.calibration(["a red circle", "two squares", "a small blue triangle", "three circles"], [1, 2, 3, 4])
    m = cls()
    m.fit(p, calib, target)
    assert abs(m.calib_nfe - target) <= 0.5
    assert abs(float(m.sample(p, calib.noise, calib.cond).nfe.mean()) - target) <= 0.5


def test_magcache_schedule_lets_the_threshold_reach_small_budgets():
    for steps, k in [(28, 6), (28, 8), (28, 14), (10, 3)]:
        ratio, m = magcache_schedule(steps, k)
        retained = int(ratio * steps + 0.5)
        assert 1 <= retained < k and m >= 5
        assert retained + math.ceil((steps - retained) / (m + 1)) <= max(k - 1, retained + 1)


@torch.no_grad()
def test_taylorseer_fit_computes_exactly_k(env):
    p = problem(env, steps=12)
    calib = p.calibration(["a red circle", "two squares"], [1, 2])
    m = TaylorSeerMethod()
    m.fit(p, calib, 5)
    assert taylorseer_count(12, m.before, m.interval) == 5 and len(m.candidates) >= 2
    assert m.sample(p, calib.noise, calib.cond).nfe.tolist() == [5.0, 5.0]


# ------------------------------------------------------------------------------ cache-dit (optional extra)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_cachedit_in_budcache_sampler_equals_cachedit_on_flux_pipeline(env, guidance, static):
    cache_dit = pytest.importorskip("cache_dit")
    from budcache.methods.cachedit import CacheDitStepsMethod, DBCacheMethod, private_copy

    m = CacheDitStepsMethod(mask=[1, 1, 0, 0, 1, 0, 0, 1, 0, 1]) if static else DBCacheMethod(threshold=0.3)
    m._steps, m._separate_cfg, m.warmup = N, guidance != 1.0, 2
    with BlockWork(private_copy(env.tf.transformer)) as work:
        ours = m.generate(problem(env, guidance), *inputs(env, guidance))
    other = tinyflow.load()  # cache-dit patches the model it touches for good: its own instance
    pipe = other.pipeline()
    cache_dit.enable_cache(pipe, cache_config=m.config())
    try:
        with BlockWork(other.transformer) as theirs_work:
            theirs = pipe(**other.pipeline_inputs(PROMPTS, guidance, SEEDS), num_inference_steps=N,
                          output_type="latent").images
    finally:
        cache_dit.disable_cache(pipe)
    assert sorted(work.runs) == sorted(theirs_work.runs)  # cache-dit may reorder a patched model's children
    # same decisions (above); what is left is float rounding of batched vs separate CFG passes, which
    # guidance multiplies: v = vu + g (vc - vu)
    atol = ATOL * guidance
    assert torch.allclose(ours.latent, theirs, atol=atol, rtol=0), (ours.latent - theirs).abs().max()
    assert ours.extra["full_runs"] < N
    if static:
        assert ours.extra["full_runs"] == sum(m.mask)


@torch.no_grad()
def test_cachedit_steps_mask_stays_within_the_budget(env):
    pytest.importorskip("cache_dit")
    from budcache.methods.cachedit import CacheDitStepsMethod, probe_fraction, steps_bins

    for n, k, w in [(28, 6, 1), (28, 10, 5), (12, 5, 2), (10, 4, 4)]:
        compute, cache = steps_bins(n, k, w)
        assert sum(compute) == k and sum(compute) + sum(cache) == n
    p = problem(env, steps=12)
    calib = p.calibration(["a red circle", "two squares"], [1, 2])
    m = CacheDitStepsMethod()
    m.fit(p, calib, 8)
    f = probe_fraction(env.tf.transformer)
    res = m.sample(p, calib.noise, calib.cond)
    # the shared transformer is untouched: budcache's own hooks still work on it afterwards
    s = p.make_sampler(CachePolicy.uniform(12, 5))
    assert s.result(s.run(s.start(calib.noise), calib.cond)).nfe.tolist() == [5, 5]
    assert not getattr(env.tf.transformer, "_is_patched", False)
    assert sum(m.mask) == m.computed and res.nfe[0] <= 8 + 1e-9
    assert float(res.nfe[0]) == pytest.approx(m.computed + (12 - m.computed) * f)


@torch.no_grad()
def test_cachedit_searched_mask_keeps_the_budget_and_never_loses_to_the_hand_set_mask(env):
    pytest.importorskip("cache_dit")
    from budcache.methods.cachedit import CacheDitSearchedMethod, CacheDitStepsMethod

    p = problem(env, steps=12)
    calib = p.calibration(["a red circle", "two squares"], [1, 2])
    hand = CacheDitStepsMethod()
    hand.fit(p, calib, 8)
    m = CacheDitSearchedMethod(search_kw={"sa_iters": 4, "hc_rounds": 1})
    m.fit(p, calib, 8)
    assert sum(m.mask) == hand.computed == m.computed and all(m.mask[:m.warmup])  # exact K', warm-up kept
    assert m.evaluations > 1 and m.search_loss <= m.start_loss  # the search starts from the hand-set mask
    res = m.sample(p, calib.noise, calib.cond)
    assert res.extra["full_runs"] == sum(m.mask)


def test_cachedit_missing_is_a_clear_error(monkeypatch):
    import importlib
    import sys

    from budcache.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "cache_dit", None)
    monkeypatch.delitem(sys.modules, "budcache.methods.cachedit", raising=False)
    with pytest.raises(MissingExtraError, match="pip install cache-dit"):
        importlib.import_module("budcache.methods.cachedit")

    assert "dbcache" not in available_methods()
