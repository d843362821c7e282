"""Tests for budcache.align: monotone schedules initialised at the base, gradients to every learnable sigma,
checkpointed = plain gradients, the aligned policy in JSON and in the sampler, resume, joint, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from budcache import CachePolicy, tinyflow
from budcache.align import (
    AlignConfig,
    CheckpointedDenoiser,
    align,
    align_plain,
    lr_factor,
    make_schedule,
    policy_loss,
    student_sampler,
)
from budcache.align.joint import joint
from budcache.align.trainer import load_checkpoint, release
from budcache.errors import ConfigError
from budcache.problems.data import pairs_for
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.schedules import flux, linear
from budcache.search import SearchConfig
from budcache.search.losses import latent_mse

torch.set_num_threads(1)

N = 8
MASK = (True, False, True, False, False, True, False, False)   # K = 3 of 8
KINDS = ("ld3", "offset", "segment")


@pytest.fixture(scope="module")
def problem() -> TinyflowProblem:
    return TinyflowProblem(tinyflow.load(), steps=N)


@pytest.fixture(scope="module")
def calib(problem):
    prompts, seeds = pairs_for(tinyflow_prompts(4, seed=3), 1, 3)
    with torch.no_grad():
        return problem.calibration(prompts, seeds)


@pytest.fixture(scope="module")
def heldout(problem):
    prompts, seeds = pairs_for(tinyflow_prompts(4, seed=99), 1, 99)
    with torch.no_grad():
        return problem.calibration(prompts, seeds)


# ============================================================================ parametrisations
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", [flux(28, 64), linear(8), flux(5, 64)], ids=["flux28", "linear8", "flux5"])
def test_initial_sigmas_equal_base(kind, base):
    n = base.numel() - 1
    mask = [k % 3 == 0 for k in range(n)]
    s = make_schedule(kind, base, mask)
    out = s()
    assert out.dtype == base.dtype and out.shape == base.shape
    assert float((out.detach().double() - base.double()).abs().max()) <= 1e-6
    assert s.theta.numel() > 0 and len(s.learnable) > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [10.0, 1e3, 1e6])
def test_schedule_strictly_decreasing_under_large_updates(kind, scale):
    base = flux(28, 64)
    mask = [k in (0, 1, 5, 9, 20) for k in range(28)]
    s = make_schedule(kind, base, mask)
    g = torch.Generator().manual_seed(int(scale))
    for _ in range(5):
        with torch.no_grad():
            s.theta.copy_(torch.randn(s.theta.shape, generator=g, dtype=torch.float64) * scale)
        out = s()
        assert bool(torch.isfinite(out).all())
        assert bool((out[1:] < out[:-1]).all()), out
        assert float(out[0].detach()) == float(base[0]) and float(out[-1].detach()) == float(base[-1])


def test_schedule_keeps_fixed_sigmas_fixed():
    base = flux(12, 64)
    mask = [k in (0, 4, 7) for k in range(12)]
    seg = make_schedule("segment", base, mask)
    with torch.no_grad():
        seg.theta.normal_(0, 3)
    out = seg().detach()
    for k in (0, 4, 7, 12):  # computed steps and the end are anchors
        assert float(out[k]) == float(base[k])
    assert set(seg.learnable) == set(range(1, 12)) - {4, 7}
    off = make_schedule("offset", base, mask, offset_indices="skipped", offset_bound=0.01)
    assert off.learnable == tuple(k for k in range(1, 12) if not mask[k])
    with torch.no_grad():
        off.theta.fill_(100.0)
    moved = off().detach() - base
    assert float(moved.abs().max()) <= 0.01 + 1e-7
    assert all(float(moved[k]) == 0.0 for k in (0, 4, 7, 12))


def test_schedule_errors():
    base = flux(6, 64)
    with pytest.raises(ConfigError, match="unknown"):
        make_schedule("cosine", base)
    with pytest.raises(ConfigError, match="every step computes"):
        make_schedule("segment", base, [True] * 6)
    with pytest.raises(ConfigError, match="strictly decreasing"):
        make_schedule("ld3", torch.tensor([1.0, 0.5, 0.6, 0.0]))
    with pytest.raises(ConfigError, match="mask has 3 steps"):
        make_schedule("ld3", base, [True] * 3)
    with pytest.raises(ConfigError, match="parametrisation"):
        AlignConfig(parametrisation="linear")
    with pytest.raises(ConfigError, match="accumulation"):
        AlignConfig(accumulation=0)
    with pytest.raises(ConfigError, match="lr"):
        AlignConfig(lr=float("nan"))


def test_lr_schedule_warmup_then_cosine():
    total = 40
    f = [lr_factor(s, total, 0.05) for s in range(total)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3)   # W = 2 warm-up updates
    assert f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 38)))


# ============================================================================ gradients
def _grads(problem, calib, kind, mask, checkpointing, residual_grad=False):
    sched = make_schedule(kind, problem.sigmas(len(mask)), mask)
    sig = sched()
    sig.retain_grad()
    sampler = student_sampler(problem, mask, sig, checkpointing, residual_grad)
    x = sampler.run(sampler.start(calib.noise), calib.cond).x
    latent_mse(x, calib.teacher).mean().backward()
    release(sampler)
    return sched, sig.grad.clone(), sched.theta.grad.clone(), sampler


@pytest.mark.parametrize("residual_grad", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_learnable_sigma(problem, calib, kind, residual_grad):
    sched, gsig, gtheta, _ = _grads(problem, calib, kind, MASK, True, residual_grad)
    for i in sched.learnable:
        assert float(gsig[i]) != 0.0, f"no gradient at sigma {i}"
    assert bool((gtheta != 0).all()), gtheta
    assert bool(torch.isfinite(gtheta).all())


@pytest.mark.parametrize("residual_grad", [True, False])
def test_checkpointed_gradients_equal_plain(problem, calib, residual_grad):
    _, gs1, gt1, s1 = _grads(problem, calib, "ld3", MASK, True, residual_grad)
    _, gs2, gt2, _ = _grads(problem, calib, "ld3", MASK, False, residual_grad)
    assert isinstance(s1.denoiser, CheckpointedDenoiser)
    assert s1.denoiser.checkpointed == sum(MASK) and s1.denoiser.recomputed == sum(MASK)
    torch.testing.assert_close(gt1, gt2, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=1e-12)


def _fd_matches(problem, calib, sched, g, h=1e-3):
    """The central difference of the loss along ``g/|g|`` equals the directional derivative ``|g|`` to 5%.

    ``(l(theta - h u) - l(theta + h u)) / 2 = -h |g| + O(h^3)``: a one-sided difference carries an O(h^2)
    curvature term that, with some model weights, alone exceeds the tolerance.
    """
    def loss_at(shift: float) -> float:
        with torch.no_grad():
            sched.theta += shift * g / g.norm()
        try:
            sig = sched().detach().double().tolist()
        finally:
            with torch.no_grad():
                sched.theta -= shift * g / g.norm()
        return policy_loss(problem, calib, CachePolicy.from_mask(MASK).with_sigmas(sig))

    assert (loss_at(-h) - loss_at(h)) / 2 == pytest.approx(-h * float(g.norm()), rel=0.05)


def test_exact_gradient_matches_finite_differences(problem, calib):
    """The default gradient (through the reused residual) predicts the loss change; the truncated one need not."""
    sched, _, g, _ = _grads(problem, calib, "ld3", MASK, True, True)
    _fd_matches(problem, calib, sched, g)


@pytest.mark.parametrize("mechanism", ["forecast1", "forecast2"])
def test_exact_gradient_through_forecast_matches_finite_differences(calib, mechanism):
    """With a forecast mechanism the straight-through term rebuilds the extrapolation from graph residuals."""
    prob = TinyflowProblem(tinyflow.load(), steps=N, mechanism=mechanism)
    sched, _, g, sampler = _grads(prob, calib, "ld3", MASK, True, True)
    assert sampler.denoiser.tap is not None and sampler.denoiser.tap.order == int(mechanism[-1])
    _fd_matches(prob, calib, sched, g)
    # the truncated gradient is a different vector
    _, _, g_detached, _ = _grads(prob, calib, "ld3", MASK, True, False)
    assert not torch.allclose(g, g_detached, rtol=1e-2)


def test_forecast_tap_estimate_matches_the_cache(problem):
    """The tap's extrapolation equals ResidualHistory.estimate of the hooks (orders 0, 1, 2)."""
    from budcache.align.trainer import _ResidualTap
    from budcache.hooks import ResidualHistory

    gen = torch.Generator().manual_seed(0)
    res = [(s, torch.randn(2, 3, 4, generator=gen)) for s in (0, 2, 5)]
    hist = ResidualHistory()
    for s, r in res:
        hist = hist.push(None, r, None, s, 2, 3)
    newest_first = list(reversed(res))
    for order in (0, 1, 2):
        tap = _ResidualTap(problem.transformer, order)
        try:
            for k in (6, 9):
                torch.testing.assert_close(tap.estimate(newest_first[:order + 1], k), hist.estimate(k, order)[0])
        finally:
            tap.remove()


