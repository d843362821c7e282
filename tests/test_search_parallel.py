"""The parallel search: replica exchange with best-of-m moves keeps the budget exact at every accepted state, is
deterministic per worker count, resumes a killed run to the uninterrupted result; the local multi-process backend
scores masks bit for bit as in process, replaces a killed worker and reports a worker's NaN with mask and step."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from budcache import tinyflow
from budcache.errors import ConfigError, ModelOutputError
from budcache.problems.data import pairs_for
from budcache.problems.settings import SamplerSettings
from budcache.problems.tinyflow import TinyflowProblem, TinyflowReplica, tinyflow_prompts
from budcache.search import SearchConfig, search
from budcache.search.anneal import block_shifts
from budcache.search.backends import make_backend, resolve_backend, resolve_workers, search_scheme
from budcache.search.distributed import (
    align_weights,
    hybrid_shares,
    item_shares,
    resolve_split,
    split_layout,
    to_device,
)
from budcache.search.evaluator import Evaluator
from budcache.search.local import LocalEvaluator, route
from budcache.search.losses import mean_of_items
from budcache.search.parallel import TemperingConfig, budget_ok, search_tempering
from budcache.search.procs import start_method, worker_context
from helpers import parent_pid

torch.set_num_threads(1)

CFG = SearchConfig(steps=16, nfe=6, sa_iters=24, hc_rounds=4, seed=2)


def table_loss(steps: int, seed: int = 0):
    """A deterministic rugged loss over compute sets (a random weight per step plus pairwise terms)."""
    rng = np.random.default_rng(seed)
    w, pair = rng.normal(size=steps), rng.normal(size=(steps, steps)) * 0.3

    def losses(computes):
        out = []
        for c in computes:
            idx = list(c)
            out.append(float(math.exp(-w[idx].sum() * 0.3 + pair[np.ix_(idx, idx)].sum() * 0.05)))
        return out

    return losses


# =============================================================================== the scheme
@pytest.mark.parametrize("workers", [1, 2, 5, 8])
def test_every_accepted_state_keeps_the_exact_budget(workers):
    seen = []
    res = search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=workers),
                           on_step=lambda e: seen.append(e["states"]))
    assert seen and all(budget_ok(s, CFG) for states in seen for s in states)
    assert budget_ok(res.compute, CFG) and len(res.compute) == CFG.nfe
    assert res.loss == table_loss(CFG.steps)([res.compute])[0]
    assert res.history[-1]["best_loss"] == res.loss


def test_each_round_is_one_request_of_w_proposals():
    sizes = []
    base = table_loss(CFG.steps)

    def losses(c):
        sizes.append(len(c))
        return base(c)

    tc = TemperingConfig(workers=8)
    assert tc.chains == 2 and tc.proposals() == [4, 4] and tc.rounds(CFG) == 2  # ceil(0.25 * 24 / 4)
    assert TemperingConfig(workers=8, anneal=1.0).rounds(CFG) == 6
    assert TemperingConfig(workers=32).proposals() == [8] * 4 and TemperingConfig(workers=2).proposals() == [2]
    assert TemperingConfig(workers=7).proposals() == [4, 3]
    search_tempering(losses, SearchConfig(steps=16, nfe=6, sa_iters=24, hc_rounds=0, seed=2), tc)
    assert sizes[0] == 2 and all(n <= 8 for n in sizes[1:])  # the starts, then at most W new masks per round
    sizes.clear()
    search_tempering(losses, SearchConfig(steps=16, nfe=6, sa_iters=24, hc_rounds=5, seed=2), tc)
    assert len(sizes) > 1 + tc.rounds(CFG) and all(n <= 8 for n in sizes)  # hill climbing: batches of W too


def test_block_shifts_are_every_budget_exact_run_moved_by_one():
    import itertools

    cfg = SearchConfig(steps=12, nfe=5, seed=0)  # P = 1
    for cur in [(0, 1, 2, 3, 11), (0, 3, 4, 8, 10), (0, 2, 4, 6, 8), (0, 8, 9, 10, 11)]:
        got = block_shifts(cur, cfg)
        assert len(got) == len(set(got)) and all(budget_ok(c, cfg) and c != cur for c in got)
        want = set()
        for i, j in itertools.combinations_with_replacement(range(1, 5), 2):
            for d in (-1, 1):
                new = [*cur[:i], *(k + d for k in cur[i:j + 1]), *cur[j + 1:]]
                if budget_ok(new, cfg):
                    want.add(tuple(new))
        assert set(got) == want
    assert (0, 2, 3, 4, 11) in block_shifts((0, 1, 2, 3, 11), cfg)  # a run of three moved in one move
    assert block_shifts((0, 1, 2, 3, 4), SearchConfig(steps=5, nfe=5)) == []


def test_proposals_follow_the_shift_probability():
    seen = []
    search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=4, shift=1.0, anneal=1.0),
                     on_step=lambda e: seen.append((e["stage"], e["states"][0])))
    walk = [s for stage, s in seen if stage in ("init", "sa")]
    moves = [(a, b) for a, b in zip(walk, walk[1:]) if a != b]
    assert moves and all(tuple(b) in block_shifts(tuple(a), CFG) for a, b in moves)


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_same_seed_and_workers_give_the_same_search(workers):
    a = search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=workers))
    b = search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=workers))
    assert a.compute == b.compute and a.loss == b.loss and a.history == b.history


def test_worker_count_changes_the_path_not_validity():
    results = [search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=w)) for w in (1, 4, 16)]
    assert len({tuple(r.history[-1].values()) for r in results}) > 1
    assert all(budget_ok(r.compute, CFG) for r in results)


def test_tempering_finds_the_brute_force_optimum_of_a_small_space():
    import itertools

    cfg = SearchConfig(steps=10, nfe=4, sa_iters=40, hc_rounds=10, seed=0)
    loss = table_loss(10, seed=3)
    sets = [(0, *c) for c in itertools.combinations(range(1, 10), 3)]
    best = min(loss(sets))
    assert search_tempering(loss, cfg, TemperingConfig(workers=8)).loss == best


class Killed(Exception):
    """Stands for the driver being killed while it waits for losses."""


class Dying:
    """A loss that raises :class:`Killed` on its ``kill_at``-th call (``None``: never); counts its calls."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at, self.calls, self.base = kill_at, 0, table_loss(CFG.steps)

    def __call__(self, computes):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed
        return self.base(computes)


