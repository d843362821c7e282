"""Tests for ERTACache, MeanCache, GCache and ECAD (budcache.methods) and cache-dit's DMD / FoCa calibrators:
each method's rule on scripted inputs, exact budgets counted from real block runs, and deterministic fits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from budcache.errors import ConfigError
from budcache.hooks import ResidualHistory
from budcache.methods import BASELINES, ECAD, ERTACache, GCache, MeanCache, Method, available_methods
from budcache.methods.ecad import crowding, non_dominated_fronts, ranks, repair, select
from budcache.methods.ertacache import (
    ERTAController,
    accumulate_schedule,
    fit_affine,
    rectify,
    schedule_for_budget,
    sources,
)
from budcache.methods.gcache import bayes_opt, bound_weights, brute_force_gcache_path, gcache_path, local_errors
from budcache.methods.meancache import (
    brute_force_peak_path,
    edge_costs,
    mean_velocity,
    objective,
    peak_suppressed_path,
)
from budcache.methods.profile import StepSolver, record_trajectory
from budcache.sampler import StaticMask
from budcache.solvers import get_solver
from helpers import make_transformer
from test_methods_baselines import BlockRuns, TinyProblem, calibration, inputs

torch.set_num_threads(1)
N = 8


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tr() -> torch.nn.Module:
    return make_transformer()


@pytest.fixture(scope="module")
def tiny(tr) -> TinyProblem:
    return TinyProblem(tr)


@pytest.fixture(scope="module")
def calib(tiny):
    return calibration(tiny, items=3)


def random_dag(n: int, seed: int, missing: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = np.triu(rng.random((n, n)), 1)
    w[w == 0] = np.nan
    w[(rng.random((n, n)) < missing) & np.isfinite(w)] = np.nan
    for i in range(n - 1):
        w[i, i + 1] = 0.0
    return w


def counted_run(method, problem, x, cond, uncond=None):
    """Sample and count the real runs of the stack's first and last block (elements per run)."""
    blocks = problem.transformer
    with BlockRuns(blocks.transformer_blocks[0]) as head, BlockRuns(blocks.single_transformer_blocks[-1]) as tail:
        run = method.sample(problem, x, cond, uncond)
    return run, sum(head.batches), sum(tail.batches)


# =============================================================================== ERTACache
def test_ertacache_accumulator_rule_on_a_scripted_profile():
    profile = [0.0, 0.2, 0.2, 0.5, 0.1, 0.1, 0.3, 0.05]
    comp, accs = accumulate_schedule(profile, 0.4)
    # acc: 0.2, 0.4 -> compute 2; 0.5 -> compute 3; 0.1, 0.2, 0.5 -> compute 6; last step always
    assert comp == (0, 2, 3, 6, 7)
    assert accs[1:] == pytest.approx([0.2, 0.4, 0.5, 0.1, 0.2, 0.5, 0.05])


@pytest.mark.parametrize("seed", range(5))
def test_ertacache_schedule_hits_every_budget_exactly(seed):
    rng = np.random.default_rng(seed)
    n = 28
    profile = np.concatenate([[0.0], rng.gamma(0.5, 1.0, n - 1)])
    for k in range(1, n + 1):
        comp, _ = schedule_for_budget(profile, k)
        assert len(comp) == k and comp[0] == 0 and len(set(comp)) == k
        if k >= 2:
            assert comp[-1] == n - 1


