"""Tests for budcache.methods: each re-implemented baseline's rule on scripted inputs, threshold calibration,
LeMiCa's exact DP, ReCache's exact-budget sampling, and every method end to end with exact NFE accounting."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from budcache.denoisers import FluxCond, FluxDenoiser
from budcache.errors import ConfigError
from budcache.hooks import Probe, ResidualHistory, find_cache, modulated_input, probe_stack
from budcache.methods import (
    BASELINES,
    DiCache,
    DiCacheController,
    LeMiCa,
    Method,
    ReCache,
    TeaCache,
    TeaCacheController,
    brute_force_path,
    calibrate_threshold,
    lexminimax_path,
)
from budcache.methods.common import polyval, rel_l1
from budcache.methods.dicache import aligned_estimate, forced_steps
from budcache.methods.lemica import edge_errors, path_cost
from budcache.methods.recache import plackett_luce_log_prob, plackett_luce_sample
from budcache.methods.teacache import fit_rescaler
from budcache.problems.data import make_calibration
from budcache.sampler import Sampler, SignalController, StaticMask
from budcache.schedules import flux
from budcache.search.losses import latent_l1
from helpers import StackRuns, make_transformer

torch.set_num_threads(1)

ROWS, COLS, TXT = 4, 4, 8
N = 8


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# =============================================================================== a tiny problem
@dataclass
class TinyProblem:
    """The Method protocol's problem on a tiny random FLUX transformer."""

    transformer: torch.nn.Module
    steps: int = N
    solver: str = "euler"
    mechanism: str = "reuse"
    guidance: float = 1.0

    def denoiser(self) -> FluxDenoiser:
        return FluxDenoiser(self.transformer, ROWS, COLS)

    def sigmas(self, steps: int | None = None) -> torch.Tensor:
        return flux(steps or self.steps, ROWS * COLS)

    def make_sampler(self, controller, steps=None, *, solver=None, mechanism=None, guidance=None, sigmas=None):
        return Sampler(self.denoiser(), self.sigmas(steps) if sigmas is None else sigmas, solver or self.solver,
                       controller, mechanism or self.mechanism, self.guidance if guidance is None else guidance)


def inputs(b: int, seed: int = 1) -> tuple[torch.Tensor, FluxCond, FluxCond]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, ROWS * COLS, 16, generator=g)
    cond = FluxCond(torch.randn(b, TXT, 32, generator=g), torch.randn(b, 32, generator=g))
    uncond = FluxCond(torch.randn(b, TXT, 32, generator=g), torch.randn(b, 32, generator=g))
    return x, cond, uncond


def calibration(problem: TinyProblem, items: int = 3, seed: int = 1):
    x, cond, uncond = inputs(items, seed)
    return make_calibration(problem.make_sampler, [f"p{i}" for i in range(items)], list(range(items)), x, cond,
                            uncond if problem.guidance != 1.0 else None, info={"seed": seed})


class BlockRuns:
    """Batch sizes of every run of one block's attention (a block runs only when its attention does)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self._handle = block.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.batches.append(hs.shape[0])

    def __enter__(self) -> BlockRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def tr() -> torch.nn.Module:
    return make_transformer()


@pytest.fixture(scope="module")
def tiny(tr) -> TinyProblem:
    return TinyProblem(tr)


@pytest.fixture(scope="module")
def tflow():
    from budcache import tinyflow

    return tinyflow.load()


# =============================================================================== probes and signal controllers
def test_probe_reads_stack_input_and_first_blocks(tr):
    """The probe returns the stack input, the first block's AdaLN modulation and block outputs, and stops there."""
    den = FluxDenoiser(tr, ROWS, COLS)
    x, cond, _ = inputs(2)
    sigma = torch.full((2,), 0.7)
    h_in = tr.x_embedder(x)
    temb = tr.time_text_embed((sigma * 1000).to(x.dtype), cond.pooled_prompt_embeds)
    e_in = tr.context_embedder(cond.prompt_embeds)
    with StackRuns(tr) as runs:
        p0 = probe_stack(tr, lambda: den(x, sigma, cond, "cond"), 0)
    assert runs.count == 0  # stopped before the first block ran
    torch.testing.assert_close(p0.h_in, h_in)
    torch.testing.assert_close(modulated_input(tr, p0), tr.transformer_blocks[0].norm1(h_in, emb=temb)[0])
    p1 = probe_stack(tr, lambda: den(x, sigma, cond, "cond"), 1)
    ids = den._position_ids(TXT, x.device, x.dtype)
    rope = tr.pos_embed(torch.cat([ids[1], ids[0]], 0))
    _, h1 = tr.transformer_blocks[0](hidden_states=h_in, encoder_hidden_states=e_in, temb=temb, image_rotary_emb=rope)
    torch.testing.assert_close(p1.h_out, h1)
    assert (p1.blocks, p1.stack_size) == (1, 3)
    with pytest.raises(ConfigError, match="probe depth"):
        probe_stack(tr, lambda: den(x, sigma, cond, "cond"), 4)


