"""Tests for budcache.sampler: the cached sampling loop on a tiny FLUX transformer."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FluxTransformer2DModel

from budcache.denoisers import FluxCond, FluxDenoiser
from budcache.errors import ConfigError, ModelOutputError
from budcache.hooks import find_cache
from budcache.policy import CachePolicy
from budcache.sampler import ALL_MECHANISMS, ComputeAll, Sampler, SamplerState, StaticMask, sample
from budcache.schedules import flux
from helpers import StackRuns, make_transformer

torch.set_num_threads(1)

ROWS, COLS, TXT = 4, 4, 8
N, K = 8, 3
POLICY = CachePolicy.uniform(N, K)  # computes steps 0, 2, 5
SIGMAS = flux(N, ROWS * COLS)
SOLVERS = ("euler", "dpmpp2m", "ipndm")


def make_inputs(b: int, seed: int = 1) -> tuple[torch.Tensor, FluxCond, FluxCond]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, ROWS * COLS, 16, generator=g)
    cond = FluxCond(torch.randn(b, TXT, 32, generator=g), torch.randn(b, 32, generator=g))
    uncond = FluxCond(torch.randn(b, TXT, 32, generator=g), torch.randn(b, 32, generator=g))
    return x, cond, uncond


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tr() -> FluxTransformer2DModel:
    return make_transformer()


def run(tr, x, cond, *, policy=None, mechanism="reuse", solver="euler", guidance=1.0, uncond=None,
        sigmas=SIGMAS):
    return sample(tr, x, cond, sigmas, solver=solver, policy=policy, mechanism=mechanism, guidance=guidance,
                  uncond=uncond, rows=ROWS, cols=COLS)


# ----------------------------------------------------------------------------- all-compute == uncached
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_full_policy_reproduces_the_uncached_sampler_bit_for_bit(tr, mechanism, solver, guidance):
    x, cond, uncond = make_inputs(2)
    plain = run(tr, x, cond, solver=solver, guidance=guidance, uncond=uncond)
    full = run(tr, x, cond, policy=CachePolicy.full(N), mechanism=mechanism, solver=solver, guidance=guidance,
               uncond=uncond)
    assert torch.equal(full.latent, plain.latent)
    assert full.nfe.tolist() == [N, N]
    assert bool(full.computed.all()) and full.computed.shape == (N, 2)
    assert find_cache(tr) is None  # the sampler takes its hooks off again


def test_mechanisms_are_the_documented_ones():
    assert set(ALL_MECHANISMS) == {"reuse", "forecast1", "forecast2", "taylor1", "taylor2", "output", "vtaylor1",
                                   "vtaylor2", "vforecast1", "vforecast2", "taylorseer"}


# ----------------------------------------------------------------------------- exact budgets
@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_static_policy_runs_the_stack_exactly_k_times(tr, mechanism, batch):
    x, cond, _ = make_inputs(batch)
    with StackRuns(tr) as runs:
        res = run(tr, x, cond, policy=POLICY, mechanism=mechanism)
    assert runs.count == K
    assert res.nfe.tolist() == [K] * batch
    assert res.nfe_max == res.nfe_min == K
    assert res.computed.shape == (N, batch)
    assert res.computed[:, 0].tolist() == list(POLICY.mask)
    assert torch.isfinite(res.latent).all()
    # the cache was really used: the result is not the uncached one
    plain = run(tr, x, cond)
    assert not torch.allclose(res.latent, plain.latent, atol=1e-4)


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_static_policy_with_cfg_runs_the_stack_2k_times(tr, mechanism):
    x, cond, uncond = make_inputs(3)
    with StackRuns(tr) as runs:
        res = run(tr, x, cond, policy=POLICY, mechanism=mechanism, guidance=3.0, uncond=uncond)
    assert runs.count == 2 * K
    assert res.nfe.tolist() == [K] * 3  # nfe counts steps, not passes


def test_uncached_sampler_runs_every_step(tr):
    x, cond, uncond = make_inputs(2)
    with StackRuns(tr) as runs:
        res = run(tr, x, cond, guidance=2.0, uncond=uncond)
    assert runs.count == 2 * N
    assert res.nfe.tolist() == [N, N]


# ----------------------------------------------------------------------------- per-element masks
MASKS = torch.tensor([
    [1, 0, 0, 1, 0, 0, 1, 0],
    [1, 1, 1, 0, 1, 0, 0, 0],
    [1, 0, 1, 0, 1, 0, 1, 1],
], dtype=torch.bool)


@pytest.mark.parametrize("mechanism,guidance", [("reuse", 1.0), ("forecast1", 1.0), ("forecast2", 1.0),
                                                ("output", 1.0), ("forecast2", 3.0), ("output", 3.0)])
def test_per_element_masks_equal_running_each_element_alone(tr, mechanism, guidance):
    x, cond, uncond = make_inputs(3, seed=5)
    with StackRuns(tr) as runs:
        batch = run(tr, x, cond, policy=MASKS, mechanism=mechanism, guidance=guidance, uncond=uncond)
    passes = 2 if guidance != 1.0 else 1
    # one stack run per step where any element computes (the others ride along for free)
    assert runs.count == passes * int(MASKS.any(0).sum())
    assert batch.nfe.tolist() == MASKS.sum(1).tolist()
    assert torch.equal(batch.computed, MASKS.T)
    for i in range(3):
        idx = torch.tensor([i])
        alone = run(tr, x[i:i + 1], cond.select(idx), policy=CachePolicy.from_mask(MASKS[i].tolist()),
                    mechanism=mechanism, guidance=guidance, uncond=uncond.select(idx))
        torch.testing.assert_close(batch.latent[i:i + 1], alone.latent, atol=1e-5, rtol=1e-5)
        assert alone.nfe.tolist() == [int(MASKS[i].sum())]


def test_mask_rows_must_match_the_batch(tr):
    x, cond, _ = make_inputs(2)
    with pytest.raises(ConfigError, match="mask has 3 rows but the batch has 2"):
        run(tr, x, cond, policy=MASKS)
    assert find_cache(tr) is None


def test_mask_must_compute_step_zero():
    with pytest.raises(ConfigError, match="step 0 must be computed"):
        StaticMask(torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool))


# ----------------------------------------------------------------------------- state copy / resume
@pytest.mark.parametrize("until", [1, 3, 6])
@pytest.mark.parametrize("mechanism,solver,guidance", [
    ("reuse", "euler", 1.0), ("forecast1", "dpmpp2m", 1.0), ("forecast2", "ipndm", 1.0),
    ("output", "dpmpp2m", 1.0), ("forecast2", "euler", 3.0), ("output", "ipndm", 3.0),
])
def test_resuming_a_kept_state_equals_one_run(tr, mechanism, solver, guidance, until):
    x, cond, uncond = make_inputs(2, seed=7)
    sampler = Sampler(FluxDenoiser(tr, ROWS, COLS), SIGMAS, solver, POLICY, mechanism, guidance)
    full = sampler.run(sampler.start(x), cond, uncond)
    mid = sampler.run(sampler.start(x), cond, uncond, until=until)
    assert isinstance(mid, SamplerState) and mid.step == until
    if mechanism != "output":
        # the residual cache travels in the state, one history per CFG pass
        assert set(mid.cache) == ({"cond", "uncond"} if guidance != 1.0 else {"cond"})
    kept_x = mid.x.clone()
    a = sampler.run(mid, cond, uncond)
    b = sampler.run(mid, cond, uncond)
    assert torch.equal(mid.x, kept_x)  # continuing did not change the kept state
    for r in (a, b):
        assert r.step == N
        assert torch.equal(r.x, full.x)
        assert torch.equal(r.nfe, full.nfe)
    assert torch.equal(sampler.result(a).latent, sampler.result(full).latent)
    assert find_cache(tr) is None


def test_result_of_an_unfinished_state_is_an_error(tr):
    x, cond, _ = make_inputs(1)
    sampler = Sampler(FluxDenoiser(tr, ROWS, COLS), SIGMAS, "euler", POLICY)
    mid = sampler.run(sampler.start(x), cond, until=4)
    with pytest.raises(ConfigError, match="state is at step 4 of 8"):
        sampler.result(mid)
    with pytest.raises(ConfigError, match=r"until=2 must lie in \[4, 8\]"):
        sampler.run(mid, cond, until=2)


# ----------------------------------------------------------------------------- gradients in sigmas
# (With "output" and Euler or iPNDM, a skipped step's sigma can cancel out exactly, since
# the reused velocity is the same on both sides of it; DPM-Solver++ keeps it through x0_hat.)
@pytest.mark.parametrize("mechanism,solver", [("reuse", "euler"), ("forecast1", "ipndm"), ("forecast2", "dpmpp2m"),
                                              ("output", "dpmpp2m")])
def test_result_is_differentiable_in_sigmas(mechanism, solver):
    tr = make_transformer(seed=3).requires_grad_(False)
    x, cond, _ = make_inputs(2, seed=9)
    sigmas = SIGMAS.clone().requires_grad_()
    with torch.enable_grad():
        res = run(tr, x, cond, policy=POLICY, mechanism=mechanism, solver=solver, sigmas=sigmas)
        loss = res.latent.square().mean()
        loss.backward()
    grad = sigmas.grad
    assert grad is not None and grad.shape == sigmas.shape
    assert torch.isfinite(grad).all(), grad
    assert (grad[1:-1] != 0).all(), grad


# ----------------------------------------------------------------------------- errors
def test_nan_from_a_callable_model_names_the_step():
    calls = []

    def model(x, sigma, cond):
        calls.append(float(sigma[0]))
        v = -x
        return v * math.nan if len(calls) == 3 else v

    x = torch.randn(2, 4)
    with pytest.raises(ModelOutputError, match=r"NaN or Inf at step 2 \(sigma="):
        sample(model, x, None, SIGMAS)
    assert len(calls) == 3


# With residual reuse the transformer is still called on skipped steps (its blocks pass through);
# with output reuse a skipped step does not call it at all.
@pytest.mark.parametrize("mechanism,nth_call", [("reuse", 3), ("output", 2)])
def test_nan_from_the_transformer_leaves_it_clean(tr, mechanism, nth_call):
    x, cond, _ = make_inputs(2)
    reference = run(tr, x, cond, policy=POLICY, mechanism=mechanism)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * math.nan if len(calls) == nth_call else output

    hook = tr.proj_out.register_forward_hook(poison)
    try:
        with pytest.raises(ModelOutputError, match="at step 2"):
            run(tr, x, cond, policy=POLICY, mechanism=mechanism)
    finally:
        hook.remove()
    assert find_cache(tr) is None  # the sampler took its hooks off on the way out
    assert torch.equal(run(tr, x, cond, policy=POLICY, mechanism=mechanism).latent, reference.latent)


def test_inf_from_a_callable_model_is_an_error():
    def model(x, sigma, cond):
        return torch.full_like(x, math.inf)

    with pytest.raises(ModelOutputError, match="step 0"):
        sample(model, torch.randn(1, 3), None, SIGMAS)


def test_plain_callable_supports_only_output_reuse():
    calls = []

    def model(x, sigma, cond):
        calls.append(1)
        return cond - x

    x, cond = torch.randn(2, 4), torch.randn(2, 4)
    for mechanism in ("reuse", "forecast1", "forecast2"):
        with pytest.raises(ConfigError, match=f"mechanism '{mechanism}' needs a diffusers transformer"):
            sample(model, x, cond, SIGMAS, policy=POLICY, mechanism=mechanism)
    assert calls == []
    res = sample(model, x, cond, SIGMAS, policy=POLICY, mechanism="output")
    assert len(calls) == K and res.nfe.tolist() == [K, K]
    # without a policy a callable runs every step with any mechanism name
    calls.clear()
    sample(model, x, cond, SIGMAS, mechanism="reuse")
    assert len(calls) == N


def test_policy_for_another_step_count_is_an_error(tr):
    den = FluxDenoiser(tr, ROWS, COLS)
    with pytest.raises(ConfigError, match="policy or mask is for 10 steps but the sampler has 8"):
        Sampler(den, SIGMAS, "euler", CachePolicy.uniform(10, 4))
    with pytest.raises(ConfigError, match="policy or mask is for 6 steps but the sampler has 8"):
        Sampler(den, SIGMAS, "euler", torch.ones(6, dtype=torch.bool))
    x, cond, _ = make_inputs(1)
    with pytest.raises(ConfigError, match="policy or mask is for 10 steps"):
        run(tr, x, cond, policy=CachePolicy.uniform(10, 4))


def test_unknown_mechanism_is_an_error(tr):
    with pytest.raises(ConfigError, match="mechanism 'fast' is unknown"):
        Sampler(FluxDenoiser(tr, ROWS, COLS), SIGMAS, "euler", POLICY, "fast")


def test_sample_uses_the_sigmas_a_policy_carries(tr):
    x, cond, _ = make_inputs(2)
    learned = torch.tensor([1.0, 0.93, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1, 0.0])
    assert not torch.allclose(learned, SIGMAS)
    with_sigmas = run(tr, x, cond, policy=POLICY.with_sigmas(learned), mechanism="forecast1")
    explicit = run(tr, x, cond, policy=POLICY, mechanism="forecast1", sigmas=learned)
    default = run(tr, x, cond, policy=POLICY, mechanism="forecast1")
    assert torch.equal(with_sigmas.latent, explicit.latent)
    assert not torch.allclose(with_sigmas.latent, default.latent, atol=1e-4)


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
def test_guidance_without_uncond_is_an_error(tr, mechanism):
    x, cond, _ = make_inputs(1)
    with StackRuns(tr) as runs, pytest.raises(ConfigError, match="needs the unconditional conditioning"):
        run(tr, x, cond, policy=POLICY, mechanism=mechanism, guidance=3.0)
    assert runs.count == 0
    assert find_cache(tr) is None


def test_controllers():
    state = Sampler(lambda x, s, c: -x, SIGMAS).start(torch.zeros(3, 2))
    assert ComputeAll().decide(4, state).tolist() == [True] * 3
    static = StaticMask(POLICY)
    assert static.steps == N
    assert [bool(static.decide(k, state)[0]) for k in range(N)] == list(POLICY.mask)


# ----------------------------------------------------------------------------- per-step estimators
MIXED = CachePolicy(N, (0, 2, 5), estimators=("vtaylor1", "taylor2", "output", "forecast1", "vtaylor2"))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_mixed_estimators_keep_the_budget_exact(tr, batch, guidance):
    x, cond, uncond = make_inputs(batch)
    with StackRuns(tr) as runs:
        res = run(tr, x, cond, policy=MIXED, mechanism=None, guidance=guidance, uncond=uncond)
    passes = 2 if guidance != 1.0 else 1
    assert runs.count == passes * K and runs.batches == [batch] * (passes * K)
    assert res.nfe.tolist() == [K] * batch
    assert res.computed[:, 0].tolist() == list(MIXED.mask)
    # every estimator really ran: the mixed result differs from each single-estimator policy
    for name in ("vtaylor1", "taylor2", "output"):
        single = run(tr, x, cond, policy=MIXED.with_estimators(name), guidance=guidance, uncond=uncond)
        assert not torch.allclose(res.latent, single.latent, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_searched_peer_schedule_keeps_the_budget_exact(tr, batch, guidance):
    """diffusers' TaylorSeer on a budcache mask computes exactly the mask's steps (its own estimator fills the rest)."""
    x, cond, uncond = make_inputs(batch)
    pol = CachePolicy(N, (0, 1, 4), meta={"mechanism": "taylorseer"})
    with StackRuns(tr) as runs:
        res = run(tr, x, cond, policy=pol, mechanism=None, guidance=guidance, uncond=uncond)
    passes = 2 if guidance != 1.0 else 1
    assert runs.count == passes * 3
    assert res.nfe.tolist() == [3] * batch
    other = run(tr, x, cond, policy=CachePolicy(N, (0, 3, 6), meta={"mechanism": "taylorseer"}), mechanism=None,
                guidance=guidance, uncond=uncond)
    assert not torch.allclose(res.latent, other.latent, atol=1e-6)  # the mask drives the peer's decisions


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("compute", [(0, 1, 4), (0, 2, 3, 6)])
def test_vforecast1_is_taylorseers_own_estimator_on_its_schedule(tr, compute, guidance):
    """budcache's ``vforecast1`` (the velocity, linear in the step index) on a schedule gives diffusers' TaylorSeer
    (lite mode) output on the same schedule: the two differ from ``vtaylor1`` only in the time variable."""
    x, cond, uncond = make_inputs(2)
    peer = run(tr, x, cond, policy=CachePolicy(N, compute, meta={"mechanism": "taylorseer"}), mechanism=None,
               guidance=guidance, uncond=uncond)
    own = CachePolicy(N, compute, estimators=["vforecast1"] * (N - len(compute)))
    ours = run(tr, x, cond, policy=own, mechanism=None, guidance=guidance, uncond=uncond)
    torch.testing.assert_close(ours.latent, peer.latent, rtol=1e-5, atol=1e-5)
    other = run(tr, x, cond, policy=own.with_estimators("vtaylor1"), guidance=guidance, uncond=uncond)
    assert not torch.allclose(other.latent, peer.latent, atol=1e-4)  # the time variable matters here


def test_per_element_plans_match_one_by_one_runs(tr):
    """A (B, N) plan runs B different masks and estimators as one batch, element b as if alone."""
    x, cond, _ = make_inputs(2)
    from budcache import estimators as est

    plans = torch.tensor([[0, est.CODES["vtaylor1"], 0, est.CODES["taylor1"], est.CODES["taylor1"], 0, 3, 3],
                          [0, 0, est.CODES["output"], est.CODES["vtaylor2"], 0, est.CODES["reuse"], 0, 1]])
    with StackRuns(tr) as runs:
        both = sample(tr, x, cond, SIGMAS, policy=StaticMask.from_plan(plans), rows=ROWS, cols=COLS)
    assert both.nfe.tolist() == [3, 4]
    assert sum(runs.batches) == 7  # element-steps that ran the stack
    for b in range(2):
        alone = sample(tr, x[b:b + 1], cond.select(torch.tensor([b])), SIGMAS,
                       policy=StaticMask.from_plan(plans[b]), rows=ROWS, cols=COLS)
        torch.testing.assert_close(both.latent[b:b + 1], alone.latent, rtol=1e-4, atol=1e-5)