def test_ertacache_rectification_is_exact_on_a_trajectory_it_can_represent():
    """Residuals that follow a per-channel affine map of the reused one are recovered exactly by the estimator."""
    g = torch.Generator().manual_seed(0)
    b_, t_, d_ = 3, 16, 8
    r_j = torch.randn(b_, t_, d_, generator=g)
    a_true, b_true = torch.randn(d_, generator=g), torch.randn(d_, generator=g)
    r_t = r_j * a_true + b_true
    txt_j = torch.randn(b_, 5, d_, generator=g)
    txt_t = 0.5 * txt_j - 1.0
    coef = fit_affine(r_j, r_t)
    torch.testing.assert_close(coef[0], a_true, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rectify(r_j, coef), r_t, rtol=1e-5, atol=1e-5)
    # the controller hands exactly that estimate to the hooks on the skipped step
    mask = torch.tensor([True, False, True])
    ctl = ERTAController(mask, {1: coef}, {1: fit_affine(txt_j, txt_t)})

    class Signals:
        estimator = None

        def set_estimator(self, est):
            self.estimator = est

    class State:
        x = torch.zeros(b_, 1)

    sig = Signals()
    assert ctl.decide_with(1, State(), sig).tolist() == [False] * b_
    hist = ResidualHistory(img=(r_j,), txt=(txt_j,), steps=(torch.zeros(b_),))
    img, txt = sig.estimator(hist, 1)
    torch.testing.assert_close(img, r_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, txt_t, rtol=1e-5, atol=1e-5)
    # a constant channel keeps a = 1 (and the offset moves its mean)
    const = torch.ones(4, 2)
    a, b = fit_affine(const, const + 2.0)
    assert a.tolist() == [1.0, 1.0] and b.tolist() == pytest.approx([2.0, 2.0])
    assert sources((0, 3, 5), 7) == {1: 0, 2: 0, 4: 3, 6: 5}


def test_ertacache_budget_exact_and_fit_deterministic(tiny, calib):
    x, cond, _ = inputs(2, seed=5)
    for k in (1, 3, 5):
        m = ERTACache()
        m.fit(tiny, calib, k)
        run, head, tail = counted_run(m, tiny, x, cond)
        assert run.nfe.tolist() == [float(k)] * 2 and head == tail == 2 * k
        assert all(0.5 <= p <= 1.5 for p in m.phi.tolist())
        again = ERTACache()
        again.fit(tiny, calib, k)
        assert again.policy.compute == m.policy.compute and torch.equal(again.phi, m.phi)
        for t in m.coef_img:
            assert torch.equal(again.coef_img[t][0], m.coef_img[t][0])
    # without rectification and timestep adjustment it is plain residual reuse on its schedule
    bare = ERTACache(rectify=False, adjust_timesteps=False)
    bare.fit(tiny, calib, 4)
    s = tiny.make_sampler(StaticMask(bare.policy))
    ref = s.run(s.start(x), cond).x
    torch.testing.assert_close(bare.sample(tiny, x, cond).latent, ref)


def test_ertacache_with_guidance_computes_both_passes_exactly_k(tr):
    problem = TinyProblem(tr, guidance=3.0)
    c = calibration(problem, items=2)
    m = ERTACache()
    m.fit(problem, c, 4)
    x, cond, uncond = inputs(2, seed=7)
    run, _, tail = counted_run(m, problem, x, cond, uncond)
    assert run.nfe.tolist() == [4.0, 4.0] and tail == 2 * 2 * 4
    assert bool(torch.isfinite(run.latent).all())


# =============================================================================== MeanCache
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [0.0, 1.0, 5.0])
def test_meancache_path_dp_equals_brute_force(seed, lam):
    w = random_dag(9, seed, missing=0.2 if seed >= 2 else 0.0)
    for k in range(2, 10):
        try:
            bf = brute_force_peak_path(w, k, lam)
        except ConfigError:
            with pytest.raises(ConfigError):
                peak_suppressed_path(w, k, lam)
            continue
        dp = peak_suppressed_path(w, k, lam)
        assert dp[1] == pytest.approx(bf[1], abs=1e-12)
        assert objective(w, dp[0], lam) == pytest.approx(dp[1])
        assert len(dp[0]) == k and dp[0][0] == 0 and dp[0][-1] == 8