class _ProbeEveryStep(SignalController):
    """Computes on a fixed mask but probes two blocks every step (to check probes leave the cache alone)."""

    def __init__(self, mask):
        self.mask = torch.tensor(mask)

    def decide_with(self, step, state, signals):
        signals.probe(2)
        return self.mask[step].expand(state.x.shape[0]).clone()


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_probes_bypass_the_cache(tiny, guidance):
    """A controller that probes every step gives the same latent as the static mask alone (probes touch no cache)."""
    mask = [True, False, True, False, False, True, False, True]
    x, cond, uncond = inputs(2)
    ref = tiny.make_sampler(StaticMask(mask), guidance=guidance)
    probing = tiny.make_sampler(_ProbeEveryStep(mask), guidance=guidance)
    a = ref.result(ref.run(ref.start(x), cond, uncond))
    b = probing.result(probing.run(probing.start(x), cond, uncond))
    torch.testing.assert_close(a.latent, b.latent)
    assert torch.equal(a.computed, b.computed)
    assert find_cache(tiny.transformer) is None


def test_signal_controller_refuses_plain_decide():
    with pytest.raises(ConfigError, match="signals"):
        TeaCacheController(0.1).decide(0, None)


# =============================================================================== TeaCache
class ScriptedTea(TeaCacheController):
    """TeaCache's rule fed a scripted indicator: ``m_t = values[t] * ones`` per element."""

    def __init__(self, values, delta, coefficients=(1.0, 0.0)):
        super().__init__(delta, coefficients)
        self.values = torch.as_tensor(values, dtype=torch.float64)  # (N, B)

    def indicator(self, signals):
        v = self.values[signals.step]
        return v.view(-1, 1, 1).float() * torch.ones(v.shape[0], 4, 4)


def _rels(values):
    return [abs(values[t] - values[t - 1]) / abs(values[t - 1]) for t in range(1, len(values))]


def test_teacache_rule_on_scripted_indicator(tiny):
    """Skip while the accumulated distance < delta, reset after a computed step, first and last always compute."""
    # element 0: rel = .1, .1, .1, .5, .05, .05, .05 ; element 1: tiny changes except one jump
    v0 = [1.0]
    for r in [0.1, 0.1, 0.1, 0.5, 0.05, 0.05, 0.05]:
        v0.append(v0[-1] * (1 + r))
    v1 = [1.0, 1.01, 1.02, 1.03, 1.04, 2.08, 2.09, 2.10]
    values = torch.tensor([v0, v1]).T  # (N, 2)
    delta = 0.25
    ctl = ScriptedTea(values, delta)
    x, cond, _ = inputs(2)
    sampler = tiny.make_sampler(ctl)
    with StackRuns(tiny.transformer) as runs:
        res = sampler.result(sampler.run(sampler.start(x), cond))
    # reference: the rule written out
    expected = []
    for vals in (v0, v1):
        acc, col = 0.0, [True]
        for t, r in enumerate(_rels(vals), start=1):
            if t == N - 1:
                col.append(True)
                acc = 0.0
                continue
            acc += r
            col.append(acc >= delta)
            if acc >= delta:
                acc = 0.0
        expected.append(col)
    assert res.computed.T.tolist() == expected
    assert expected[0] == [True, False, False, True, True, False, False, True]
    assert expected[1] == [True, False, False, False, False, True, False, True]
    assert res.nfe.tolist() == [4, 3]
    # exact accounting: the stack ran once per step where any element computed, on that subset only
    assert runs.batches == [int(c.sum()) for c in res.computed if c.any()]
    accs = torch.stack([t["acc"] for t in ctl.trace])  # (N, 2): zero right after every computed step
    assert bool((accs[res.computed] == 0).all())


