"""Tests for budcache.search: exact mask evaluation, budget-keeping moves, the annealing search and its
resumable checkpoints, prompt files, and the exhaustive optimality check on tinyflow."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

import budcache.search.anneal as anneal
from budcache.denoisers import FluxCond, FluxDenoiser
from budcache.errors import ConfigError, ModelOutputError
from budcache.problems.data import CalibrationSet, make_calibration, pairs_for, read_prompt_file
from budcache.problems.tinyflow import tinyflow_prompts
from budcache.sampler import Sampler, StaticMask
from budcache.schedules import flux
from budcache.search import (
    Evaluator,
    SearchConfig,
    compute_of,
    fit_budget,
    hc_neighbourhood,
    mask_of,
    random_init,
    sa_proposal,
    search,
)
from budcache.search.anneal import memo_scores
from budcache.search.losses import latent_mse
from helpers import make_transformer

torch.set_num_threads(1)

ROWS, COLS, TXT = 4, 4, 8
N = 10
C = 3  # calibration items


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# =============================================================================== tiny FLUX set-up
@pytest.fixture(scope="module")
def tr() -> FluxTransformer2DModel:
    return make_transformer()


def factory(tr, solver: str, mechanism: str, guidance: float = 1.0, steps: int = N):
    sigmas = flux(steps, ROWS * COLS)

    def make_sampler(controller):
        return Sampler(FluxDenoiser(tr, ROWS, COLS), sigmas, solver, controller, mechanism, guidance)

    return make_sampler


def tiny_calibration(make_sampler, items: int = C, seed: int = 1) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(items, ROWS * COLS, 16, generator=g)
    cond = FluxCond(torch.randn(items, TXT, 32, generator=g), torch.randn(items, 32, generator=g))
    uncond = FluxCond(torch.randn(items, TXT, 32, generator=g), torch.randn(items, 32, generator=g))
    sampler = make_sampler(None)
    return make_calibration(make_sampler, [f"p{i}" for i in range(items)], list(range(items)), noise, cond,
                            uncond if sampler.guidance != 1.0 else None, info={"test": True})


def random_computes(n: int, steps: int, seed: int, ks=None) -> list[tuple[int, ...]]:
    """``n`` distinct valid compute sets (step 0 computed) with various K < steps."""
    rng = np.random.default_rng(seed)
    out: dict[tuple[int, ...], None] = {}
    while len(out) < n:
        k = int(rng.integers(1, steps)) if ks is None else int(ks[len(out) % len(ks)])
        rest = rng.choice(np.arange(1, steps), size=k - 1, replace=False)
        out[tuple(sorted([0, *(int(r) for r in rest)]))] = None
    return list(out)


def direct_loss(make_sampler, calib: CalibrationSet, compute) -> float:
    """The definition: sample every item under the mask with budcache's sampler, latent MSE vs the teacher."""
    sampler = make_sampler(StaticMask(torch.tensor(mask_of(sampler_steps(make_sampler), compute))))
    st = sampler.run(sampler.start(calib.noise), calib.cond, calib.uncond)
    assert st.nfe.tolist() == [len(compute)] * len(calib)
    return float(latent_mse(st.x, calib.teacher).mean())


def sampler_steps(make_sampler) -> int:
    return make_sampler(None).steps


CASES = [("euler", "reuse", 1.0), ("euler", "forecast2", 1.0), ("dpmpp2m", "reuse", 1.0),
         ("dpmpp2m", "forecast2", 1.0), ("euler", "forecast2", 3.0), ("dpmpp2m", "output", 1.0)]


# =============================================================================== 1. evaluator exactness
def test_mask_of_and_compute_of_are_inverse():
    assert mask_of(6, (0, 2, 5)) == (True, False, True, False, False, True)
    assert compute_of(mask_of(6, [5, 0, 2])) == (0, 2, 5)
    for c in random_computes(20, 12, seed=3):
        assert compute_of(mask_of(12, c)) == c


def test_teacher_is_the_full_step_sampler(tr):
    make = factory(tr, "dpmpp2m", "reuse")
    calib = tiny_calibration(make)
    s = make(None)
    full = s.run(s.start(calib.noise), calib.cond)
    torch.testing.assert_close(calib.teacher, full.x, rtol=0, atol=0)
    assert len(calib) == C and calib.teacher.shape == calib.noise.shape