def test_recompute_with_cache_installed_does_not_push_twice(problem, calib):
    """Backward while the sampler's cache is still installed: the recomputation leaves the cache as it was."""
    _, _, plain, _ = _grads(problem, calib, "ld3", MASK, False)
    sched = make_schedule("ld3", problem.sigmas(N), MASK)
    sampler = student_sampler(problem, MASK, sched(), True)
    from budcache.hooks import find_cache

    seen = {}

    def callback(st):
        if st.step == N:
            handle = find_cache(problem.transformer)
            before = handle.snapshot()
            seen["grad"] = torch.autograd.grad(latent_mse(st.x, calib.teacher).mean(), sched.theta)[0]
            after = handle.snapshot()
            seen["same"] = before.keys() == after.keys() and all(
                len(before[c].img) == len(after[c].img) and all(a is b for a, b in zip(before[c].img, after[c].img))
                and all(a is b for a, b in zip(before[c].steps, after[c].steps)) for c in before)

    sampler.run(sampler.start(calib.noise), calib.cond, callback=callback)
    assert sampler.denoiser.recomputed == sum(MASK)
    assert seen["same"]
    torch.testing.assert_close(seen["grad"], plain, rtol=1e-5, atol=1e-12)


# ============================================================================ trainer
FAST = dict(lr=0.02, accumulation=1, micro_batch=2, epochs=2, warmup=0.0)