def test_meancache_peak_weight_changes_the_path():
    """Two 3-node paths: one with the lower sum, one with the lower peak; lam decides between them."""
    w = np.full((4, 4), np.nan)
    w[0, 1], w[1, 3] = 0.0, 1.0          # sum 1.0, peak 1.0
    w[0, 2], w[2, 3] = 0.6, 0.6          # sum 1.2, peak 0.6
    assert peak_suppressed_path(w, 3, 0.0)[0] == (0, 1, 3)
    assert peak_suppressed_path(w, 3, 1.0)[0] == (0, 2, 3)


def test_meancache_average_velocity_estimate():
    sig = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    euler = get_solver("euler")
    g = torch.Generator().manual_seed(0)
    # a scripted log: the Euler trajectory of velocities v_m
    vs = [torch.randn(2, 3, generator=g) for _ in range(3)]
    x = torch.randn(2, 3, generator=g)
    log = []
    for m, v in enumerate(vs):
        x_next, _ = euler.step(x, v, m, sig, ())
        log.append((x, x_next, v))
        x = x_next
    # window 1 with Euler: the mean velocity of the last step is v_2 itself, so the estimate is plain reuse
    torch.testing.assert_close(mean_velocity(log, 3, 1, sig), vs[2])
    # window 3 by hand: u_bar = mean of v_0..v_2 (equal intervals); d = (v_0 - u_bar) / (s_3 - s_0)
    u_bar = (vs[0] + vs[1] + vs[2]) / 3
    d = (vs[0] - u_bar) / (sig[3] - sig[0])
    torch.testing.assert_close(mean_velocity(log, 3, 3, sig), vs[2] - d * (sig[4] - sig[3]))
    # a window longer than the log uses what there is
    torch.testing.assert_close(mean_velocity(log, 3, 9, sig), mean_velocity(log, 3, 3, sig))


def test_meancache_edge_costs_and_budget(tiny, calib):
    traj = record_trajectory(tiny, calib, keep_states=True)
    cost, win = edge_costs(traj, get_solver("euler"), windows=(1, 3))
    assert all(cost[i, i + 1] == 0 for i in range(N - 1))
    assert np.isfinite(cost[0, N - 1]) and np.isnan(cost[3, 2])
    assert set(np.unique(win[np.isfinite(cost)])) <= {1, 3}
    # edge (2, 6) with window 1 is velocity reuse from the full state after step 2
    sig = traj.sigmas
    x = traj.x[3]
    for k in range(3, 6):
        x = x + (sig[k + 1] - sig[k]) * traj.v[2]
    reuse = float((x - traj.x[6]).abs().mean())
    only1, _ = edge_costs(traj, get_solver("euler"), windows=(1,))
    assert only1[2, 6] == pytest.approx(reuse, rel=1e-5)
    assert cost[2, 6] <= only1[2, 6] + 1e-12
    x_in, cond, _ = inputs(2, seed=5)
    for k in (1, 3, 6):
        m = MeanCache()
        m.fit(tiny, calib, k)
        run, head, tail = counted_run(m, tiny, x_in, cond)
        assert run.nfe.tolist() == [float(k)] * 2 and head == tail == 2 * k
        again = MeanCache()
        again.fit(tiny, calib, k)
        assert again.policy.compute == m.policy.compute and again.step_window == m.step_window
        torch.testing.assert_close(again.sample(tiny, x_in, cond).latent, run.latent)


def test_step_solver_restarts_its_log_every_generation():
    sig = torch.tensor([1.0, 0.5, 0.0])
    seen = []
    s = StepSolver(get_solver("euler"), scale=torch.tensor([1.0, 2.0]),
                   replace=lambda k, x, v, log, sg: seen.append(len(log)))
    x = torch.ones(1, 2)
    for _ in range(2):
        y, h = s.step(x, torch.ones(1, 2), 0, sig, ())
        y, h = s.step(y, torch.ones(1, 2), 1, sig, h)
    assert seen == [0, 1, 0, 1]
    torch.testing.assert_close(y, torch.ones(1, 2) - 0.5 - 2 * 0.5)


