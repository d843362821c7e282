"""Estimators: Newton forecasts exact on polynomials, per-element choice, and every entry point following them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from budcache import CachePolicy, ConfigError
from budcache import estimators as est
from budcache.estimators import ESTIMATORS, History, newton
from budcache.sampler import Sampler, StaticMask, policy_plan
from budcache.specs import plan_legend


def _history(values: list[torch.Tensor], steps: list[int], depth: int = 3) -> History:
    """A history holding ``values`` pushed at ``steps`` in order (newest last in the lists)."""
    h = History()
    for v, s in zip(values, steps):
        h = h.push(None, v, None, s, v.shape[0], depth)
    return h


# Unevenly spaced computed steps on a shifted (FLUX-like) sigma schedule.
SIGMAS = torch.tensor([1.0, 0.97, 0.91, 0.8, 0.66, 0.5, 0.33, 0.17, 0.05, 0.0], dtype=torch.float64)
STEPS = [0, 2, 3, 6]


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("time", ["step", "sigma"])
def test_newton_is_exact_on_polynomials_of_its_order(order: int, time: str) -> None:
    """A trajectory of degree <= order in the time variable is reproduced exactly at any skipped step."""
    g = torch.Generator().manual_seed(order)
    coef = torch.randn(order + 1, 2, 5, generator=g, dtype=torch.float64)

    def t_of(k: int) -> float:
        return float(k) if time == "step" else float(SIGMAS[k])

    def traj(k: int) -> torch.Tensor:
        return sum(coef[i] * t_of(k) ** i for i in range(order + 1))

    hist = _history([traj(s) for s in STEPS], STEPS)
    for k in (4, 5, 7, 8):
        got = newton(hist.img, hist.steps, k, order, SIGMAS if time == "sigma" else None)
        torch.testing.assert_close(got, traj(k), rtol=1e-9, atol=1e-9)


def test_order_below_the_degree_is_not_exact() -> None:
    """The check above can fail: order 1 misses a quadratic (so exactness is not vacuous)."""
    traj = [torch.full((1, 3), float(SIGMAS[k]) ** 2, dtype=torch.float64) for k in STEPS]
    hist = _history(traj, STEPS)
    got = newton(hist.img, hist.steps, 7, 1, SIGMAS)
    assert not torch.allclose(got, torch.full((1, 3), float(SIGMAS[7]) ** 2, dtype=torch.float64))


def test_sigma_and_step_time_differ_on_uneven_schedules() -> None:
    """Linear in sigma is not linear in the step index when sigmas are unevenly spaced."""
    traj = [torch.full((1, 2), float(SIGMAS[k]), dtype=torch.float64) for k in STEPS]
    hist = _history(traj, STEPS)
    by_sigma = newton(hist.img, hist.steps, 8, 1, SIGMAS)
    by_step = newton(hist.img, hist.steps, 8, 1, None)
    torch.testing.assert_close(by_sigma, torch.full((1, 2), float(SIGMAS[8]), dtype=torch.float64))
    assert not torch.allclose(by_step, by_sigma)


def test_elements_with_fewer_entries_fall_back_to_their_order() -> None:
    h = History()
    a = torch.tensor([[1.0], [10.0]])
    h = h.push(None, a, None, 0, 2, 3)
    # only element 0 computes at step 2
    h = h.push(torch.tensor([0]), torch.tensor([[3.0]]), None, 2, 2, 3)
    got = newton(h.img, h.steps, 4, 1)
    torch.testing.assert_close(got, torch.tensor([[5.0], [10.0]]))  # linear for 0, reuse for 1


def test_mixed_picks_each_elements_estimator() -> None:
    traj = [torch.stack([torch.full((2,), float(k)), torch.full((2,), float(k))]) for k in STEPS]
    hist = _history(traj, STEPS)
    codes = torch.tensor([est.CODES["reuse"], est.CODES["forecast1"]])
    img, txt = est.mixed(hist, 8, codes, None)
    assert txt is None
    torch.testing.assert_close(img[0], torch.full((2,), 6.0))
    torch.testing.assert_close(img[1], torch.full((2,), 8.0))


def test_registry_names_are_stable_and_unknown_names_fail() -> None:
    assert list(ESTIMATORS)[:3] == ["reuse", "forecast1", "forecast2"]
    assert {s.target for s in ESTIMATORS.values()} == {"residual", "velocity"}
    with pytest.raises(ConfigError, match="estimator 'nope' is unknown"):
        est.get("nope")


# ------------------------------------------------------------------------------ policies
def test_policy_v2_round_trips_and_v1_stays_v1(tmp_path) -> None:
    p1 = CachePolicy.uniform(10, 4)
    assert p1.to_dict()["version"] == 1 and "estimators" not in p1.to_dict()
    p2 = CachePolicy.uniform(10, 4, estimator="vtaylor1")
    d = p2.to_dict()
    assert d["version"] == 2 and d["estimators"] == ["vtaylor1"] * 6
    mixed = p2.with_estimators(["output", "vtaylor2", "vtaylor1", "taylor2", "reuse", "vtaylor1"])
    back = CachePolicy.load(mixed.save(tmp_path / "p.json"))
    assert back == mixed and back.estimators == mixed.estimators
    assert back.estimator == "mixed" and back.estimator_at(1) == "output" and back.estimator_at(0) is None
    assert back.estimator_strip() == "CoCVvCTCrv"
    # one letter per estimator, none taken twice or by the strip's own 'C' and '.', all in the legend
    letters = [s.letter for s in ESTIMATORS.values()]
    assert len(set(letters)) == len(letters) and not {"C", "."} & set(letters)
    assert plan_legend() == "C computed, " + ", ".join(f"{s.letter} {n}" for n, s in ESTIMATORS.items())
    step = p2.with_estimators(["vforecast1", "vforecast2", "vtaylor1", "forecast1", "forecast2", "taylor1"])
    assert CachePolicy.load(step.save(tmp_path / "q.json")).estimator_strip() == "CsCSvCfCFt"


@pytest.mark.parametrize(("estimators", "match"), [
    (["vtaylor1"] * 5, r"'estimators': has 5 names but the policy skips 6 steps"),
    (["vtaylor1"] * 5 + ["warp"], r"'estimators': entry 5 is 'warp', not an estimator"),
    ("vtaylor1", r"'estimators': must be a sequence"),
])
def test_policy_rejects_bad_estimators(estimators, match) -> None:
    from budcache import PolicyError

    with pytest.raises(PolicyError, match=match):
        CachePolicy(10, (0, 3, 5, 8), estimators=estimators)


def test_policy_plan_codes() -> None:
    p = CachePolicy(6, (0, 3), estimators=("output", "vtaylor1", "reuse", "taylor2"))
    assert policy_plan(p).tolist() == [0, est.CODES["output"], est.CODES["vtaylor1"], 0, est.CODES["reuse"],
                                       est.CODES["taylor2"]]


# ------------------------------------------------------------------------------ sampler
def _callable_model():
    """A velocity field quadratic in sigma: velocity forecasts of order 2 in sigma are exact for it."""
    def v(x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return 0.3 + 0.5 * s - 1.2 * s * s + 0 * x
    return v


def _run(policy, mechanism=None):
    from budcache.denoisers import as_denoiser

    sig = SIGMAS.to(torch.float32)
    s = Sampler(as_denoiser(_callable_model()), sig, "euler", policy, mechanism)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    return s.result(s.run(s.start(noise), None))


def test_velocity_forecast_of_order_2_in_sigma_is_exact_on_a_quadratic_velocity() -> None:
    full = _run(None).latent
    pol = CachePolicy(9, (0, 1, 2, 5)).with_estimators("vtaylor2")
    res = _run(pol)
    assert res.nfe.tolist() == [4, 4, 4]
    torch.testing.assert_close(res.latent, full, rtol=1e-5, atol=1e-5)
    worse = _run(pol.with_estimators("output")).latent
    assert (worse - full).abs().max() > 1e-3  # reuse is not exact: the test can fail


def test_plain_callables_refuse_residual_estimators() -> None:
    with pytest.raises(ConfigError, match="needs a diffusers transformer"):
        _run(CachePolicy(9, (0, 4)).with_estimators("taylor1"))


def test_policy_estimators_win_over_the_callers_mechanism() -> None:
    pol = CachePolicy(9, (0, 1, 2, 5)).with_estimators("vtaylor2")
    a = _run(pol, mechanism="output").latent
    b = _run(pol).latent
    assert torch.equal(a, b)


def test_static_mask_plan_must_agree_with_mask() -> None:
    with pytest.raises(ConfigError, match="plan and mask disagree"):
        StaticMask(torch.tensor([True, False, True]), torch.tensor([0, 0, 0]))
    with pytest.raises(ConfigError, match="step 0 must be computed"):
        StaticMask.from_plan([1, 0, 0])


# ------------------------------------------------------------------------------ version 1 unchanged
#: The last release before policy version 2: its code writes the reference outputs of version-1 policies.
V1_RELEASE = "838c296"


def _v1_reference(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The outputs of version-1 policies under the release before version 2, computed here and now.

    Float results depend on the CPU's kernels, so the reference is not stored: the earlier release's
    package is taken from git history (with today's tinyflow weights) and runs
    ``tests/data/make_v1_reference.py`` in a subprocess on this machine.
    """
    import io
    import os
    import shutil
    import subprocess
    import sys
    import tarfile

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    try:
        blob = subprocess.run(["git", "-C", str(root), "archive", V1_RELEASE, "src/budcache"], capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git and the project's history (commit {V1_RELEASE}) to run the earlier release")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links out of the folder
            tar.extractall(tmp_path / "old", filter="data")
        else:
            tar.extractall(tmp_path / "old")  # our own repository's archive
    old_weights = tmp_path / "old" / "src" / "budcache" / "tinyflow" / "weights"
    shutil.rmtree(old_weights)
    shutil.copytree(root / "src" / "budcache" / "tinyflow" / "weights", old_weights)
    out = tmp_path / "v1_reference.safetensors"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "old" / "src"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(root / "tests" / "data" / "make_v1_reference.py"), str(out)], env=env,
                   check=True, capture_output=True, cwd=tmp_path)
    return load_file(str(out))