def test_teacache_polynomial_rescales_and_clamps(tiny):
    """acc grows by max(0, poly(rel)): a polynomial negative on the data never lets acc fall."""
    values = torch.tensor([[1.0], [1.1], [1.21], [1.331], [1.4641], [1.6105], [1.7716], [1.9487]])
    neg = ScriptedTea(values, delta=0.05, coefficients=(-1.0, 0.0))  # poly(rel) = -rel < 0: never reaches delta
    x, cond, _ = inputs(1)
    s = tiny.make_sampler(neg)
    res = s.result(s.run(s.start(x), cond))
    assert res.computed[:, 0].tolist() == [True] + [False] * (N - 2) + [True]
    double = ScriptedTea(values, delta=0.15, coefficients=(2.0, 0.0))  # 2 * 0.1 >= 0.15: every step computes
    s = tiny.make_sampler(double)
    assert bool(s.result(s.run(s.start(x), cond)).computed.all())
    assert polyval([1.0, -2.0, 3.0], torch.tensor([2.0])).item() == pytest.approx(3.0)
    # rel-L1 is per element: mean|a - b| / mean|b| over everything but the batch dimension
    assert rel_l1(torch.tensor([[3.0, 3.0], [1.0, 2.0]]), torch.ones(2, 2)).tolist() == [2.0, 0.5]


def test_teacache_refit_and_sample(tiny):
    """The refitted polynomial fits the full-step data and sampling reports the NFE it ran."""
    calib = calibration(tiny, items=3)
    coef, info = fit_rescaler(tiny, calib, degree=2)
    assert len(coef) == 3 and info["points"] == 3 * (N - 1)
    # the input change predicts the output change (0.63 here; a least-squares fit with a constant is >= 0 by
    # construction, so only a floor well above 0 fails when x and y are mispaired or the wrong quantities)
    assert np.isfinite(coef).all() and info["r2"] > 0.5
    m = TeaCache(degree=2, max_evals=25)
    m.fit(tiny, calib, 4)
    assert m.coefficients == coef  # the refit, reused for the budget
    x, cond, _ = inputs(4, seed=9)
    with StackRuns(tiny.transformer) as runs:
        run = m.sample(tiny, x, cond)
    assert torch.equal(run.nfe, run.extra["computed"].sum(0).double())
    assert sum(runs.batches) == int(run.nfe.sum())
    assert bool(run.extra["computed"][0].all()) and bool(run.extra["computed"][-1].all())


# =============================================================================== DiCache
class FakeSignals:
    """What DiCache's rule reads, scripted: probe outputs p_t and stack inputs x_t per step."""

    def __init__(self, steps, h_in, h_out, step):
        self.sampler = type("S", (), {"steps": steps})()
        self.step = step
        self._probe = Probe(h_in, None, h_out, 1, 4)
        self.estimator = None

    def probe(self, blocks):
        return self._probe

    def set_estimator(self, est):
        self.estimator = est


def _run_dicache(ctl, xs, ps, steps):
    """Feed the scripted probes of the first ``len(xs)`` steps of a ``steps``-step sampler."""
    decisions, estimators = [], []
    for k in range(len(xs)):
        sig = FakeSignals(steps, xs[k], ps[k], k)
        state = type("St", (), {"x": xs[k]})()
        decisions.append(ctl.decide_with(k, state, sig).tolist())
        estimators.append(sig.estimator)
    return decisions, estimators


def test_dicache_forced_steps_and_threshold():
    """Steps k <= int(0.2 T) and the last compute; in between, skip while the accumulated probe rel-L1 < thr."""
    steps = 12
    assert forced_steps(steps, 0.2) == {0, 1, 2, 11}
    assert forced_steps(28, 0.2) == set(range(6)) | {27}
    # probe outputs change by 10% per step (element 0) or 30% (element 1); inputs fixed
    xs = [torch.ones(2, 3, 2) for _ in range(steps)]
    ps = [torch.stack([torch.full((3, 2), 1.1 ** k), torch.full((3, 2), 1.3 ** k)]) for k in range(steps)]
    dec, _ = _run_dicache(DiCacheController(threshold=0.25), xs, ps, steps)
    col0 = [d[0] for d in dec]
    col1 = [d[1] for d in dec]
    # element 0: rel 0.1 each step -> acc .1, .2, .3 (compute) ...; element 1: rel .3 >= thr: always computes
    assert col0 == [True, True, True, False, False, True, False, False, True, False, False, True]
    assert all(col1)
    never = DiCacheController(threshold=1e9)
    dec, _ = _run_dicache(never, xs, ps, steps)
    assert [k for k in range(steps) if dec[k][0]] == [0, 1, 2, 11]