# =============================================================================== GCache
@pytest.mark.parametrize("seed", range(4))
def test_gcache_dp_equals_brute_force(seed):
    w = random_dag(9, seed, missing=0.2 if seed >= 2 else 0.0)
    for k in range(2, 10):
        try:
            bf = brute_force_gcache_path(w, k)
        except ConfigError:
            with pytest.raises(ConfigError):
                gcache_path(w, k)
            continue
        dp = gcache_path(w, k)
        assert dp[1] == pytest.approx(bf[1], abs=1e-12) and len(dp[0]) == k


def test_gcache_bound_weights():
    e = np.array([[np.nan, 0.0, 4.0], [np.nan, np.nan, 0.0], [np.nan] * 3])
    sig = [1.0, 0.5, 0.25, 0.0]
    w = bound_weights(e, sig, 2.0, 0.5)
    assert w[0, 2] == pytest.approx(2.0 * np.exp(2.0 * 0.25))
    assert w[0, 1] == 0.0 and np.isnan(w[1, 0])
    assert bound_weights(e, sig, 0.0, 1.0)[0, 2] == pytest.approx(4.0)


def test_gcache_local_errors_are_teacher_forced_segments(tiny, calib):
    traj = record_trajectory(tiny, calib, keep_states=True)
    e = local_errors(tiny, calib, traj)
    for i, j in [(0, 3), (2, 7), (4, 6)]:
        mask = [s <= i or s >= j for s in range(N)]
        s = tiny.make_sampler(StaticMask(mask))
        xj = s.run(s.start(calib.noise), calib.cond, until=j).x
        rms = (xj - traj.x[j]).pow(2).flatten(1).mean(1).sqrt().mean()
        assert e[i, j] == pytest.approx(float(rms), rel=1e-4, abs=1e-7)
    assert all(e[i, i + 1] == 0 for i in range(N - 1))


def test_gcache_bayes_opt_is_seeded_and_improves():
    def f(u):
        return float((u[0] - 0.3) ** 2 + (u[1] - 0.7) ** 2)

    a = bayes_opt(f, evals=14, init=4, seed=3)
    b = bayes_opt(f, evals=14, init=4, seed=3)
    assert [h[1] for h in a] == [h[1] for h in b] and len(a) == 14
    assert min(h[1] for h in a) < min(h[1] for h in a[:4])


def test_gcache_fit_exact_budget_and_deterministic(tiny, calib):
    x, cond, _ = inputs(2, seed=5)
    for k in (1, 3, 5):
        m = GCache(evals=6, init=3)
        m.fit(tiny, calib, k)
        run, head, tail = counted_run(m, tiny, x, cond)
        assert run.nfe.tolist() == [float(k)] * 2 and head == tail == 2 * k
        again = GCache(evals=6, init=3)
        again.fit(tiny, calib, k)
        assert again.policy.compute == m.policy.compute
        if 1 < k < N:
            best = min(h["loss"] for h in m.history)
            assert m.policy.meta["calib_loss"] == best


# =============================================================================== ECAD
def test_ecad_fronts_and_crowding():
    objs = np.array([[1.0, 5.0], [2.0, 3.0], [3.0, 1.0], [2.5, 3.5], [4.0, 4.0], [1.0, 5.0]])
    fronts = non_dominated_fronts(objs)
    assert fronts[0] == [0, 1, 2, 5] and fronts[1] == [3] and fronts[2] == [4]
    d = crowding(objs, fronts[0])
    assert np.isinf(d[0]) and np.isinf(d[2]) and np.isfinite(d[1])


def test_ecad_selection_keeps_the_budget_and_the_population_size():
    rng = np.random.default_rng(0)
    n, k, p = 12, 5, 10
    lo, hi = k - 2, k + 2
    pop = [repair(rng.random(n) < 0.5, lo, hi, rng) for _ in range(2 * p)]
    assert all(m[0] and lo <= m.sum() <= hi for m in pop)
    objs = np.array([[rng.random(), float(m.sum())] for m in pop])
    keep = select(objs, p)
    assert len(keep) == p and len(set(keep)) == p
    # the first front is kept whole when it fits
    first = non_dominated_fronts(objs)[0]
    if len(first) <= p:
        assert set(first) <= set(keep)
    rank, dist = ranks(objs)
    assert rank.min() == 0 and len(dist) == 2 * p
    for extreme in ([True] * n, [True] + [False] * (n - 1)):
        assert lo <= repair(np.array(extreme), lo, hi, rng).sum() <= hi