@pytest.mark.parametrize("solver,mechanism,guidance", CASES)
def test_evaluator_losses_equal_naive_and_direct_sampling(tr, solver, mechanism, guidance):
    make = factory(tr, solver, mechanism, guidance)
    calib = tiny_calibration(make)
    computes = random_computes(12, N, seed=len(solver) + len(mechanism) + int(guidance))
    # neighbours of an early mask share prefixes with it: later calls resume from stored states
    cfg = SearchConfig(N, len(computes[0]), far_jumps=1)
    computes += [c for c in hc_neighbourhood(computes[0], cfg, np.random.default_rng(0)) if c not in computes][:4]
    computes.append(tuple(range(N)))  # all steps: exactly the teacher
    assert len(computes) >= 15

    fast = Evaluator(make, calib)
    naive = Evaluator(make, calib, prefix_sharing=False, batch_candidates=False)
    # several calls, as a search makes them: a batch, single masks, then the rest as one batch
    got = fast.losses(computes[:4]) + [fast.loss_of(c) for c in computes[4:7]] + fast.losses(computes[7:])
    ref = naive.losses(computes)
    direct = [direct_loss(make, calib, c) for c in computes]

    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-12)
    assert got[-1] == pytest.approx(0.0, abs=1e-10)
    # the losses are informative: cached masks really differ from the teacher and from each other
    assert min(got[:-1]) > 1e-8
    assert len({round(v, 12) for v in got[:-1]}) > 10
    assert fast.stats.evaluations == naive.stats.evaluations == len(computes)
    # the naive evaluator runs the block stack for exactly K steps of every item of every mask
    assert naive.stats.item_evaluations == C * sum(len(c) for c in computes)
    # prefix sharing really resumed some masks from stored states
    assert fast.stats.item_evaluations < naive.stats.item_evaluations


@pytest.mark.parametrize("prefix_sharing,batch_candidates,max_batch,max_state_bytes",
                         [(True, False, 512, 2**30), (False, True, 512, 2**30), (True, True, 7, 2**30),
                          (True, True, 512, 20_000)])
def test_every_evaluator_variant_is_exact(tr, prefix_sharing, batch_candidates, max_batch, max_state_bytes):
    """Small batches (chunked candidates) and a tiny state store (LRU eviction) change cost, never losses."""
    make = factory(tr, "dpmpp2m", "forecast2")
    calib = tiny_calibration(make)
    computes = random_computes(12, N, seed=11)
    ref = Evaluator(make, calib, prefix_sharing=False, batch_candidates=False).losses(computes)
    ev = Evaluator(make, calib, prefix_sharing=prefix_sharing, batch_candidates=batch_candidates,
                   max_batch=max_batch, max_state_bytes=max_state_bytes)
    # two calls: the second resumes from states stored by the first
    got = ev.losses(computes[:6]) + ev.losses(computes[6:])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-12)
    if max_state_bytes < 2**30:
        assert ev._store.bytes <= max_state_bytes or len(ev._store) == 1


def test_memo_answers_repeats_without_running_the_model(tr):
    make = factory(tr, "euler", "reuse")
    calib = tiny_calibration(make)
    ev = Evaluator(make, calib)
    computes = random_computes(6, N, seed=5)
    first = ev.losses(computes)
    evals, items, steps = ev.stats.evaluations, ev.stats.item_evaluations, ev.stats.steps_run
    assert evals == 6 and ev.stats.memo_hits == 0

    # repeats, in another order and unsorted, plus a duplicate inside one call
    again = ev.losses([tuple(reversed(c)) for c in reversed(computes)] + [computes[0]])
    assert again == [*reversed(first), first[0]]
    assert ev.stats.memo_hits == 7
    assert (ev.stats.evaluations, ev.stats.item_evaluations, ev.stats.steps_run) == (evals, items, steps)
    assert ev.loss_of(computes[2]) == first[2]
    assert ev.stats.memo_hits == 8 and ev.stats.evaluations == evals

    # a new set in the same call as repeats: only the new one runs
    new = next(c for c in random_computes(20, N, seed=6) if c not in computes)
    ev.losses([computes[1], new, computes[3]])
    assert ev.stats.evaluations == evals + 1 and ev.stats.memo_hits == 10


def test_prefix_sharing_saves_work_on_a_neighbourhood(tr):
    make = factory(tr, "euler", "forecast2")
    calib = tiny_calibration(make)
    cfg = SearchConfig(N, 4, radius=3, far_jumps=0)
    centre = (0, 3, 6, 8)
    neigh = hc_neighbourhood(centre, cfg, np.random.default_rng(0))
    assert len(neigh) >= 6

    fast = Evaluator(make, calib)
    naive = Evaluator(make, calib, prefix_sharing=False, batch_candidates=False)
    for ev in (fast, naive):
        ev.loss_of(centre)
    f0, n0 = fast.stats.item_evaluations, naive.stats.item_evaluations
    assert f0 == n0 == C * 4
    got, ref = fast.losses(neigh), naive.losses(neigh)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-12)
    fast_items, naive_items = fast.stats.item_evaluations - f0, naive.stats.item_evaluations - n0
    assert naive_items == C * 4 * len(neigh)
    assert fast_items < naive_items
    # resuming from a stored prefix skips at least the shared step 0 of every neighbour
    assert fast_items <= naive_items - C * len(neigh)
    # batching: fewer (batched) stack calls than candidates x steps one by one
    assert fast.stats.stack_calls < naive.stats.stack_calls


def test_one_by_one_prefix_resumes_are_exact(tr):
    """Single-candidate groups store uncloned state slices; later resumes must still be exact."""
    make = factory(tr, "dpmpp2m", "forecast2")
    calib = tiny_calibration(make)
    cfg = SearchConfig(N, 5, far_jumps=1)
    rng = np.random.default_rng(3)
    cur = random_init(cfg, rng)
    fast = Evaluator(make, calib)
    seq = [cur]
    for _ in range(12):
        cur = sa_proposal(cur, cfg, rng)
        seq.append(cur)
    got = [fast.loss_of(c) for c in seq]
    ref = [direct_loss(make, calib, c) for c in seq]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-12)
    assert fast.stats.item_evaluations < C * 5 * len(set(seq))