def test_dicache_gamma_is_clipped_and_aligns_residuals():
    """gamma = clip(mean|Rp_t - Rp[-2]| / mean|Rp[-1] - Rp[-2]|, 1, 1.5); h = x + R[-2] + gamma (R[-1] - R[-2])."""
    steps = 6
    ctl = DiCacheController(threshold=0.6, retention=0.2)  # forced: 0, 1 and 5
    x = torch.zeros(4, 2, 2)
    # probe residuals Rp = p - x at the computed steps 0 and 1: 1 and 2 for every element
    ps = [torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0)]
    # step 2: rel-L1 vs 2.0 = .5, .1, .3, .25 < .6 -> all skip; raw gamma = |p - 1| / |2 - 1| = 2, 1.2, 1.6, .5
    ps.append(torch.tensor([3.0, 2.2, 2.6, 1.5]).view(4, 1, 1).expand(4, 2, 2).clone())
    dec, est = _run_dicache(ctl, [x] * 3, ps, steps)
    assert dec == [[True] * 4, [True] * 4, [False] * 4]
    assert est[0] is None and est[1] is None
    g = ctl.trace[2]["gamma"]
    assert g.tolist() == pytest.approx([1.5, 1.2, 1.5, 1.0])
    torch.testing.assert_close(ctl.trace[2]["acc"], torch.tensor([0.5, 0.1, 0.3, 0.25], dtype=torch.float64))
    # the estimator blends the two stored stack residuals with those gammas
    r_new, r_old = torch.randn(4, 4, 5), torch.randn(4, 4, 5)
    hist = ResidualHistory(img=(r_new, r_old), txt=(None, None), steps=(torch.ones(4), torch.zeros(4)))
    img, txt = est[2](hist, 2)
    torch.testing.assert_close(img, r_old + g.float().view(-1, 1, 1) * (r_new - r_old))
    assert txt is None
    # with one stored residual, plain reuse
    hist1 = ResidualHistory(img=(r_new, torch.zeros_like(r_new)), txt=(None, None),
                            steps=(torch.ones(4), torch.full((4,), -1.0)))
    torch.testing.assert_close(aligned_estimate(hist1, g.float())[0], r_new)


def test_dicache_end_to_end_cost_and_alignment(tiny):
    """On the tiny transformer: NFE = computed + (1/3) skipped; block 0 runs only in probes, the rest on computes."""
    x, cond, _ = inputs(3)
    m = DiCache(threshold=0.05)
    tr = tiny.transformer
    with BlockRuns(tr.transformer_blocks[0]) as head, BlockRuns(tr.single_transformer_blocks[-1]) as tail:
        run = m.sample(tiny, x, cond)
    comp = run.extra["computed"]
    assert comp[list(forced_steps(N, 0.2))].all() and not bool(comp.all())
    skipped = (~comp).sum(0).double()
    torch.testing.assert_close(run.nfe, comp.sum(0).double() + skipped / 3)
    # work actually done: one probe of block 0 per step (whole batch); computed elements resume from it
    assert head.batches == [3] * N
    assert sum(tail.batches) == int(comp.sum())
    assert sum(head.batches) / 3 + sum(tail.batches) * 2 / 3 == pytest.approx(float(run.nfe.sum()))