def test_ecad_fit_keeps_population_in_the_band_and_computes_exactly_k(tiny, calib):
    x, cond, _ = inputs(2, seed=5)
    for k in (2, 4):
        m = ECAD(population=8, generations=3)
        m.fit(tiny, calib, k)
        lo, hi = m.band(N, k)
        assert len(m.last_population) == 8
        assert all(c[0] == 0 and lo <= len(c) <= hi for c in m.last_population)
        assert len(m.policy.compute) == k
        costs = [c for c, _ in m.front]
        losses = [v for _, v in m.front]
        assert costs == sorted(costs) and losses == sorted(losses, reverse=True)  # a front: cheaper is worse
        run, head, tail = counted_run(m, tiny, x, cond)
        assert run.nfe.tolist() == [float(k)] * 2 and head == tail == 2 * k
        again = ECAD(population=8, generations=3)
        again.fit(tiny, calib, k)
        assert again.policy.compute == m.policy.compute and again.last_population == m.last_population


# =============================================================================== registry, cache-dit
def test_registry_lists_the_new_methods():
    for name in ("ertacache", "meancache", "gcache", "ecad"):
        m = BASELINES[name]()
        assert isinstance(m, Method) and m.name == name and m.kind == "static"
    avail = available_methods()
    assert {"ertacache", "meancache", "gcache", "ecad"} <= set(avail)
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        assert "cachedit-dmd" not in avail
    else:
        assert {"cachedit-dmd", "cachedit-foca"} <= set(avail)


@pytest.mark.slow
@pytest.mark.parametrize("calibrator", ["dmd", "foca"])
def test_cachedit_calibrators_on_the_steps_mask(calibrator):
    """cache-dit's calibrator runs on its static mask: the mask's computed steps and probes are what ran, and the
    output differs from the same mask without the calibrator (the forecast replaces plain reuse)."""
    pytest.importorskip("cache_dit")
    from budcache import tinyflow
    from budcache.methods.cachedit import CacheDitCalibratedMethod, CacheDitStepsMethod, probe_fraction
    from budcache.problems.tinyflow import TinyflowProblem

    tf = tinyflow.load()
    p = TinyflowProblem(tf, 12)
    c = p.calibration(["a red circle", "two squares"], [1, 2])
    m = CacheDitCalibratedMethod(name=f"cachedit-{calibrator}", calibrator=calibrator)
    m.fit(p, c, 8)
    res = m.sample(p, c.noise, c.cond)
    f = probe_fraction(tf.transformer)
    assert sum(m.mask) == m.computed and float(res.nfe[0]) == pytest.approx(m.computed + (12 - m.computed) * f)
    assert res.extra["full_runs"] == m.computed
    plain = CacheDitStepsMethod(mask=list(m.mask))
    plain._setup(p, 8)
    plain.mask, plain.warmup = list(m.mask), m.warmup
    other = plain.sample(p, c.noise, c.cond)
    assert not torch.allclose(other.latent, res.latent)


def test_unused_brute_force_helpers_cover_small_graphs():
    """Sanity of the brute-force references themselves: they enumerate every path."""
    n, k = 6, 4
    w = np.triu(np.ones((n, n)), 1)
    w[w == 0] = np.nan
    paths = [(0, *mid, n - 1) for mid in itertools.combinations(range(1, n - 1), k - 2)]
    assert brute_force_gcache_path(w, k)[1] == 3.0 and len(paths) == 6
    assert brute_force_peak_path(w, k, 2.0)[1] == 5.0