def test_resume_after_a_kill_in_any_round_gives_the_uninterrupted_result(tmp_path):
    tc = TemperingConfig(workers=4)
    counter = Dying(None)
    ref = search_tempering(counter, CFG, tc)
    assert counter.calls >= 6
    for kill_at in range(1, counter.calls + 1):
        ck = tmp_path / f"ck{kill_at}.json"
        with pytest.raises(Killed):
            search_tempering(Dying(kill_at), CFG, tc, checkpoint=ck, digest="d")
        res = search_tempering(table_loss(CFG.steps), CFG, tc, checkpoint=ck, resume=True, digest="d")
        assert res.compute == ref.compute and res.loss == ref.loss and res.history == ref.history


def test_a_checkpoint_of_another_worker_count_or_scheme_is_refused(tmp_path):
    ck = tmp_path / "ck.json"
    search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=2), checkpoint=ck, digest="d")
    with pytest.raises(ConfigError, match="another search"):
        search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=3), checkpoint=ck, resume=True,
                         digest="d")
    seq = tmp_path / "seq.json"
    search(table_loss(CFG.steps), CFG, checkpoint=seq, digest="d")
    with pytest.raises(ConfigError, match="another --scheme"):
        search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=2), checkpoint=seq, resume=True,
                         digest="d")
    ck.write_text(ck.read_text().replace('"restart"', '"restart" ', 1).replace("0.", "1.", 1))
    with pytest.raises(ConfigError):
        search_tempering(table_loss(CFG.steps), CFG, TemperingConfig(workers=2), checkpoint=ck, resume=True,
                         digest="d")