@pytest.mark.parametrize(("guidance", "threshold"), [(1.0, 0.05), (1.0, 1e9), (2.5, 1e9)])
def test_dicache_resume_from_probe_is_exact(tiny, monkeypatch, guidance, threshold):
    """Resuming computed elements from the probe gives the latent of running the whole stack again."""
    from budcache.sampler import StepSignals

    x, cond, uncond = inputs(3)
    s = tiny.make_sampler(DiCacheController(threshold), guidance=guidance)
    resumed = s.result(s.run(s.start(x), cond, uncond))
    monkeypatch.setattr(StepSignals, "resume_from", lambda self, blocks: None)
    s = tiny.make_sampler(DiCacheController(threshold), guidance=guidance)
    with BlockRuns(tiny.transformer.transformer_blocks[0]) as head:
        again = s.result(s.run(s.start(x), cond, uncond))
    assert torch.equal(resumed.computed, again.computed) and not bool(again.computed.all())
    torch.testing.assert_close(resumed.latent, again.latent, rtol=1e-5, atol=1e-6)
    assert len(head.batches) > N  # without resuming, block 0 ran again on computed steps


def test_dicache_budget_below_its_floor_reports_what_it_spends(tiny):
    """Below forced steps + probes, DiCache skips all it may and says it missed the budget (no bisection)."""
    calib = calibration(tiny, items=2)
    m = DiCache()
    assert m.min_nfe(tiny) == pytest.approx(3 + 5 / 3)  # forced {0, 1, 7}, 5 probed steps of 1/3 stack
    m.fit(tiny, calib, 2)
    assert not m.calibration.reached and m.calibration.evaluations == 1
    assert m.calib_nfe == pytest.approx(m.min_nfe(tiny))
    run = m.sample(tiny, calib.noise, calib.cond)
    assert run.extra["computed"].sum(0).tolist() == [3, 3]


# =============================================================================== threshold calibration
def test_calibration_bisects_to_target():
    """A synthetic method whose per-element NFE falls with the threshold: the target is met within 0.5."""
    scale = torch.tensor([1.0, 2.0, 3.0, 5.0])

    def nfe_of(t):
        return torch.clamp(torch.floor(20 / (1 + 7 * t * scale)), min=1.0)

    for target in (3, 6.3, 10, 15):
        fit = calibrate_threshold(nfe_of, target)
        assert fit.reached and abs(fit.mean - target) <= 0.5
        v = nfe_of(fit.threshold)
        assert (fit.mean, fit.min, fit.max) == (float(v.mean()), float(v.min()), float(v.max()))
    inc = calibrate_threshold(lambda t: torch.tensor([min(20.0, 2 + 3 * t)] * 2), 11, increasing=True)
    assert inc.reached and abs(inc.mean - 11) <= 0.5
    unreachable = calibrate_threshold(lambda t: torch.tensor([25.0 if t < 0.3 else 1.0]), 10)
    assert not unreachable.reached
    with pytest.raises(ConfigError, match="target"):
        calibrate_threshold(nfe_of, 0)
    with pytest.raises(ConfigError, match="lo < hi"):
        calibrate_threshold(nfe_of, 5, lo=1.0, hi=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["teacache", "dicache"])
def test_calibration_on_tinyflow_hits_target(tflow, method):
    """tinyflow, 12 steps, 4 calibration pairs: the calibrated threshold's mean NFE is within 0.5 of the budget."""
    from budcache.problems.data import pairs_for
    from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts

    problem = TinyflowProblem(tflow, steps=12)
    prompts, seeds = pairs_for(tinyflow_prompts(4, seed=3), 1, 3)
    calib = problem.calibration(prompts, seeds)
    m = BASELINES[method]()
    m.fit(problem, calib, 6)
    fit = m.calibration
    assert fit.reached and abs(fit.mean - 6) <= 0.5
    assert fit.min <= fit.mean <= fit.max
    nfe = m.nfe_at(problem, calib, fit.threshold)
    assert float(nfe.mean()) == pytest.approx(fit.mean)


# =============================================================================== LeMiCa
@pytest.mark.parametrize("seed", range(4))
def test_lemica_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 9
    w = np.triu(rng.random((n, n)), 1)
    w[w == 0] = np.nan
    for i in range(n - 1):
        w[i, i + 1] = 0.0
    for k in range(2, n + 1):
        dp = lexminimax_path(w, k)
        bf = brute_force_path(w, k)
        assert dp == bf
        assert len(dp[0]) == k and dp[0][0] == 0 and dp[0][-1] == n - 1
        assert dp[1] == path_cost(w, dp[0])