@pytest.mark.slow
def test_version_1_policies_reproduce_their_earlier_outputs_bit_for_bit(tmp_path: Path) -> None:
    """Version-1 policies give the outputs of the release before version 2, bit for bit, on this machine."""
    import budcache.diffusers as bd
    from budcache import tinyflow

    ref = _v1_reference(tmp_path)
    prompts = ["a red circle", "two green triangles", "a small blue square in the top left"]
    seeds = [3, 4, 5]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            tf = tinyflow.load()
            for mech in ("reuse", "forecast1", "forecast2", "output"):
                pol = CachePolicy(28, (0, 1, 3, 6, 10, 15, 21, 27), meta={"mechanism": mech})
                assert pol.to_dict()["version"] == 1
                got = tf.sample(prompts, seeds, 28, policy=pol).latent  # follows meta["mechanism"]
                assert torch.equal(got, ref[f"sample_{mech}"]), mech
            pipe = tinyflow.load_pipeline()
            for mech in ("reuse", "forecast1"):
                bd.apply(pipe, CachePolicy(28, (0, 1, 3, 6, 10, 15, 21, 27), meta={"mechanism": mech}))
                try:
                    got = pipe(**tf.pipeline_inputs(prompts[:1], seeds=seeds[:1]), num_inference_steps=28,
                               output_type="latent").images
                finally:
                    bd.remove(pipe)
                assert torch.equal(got, ref[f"pipeline_{mech}"]), mech
    finally:
        torch.set_num_threads(prev)