@pytest.mark.parametrize("bad", [(1, 2, 3), (), (0, N), (0, 3, N + 4), (0, 2, 2, 5), (-1, 0, 3), [0, 4, 4]])
def test_invalid_compute_sets_are_config_errors(tr, bad):
    make = factory(tr, "euler", "reuse")
    calib = tiny_calibration(make)
    ev = Evaluator(make, calib)
    with pytest.raises(ConfigError, match="invalid"):
        ev.losses([(0, 1), bad])
    assert ev.stats.evaluations == 0  # nothing ran for the valid one either


def test_evaluator_needs_teacher_outputs(tr):
    make = factory(tr, "euler", "reuse")
    calib = tiny_calibration(make)
    bare = CalibrationSet(calib.prompts, calib.seeds, calib.noise, calib.cond)
    with pytest.raises(ConfigError, match="teacher"):
        Evaluator(make, bare)


def test_calibration_digest_tracks_its_definition(tr):
    make = factory(tr, "euler", "reuse")
    a, b = tiny_calibration(make), tiny_calibration(make)
    assert a.digest == b.digest and len(a.digest) == 16
    c = CalibrationSet(a.prompts, [9, 9, 9], a.noise, a.cond, teacher=a.teacher, info=a.info)
    d = CalibrationSet(a.prompts, a.seeds, a.noise, a.cond, teacher=a.teacher, info={"test": False})
    assert len({a.digest, c.digest, d.digest}) == 3


# =============================================================================== 2. moves
def _check_valid(c, cfg: SearchConfig) -> None:
    assert isinstance(c, tuple)
    assert len(c) == cfg.nfe, (c, cfg)
    assert list(c) == sorted(set(c)), c
    assert all(isinstance(k, int) for k in c)
    assert 0 <= c[0] and c[-1] <= cfg.steps - 1
    assert c[:cfg.forced] == tuple(range(cfg.forced)), (c, cfg.forced)


def _configs():
    rng = np.random.default_rng(2024)
    out = []
    for _ in range(60):
        steps = int(rng.integers(2, 30))
        nfe = int(rng.integers(1, steps + 1))
        prefix = None if rng.random() < 0.6 else int(rng.integers(1, nfe + 1))
        out.append(SearchConfig(steps, nfe, radius=int(rng.integers(1, 5)), far_jumps=int(rng.integers(0, 4)),
                                p_single=float(rng.random()), p_local=float(rng.random()), prefix=prefix,
                                seed=int(rng.integers(1000))))
    return out + [SearchConfig(12, 5), SearchConfig(28, 10), SearchConfig(8, 8), SearchConfig(8, 7),
                  SearchConfig(5, 1), SearchConfig(20, 6, prefix=3)]


def test_forced_prefix_default_and_override():
    assert SearchConfig(28, 10).forced == 2
    assert SearchConfig(12, 3).forced == 1
    assert SearchConfig(12, 8).forced == 2
    assert SearchConfig(12, 8, prefix=5).forced == 5


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"N{c.steps}K{c.nfe}P{c.forced}r{c.radius}")
def test_moves_keep_the_budget_and_the_prefix(cfg):
    rng = np.random.default_rng(cfg.seed)
    free_slots = cfg.steps - cfg.nfe
    for _ in range(15):
        cur = random_init(cfg, rng)
        _check_valid(cur, cfg)
        for _ in range(10):
            nxt = sa_proposal(cur, cfg, rng)
            _check_valid(nxt, cfg)
            if free_slots > 0 and cfg.nfe > cfg.forced:
                assert nxt != cur  # a move always moves something
                assert 1 <= len(set(nxt) - set(cur)) <= 2
            else:
                assert nxt == cur
            neigh = hc_neighbourhood(nxt, cfg, rng)
            assert nxt not in neigh
            assert len(neigh) == len(set(neigh))
            for c in neigh:
                _check_valid(c, cfg)
                assert len(set(c) - set(nxt)) == 1  # one step moved
            if free_slots == 0 or cfg.nfe == cfg.forced:
                assert neigh == []
            cur = nxt


def test_hc_neighbourhood_holds_every_local_move():
    cfg = SearchConfig(12, 4, radius=2, far_jumps=0)
    cur = (0, 3, 4, 9)
    neigh = set(hc_neighbourhood(cur, cfg, np.random.default_rng(0)))
    expected = set()
    for c in cur[1:]:
        for t in range(max(1, c - 2), min(11, c + 2) + 1):
            if t not in cur:
                expected.add(tuple(sorted(set(cur) - {c} | {t})))
    assert neigh == expected
    # far jumps add moves beyond the radius
    far = set(hc_neighbourhood(cur, SearchConfig(12, 4, radius=2, far_jumps=4), np.random.default_rng(1)))
    assert expected <= far and far - expected


def test_random_init_covers_the_space():
    cfg = SearchConfig(8, 3)
    rng = np.random.default_rng(0)
    seen = {random_init(cfg, rng) for _ in range(400)}
    assert seen == {(0, a, b) for a, b in itertools.combinations(range(1, 8), 2)}
    cfg = SearchConfig(10, 6, prefix=4)
    for _ in range(50):
        c = random_init(cfg, rng)
        _check_valid(c, cfg)