def test_lemica_dp_with_ties_and_missing_edges():
    """Integer weights (many ties) and a graph missing long edges: the DP's cost equals brute force's."""
    rng = np.random.default_rng(7)
    n = 10
    w = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, min(n, i + 4)):
            w[i, j] = float(rng.integers(0, 4))
    for k in range(4, n + 1):
        assert lexminimax_path(w, k)[1] == brute_force_path(w, k)[1]
    with pytest.raises(ConfigError, match="no path"):
        lexminimax_path(w, 3)  # spans of at most 3 cannot reach step 9 in 2 edges
    with pytest.raises(ConfigError, match="computed steps"):
        lexminimax_path(w, 1)


def test_lemica_lexicographic_not_just_minimax():
    """Two paths share the worst edge; LeMiCa picks the one whose second-worst edge is smaller."""
    w = np.full((4, 4), np.nan)
    w[0, 1], w[1, 3], w[0, 2], w[2, 3] = 0.5, 1.0, 1.0, 0.2
    assert lexminimax_path(w, 3) == ((0, 2, 3), (1.0, 0.2))


def test_lemica_edges_and_fit(tiny):
    """Edge weights are the final-latent L1 of caching that segment alone; the fitted schedule is the DP's path."""
    calib = calibration(tiny, items=2)
    w = edge_errors(tiny.make_sampler, calib, N, max_span=4)
    assert all(w[i, i + 1] == 0 for i in range(N - 1))
    assert np.isnan(w[0, 5]) and np.isfinite(w[1, 5])
    for i, j in [(0, 2), (3, 7)]:
        mask = [not i < s < j for s in range(N)]
        s = tiny.make_sampler(StaticMask(mask))
        x = s.run(s.start(calib.noise), calib.cond).x
        assert w[i, j] == pytest.approx(float(latent_l1(x, calib.teacher).mean()), rel=1e-5)
    m = LeMiCa(max_span=4)
    m.fit(tiny, calib, 4)
    assert m.policy.compute == lexminimax_path(w, 4)[0]
    one = LeMiCa(max_span=4, items=1).edges(tiny, calib)  # edges measured on the first pair only
    first = make_calibration(tiny.make_sampler, calib.prompts[:1], calib.seeds[:1], calib.noise[:1],
                             calib.cond.select(torch.tensor([0])))
    w1 = edge_errors(tiny.make_sampler, first, N, max_span=4)
    np.testing.assert_allclose(one, w1, rtol=1e-5)
    x, cond, _ = inputs(2, seed=5)
    with StackRuns(tiny.transformer) as runs:
        run = m.sample(tiny, x, cond)
    assert run.nfe.tolist() == [4.0, 4.0] and runs.count == 4


# =============================================================================== ReCache
def test_plackett_luce_samples_exactly_k_and_normalises():
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    for k in range(0, 6):
        for _ in range(20):
            o = plackett_luce_sample(theta, k, gen)
            assert o.numel() == k and len(set(o.tolist())) == k
    # the ordered draws of 3 out of 5 are a probability distribution
    orders = itertools.permutations(range(5), 3)
    total = sum(math.exp(float(plackett_luce_log_prob(theta, torch.tensor(p)))) for p in orders)
    assert total == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="cannot draw 6 distinct steps out of 5"):
        plackett_luce_sample(theta, 6)


class _SyntheticEvaluator:
    """Loss = number of computed steps outside a target set (the target is the unique optimum)."""

    def __init__(self, target):
        self.target = set(target)
        self.calls = []

    def losses(self, sets):
        self.calls += [tuple(s) for s in sets]
        return [0.1 + len(set(s) - self.target) for s in sets]

    def loss_of(self, s):
        return self.losses([s])[0]


def test_recache_reinforce_learns_under_exact_budget(tiny):
    """Every sampled schedule computes exactly k steps (step 0 included) and training finds the optimum."""
    target = (0, 2, 5, 7)
    m = ReCache(iterations=60, samples=8, lr=0.3, seed=1)
    syn = _SyntheticEvaluator(target)
    m.evaluator = lambda problem, calib: syn
    m.fit(tiny, calib=None, nfe=4)
    assert all(len(s) == 4 and s[0] == 0 and len(set(s)) == 4 for s in syn.calls)
    assert m.policy.compute == target
    assert m.history[-1]["mean_loss"] < m.history[0]["mean_loss"]