@pytest.mark.parametrize("queue, why", [
    ([[0, 1, 2]], "state.queue"),                      # a mask of 3 steps where K = 6
    ([[0, 1, 2, 3, 4, 99]], "state.queue"),            # a step beyond N
    ([[0, 1, 2, 3, 4, 5.0]], "state.queue"),           # a float step
    ([7], "malformed content"),                        # not a compute set at all
    ("x", "state.queue' must be a list"),
])
def test_a_checkpoint_whose_pending_neighbourhood_is_corrupt_is_refused(tmp_path, queue, why):
    """The checkpointed hill-climbing queue is validated on --resume, even with a matching content digest (a
    hostile or hand-edited file): one ConfigError naming the field, nothing run."""
    import json

    from budcache.search.anneal import content_digest

    ck = tmp_path / "ck.json"
    tc = TemperingConfig(workers=2)
    search_tempering(table_loss(CFG.steps), CFG, tc, checkpoint=ck, digest="d")
    data = json.loads(ck.read_text())
    data["state"]["queue"] = queue
    data["sha256"] = content_digest(data)
    ck.write_text(json.dumps(data))
    calls = []

    def spy(computes):
        calls.append(computes)
        return table_loss(CFG.steps)(computes)

    with pytest.raises(ConfigError, match=why):
        search_tempering(spy, CFG, tc, checkpoint=ck, resume=True, digest="d")
    assert calls == []


def test_sequential_scheme_is_the_paper_search():
    a = search_scheme("sequential", table_loss(CFG.steps), CFG, workers=8, sa_batch=8)
    b = search(table_loss(CFG.steps), CFG)
    path = [[(h["stage"], h["loss"], h["best_loss"]) for h in r.history] for r in (a, b)]
    assert a.compute == b.compute and a.loss == b.loss and path[0] == path[1]  # speculation costs only evaluations
    with pytest.raises(ConfigError, match="--scheme"):
        search_scheme("annealing", table_loss(CFG.steps), CFG, workers=1)


def test_non_finite_losses_name_the_mask():
    def nan(c):
        return [float("nan")] * len(c)

    with pytest.raises(ModelOutputError, match="compute set"):
        search_tempering(nan, CFG, TemperingConfig(workers=2))


@pytest.mark.parametrize("kw", [{"workers": 0}, {"workers": 1.5}, {"max_chains": 0}, {"ladder": 0.5},
                                {"shift": 1.5}, {"shift": -0.1}, {"anneal": 0}, {"anneal": 1.2}])
def test_bad_tempering_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        TemperingConfig(**kw)


def test_backend_and_worker_resolution():
    assert resolve_backend("auto", pipeline=False, mechanism="vtaylor1") == "local"
    assert resolve_backend("auto", pipeline=True, mechanism="vtaylor1") == "inprocess"
    assert resolve_backend("auto", pipeline=False, mechanism="taylorseer") == "inprocess"
    assert resolve_workers("local", None) >= 1 and resolve_workers("ray", None) == 1
    for bad in (("inprocess", 2), ("local", 0), ("local", 10**6)):
        with pytest.raises(ConfigError, match="--workers"):
            resolve_workers(*bad)
    with pytest.raises(ConfigError, match="--backend"):
        resolve_backend("cluster", pipeline=False, mechanism=None)


def test_routing_sends_a_mask_to_the_worker_holding_its_prefix():
    held = [set(), set()]
    a, b = (0, 1, 2, 5), (0, 3, 4, 5)
    first = route([a, b], 8, held)
    assert sorted(map(len, first)) == [1, 1]
    wa = 0 if a in first[0] else 1
    again = route([(0, 1, 2, 6), (0, 3, 4, 7)], 8, held)
    assert again[wa] == [(0, 1, 2, 6)]  # shares a's prefix 0..6: goes where a ran
    assert route([], 8, held) == [[], []]


# =============================================================================== local backend on tinyflow
STEPS = 8
SMALL = SearchConfig(steps=STEPS, nfe=3, sa_iters=8, hc_rounds=2, seed=1)


@pytest.fixture(scope="module")
def problem() -> TinyflowProblem:
    return TinyflowProblem(tinyflow.load(), STEPS)


@pytest.fixture(scope="module")
def calib(problem):
    prompts, seeds = pairs_for(tinyflow_prompts(2, seed=5), 1, 5)
    with torch.no_grad():
        return problem.calibration(prompts, seeds)


@pytest.fixture(scope="module", params=["items", "masks"])
def local(calib, request):
    ev = LocalEvaluator(TinyflowReplica(settings=SamplerSettings(steps=STEPS)), calib, workers=2, split=request.param)
    assert ev.split == request.param and ev.sa_batch == (1 if request.param == "items" else 2)
    yield ev
    ev.close()


