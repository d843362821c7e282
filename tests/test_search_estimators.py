"""The per-step estimator search: exact budget at every move, steepest descent, and the search's estimator rules."""

from __future__ import annotations

import pytest

from budcache import ConfigError
from budcache import estimators as est
from budcache.search.anneal import refine_estimators
from budcache.search.evaluator import plan_names, plan_of
from budcache.search.run import search_estimators

V1, V2, O = est.CODES["vtaylor1"], est.CODES["vtaylor2"], est.CODES["output"]


def test_plan_of_and_names_round_trip() -> None:
    plan = plan_of(6, (0, 3), ["output", "vtaylor1", "vtaylor2", "reuse"])
    assert plan == (0, O, V1, 0, V2, est.CODES["reuse"])
    assert plan_names(plan) == ("output", "vtaylor1", "vtaylor2", "reuse")
    assert plan_of(4, (0, 2), "vtaylor1") == (0, V1, 0, V1)
    with pytest.raises(ConfigError, match="2 estimator names for 1 skipped steps"):
        plan_of(3, (0, 1), ["output", "output"])


def test_refinement_finds_the_best_assignment_and_never_moves_a_computed_step() -> None:
    """A separable loss: each skipped step has one best code; steepest descent reaches the optimum."""
    best = {1: V2, 2: O, 4: V1, 5: V2}
    seen: list[tuple[int, ...]] = []

    def losses(plans):
        out = []
        for p in plans:
            seen.append(p)
            out.append(sum(0.0 if p[k] == c else 1.0 + k for k, c in best.items()))
        return out

    start = (0, V1, V1, 0, V1, V1)
    res = refine_estimators(losses, start, [V1, V2, O])
    assert res.plan == (0, V2, O, 0, V1, V2) and res.loss == 0.0
    for p in seen:  # the budget is exact at every move: the computed steps are always 0 and 3
        assert [k for k, c in enumerate(p) if c == est.COMPUTE] == [0, 3]
    assert [h["loss"] for h in res.history] == sorted((h["loss"] for h in res.history), reverse=True)
    # deterministic
    assert refine_estimators(losses, start, [V1, V2, O]).plan == res.plan


def test_refinement_stops_at_a_local_minimum() -> None:
    calls = []

    def losses(plans):
        calls.append(len(plans))
        return [0.0 if p == (0, V1, 0) else 1.0 for p in plans]

    res = refine_estimators(losses, (0, V1, 0), [V1, O])
    assert res.plan == (0, V1, 0) and len(res.history) == 1 and calls == [1, 1]


@pytest.mark.parametrize(("mechanism", "choices", "expected"), [
    ("forecast1", None, (None, [])),                       # version 1: bit-identical evaluator
    ("reuse", ["reuse"], (None, [])),
    ("vtaylor1", None, ("vtaylor1", [])),
    ("vtaylor1", ["vtaylor1", "output"], ("vtaylor1", ["vtaylor1", "output"])),
    ("forecast1", ["output"], ("forecast1", ["output"])),  # per-step choice needs plans
    ("taylorseer", None, (None, [])),
])
def test_search_estimator_rules(mechanism, choices, expected) -> None:
    assert search_estimators(mechanism, choices) == expected


def test_peer_mechanisms_refuse_per_step_estimators() -> None:
    with pytest.raises(ConfigError, match="per-step estimators"):
        search_estimators("taylorseer", ["vtaylor1"])
    with pytest.raises(ConfigError, match="unknown"):
        search_estimators("warp", None)
