"""The per-step estimator search: exact budget at every move, steepest descent, and the search's estimator rules."""

from __future__ import annotations

import dataclasses

import pytest

from budcache import ConfigError
from budcache import estimators as est
from budcache.search.anneal import refine_estimators
from budcache.search.evaluator import plan_names, plan_of
from budcache.search.job import search_estimators

V1, V2, OUT = est.CODES["vtaylor1"], est.CODES["vtaylor2"], est.CODES["output"]


def test_plan_of_and_names_round_trip() -> None:
    plan = plan_of(6, (0, 3), ["output", "vtaylor1", "vtaylor2", "reuse"])
    assert plan == (0, OUT, V1, 0, V2, est.CODES["reuse"])
    assert plan_names(plan) == ("output", "vtaylor1", "vtaylor2", "reuse")
    assert plan_of(4, (0, 2), "vtaylor1") == (0, V1, 0, V1)
    with pytest.raises(ConfigError, match="2 estimator names for 1 skipped steps"):
        plan_of(3, (0, 1), ["output", "output"])


@pytest.mark.parametrize("scheme", ["sweep", "steepest"])
def test_refinement_finds_the_best_assignment_and_never_moves_a_computed_step(scheme) -> None:
    """A separable loss: each skipped step has one best code; both schemes reach the optimum."""
    best = {1: V2, 2: OUT, 4: V1, 5: V2}
    seen: list[tuple[int, ...]] = []

    def losses(plans):
        out = []
        for p in plans:
            seen.append(p)
            out.append(sum(0.0 if p[k] == c else 1.0 + k for k, c in best.items()))
        return out

    start = (0, V1, V1, 0, V1, V1)
    res = refine_estimators(losses, start, [V1, V2, OUT], scheme=scheme)
    assert res.plan == (0, V2, OUT, 0, V1, V2) and res.loss == 0.0
    for p in seen:  # the budget is exact at every move: the computed steps are always 0 and 3
        assert [k for k, c in enumerate(p) if c == est.COMPUTE] == [0, 3]
    assert [h["loss"] for h in res.history] == sorted((h["loss"] for h in res.history), reverse=True)
    # deterministic
    assert refine_estimators(losses, start, [V1, V2, OUT], scheme=scheme).plan == res.plan


@pytest.mark.parametrize("scheme", ["sweep", "steepest"])
def test_refinement_stops_at_a_local_minimum(scheme) -> None:
    calls = []

    def losses(plans):
        calls.append(len(plans))
        return [0.0 if p == (0, V1, 0) else 1.0 for p in plans]

    res = refine_estimators(losses, (0, V1, 0), [V1, OUT], scheme=scheme)
    assert res.plan == (0, V1, 0) and len(res.history) == 1 and calls == [1, 1]


def test_sweep_visits_the_skipped_steps_from_last_to_first_and_keeps_each_improvement() -> None:
    """One batch per skipped step, last step first; an improving change is kept before the next step is tried,
    so one sweep makes several moves; a sweep without a move ends the search."""
    batches: list[list[tuple[int, ...]]] = []

    def losses(plans):
        batches.append(list(plans))
        # step 4 prefers OUT; step 1 prefers V2 only once step 4 is OUT (not separable)
        return [(0.0 if p[4] == OUT else 2.0) + (0.0 if (p[1] == V2 and p[4] == OUT) else 1.0) + 0.1 * (p[2] != V1)
                for p in plans]

    start = (0, V1, V1, 0, V1)
    res = refine_estimators(losses, start, [V1, V2, OUT])
    assert res.plan == (0, V2, V1, 0, OUT) and res.loss == 0.0
    def steps_changed(batch, base):
        return sorted({k for p in batch for k in range(5) if p[k] != base[k]})

    # sweep 1: step 4 (takes OUT), step 2 (no gain), step 1 (takes V2), each tried on the plan as it is then
    assert steps_changed(batches[1], start) == [4]
    assert steps_changed(batches[2], (0, V1, V1, 0, OUT)) == [2]
    assert steps_changed(batches[3], (0, V1, V1, 0, OUT)) == [1]
    assert all(len(b) == 2 for b in batches[1:])  # one step's two alternatives per batch
    # sweep 2 moves nothing; its step-1 alternatives were both scored in sweep 1, so they are not asked again
    assert len(batches) == 1 + 3 + 2 and [h["round"] for h in res.history] == [0, 1]
    # steepest takes one move per round: the same optimum in two rounds; each round asks the moves not scored yet
    # (round 2: the four away from step 4; round 3: three of them, the other three met before)
    batches.clear()
    st = refine_estimators(losses, start, [V1, V2, OUT], scheme="steepest")
    assert st.plan == res.plan and [len(b) for b in batches] == [1, 6, 4, 3]
    assert len({p for b in batches for p in b}) == sum(len(b) for b in batches)  # no plan asked twice