def test_recache_fit_and_sample(tiny):
    calib = calibration(tiny, items=2)
    m = ReCache(iterations=4, samples=4)
    m.fit(tiny, calib, 3)
    assert m.policy.nfe == 3 and m.policy.compute[0] == 0
    assert m.policy.meta["calib_loss"] == pytest.approx(m.evaluator(tiny, calib).loss_of(m.policy.compute))
    x, cond, _ = inputs(2, seed=4)
    run = m.sample(tiny, x, cond)
    assert run.nfe.tolist() == [3.0, 3.0]


# =============================================================================== registry, end to end on tinyflow
def test_registry_lists_the_methods():
    assert set(BASELINES) >= {"teacache", "dicache", "lemica", "recache"}
    for name, factory in BASELINES.items():
        m = factory()
        assert isinstance(m, Method) and m.name == name and m.kind in ("static", "threshold")
    with pytest.raises(ConfigError, match="budget"):
        LeMiCa().fit(TinyProblem(make_transformer()), None, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["teacache", "dicache", "lemica", "recache"])
def test_methods_end_to_end_on_tinyflow(tflow, name):
    """Fit on 3 calibration pairs, sample 3 other pairs: NFE is exactly what ran (probes counted for DiCache)."""
    from budcache.problems.data import pairs_for
    from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts

    steps = 10
    problem = TinyflowProblem(tflow, steps=steps)
    prompts, seeds = pairs_for(tinyflow_prompts(6, seed=11), 1, 11)
    calib = problem.calibration(prompts[:3], seeds[:3])
    kwargs = {"recache": {"iterations": 5, "samples": 4}}.get(name, {})
    m = BASELINES[name](**kwargs)
    m.fit(problem, calib, 5)
    cond, uncond = problem.conds(prompts[3:])
    noise = tflow.noise(seeds[3:])
    tr = tflow.transformer
    with BlockRuns(tr.transformer_blocks[0]) as head, BlockRuns(tr.single_transformer_blocks[-1]) as tail:
        run = m.sample(problem, noise, cond, uncond)
    comp = run.extra["computed"]
    assert run.latent.shape == noise.shape and bool(torch.isfinite(run.latent).all())
    assert comp.shape == (steps, 3) and bool(comp[0].all())
    # the last block ran on exactly the computed elements
    assert sum(tail.batches) == int(comp.sum())
    if name == "dicache":
        torch.testing.assert_close(run.nfe, comp.sum(0).double() + (~comp).sum(0).double() / 8)
        assert head.batches == [3] * steps  # one probe of block 0 per step; computed elements resume from it
    else:
        assert torch.equal(run.nfe, comp.sum(0).double())
        assert sum(head.batches) == int(comp.sum())
    if m.kind == "static":
        assert run.nfe.tolist() == [5.0] * 3


@pytest.mark.parametrize("method", [TeaCache(refit=False, delta=0.3), DiCache(threshold=0.3)])
def test_threshold_methods_with_guidance_share_one_decision(tr, method):
    """With CFG the step's decision covers both passes: the stack runs twice per computed element, never otherwise."""
    problem = TinyProblem(tr, guidance=3.0)
    x, cond, uncond = inputs(3)
    with BlockRuns(tr.single_transformer_blocks[-1]) as tail:
        run = method.sample(problem, x, cond, uncond)
    comp = run.extra["computed"]
    assert bool(comp[0].all()) and bool(comp[-1].all()) and not bool(comp.all())
    assert sum(tail.batches) == 2 * int(comp.sum())
    assert bool(torch.isfinite(run.latent).all())


def test_baselines_reuse_residuals_whatever_the_problem_mechanism(tr):
    """The originals reuse the cached residual: a problem defaulting to forecasting does not change them."""
    x, cond, _ = inputs(2)
    reuse, forecast = TinyProblem(tr), TinyProblem(tr, mechanism="forecast2")
    m = TeaCache(refit=False, delta=0.3)
    a, b = m.sample(reuse, x, cond), m.sample(forecast, x, cond)
    assert not bool(a.extra["computed"].all())
    torch.testing.assert_close(a.latent, b.latent)
    calib = calibration(reuse, items=2)
    ea = edge_errors(reuse.make_sampler, calib, N, max_span=3)
    np.testing.assert_allclose(LeMiCa(max_span=3).edges(forecast, calib), ea, rtol=1e-6)