@pytest.mark.parametrize("steps", [6, 12, 28])
def test_fit_budget_maps_to_every_budget(steps):
    rng = np.random.default_rng(steps)
    for src_k in range(1, steps + 1):
        src = random_init(SearchConfig(steps, src_k), rng)
        for k in range(1, steps + 1):
            cfg = SearchConfig(steps, k)
            out = fit_budget(src, cfg)
            _check_valid(out, cfg)
            if k == src_k and set(range(cfg.forced)) <= set(src):
                assert out == src
            if k >= src_k:
                assert set(src) | set(range(cfg.forced)) <= set(out) or len(set(src) | set(range(cfg.forced))) > k
            else:
                assert set(out) <= set(src) | set(range(cfg.forced))


def test_fit_budget_with_explicit_prefix():
    cfg = SearchConfig(20, 8, prefix=4)
    out = fit_budget((0, 10, 19), cfg)
    _check_valid(out, cfg)
    assert {10, 19} <= set(out)


@pytest.mark.parametrize("kw, why", [
    (dict(steps=10, nfe=0), "nfe 0 must lie in 1..10"), (dict(steps=10, nfe=11), "nfe 11 must lie in 1..10"),
    (dict(steps=10, nfe=-3), "nfe -3 must lie in 1..10"), (dict(steps=0, nfe=1), "nfe 1 must lie in 1..0"),
    (dict(steps=10, nfe=3, t_min=0.0), "temperatures"), (dict(steps=10, nfe=3, t_min=-1e-3), "temperatures"),
    (dict(steps=10, nfe=3, t_min=0.1, t_max=0.01), "temperatures"),
    (dict(steps=10, nfe=3, t_max=float("nan")), "temperatures"),
    (dict(steps=10, nfe=3, restarts=0), "restarts and radius >= 1"),
    (dict(steps=10, nfe=3, sa_iters=-1), "sa_iters and hc_rounds must be >= 0"),
    (dict(steps=10, nfe=3, hc_rounds=-1), "sa_iters and hc_rounds must be >= 0"),
    (dict(steps=10, nfe=3, radius=0), "restarts and radius >= 1"),
    (dict(steps=10, nfe=3, prefix=0), "prefix 0 must lie in 1..nfe=3"),
    (dict(steps=10, nfe=3, prefix=4), "prefix 4 must lie in 1..nfe=3"),
])
def test_search_config_rejects_bad_settings(kw, why):
    with pytest.raises(ConfigError, match=re.escape(why)):
        SearchConfig(**kw)


def test_search_config_error_names_nfe():
    with pytest.raises(ConfigError, match=r"nfe 11 .*1\.\.10"):
        SearchConfig(10, 11)


# =============================================================================== 3. search on synthetic losses
def all_masks(steps: int, nfe: int, forced: int = 1) -> list[tuple[int, ...]]:
    return [tuple(range(forced)) + c for c in itertools.combinations(range(forced, steps), nfe - forced)]


class Killed(Exception):
    """Stands for the process being killed in the middle of a search."""


class TableLoss:
    """A deterministic loss over compute sets that records every request."""

    def __init__(self, fn, fail_after: int | None = None):
        self.fn = fn
        self.calls: list[list[tuple[int, ...]]] = []
        self.fail_after = fail_after

    def __call__(self, computes):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Killed(f"killed at call {len(self.calls)}")
        computes = [tuple(c) for c in computes]
        self.calls.append(computes)
        return [self.fn(c) for c in computes]

    @property
    def asked(self) -> list[tuple[int, ...]]:
        return [c for call in self.calls for c in call]


def random_table(steps: int, nfe: int, seed: int) -> dict[tuple[int, ...], float]:
    masks = all_masks(steps, nfe, SearchConfig(steps, nfe).forced)
    vals = np.random.default_rng(seed).random(len(masks))
    return dict(zip(masks, (float(v) for v in vals)))


def target_loss(target: tuple[int, ...], seed: int = 0):
    """Sorted-L1 distance to a hidden target plus a small unique jitter: one global minimum (the target),
    reachable by single-step moves from anywhere."""
    rng = np.random.default_rng(seed)
    jitter: dict[tuple[int, ...], float] = {}

    def fn(c):
        if c not in jitter:
            jitter[c] = float(rng.random()) * 0.49 if c != target else 0.0
        return float(sum(abs(a - b) for a, b in zip(sorted(c), target))) + jitter[c]

    return fn


def test_search_finds_the_brute_force_optimum_of_a_structured_loss():
    steps, nfe = 12, 5
    target = (0, 2, 5, 9, 11)
    fn = target_loss(target)
    table = {m: fn(m) for m in all_masks(steps, nfe)}
    assert len(table) == math.comb(11, 4)
    best = min(table, key=table.get)
    assert best == target
    for seed in range(4):
        loss = TableLoss(table.__getitem__)
        res = search(loss, SearchConfig(steps, nfe, seed=seed))
        assert res.compute == best and res.loss == table[best]
        assert res.evaluations == len(set(loss.asked)) < len(table)