def test_refinement_rejects_an_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="refinement scheme 'greedy' is unknown"):
        refine_estimators(lambda ps: [0.0] * len(ps), (0, V1), [V1, OUT], scheme="greedy")


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


# ------------------------------------------------------------------------------ evaluators on a tiny FLUX
import numpy as np  # noqa: E402
import torch  # noqa: E402

from budcache.denoisers import FluxCond, FluxDenoiser  # noqa: E402
from budcache.problems.data import make_calibration  # noqa: E402
from budcache.sampler import Sampler, StaticMask  # noqa: E402
from budcache.schedules import flux  # noqa: E402
from budcache.search.evaluator import Evaluator, PeerScheduleEvaluator  # noqa: E402
from budcache.search.losses import latent_mse  # noqa: E402
from helpers import make_transformer  # noqa: E402

ROWS, COLS, TXT, N, C = 4, 4, 8, 8, 3


@pytest.fixture(scope="module")
def tr():
    return make_transformer()


def _factory(tr, guidance: float = 1.0):
    sigmas = flux(N, ROWS * COLS)

    def make_sampler(controller, mechanism: str = "vtaylor1"):
        return Sampler(FluxDenoiser(tr, ROWS, COLS), sigmas, "euler", controller, mechanism, guidance)

    return make_sampler


def _calib(make_sampler, guidance: float = 1.0):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(C, ROWS * COLS, 16, generator=g)
    cond = FluxCond(torch.randn(C, TXT, 32, generator=g), torch.randn(C, 32, generator=g))
    uncond = FluxCond(torch.randn(C, TXT, 32, generator=g), torch.randn(C, 32, generator=g))
    with torch.no_grad():
        return make_calibration(make_sampler, [f"p{i}" for i in range(C)], list(range(C)), noise, cond,
                                uncond if guidance != 1.0 else None)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_plan_losses_equal_direct_sampling(tr, guidance):
    make = _factory(tr, guidance)
    calib = _calib(make, guidance)
    rng = np.random.default_rng(0)
    codes = [est.CODES[n] for n in ("vtaylor1", "vtaylor2", "output", "taylor2", "reuse")]
    plans = []
    base = (0, V1, 0, V1, V1, 0, V1, V1)
    for _ in range(8):  # neighbours of one plan share prefixes: later ones resume from stored states
        k = int(rng.choice([1, 3, 4, 6, 7]))
        plans.append(base[:k] + (int(rng.choice(codes)),) + base[k + 1:])
    ev = Evaluator(make, calib, estimator="vtaylor1")
    with torch.no_grad():
        got = ev.plan_losses(plans[:3]) + ev.plan_losses(plans[3:])
        for p, value in zip(plans, got):
            s = make(StaticMask.from_plan(torch.tensor([p] * C)))
            st = s.run(s.start(calib.noise), calib.cond, calib.uncond)
            assert st.nfe.tolist() == [3] * C
            assert value == pytest.approx(float(latent_mse(st.x, calib.teacher).mean()), rel=1e-4, abs=1e-12)
        # a compute set is scored as its plan with the evaluator's estimator
        assert ev.loss_of((0, 2, 5)) == pytest.approx(ev.plan_losses([base])[0], rel=0, abs=0)
    assert len(set(round(v, 10) for v in got)) > 3