class ShareReference:
    """In-process reference of an item split: each share of the items scored by its own in-process evaluator
    (one thread, aligned data), the per-item losses averaged in item order."""

    def __init__(self, problem, calib, shares, estimator=None):
        align_weights(problem.transformer)
        self.parts = [Evaluator(problem.make_sampler, to_device(calib.items(a, b), "cpu"), batch_candidates=False,
                                threads=1, estimator=estimator, keep_items=True) for a, b in shares]
        self.stats = self.parts[0].stats

    def losses(self, computes):
        with torch.no_grad():
            per = [ev.item_losses(computes) for ev in self.parts]
        return [mean_of_items([p[j] for p in per]) for j in range(len(computes))]

    def plan_losses(self, plans):
        with torch.no_grad():
            per = [ev.item_plan_losses(plans) for ev in self.parts]
        return [mean_of_items([p[j] for p in per]) for j in range(len(plans))]


def reference(problem, calib, ev, estimator=None):
    """What ``ev`` must return bit for bit: the in-process losses (mask split), share by share (item split)."""
    if ev.split == "masks":
        return make_backend("inprocess", problem, calib, estimator=estimator)
    return ShareReference(problem, calib, ev.shares[:ev.per_group], estimator)  # every group holds these shares


def test_one_share_is_the_in_process_loss_bit_for_bit(problem, calib):
    masks = [(0, 2, 5), (0, 3, 6)]
    with torch.no_grad():
        want = make_backend("inprocess", problem, calib).losses(masks)
    assert ShareReference(problem, calib, [(0, len(calib))]).losses(masks) == want


def test_local_backend_scores_bit_for_bit_as_in_process_and_searches_alike(problem, calib, local):
    with torch.no_grad():
        inproc = reference(problem, calib, local)
        ref = search_tempering(inproc.losses, SMALL, TemperingConfig(workers=2))
        got = search_tempering(local.losses, SMALL, TemperingConfig(workers=2))
    assert got.compute == ref.compute and got.loss == ref.loss and got.history == ref.history
    masks = list(local.memo)
    assert local.losses(masks) == inproc.losses(masks)
    assert local.stats.evaluations == len(local.memo)
    if local.split == "items":  # shares of one item round differently from a batch of two, by little
        with torch.no_grad():
            whole = make_backend("inprocess", problem, calib).losses(masks)
        assert np.allclose(local.losses(masks), whole, rtol=1e-4, atol=0)


def test_a_killed_local_worker_is_replaced_and_its_chunk_scored(calib, local, problem):
    before = local.restarts
    os.kill(local.slots[1].proc.pid, signal.SIGKILL)
    local.slots[1].proc.join(10)
    masks = [(0, 2, 5), (0, 3, 6), (0, 1, 7), (0, 4, 6)]
    with torch.no_grad():
        want = reference(problem, calib, local).losses(masks)
    assert local.losses(masks) == want
    assert local.restarts == before + 1 and local.slots[1].proc.is_alive()


def test_hybrid_split_routes_masks_across_groups_that_split_the_items(problem, calib):
    """W = 4 workers on C = 2 pairs: 2 groups of 2 workers, each worker scoring its group's masks on one pair."""
    from budcache.search.evaluator import plan_of

    plans = [plan_of(STEPS, (0, 4, 7), "vtaylor1"), plan_of(STEPS, (0, 3, 7), "output")]
    with LocalEvaluator(TinyflowReplica(settings=SamplerSettings(steps=STEPS)), calib, workers=4,
                        estimator="vtaylor1") as ev:
        assert ev.split == "hybrid" and (ev.groups, ev.per_group) == (2, 2) and ev.sa_batch == ev.proposals == 2
        assert ev.shares == [(0, 1), (1, 2), (0, 1), (1, 2)]
        ref = reference(problem, calib, ev, "vtaylor1")
        with torch.no_grad():
            want = search_tempering(ref.losses, SMALL, TemperingConfig(workers=ev.proposals))
        got = search_tempering(ev.losses, SMALL, TemperingConfig(workers=ev.proposals))
        assert got.compute == want.compute and got.loss == want.loss and got.history == want.history
        assert ev.stats.evaluations == len(ev.memo) and ev.plan_losses(plans) == ref.plan_losses(plans)
        assert all(ev.held) and ev.held[0] != ev.held[1]  # both groups ran masks, not the same ones
        os.kill(ev.slots[3].proc.pid, signal.SIGKILL)  # group 1's second share
        ev.slots[3].proc.join(10)
        masks = [(0, 2, 5), (0, 3, 6), (0, 1, 7), (0, 4, 6)]
        assert ev.losses(masks) == ref.losses(masks)
        assert ev.restarts == 1 and ev.slots[3].proc.is_alive()