@pytest.mark.parametrize("steps,nfe,target", [(20, 6, (0, 1, 4, 9, 15, 19)), (28, 10, (0, 1, 2, 4, 6, 9, 13, 18, 23, 27))])
def test_search_finds_a_hidden_target_on_larger_spaces(steps, nfe, target):
    res = search(TableLoss(target_loss(target, seed=nfe)), SearchConfig(steps, nfe, seed=1, hc_rounds=60))
    assert res.compute == target and res.loss == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_search_finds_the_optimum_of_a_random_table(seed):
    steps, nfe = 8, 3
    table = random_table(steps, nfe, seed)
    best = min(table, key=table.get)
    res = search(TableLoss(table.__getitem__), SearchConfig(steps, nfe, seed=seed))
    assert res.compute == best and res.loss == table[best]


def test_search_result_is_valid_and_consistent_on_a_random_table():
    steps, nfe = 12, 5
    table = random_table(steps, nfe, 7)
    cfg = SearchConfig(steps, nfe, seed=3, sa_iters=120, restarts=2)
    loss = TableLoss(table.__getitem__)
    seen = []
    res = search(loss, cfg, on_step=seen.append)
    _check_valid(res.compute, cfg)
    assert res.loss == table[res.compute] == min(table[c] for c in loss.asked)
    # every request is valid and the memo never asks twice (shared across SA, HC and restarts)
    for c in loss.asked:
        _check_valid(c, cfg)
    assert len(loss.asked) == len(set(loss.asked)) == res.evaluations
    # history: consecutive steps, best-so-far never rises, both restarts start with init then SA
    h = res.history
    assert seen == h
    assert [e["step"] for e in h] == list(range(len(h)))
    assert all(b["best_loss"] <= a["best_loss"] for a, b in zip(h, h[1:]))
    assert h[-1]["best_loss"] == res.loss
    for r in range(2):
        stages = [e["stage"] for e in h if e["restart"] == r]
        assert stages[0] == "init" and stages[1:cfg.sa_iters + 1] == ["sa"] * cfg.sa_iters
        assert set(stages[cfg.sa_iters + 1:]) <= {"hc"}
    assert all(e["loss"] >= e["best_loss"] for e in h)


def test_hill_climbing_ends_in_a_local_minimum():
    steps, nfe = 12, 5
    table = random_table(steps, nfe, 1)
    cfg = SearchConfig(steps, nfe, seed=0, sa_iters=0, hc_rounds=100, far_jumps=0)
    res = search(TableLoss(table.__getitem__), cfg)
    neigh = hc_neighbourhood(res.compute, cfg, np.random.default_rng(0))
    assert all(table[c] >= res.loss for c in neigh)


def test_same_seed_same_search_and_different_seeds_both_valid():
    steps, nfe = 12, 5
    table = random_table(steps, nfe, 3)
    runs = {}
    for seed in (0, 0, 1):
        loss = TableLoss(table.__getitem__)
        res = search(loss, SearchConfig(steps, nfe, seed=seed, sa_iters=80))
        runs.setdefault(seed, []).append((res, loss.calls))
    (a, calls_a), (b, calls_b) = runs[0]
    assert (a.compute, a.loss, a.history, a.evaluations) == (b.compute, b.loss, b.history, b.evaluations)
    assert calls_a == calls_b
    c, calls_c = runs[1][0]
    assert calls_c != calls_a  # another seed explores differently
    for r in (a, c):
        _check_valid(r.compute, SearchConfig(steps, nfe))
        assert r.loss == table[r.compute]


def test_relative_search_is_invariant_to_the_loss_scale():
    """Relative Metropolis: a loss scaled by a power of two (exact in floating point) is searched identically."""
    table = random_table(12, 5, 5)
    scale = 2.0 ** -20
    a, b = TableLoss(table.__getitem__), TableLoss(lambda c: table[c] * scale)
    cfg = SearchConfig(12, 5, seed=2, sa_iters=100, relative=True)
    ra, rb = search(a, cfg), search(b, cfg)
    assert a.calls == b.calls
    assert ra.compute == rb.compute and rb.loss == ra.loss * scale
    assert [e["stage"] for e in ra.history] == [e["stage"] for e in rb.history]


def test_warm_start_begins_at_the_fitted_init():
    steps = 12
    table = random_table(steps, 5, 0)
    loss = TableLoss(table.__getitem__)
    init = (0, 1, 4, 7, 9, 11)  # a K=6 result
    cfg = SearchConfig(steps, 5, seed=0, sa_iters=5, hc_rounds=0)
    res = search(loss, cfg, init=init)
    assert loss.calls[0] == [fit_budget(init, cfg)]
    assert res.history[0]["loss"] == table[fit_budget(init, cfg)]


def test_non_finite_loss_is_a_model_output_error_naming_the_mask():
    with pytest.raises(ModelOutputError, match=r"compute set \[0, .*not finite"):
        search(TableLoss(lambda c: float("nan")), SearchConfig(8, 3, sa_iters=3))


def test_search_with_full_budget_returns_all_steps():
    res = search(TableLoss(lambda c: 1.0), SearchConfig(6, 6, sa_iters=5))
    assert res.compute == tuple(range(6)) and res.loss == 1.0