def test_align_lowers_calibration_loss_and_policy_roundtrips(problem, calib, tmp_path):
    pol = CachePolicy(N, tuple(k for k, m in enumerate(MASK) if m), meta={"budget": 3})
    before = policy_loss(problem, calib, pol)
    # the objective that is checked: full-batch updates (2 x 2 accumulated = all 4 items) on the calibration
    # noise itself, so "lower" does not hang on the weights (mini-batches on fresh noise may step uphill)
    cfg = AlignConfig(**{**FAST, "accumulation": 2, "epochs": 4, "fresh_noise": False, "lr": 0.01})
    res = align(problem, calib, pol, cfg)
    assert res.updates == 4 and len(res.history) == 4
    after = policy_loss(problem, calib, res.policy)
    assert after < before
    p = res.policy
    assert p.compute == pol.compute and p.meta["budget"] == 3
    assert p.meta["alignment"]["parametrisation"] == "ld3" and p.meta["alignment"]["updates"] == 4
    assert max(abs(a - b) for a, b in zip(p.sigmas, problem.sigmas(N).tolist())) > 1e-4
    # JSON round trip, and the sampler runs the learned sigmas
    p.save(tmp_path / "aligned.json")
    q = CachePolicy.load(tmp_path / "aligned.json")
    assert q == p and q.sigmas == p.sigmas
    with torch.no_grad():
        from_policy = problem.final_latents(calib, q)
        s = problem.make_sampler(StaticMaskOf(q), sigmas=torch.tensor(q.sigmas, dtype=torch.float32))
        explicit = s.run(s.start(calib.noise), calib.cond).x
        base = problem.final_latents(calib, CachePolicy(N, q.compute))
    assert torch.equal(from_policy, explicit)
    assert not torch.equal(from_policy, base)
    assert policy_loss(problem, calib, q) == pytest.approx(after)