def test_plan_losses_need_an_estimator(tr):
    make = _factory(tr)
    ev = Evaluator(make, _calib(make))
    with pytest.raises(ConfigError, match="plan_losses needs an evaluator built with an estimator"):
        ev.plan_losses([(0,) * N])


def test_peer_schedule_losses_equal_direct_sampling(tr):
    make = _factory(tr)
    calib = _calib(make)
    ev = PeerScheduleEvaluator(make, calib, mechanism="taylorseer")
    computes = [(0, 1, 4), (0, 3, 6), (0, 2, 5)]
    with torch.no_grad():
        got = ev.losses(computes)
        for comp, value in zip(computes, got):
            mask = torch.tensor([k in comp for k in range(N)])
            s = make(StaticMask(mask), mechanism="taylorseer")
            st = s.run(s.start(calib.noise), calib.cond, calib.uncond)
            assert value == float(latent_mse(st.x, calib.teacher).mean())
    assert len(set(got)) == 3 and ev.stats.evaluations == 3
    ev.losses(computes[:1])
    assert ev.stats.evaluations == 3 and ev.stats.memo_hits == 1


def test_plan_losses_are_exact_when_resuming_states_of_plans_with_other_estimators(tr):
    """Prefix sharing across estimators: a vtaylor2 / taylor2 plan resumed from a vtaylor1 plan's stored states
    scores exactly as when run alone (states keep the deepest histories)."""
    make = _factory(tr)
    calib = _calib(make)
    first = (0, V1, 0, V1, V1, 0, V1, V1)
    later = [(0, V1, 0, V1, V1, 0, V2, V2), (0, V1, 0, V1, V1, 0, est.CODES["taylor2"], V1)]
    shared = Evaluator(make, calib, estimator="vtaylor1")
    alone = Evaluator(make, calib, estimator="vtaylor1", prefix_sharing=False)
    with torch.no_grad():
        shared.plan_losses([first])
        got = shared.plan_losses(later)
        ref = alone.plan_losses(later)
    assert got == pytest.approx(ref, rel=1e-5)  # batched candidates round differently; a lost order would not


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_peer_schedule_prefix_sharing_is_exact_and_saves_steps(tr, guidance):
    """Masks sharing a prefix resume from the stored state (the TaylorSeer hooks' state included, per CFG
    context): the same loss bits as whole generations, with fewer steps run."""
    make = _factory(tr, guidance)
    calib = _calib(make, guidance)
    computes = [(0, 2, 5), (0, 2, 6), (0, 2, 4), (0, 1, 4), (0, 2, 5, 7), (0, 3)]
    shared = PeerScheduleEvaluator(make, calib, mechanism="taylorseer")
    alone = PeerScheduleEvaluator(make, calib, mechanism="taylorseer", prefix_sharing=False)
    with torch.no_grad():
        got = [shared.loss_of(c) for c in computes]  # one at a time: each later mask finds stored prefixes
        ref = alone.losses(computes)
    assert got == ref
    assert len(set(got)) == len(computes)
    assert alone.stats.steps_run == N * len(computes)
    assert shared.stats.steps_run < alone.stats.steps_run
    calls = (2 if guidance != 1.0 else 1) * sum(len(c) for c in computes)
    assert alone.stats.stack_calls == calls and shared.stats.stack_calls < calls


def test_peer_run_resumes_from_a_state_bit_for_bit(tr):
    make = _factory(tr, 3.0)
    calib = _calib(make, 3.0)
    mask = torch.tensor([k in (0, 2, 5) for k in range(N)])
    with torch.no_grad():
        s = make(StaticMask(mask), mechanism="taylorseer")
        whole = s.run(s.start(calib.noise), calib.cond, calib.uncond)
        half = s.run(s.start(calib.noise), calib.cond, calib.uncond, until=4)
        assert half.peer is not None and half.step == 4
        for _ in range(2):  # a stored state resumes more than once
            rest = make(StaticMask(mask), mechanism="taylorseer").run(half, calib.cond, calib.uncond)
            assert torch.equal(rest.x, whole.x) and rest.nfe.tolist() == whole.nfe.tolist()
        other = make(StaticMask(mask))  # a vtaylor1 state carries no hook state: a peer cannot resume it
        plain = other.run(other.start(calib.noise), calib.cond, calib.uncond, until=2)
        with pytest.raises(ConfigError, match="peer mechanism's state lives in its own hooks"):
            s.run(plain, calib.cond, calib.uncond)