# =============================================================================== 4. checkpoint and resume
RESUME_CFG = SearchConfig(12, 5, seed=4, sa_iters=40, hc_rounds=10, restarts=2)
RESUME_TABLE = random_table(12, 5, 11)


def _reference():
    loss = TableLoss(RESUME_TABLE.__getitem__)
    res = search(loss, RESUME_CFG)
    return res, loss


def _no_stray_files(d: Path, name: str = "ckpt.json") -> None:
    assert sorted(p.name for p in d.iterdir()) == [name]


def test_resume_after_a_kill_anywhere_gives_the_uninterrupted_result(tmp_path):
    ref, ref_loss = _reference()
    total = len(ref_loss.calls)
    hc_calls = [i for i, call in enumerate(ref_loss.calls) if len(call) > 1]
    assert total > 30 and hc_calls  # the run has SA and HC phases to be killed in
    kills = sorted(set(range(1, total, 3)) | set(hc_calls) | {1, total - 1})
    assert any(k < hc_calls[0] for k in kills) and any(k in hc_calls for k in kills)
    for m in kills:
        d = tmp_path / f"kill{m}"
        d.mkdir()
        ckpt = d / "ckpt.json"
        with pytest.raises(Killed):
            search(TableLoss(RESUME_TABLE.__getitem__, fail_after=m), RESUME_CFG, checkpoint=ckpt, digest="abc")
        assert json.loads(ckpt.read_text())["format"] == "budcache.search-checkpoint"
        _no_stray_files(d)
        resumed_loss = TableLoss(RESUME_TABLE.__getitem__)
        res = search(resumed_loss, RESUME_CFG, checkpoint=ckpt, resume=True, digest="abc")
        assert res.compute == ref.compute, m
        assert res.loss == ref.loss, m
        assert res.history == ref.history, m
        assert res.evaluations == ref.evaluations, m
        # the resumed run does not recompute what the checkpoint already knew
        assert len(resumed_loss.asked) < len(ref_loss.asked)
        assert json.loads(ckpt.read_text())["state"]["phase"] == "done"
        _no_stray_files(d)