def StaticMaskOf(policy):
    from budcache.sampler import StaticMask

    return StaticMask(policy.mask_tensor())


def test_original_opt_aligns_plain_sampler(problem, calib):
    res = align_plain(problem, calib, 3, AlignConfig(**FAST))
    p = res.policy
    assert p.steps == 3 and p.nfe == 3 and len(p.sigmas) == 4 and p.meta["alignment"]["plain"] is True
    before = policy_loss(problem, calib, None, plain_steps=3)
    assert policy_loss(problem, calib, p) < before
    with pytest.raises(ConfigError, match="segment parametrisation: every step computes"):
        align_plain(problem, calib, 3, AlignConfig(parametrisation="segment"))


@pytest.mark.parametrize("fresh", [True, False])
def test_resume_equals_uninterrupted(problem, calib, tmp_path, fresh):
    cfg = AlignConfig(**{**FAST, "epochs": 3, "fresh_noise": fresh}, parametrisation="segment")
    full = align(problem, calib, MASK, cfg)

    class Stop(Exception):
        pass

    def stop_after_two(entry):
        if entry["step"] == 1:
            raise Stop

    ck = tmp_path / "ck.safetensors"
    with pytest.raises(Stop):
        align(problem, calib, MASK, cfg, checkpoint=ck, on_step=stop_after_two)
    resumed = align(problem, calib, MASK, cfg, checkpoint=ck, resume=True)
    assert torch.equal(resumed.sigmas, full.sigmas)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # a finished checkpoint resumes to the same result without training
    again = align(problem, calib, MASK, cfg, checkpoint=ck, resume=True, on_step=stop_after_two)
    assert torch.equal(again.sigmas, full.sigmas)


def test_checkpoint_mismatch_and_corruption_are_clear_errors(problem, calib, tmp_path):
    ck = tmp_path / "ck.safetensors"
    cfg = AlignConfig(**{**FAST, "epochs": 1})
    align(problem, calib, MASK, cfg, checkpoint=ck)
    with pytest.raises(ConfigError, match="another alignment"):
        align(problem, calib, MASK, AlignConfig(**{**FAST, "epochs": 1, "lr": 0.01}), checkpoint=ck, resume=True)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ConfigError, match="alignment checkpoint"):
        align(problem, calib, MASK, cfg, checkpoint=bad, resume=True)
    sched = make_schedule("ld3", problem.sigmas(N), MASK)
    opt = torch.optim.AdamW([sched.theta])
    with pytest.raises(ConfigError, match="another alignment"):
        load_checkpoint(ck, sched, opt, {"other": 1})