def test_a_peer_snapshot_restores_only_into_the_same_hooks(tr):
    from budcache.peers import apply_taylorseer_schedule, peer_snapshot, restore_peer, scheduled_hooks

    mask = [True, False, True, False]
    remove = apply_taylorseer_schedule(tr, mask, lite=True)
    snap = peer_snapshot(scheduled_hooks(tr))
    remove()
    remove = apply_taylorseer_schedule(tr, mask, lite=False)  # hooks on other modules
    try:
        with pytest.raises(ConfigError, match="cannot resume hooks on"):
            restore_peer(scheduled_hooks(tr), snap, step=0, contexts=("cond",))
    finally:
        remove()


def test_a_peer_state_resumes_only_its_own_step_and_guidance(tr):
    make1, make3 = _factory(tr, 1.0), _factory(tr, 3.0)
    calib = _calib(make3, 3.0)
    mask = torch.tensor([k in (0, 2, 5) for k in range(N)])
    with torch.no_grad():
        s1 = make1(StaticMask(mask), mechanism="taylorseer")
        half = s1.run(s1.start(calib.noise), calib.cond, None, until=3)
        with pytest.raises(ConfigError, match="contexts \\['cond'\\] cannot resume a run with \\['cond', 'uncond'\\]"):
            make3(StaticMask(mask), mechanism="taylorseer").run(half, calib.cond, calib.uncond)
        moved = dataclasses.replace(half, step=4)  # a state whose hooks stopped at another step
        with pytest.raises(ConfigError, match="TaylorSeer state of step 3 cannot resume a run at step 4"):
            s1.run(moved, calib.cond, None)
    assert not s1._peer_hooks  # the hooks were removed after the refusal


def test_a_peer_snapshot_maps_its_batch(tr):
    make = _factory(tr, 3.0)
    calib = _calib(make, 3.0)
    with torch.no_grad():
        s = make(StaticMask(torch.tensor([k in (0, 2, 5) for k in range(N)])), mechanism="taylorseer")
        st = s.run(s.start(calib.noise), calib.cond, calib.uncond, until=2)
    one = st.peer.map(lambda t: t[1:2])
    for full, part in zip(st.peer.states, one.states):
        assert set(full) == set(part) == {"cond", "uncond"}
        for ctx in full:
            a, b = full[ctx], part[ctx]
            if a.inactive_shapes is not None:
                assert [sh[0] for sh in b.inactive_shapes] == [1] * len(a.inactive_shapes)
                assert [tuple(sh[1:]) for sh in b.inactive_shapes] == [tuple(sh[1:]) for sh in a.inactive_shapes]
            for i, f in a.taylor_factors.items():
                for o, t in f.items():
                    assert torch.equal(b.taylor_factors[i][o], t[1:2])
    assert any(a.taylor_factors for h in st.peer.states for a in h.values())  # the active module has factors


def test_sweeps_stop_after_two_by_default_even_when_another_would_move() -> None:
    """Each step prefers OUT only once the step before it is OUT, so a last-to-first sweep makes one move; the
    default stops after 2 sweeps (2 moves), ``rounds=4`` goes on to the optimum."""
    def losses(plans):
        return [-float(sum(p[k] == OUT and (k == 1 or p[k - 1] == OUT) for k in range(1, 5))) for p in plans]

    start = (0, V1, V1, V1, V1)
    two = refine_estimators(losses, start, [V1, OUT])
    assert two.plan == (0, OUT, OUT, V1, V1) and [h["round"] for h in two.history] == [0, 1, 2]
    four = refine_estimators(losses, start, [V1, OUT], rounds=4)
    assert four.plan == (0, OUT, OUT, OUT, OUT) and four.loss == -4.0
