"""budcache's own methods (searched, uniform, plain) at exact budgets, the registry that builds every method,
and the threshold bisection's short form."""

from __future__ import annotations

import pytest
import torch

from budcache import tinyflow
from budcache.errors import ConfigError
from budcache.methods import (
    BudcacheMethod,
    Method,
    PlainMethod,
    UniformMethod,
    available_methods,
    bisect_threshold,
    build_methods,
)
from budcache.policy import CachePolicy
from budcache.problems.tinyflow import TinyflowProblem

torch.set_num_threads(1)

N = 8


@pytest.fixture(scope="module")
def tf():
    return tinyflow.load()


@pytest.fixture(scope="module")
def setup(tf):
    p = TinyflowProblem(tf, N)
    calib = p.calibration(["a red circle", "two squares", "a small blue triangle"], [1, 2, 3])
    return p, calib


def test_every_method_implements_the_protocol():
    for name, factory in available_methods().items():
        m = factory()
        assert isinstance(m, Method), name
        assert m.kind in ("static", "threshold")


@pytest.mark.parametrize("k", [2, 3, 5])
@torch.no_grad()
def test_static_methods_spend_exactly_k(setup, k):
    p, calib = setup
    searched = BudcacheMethod(search_kw={"sa_iters": 5, "hc_rounds": 2})
    for m in (searched, UniformMethod(), PlainMethod()):
        m.fit(p, calib, k)
        run_ = m.sample(p, calib.noise, calib.cond)
        assert run_.nfe.tolist() == [k] * len(calib), m.name
        assert run_.latent.shape == calib.noise.shape
    assert searched.policy.nfe == k and searched.policy.compute[0] == 0


@torch.no_grad()
def test_searched_mask_is_no_worse_than_uniform_on_calibration(setup):
    p, calib = setup
    searched, uni = BudcacheMethod(search_kw={"sa_iters": 30, "hc_rounds": 5}), UniformMethod()
    losses = []
    for m in (searched, uni):
        m.fit(p, calib, 3)
        losses.append(float((m.sample(p, calib.noise, calib.cond).latent - calib.teacher).pow(2).mean()))
    assert losses[0] <= losses[1] + 1e-12


@torch.no_grad()
def test_given_policy_is_used_instead_of_searching(setup):
    p, calib = setup
    pol = CachePolicy(N, (0, 1, 6))
    m = BudcacheMethod(policies={3: pol})
    m.fit(p, calib, 3)
    assert m.policy is pol
    with pytest.raises(ConfigError, match="steps"):
        BudcacheMethod(policies={3: CachePolicy(12, (0, 1, 6))}).fit(p, calib, 3)


def test_given_policies_go_to_the_method_of_their_mechanism():
    reuse = CachePolicy(N, (0, 1, 6))
    fc = CachePolicy(N, (0, 2, 5, 7), meta={"mechanism": "forecast1"})
    v2 = CachePolicy(N, (0, 4), meta={"mechanism": "vtaylor1"}).with_estimators("vtaylor1")
    ts = CachePolicy(N, (0, 3, 6), meta={"mechanism": "taylorseer"})
    ms = {m.name: m for m in build_methods(["budcache", "budcache-reuse", "budcache-forecast", "taylorseer-searched"],
                                           policies={3: reuse, 4: fc, 2: v2, 5: ts})}
    assert ms["budcache-reuse"].policies == {3: reuse} and ms["budcache-reuse"].mechanism == "reuse"
    assert ms["budcache-forecast"].policies == {4: fc} and ms["budcache-forecast"].mechanism == "forecast1"
    assert ms["budcache"].policies == {2: v2} and ms["budcache"].mechanism == "vtaylor1"
    assert ms["taylorseer-searched"].policies == {5: ts}
    with pytest.raises(ConfigError, match="runs as method 'budcache-forecast', which is not among"):
        build_methods(["budcache", "plain"], policies={4: fc})
    # a version-1 policy of any other estimator runs as the default method
    f2 = CachePolicy(N, (0, 2, 5, 7), meta={"mechanism": "forecast2"})
    assert build_methods(["budcache"], policies={4: f2})[0].policies == {4: f2}
    # one budget, several policies: each to the method of its mechanism; two for one method are refused
    ts3 = CachePolicy(N, (0, 2, 6), meta={"mechanism": "taylorseer"})
    ms = {m.name: m for m in build_methods(["budcache", "taylorseer-searched"], policies={3: [reuse.with_estimators(
        "vtaylor1"), ts3], 5: ts})}
    assert ms["budcache"].policies[3].compute == (0, 1, 6) and ms["taylorseer-searched"].policies == {3: ts3, 5: ts}
    with pytest.raises(ConfigError, match="two different policies for NFE 3 run as method 'taylorseer-searched'"):
        build_methods(["budcache", "taylorseer-searched"], policies={3: [ts3, CachePolicy(N, (0, 3, 6), meta={
            "mechanism": "taylorseer"})]})


def test_bisect_threshold_reaches_a_monotone_target():
    def nfe(t: float) -> float:  # 28 steps at t = 0, falling like a staircase
        return float(max(1, 28 - int(40 * t)))

    for target in (6, 10, 14):
        t, got = bisect_threshold(nfe, target, 0.0, 0.05)
        assert abs(got - target) <= 0.5 and nfe(t) == got
    t, got = bisect_threshold(lambda t: 28.0 - (t > 1.0) * 20, 14, 0.0, 0.5)  # jumps over the target: closest
    assert got == 8.0 and t > 1.0  # |8 - 14| < |28 - 14|; the bracket was widened past hi to find it
    with pytest.raises(ConfigError, match="lo < hi"):
        bisect_threshold(nfe, 6, 1.0, 1.0)


def test_unknown_or_repeated_methods_are_errors():
    with pytest.raises(ConfigError, match="unknown method"):
        build_methods(["budcache", "teacash"])
    with pytest.raises(ConfigError, match="twice"):
        build_methods(["plain", "plain"])


def test_registry_is_the_one_list_of_names_in_list_order(monkeypatch):
    import sys

    from budcache.errors import MissingExtraError
    from budcache.methods import BASELINES, REGISTRY, MethodSpec

    assert list(REGISTRY)[:9] == ["budcache", "budcache-reuse", "budcache-forecast", "taylorseer-searched", "uniform",
                                  "plain", "fbcache", "magcache", "taylorseer"]
    assert list(BASELINES) == ["teacache", "dicache", "lemica", "recache", "ertacache", "meancache", "gcache", "ecad"]
    for name, spec in REGISTRY.items():
        assert spec.name == name and (spec.extra is None) == (spec.source != "cache-dit")
    # a registered method whose extra is missing names the extra; it is not "unknown"
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    monkeypatch.delitem(sys.modules, "budcache.methods.cachedit", raising=False)
    assert "dbcache" in REGISTRY and "dbcache" not in available_methods()
    with pytest.raises(MissingExtraError, match=r"\['dbcache'\] need the optional extra\(s\) \['cachedit'\]"):
        build_methods(["plain", "dbcache"])
    with pytest.raises(ConfigError, match="needs the extra"):
        MethodSpec("mine", "reimplemented", "MyMethod")