def test_validation_selects_the_best_epoch_never_worse_than_start(problem, calib, heldout, tmp_path):
    cfg = AlignConfig(**{**FAST, "lr": 0.5, "epochs": 3})   # a step size that overshoots
    res = align(problem, calib, MASK, cfg, validation=heldout)
    v = res.policy.meta["alignment"]["validation"]
    assert v["pairs"] == len(heldout) and v["loss"] <= v["start_loss"]
    assert policy_loss(problem, heldout, res.policy) == pytest.approx(v["loss"])
    epoch_ends = [h["validation_loss"] for h in res.history if "validation_loss" in h]
    assert len(epoch_ends) == 3 and v["loss"] == min([v["start_loss"], *epoch_ends])
    # resumable with the selection
    ck = tmp_path / "ck.safetensors"

    def stop(entry):
        if entry["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        align(problem, calib, MASK, cfg, validation=heldout, checkpoint=ck, on_step=stop)
    again = align(problem, calib, MASK, cfg, validation=heldout, checkpoint=ck, resume=True)
    assert torch.equal(again.sigmas, res.sigmas)


def test_align_input_errors(problem, calib):
    with pytest.raises(ConfigError, match="initial sigmas"):
        align(problem, calib, MASK, init_sigmas=flux(5, 64))
    with pytest.raises(ConfigError, match="step 0"):
        align(problem, calib, [False, True, True])


# ============================================================================ joint
def test_joint_alternates_and_returns_best_round(problem, calib, heldout, tmp_path):
    cfg = SearchConfig(steps=N, nfe=3, sa_iters=6, hc_rounds=2, seed=0)
    seen = []
    res = joint(problem, calib, heldout, cfg, AlignConfig(**{**FAST, "epochs": 1}), max_rounds=3,
                later_sa_iters=0, out=tmp_path, on_round=seen.append)
    assert 1 <= len(res.rounds) <= 3 and res.stopped
    assert res.rounds == seen
    losses = [r.aligned_loss for r in res.rounds]
    assert res.rounds[res.best].aligned_loss == min(losses)
    assert res.policy.nfe == 3 and res.policy.sigmas is not None
    assert res.policy.meta["joint"]["round"] == res.best
    assert res.search_then_align is res.rounds[0]
    # resume from the round checkpoints gives the same rounds
    again = joint(problem, calib, heldout, cfg, AlignConfig(**{**FAST, "epochs": 1}), max_rounds=3,
                  later_sa_iters=0, out=tmp_path, resume=True)
    assert [r.compute for r in again.rounds] == [r.compute for r in res.rounds]
    assert again.policy.sigmas == res.policy.sigmas


# ============================================================================ CLI
@pytest.mark.slow
def test_cli_align_end_to_end(tmp_path, capsys):
    from budcache.cli import main

    src = CachePolicy.uniform(N, 3, meta={"budget": 3})
    src.save(tmp_path / "p.json")
    common = ["--steps", str(N), "--calib-pairs", "4", "--heldout", "4", "--accumulation", "1",
              "--micro-batch", "2", "--lr", "0.05", "--quiet"]
    assert main(["align", "--policy", str(tmp_path / "p.json"), "--out", str(tmp_path / "a"), *common]) == 0
    out = capsys.readouterr().out
    pol = CachePolicy.load(tmp_path / "a" / f"policy_aligned_N{N}_K3.json")
    assert pol.compute == src.compute and pol.sigmas is not None and pol.meta["budget"] == 3
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["runs"][0]["aligned"]["latent_mse"] > 0 and summary["runs"][0]["before"]["psnr"] > 0
    assert (tmp_path / "a" / "report.md").read_text().startswith("# budcache align report")
    assert "aligned" in out
    assert main(["align", "--plain", "3", "--select-on-validation", "--out", str(tmp_path / "b"), *common]) == 0
    plain = CachePolicy.load(tmp_path / "b" / "policy_plain_K3_aligned.json")
    assert plain.steps == 3 and len(plain.sigmas) == 4
    assert plain.meta["alignment"]["validation"]["loss"] <= plain.meta["alignment"]["validation"]["start_loss"]
    assert main(["align", "--joint", "3", "--rounds", "2", "--sa-iters", "4", "--hc-rounds", "1",
                 "--out", str(tmp_path / "c"), *common]) == 0
    assert CachePolicy.load(tmp_path / "c" / f"policy_joint_N{N}_K3.json").nfe == 3
    # a resumed run reuses the checkpoint and writes the same policy
    assert main(["align", "--policy", str(tmp_path / "p.json"), "--out", str(tmp_path / "a"), "--resume",
                 *common]) == 0
    assert CachePolicy.load(tmp_path / "a" / f"policy_aligned_N{N}_K3.json") == pol
    # bad input is a clear error, exit code 2
    assert main(["align", "--out", str(tmp_path / "d"), *common]) == 2
    assert "give one of" in capsys.readouterr().err
    assert main(["align", "--uniform", "30", "--out", str(tmp_path / "d"), *common]) == 2