def _parent_cmdline(pid: int) -> tuple[int, str]:
    """The parent pid of ``pid`` and the parent's command line (Linux ``/proc``)."""
    ppid = parent_pid(pid)
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        return ppid, f.read().replace(b"\0", b" ").decode()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_workers_are_forked_from_the_clean_server_and_so_is_a_replacement(calib, local):
    assert worker_context().get_start_method() == start_method() == "forkserver"
    for pid in [s.proc.pid for s in local.slots]:  # the live workers, replacements included
        ppid, cmd = _parent_cmdline(pid)
        assert ppid != os.getpid() and "multiprocessing.forkserver" in cmd


def test_procs_starts_the_server_without_importing_torch(tmp_path):
    code = ("import sys, multiprocessing.forkserver as f\n"
            "from budcache.search.procs import start_worker_server\n"
            "start_worker_server()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert f._forkserver._forkserver_pid is not None, 'no server'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@dataclass(frozen=True)
class PoisonedReplica:
    """tinyflow whose block stack returns NaN at one step (only masks computing that step are hit)."""

    step: int

    def __call__(self, device: str = "cpu") -> TinyflowProblem:
        p = TinyflowProblem(tinyflow.load(None, device), STEPS)
        target = float(p.sigmas()[self.step])
        seen: dict[str, float] = {}

        def pre(module, args, kwargs):
            seen["t"] = float(kwargs["timestep"].reshape(-1)[0])

        def post(module, args, output):
            if abs(seen["t"] - target) < 1e-3:
                return tuple(o * float("nan") for o in output) if isinstance(output, tuple) else output * float("nan")
            return output

        p.transformer.register_forward_pre_hook(pre, with_kwargs=True)
        p.transformer.transformer_blocks[0].attn.register_forward_hook(post)
        return p


def test_a_workers_nan_is_reported_with_mask_and_step(calib):
    with LocalEvaluator(PoisonedReplica(5), calib, workers=2) as ev:
        assert all(math.isfinite(v) for v in ev.losses([(0, 1, 2), (0, 3, 4)]))
        with pytest.raises(ModelOutputError, match="at step 5") as info:
            ev.losses([(0, 1, 2), (0, 3, 5)])
    assert info.value.computes == [(0, 3, 5)] and info.value.step == 5


@pytest.mark.parametrize("split", ["items", "masks"])
def test_local_plan_losses_equal_in_process(problem, calib, split):
    from budcache import estimators as est
    from budcache.search.evaluator import plan_of

    plans = [plan_of(STEPS, (0, 2, 5), "vtaylor1"), plan_of(STEPS, (0, 2, 5), "output"),
             plan_of(STEPS, (0, 3, 6), "vtaylor2")]
    with LocalEvaluator(TinyflowReplica(settings=SamplerSettings(steps=STEPS)), calib, workers=2,
                        estimator="vtaylor1", split=split) as ev:
        with torch.no_grad():
            inproc = reference(problem, calib, ev, "vtaylor1")
            want = inproc.plan_losses(plans)
            mask_want = inproc.losses([(0, 1, 4), (0, 2, 5)])
        assert ev.plan_losses(plans) == want
        assert ev.losses([(0, 1, 4), (0, 2, 5)]) == mask_want
        with pytest.raises(ConfigError):
            ev.plan_losses([(0,) * (STEPS - 1)])
    assert est.COMPUTE == 0


# =============================================================================== item split
def test_item_shares_and_split_resolution():
    assert item_shares(5, 2) == [(0, 2), (2, 5)] and item_shares(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for n, w in ((32, 3), (7, 7), (1, 1), (33, 8)):
        shares = item_shares(n, w)
        sizes = [b - a for a, b in shares]
        assert shares[0][0] == 0 and shares[-1][1] == n and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert all(shares[j][1] == shares[j + 1][0] for j in range(w - 1))
    assert resolve_split("auto", 2, 32) == "items" and resolve_split("auto", 37, 32) == "masks"  # 37: prime
    assert resolve_split("auto", 8, 2) == "hybrid" and resolve_split("hybrid", 2, 32) == "items"
    assert resolve_split("hybrid", 7, 2) == "masks" and resolve_split("masks", 2, 32) == "masks"
    assert [hybrid_shares(w, c) for w, c in ((8, 2), (32, 2), (33, 32), (7, 2), (12, 5), (4, 4))] == \
        [2, 2, 11, 1, 4, 4]
    assert split_layout("hybrid", 8, 2) == (4, 2) and split_layout("items", 4, 9) == (1, 4) and \
        split_layout("masks", 3, 9) == (3, 1)
    with pytest.raises(ConfigError, match="--split items needs at most one worker per calibration item"):
        resolve_split("items", 3, 2)
    with pytest.raises(ConfigError, match="--split 'rows' is unknown"):
        resolve_split("rows", 1, 2)


def test_calibration_items_are_a_copy_of_a_range(calib):
    part = calib.items(1, 2)
    assert part.prompts == calib.prompts[1:2] and part.seeds == calib.seeds[1:2]
    assert torch.equal(part.noise, calib.noise[1:2]) and torch.equal(part.teacher, calib.teacher[1:2])
    assert part.noise.data_ptr() != calib.noise[1:2].data_ptr()
    for bad in ((0, 0), (1, 3), (-1, 1)):
        with pytest.raises(ConfigError, match="not a non-empty range"):
            calib.items(*bad)


@pytest.fixture(scope="module")
def cfg_problem() -> TinyflowProblem:
    return TinyflowProblem(tinyflow.load(), STEPS, guidance=3.0)


@pytest.fixture(scope="module")
def calib5(cfg_problem):
    prompts, seeds = pairs_for(tinyflow_prompts(5, seed=9), 1, 9)
    with torch.no_grad():
        return cfg_problem.calibration(prompts, seeds)


@pytest.mark.parametrize("workers", [2, 3])
def test_item_split_losses_equal_in_process_bit_for_bit_with_cfg_and_uneven_shares(cfg_problem, calib5, workers):
    from budcache.search.evaluator import plan_of

    masks = [(0, 2, 5), (0, 2, 6), (0, 1, 4, 7), (0, 3)]
    plans = [plan_of(STEPS, (0, 2, 5), "vtaylor1"), plan_of(STEPS, (0, 2, 5), "output"),
             plan_of(STEPS, (0, 3, 6), "vtaylor2")]
    replica = TinyflowReplica(settings=SamplerSettings(steps=STEPS, guidance=3.0))
    with LocalEvaluator(replica, calib5, workers=workers, estimator="vtaylor1", split="items") as ev:
        assert [b - a for a, b in ev.shares] == ([2, 3] if workers == 2 else [1, 2, 2])
        ref = reference(cfg_problem, calib5, ev, "vtaylor1")
        assert ev.losses(masks) == ref.losses(masks)
        assert ev.plan_losses(plans) == ref.plan_losses(plans)
        assert ev.stats.evaluations == len(masks) + len(plans)
        # every worker ran every mask on its own items: the block-stack work adds up to one process's
        with torch.no_grad():
            whole = make_backend("inprocess", cfg_problem, calib5, estimator="vtaylor1")
            assert np.allclose(ev.losses(masks), whole.losses(masks), rtol=1e-4, atol=0)
            whole.plan_losses(plans)
        assert ev.stats.item_evaluations == whole.stats.item_evaluations


def test_item_split_search_is_the_share_by_share_search(problem, calib):
    with LocalEvaluator(TinyflowReplica(settings=SamplerSettings(steps=STEPS)), calib, workers=2, split="items") as ev:
        ref = search(reference(problem, calib, ev).losses, SMALL)
        got = search(ev.losses, SMALL, sa_batch=ev.sa_batch)
    assert got.compute == ref.compute and got.loss == ref.loss and got.history == ref.history
    assert ev.stats.evaluations == got.evaluations  # no speculative masks


def test_split_needs_local_workers(problem, calib):
    with pytest.raises(ConfigError, match="--split applies only with workers"):
        make_backend("inprocess", problem, calib, split="items")
    with pytest.raises(ConfigError, match="--split 'x' is unknown"):
        make_backend("local", problem, calib, split="x")
