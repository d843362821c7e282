"""budcache.problems: settings, pair splits, metrics, family records, replicas and the callable stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import budcache
from budcache import tinyflow
from budcache.errors import ConfigError
from budcache.policy import CachePolicy
from budcache.problems import (
    FAMILIES,
    SPLITS,
    Problem,
    SamplerSettings,
    Shipped,
    TinyflowProblem,
    TinyflowReplica,
    calibration_pairs,
    family_of,
    item_metrics,
    split_pairs,
)
from budcache.problems.data import weights_digest
from budcache.problems.options import settings_from
from helpers import make_wan_pipeline


@pytest.fixture(scope="module")
def tf():
    return tinyflow.load()


class FixedPrompts:
    """A problem with a fixed prompt list (as a pipeline with an embeddings file)."""

    draws_prompts = False

    def prompts(self, n: int, seed: int) -> list[str]:
        return ["a", "b", "c"]


# settings -------------------------------------------------------------------------------------------------
def test_settings_validate_every_field():
    s = SamplerSettings()
    assert (s.steps, s.solver, s.mechanism, s.guidance) == (28, "euler", "reuse", 1.0)
    for bad, word in ((dict(steps=0), "--steps"), (dict(steps=2.5), "--steps"), (dict(steps=True), "--steps"),
                      (dict(solver="heun9"), "solver"), (dict(mechanism="magic"), "mechanism"),
                      (dict(guidance=-1), "--guidance"), (dict(guidance=float("nan")), "--guidance")):
        with pytest.raises(ConfigError, match=word):
            SamplerSettings(**bad)
    t = s.replace(steps=10, solver=None)
    assert (t.steps, t.solver) == (10, "euler") and s.steps == 28  # frozen: a copy
    with pytest.raises(ConfigError, match="--steps"):
        s.replace(steps=-3)


def test_settings_follow_the_policy_unless_given():
    pol = CachePolicy.uniform(12, 4, meta={"solver": "dpmpp2m", "mechanism": "forecast2", "guidance": 2.5})
    s = settings_from(pol)
    assert (s.steps, s.solver, s.mechanism, s.guidance) == (12, "dpmpp2m", "forecast2", 2.5)
    s = settings_from(pol, solver="euler", guidance=1.0)
    assert (s.solver, s.guidance, s.mechanism) == ("euler", 1.0, "forecast2")
    with pytest.raises(ConfigError, match="--steps 28 but the policy p.json is for 12 steps"):
        settings_from(pol, steps=28, source="p.json")
    with pytest.raises(ConfigError, match="meta.guidance must be a number"):
        settings_from(pol.with_meta(guidance="high"), source="p.json")
    assert settings_from(None, default_mechanism="forecast1").mechanism == "forecast1"


# pairs ----------------------------------------------------------------------------------------------------
def test_splits_are_disjoint_and_deterministic(tf):
    p = TinyflowProblem(tf, 8)
    cp, cs = calibration_pairs(p, 16, seed=3)
    hp, hs = split_pairs(p, "heldout", 16, 3, cp)
    vp, vs = split_pairs(p, "validation", 16, 3, cp)
    assert len(cp) == len(hp) == len(vp) == 16
    assert not set(cs) & set(hs) and not set(cs) & set(vs) and not set(hs) & set(vs)
    assert (cp, cs) == calibration_pairs(p, 16, seed=3) and (hp, hs) == split_pairs(p, "heldout", 16, 3, cp)
    assert calibration_pairs(p, None, seed=3) == calibration_pairs(p, 32, seed=3)  # the default count
    assert SPLITS["calibration"] == 0 and len(set(SPLITS.values())) == len(SPLITS)
    with pytest.raises(ConfigError, match="split 'test' is unknown"):
        split_pairs(p, "test", 4, 0)
    with pytest.raises(ConfigError, match="split 'calibration' is unknown"):
        split_pairs(p, "calibration", 4, 0)


def test_seeds_per_prompt_and_exact_counts(tf):
    p = TinyflowProblem(tf, 8)
    prompts, seeds = calibration_pairs(p, 5, seed=0, seeds_per_prompt=2)
    assert len(prompts) == 5 and prompts[0] == prompts[1] and seeds[0] != seeds[1]
    with pytest.raises(ConfigError, match="--seeds-per-prompt"):
        calibration_pairs(p, 5, seed=0, seeds_per_prompt=0)
    with pytest.raises(ConfigError, match="--calib-pairs"):
        calibration_pairs(p, 0, seed=0)


def test_fixed_prompt_problems_cycle_their_prompts_with_fresh_seeds():
    fp = FixedPrompts()
    cp, cs = calibration_pairs(fp, None, seed=0)
    assert cp == ["a", "b", "c"]  # no count: every prompt once
    cp7, _ = calibration_pairs(fp, 7, seed=0)
    assert cp7 == ["a", "b", "c", "a", "b", "c", "a"]
    hp, hs = split_pairs(fp, "heldout", 4, 0, cp)
    assert hp == ["a", "b", "c", "a"] and hs == [SPLITS["heldout"] + i for i in range(4)]
    assert not set(hs) & set(cs)


def test_prompt_file_pairs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\nthree\n")
    prompts, seeds = calibration_pairs(None, None, seed=1, seeds_per_prompt=2, prompt_file=f)
    assert prompts == ["one", "one", "two", "two", "three", "three"]
    sub, sub_seeds = calibration_pairs(None, 3, seed=1, seeds_per_prompt=2, prompt_file=f)
    assert len(sub) == 3 and set(zip(sub, sub_seeds)) <= set(zip(prompts, seeds))
    with pytest.raises(ConfigError, match="--calib-pairs 9 but the prompt file"):
        calibration_pairs(None, 9, seed=1, seeds_per_prompt=2, prompt_file=f)


# the problem ----------------------------------------------------------------------------------------------
def test_tinyflow_problem_is_a_problem_and_settings_are_its_only_truth(tf):
    p = TinyflowProblem(tf, 6, "euler", "forecast1", 1.0)
    assert isinstance(p, Problem)
    assert (p.steps, p.mechanism) == (6, "forecast1") and p.sigmas().numel() == 7
    q = p.with_settings(steps=4, guidance=2.0)
    assert q.tf is p.tf and (q.steps, q.guidance, p.steps) == (4, 2.0, 6)  # weights shared, p unchanged
    assert q.make_sampler(None).steps == 4 and q.conds(["a red circle"])[1] is not None
    assert p.conds(["a red circle"])[1] is None  # guidance 1: no negative conditioning


def test_replicas_rebuild_the_same_model(tf):
    in_memory = TinyflowProblem(tf, 4)
    assert isinstance(in_memory.replica(), Shipped)  # weights given in memory are shipped as they are
    loaded = TinyflowProblem(steps=4)
    recipe = loaded.replica()
    assert isinstance(recipe, TinyflowReplica) and recipe.settings == loaded.settings
    again = recipe("cpu")
    assert weights_digest(again.transformer) == weights_digest(loaded.transformer) == weights_digest(tf.transformer)


def test_metrics_cap_psnr_and_fall_back_to_latents(tf):
    p = TinyflowProblem(tf, 4)
    calib = p.calibration(["a red circle", "two squares"], [1, 2])
    same = item_metrics(p, calib.teacher, calib.teacher, calib.prompts)
    assert np.allclose(same["psnr"], 120.0) and np.allclose(same["ssim"], 1.0)
    assert set(np.unique(same["checker_ok"])) <= {0.0, 1.0}

    class NoDecoder:
        @staticmethod
        def images(latents):
            return None

    t = torch.linspace(-1, 1, 32).reshape(2, 16)
    m = item_metrics(NoDecoder(), t + 0.01, t)
    peak = (t.max(1).values - t.min(1).values).pow(2).numpy()  # each item's own range
    assert set(m) == {"latent_mse", "psnr"} and np.allclose(m["psnr"], 10 * np.log10(peak / 1e-4), atol=1e-3)


def test_unknown_pipeline_family_is_a_clear_error():
    assert {"FluxPipeline", "StableDiffusion3Pipeline", "WanPipeline"} <= set(FAMILIES)
    assert family_of(make_wan_pipeline()).video

    class MysteryPipeline:
        transformer = None

    with pytest.raises(ConfigError, match="MysteryPipeline is not supported"):
        family_of(MysteryPipeline())


# the public API -------------------------------------------------------------------------------------------
def test_stages_are_callable(tmp_path):
    assert callable(budcache.search) and callable(budcache.align) and callable(budcache.compare)
    outcomes = budcache.search(tmp_path, nfes=[2], settings=SamplerSettings(steps=4, mechanism="forecast1"),
                               estimators=None, calib_pairs=2, heldout_pairs=1, sa_iters=2, hc_rounds=1,
                               progress=False)
    assert outcomes[0].policy.nfe == 2 and (tmp_path / "policy_N4_K2.json").is_file()
    with pytest.raises(ConfigError, match="either a problem or settings"):
        budcache.search(tmp_path / "x", nfes=[2], problem=TinyflowProblem(steps=4), settings=SamplerSettings())
    with pytest.raises(ConfigError, match="steps is a sampler setting"):
        budcache.search(tmp_path / "y", nfes=[2], steps=4)
    with pytest.raises(ConfigError, match="unknown search option 'sa_iter'"):
        budcache.search(tmp_path / "z", nfes=[2], sa_iter=4)


def test_paired_gap_is_the_difference_of_the_statistic_with_a_seeded_paired_interval():
    from budcache.problems import PairedGap, paired_gap

    rng = np.random.default_rng(0)
    other = rng.normal(30.0, 8.0, 128)
    # a clear lead: ref = other + 2 dB, +-0.1 dB per pair; the pairs' spread cancels in the paired gap
    ref = other + 2.0 + rng.normal(0.0, 0.1, 128)
    for stat, fn in (("mean", np.mean), ("median", np.median)):
        g = paired_gap(ref, other, stat)
        assert g.gap == pytest.approx(fn(ref) - fn(other))
        assert g.low <= g.gap <= g.high and g.low > 0 and g.excludes_zero()
        assert paired_gap(ref, other, stat) == g  # seeded: the same scores give the same interval
    # no lead: two independent draws of one distribution; the interval holds 0
    tie = paired_gap(rng.normal(30.0, 8.0, 128), rng.normal(30.0, 8.0, 128), "median")
    assert tie.low < 0 < tie.high and not tie.excludes_zero()
    # a bimodal score (pairs matched almost exactly or not at all) makes the median gap wide even when most pairs
    # favour ref: the interval is what says whether a median gap is the method or the draw of pairs
    modes = np.where(rng.random(128) < 0.5, 60.0, 25.0) + rng.normal(0, 1, 128)
    wide = paired_gap(modes + 0.5, modes[::-1].copy(), "median")
    assert wide.high - wide.low > 10
    assert paired_gap(np.array([1.0]), np.array([0.0])) == PairedGap(1.0, None, None)
    # a report row's fields and cell text, with and without an interval
    from budcache.problems import gap_text

    assert PairedGap(1.0, None, None).fields("g") == {"g": 1.0} and gap_text(1.0) == "+1.00"
    assert PairedGap(-1.5, -2.0, 0.25).fields("g") == {"g": -1.5, "g_ci": [-2.0, 0.25]}
    assert gap_text(-1.5, [-2.0, 0.25]) == "-1.50 [-2.00, +0.25]"
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        paired_gap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="'mean' or 'median'"):
        paired_gap(np.zeros(3), np.zeros(3), "max")