def test_resume_with_absolute_temperatures(tmp_path):
    cfg = SearchConfig(12, 5, seed=8, sa_iters=40, hc_rounds=10, relative=False)
    table = {c: v * 1e-4 for c, v in RESUME_TABLE.items()}
    ref_loss = TableLoss(table.__getitem__)
    ref = search(ref_loss, cfg)
    total = len(ref_loss.calls)
    hc_call = next(i for i, call in enumerate(ref_loss.calls) if len(call) > 1)
    for kill in sorted({2, total // 3, total // 2, hc_call, total - 1}):
        ckpt = tmp_path / f"ckpt{kill}.json"
        with pytest.raises(Killed):
            search(TableLoss(table.__getitem__, fail_after=kill), cfg, checkpoint=ckpt)
        res = search(TableLoss(table.__getitem__), cfg, checkpoint=ckpt, resume=True)
        assert (res.compute, res.loss, res.history) == (ref.compute, ref.loss, ref.history), kill


def test_resume_of_a_finished_search_calls_no_loss(tmp_path):
    ckpt = tmp_path / "ckpt.json"
    ref = search(TableLoss(RESUME_TABLE.__getitem__), RESUME_CFG, checkpoint=ckpt, digest="abc")
    again = search(TableLoss(RESUME_TABLE.__getitem__, fail_after=0), RESUME_CFG, checkpoint=ckpt, resume=True,
                   digest="abc")
    assert (again.compute, again.loss, again.history, again.evaluations) == \
        (ref.compute, ref.loss, ref.history, ref.evaluations)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    ref, _ = _reference()
    res = search(TableLoss(RESUME_TABLE.__getitem__), RESUME_CFG, checkpoint=tmp_path / "none.json", resume=True)
    assert (res.compute, res.loss, res.history) == (ref.compute, ref.loss, ref.history)


def test_checkpoint_is_complete_json_after_every_save(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.json"
    original = anneal._save
    saves = []

    def checked_save(path, payload):
        original(path, payload)
        data = json.loads(Path(path).read_text())
        assert data["config"] == payload["config"] and data["digest"] == "d1"
        assert data["state"]["history"] == payload["state"]["history"]
        saves.append(data["state"]["phase"])
        _no_stray_files(tmp_path)

    monkeypatch.setattr(anneal, "_save", checked_save)
    search(TableLoss(RESUME_TABLE.__getitem__), RESUME_CFG, checkpoint=ckpt, digest="d1")
    assert len(saves) > 10 and saves[-1] == "done" and "hc" in saves and "sa" in saves


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A kill inside the write leaves the last complete checkpoint (atomic replace), and resume still works."""
    ref, _ = _reference()
    ckpt = tmp_path / "ckpt.json"
    real_replace = os.replace
    count = {"n": 0}

    def flaky_replace(src, dst, *a, **k):
        count["n"] += 1
        if count["n"] == 8:
            raise OSError("disk full")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        search(TableLoss(RESUME_TABLE.__getitem__), RESUME_CFG, checkpoint=ckpt, digest="abc")
    monkeypatch.setattr(os, "replace", real_replace)
    data = json.loads(ckpt.read_text())
    assert data["state"]["phase"] in ("sa", "hc")
    _no_stray_files(tmp_path)
    res = search(TableLoss(RESUME_TABLE.__getitem__), RESUME_CFG, checkpoint=ckpt, resume=True, digest="abc")
    assert (res.compute, res.loss, res.history) == (ref.compute, ref.loss, ref.history)


@pytest.mark.parametrize("change", [dict(seed=5), dict(nfe=6), dict(sa_iters=41), dict(digest="other")])
def test_checkpoint_of_another_search_is_refused(tmp_path, change):
    ckpt = tmp_path / "ckpt.json"
    with pytest.raises(Killed):
        search(TableLoss(RESUME_TABLE.__getitem__, fail_after=10), RESUME_CFG, checkpoint=ckpt, digest="abc")
    before = ckpt.read_text()
    kw = {k: v for k, v in change.items() if k != "digest"}
    cfg = SearchConfig(**{**RESUME_CFG.__dict__, **kw})
    with pytest.raises(ConfigError, match="another search"):
        search(TableLoss(RESUME_TABLE.__getitem__), cfg, checkpoint=ckpt, resume=True,
               digest=change.get("digest", "abc"))
    assert ckpt.read_text() == before  # the refused checkpoint is left alone


def test_without_resume_an_old_checkpoint_is_overwritten(tmp_path):
    ref, _ = _reference()
    ckpt = tmp_path / "ckpt.json"
    search(TableLoss(random_table(12, 5, 99).__getitem__), RESUME_CFG, checkpoint=ckpt, digest="abc")
    res = search(TableLoss(RESUME_TABLE.__getitem__), RESUME_CFG, checkpoint=ckpt, digest="abc")
    assert (res.compute, res.loss, res.history) == (ref.compute, ref.loss, ref.history)
    assert json.loads(ckpt.read_text())["state"]["best_loss"] == ref.loss


# =============================================================================== 5. exhaustive check on tinyflow
@pytest.fixture(scope="module")
def tinyflow_exhaustive():
    """tinyflow, N=12, 2 calibration pairs: the losses of all 330 masks of K=5 (step 0 computed), one call."""
    from budcache import tinyflow
    from budcache.problems.tinyflow import TinyflowProblem

    problem = TinyflowProblem(tinyflow.load(), steps=12)
    prompts, seeds = pairs_for(tinyflow_prompts(2), 1, 0)
    calib = problem.calibration(prompts, seeds)
    assert len(calib) == 2
    brute = Evaluator(problem.make_sampler, calib)
    masks = all_masks(12, 5)
    assert len(masks) == 330
    with torch.no_grad():
        losses = brute.losses(masks)
    assert brute.stats.evaluations == 330
    assert all(math.isfinite(v) and v > 0 for v in losses)
    return problem, calib, masks, losses, brute.stats


def _check_exhaustive(tinyflow_exhaustive, cfg: SearchConfig) -> None:
    problem, calib, masks, losses, brute_stats = tinyflow_exhaustive
    best = float(min(losses))
    fresh = Evaluator(problem.make_sampler, calib)
    res = search(fresh.losses, cfg)
    ranked = sorted(losses)
    argmins = {m for m, v in zip(masks, losses) if v <= best * (1 + 1e-6)}
    assert res.compute in argmins, \
        f"search found {list(res.compute)} (rank {ranked.index(losses[masks.index(res.compute)])} " \
        f"of 330), the optimum is {list(masks[losses.index(best)])}"
    # the loss it reports is that mask's, up to float32 rounding: the search scores masks in other batches
    # (shared prefixes) than the one-call enumeration, which moves the loss by ~1e-5 relative
    assert res.loss == pytest.approx(best, rel=1e-4)
    # the search is far cheaper than the enumeration
    assert fresh.stats.evaluations < 330
    assert fresh.stats.item_evaluations < brute_stats.item_evaluations
    # and it beats the evenly spaced mask of the same budget
    uniform = tuple(i * 12 // 5 for i in range(5))
    assert res.loss < losses[masks.index(uniform)]


@pytest.mark.slow
def test_search_matches_exhaustive_enumeration_on_tinyflow(tinyflow_exhaustive):
    _check_exhaustive(tinyflow_exhaustive, SearchConfig(12, 5, seed=0))


@pytest.mark.slow
def test_absolute_temperature_search_matches_exhaustive_enumeration_on_tinyflow(tinyflow_exhaustive):
    _check_exhaustive(tinyflow_exhaustive, SearchConfig(12, 5, seed=0, relative=False))


# =============================================================================== 6. prompt files
def test_read_txt_skips_blank_lines(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a red circle\n\n   \n  two squares  \r\nthree triangles")
    assert read_prompt_file(p) == ["a red circle", "two squares", "three triangles"]


def test_read_jsonl_strings_and_objects(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('"a red circle"\n\n{"prompt": "two squares", "seed": 3}\n{"prompt": "a blue triangle"}\n')
    assert read_prompt_file(str(p)) == ["a red circle", "two squares", "a blue triangle"]


def test_read_csv_with_and_without_header(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text('id,Prompt,notes\n1,a red circle,x\n2,"a circle and a square",y\n3,,z\n')
    assert read_prompt_file(p) == ["a red circle", "a circle and a square"]
    q = tmp_path / "n.CSV"
    q.write_text("a red circle,1\nthree circles,2\n")
    assert read_prompt_file(q) == ["a red circle", "three circles"]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "p.yaml").write_text("- a circle\n")
    with pytest.raises(ConfigError, match="unknown extension"):
        read_prompt_file(tmp_path / "p.yaml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"a circle"\n\n{"prompt": "two squares"\n')
    with pytest.raises(ConfigError, match="line 3"):
        read_prompt_file(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('"a circle"\n{"text": "two squares"}\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_prompt_file(wrong)
    for name, text in (("e.txt", ""), ("e2.txt", "\n  \n"), ("e.jsonl", "\n"), ("e.csv", ""),
                       ("h.csv", "prompt\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="empty|no prompts"):
            read_prompt_file(tmp_path / name)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("n", [1, 4, 9, 40])
def test_tinyflow_prompts_cover_every_template_and_parse(n):
    from budcache.tinyflow.grammar import parse_prompt

    prompts = tinyflow_prompts(n)
    assert len(prompts) == n
    assert prompts == tinyflow_prompts(n)  # seeded
    specs = [parse_prompt(p) for p in prompts]
    assert all(p for p in prompts)  # no empty prompt
    if n >= 4:
        kinds = {s.template for s in specs}
        assert kinds == {"single", "pair", "count"}
        assert any(s.fully_specified for s in specs)
        assert any(s.template == "single" and not s.fully_specified for s in specs)
        assert len(set(prompts)) == n
    assert tinyflow_prompts(8, seed=1) != tinyflow_prompts(8, seed=2)


def test_pairs_for_repeats_prompts_with_seeds():
    prompts, seeds = pairs_for(["a", "b"], 3, seed=0)
    assert prompts == ["a"] * 3 + ["b"] * 3
    assert len(set(seeds)) == 6 and pairs_for(["a", "b"], 3, seed=0)[1] == seeds
    with pytest.raises(ConfigError, match=r"seeds per prompt must be >= 1 \(got 0\)"):
        pairs_for(["a"], 0, seed=0)


def test_prompt_files_tolerate_a_byte_order_mark(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_bytes("\ufeffprompt,seed\na red circle,1\n".encode("utf-8"))
    assert read_prompt_file(csv_file) == ["a red circle"]
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa circle\n".encode("utf-8"))
    assert read_prompt_file(txt) == ["a circle"]


def test_log_mse_loss_weighs_items_by_relative_error():
    from budcache.search.losses import get_loss, latent_mse

    teacher = torch.zeros(2, 4)
    x = torch.tensor([[1.0, 1, 1, 1], [0.1, 0.1, 0.1, 0.1]])
    log_mse = get_loss("logmse")
    assert torch.allclose(log_mse(x, teacher), torch.log(latent_mse(x, teacher)))
    # halving one item's error improves the mean log-MSE equally, whichever item it is
    a = log_mse(x * torch.tensor([[0.5], [1.0]]), teacher).mean()
    b = log_mse(x * torch.tensor([[1.0], [0.5]]), teacher).mean()
    assert torch.isclose(a, b)
    assert torch.isfinite(log_mse(teacher, teacher)).all()
    with pytest.raises(ConfigError, match="logmse"):
        get_loss("psnr")


def test_memo_scores_scores_each_new_mask_once_and_names_a_non_finite_one():
    calls: list[list[tuple[int, ...]]] = []

    def losses(cands):
        calls.append(list(cands))
        return [float("inf") if c == (0, 2) else float(sum(c)) for c in cands]

    memo = {(0, 1): 0.5}
    assert memo_scores(memo, losses, [(0, 3), (0, 1), (0, 3)]) == [3.0, 0.5, 3.0]
    assert calls == [[(0, 3)]]  # the memo answers (0, 1); a repeat is scored once
    assert memo_scores(memo, losses, [(0, 3)]) == [3.0] and len(calls) == 1
    with pytest.raises(ModelOutputError, match=r"compute set \[0, 2\] is not finite"):
        memo_scores(memo, losses, [(0, 2)])
    assert (0, 2) not in memo


def test_tempering_reports_a_non_finite_loss_with_its_mask():
    from budcache.search.parallel import TemperingConfig, search_tempering

    with pytest.raises(ModelOutputError, match=r"compute set \[0, .*not finite"):
        search_tempering(TableLoss(lambda c: float("nan")), SearchConfig(8, 3, sa_iters=4),
                         TemperingConfig(workers=2))


def test_taylorseer_grid_computes_are_the_grids_exact_budget_schedules():
    from budcache.peers import taylorseer_grid_computes, taylorseer_grid_mask

    got = taylorseer_grid_computes(12, 4)
    assert got and len(set(got)) == len(got) and all(len(c) == 4 and c[0] == 0 for c in got)
    want = {tuple(k for k, m in enumerate(taylorseer_grid_mask(12, b, i)) if m)
            for b in range(1, 5) for i in range(1, 13) if sum(taylorseer_grid_mask(12, b, i)) == 4}
    assert set(got) <= want and taylorseer_grid_computes(12, 13) == []
