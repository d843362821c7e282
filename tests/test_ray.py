"""Distributed search and faults: the Ray backend gives the in-process policy with 1 or 2 workers, a killed
worker is replaced and its batch retried, speculative SA batches leave the search unchanged, losses are
bit-identical whatever the batch, and NaN/Inf from the model is reported with the mask and step.

The Ray tests run a local cluster with 4 logical CPUs (on however many cores) on tinyflow; they skip only when ray is not importable
(CI installs the ``ray`` extra)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from budcache import tinyflow
from budcache.errors import ConfigError, MissingExtraError, ModelOutputError
from budcache.problems.base import Shipped
from budcache.problems.data import pairs_for
from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts
from budcache.search import Evaluator, SearchConfig, hc_neighbourhood, random_init, search
from budcache.search.anneal import load_checkpoint
from budcache.search.distributed import (
    ALIGN,
    RayEvaluator,
    align_weights,
    make_evaluator,
    to_device,
)

torch.set_num_threads(1)

STEPS = 10
CFG = SearchConfig(steps=STEPS, nfe=4, sa_iters=16, hc_rounds=3, seed=3)
NAN_STEP = 6


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def problem() -> TinyflowProblem:
    return TinyflowProblem(tinyflow.load(), STEPS)


@pytest.fixture(scope="module")
def calib(problem):
    prompts, seeds = pairs_for(tinyflow_prompts(2, seed=5), 1, 5)
    with torch.no_grad():
        return problem.calibration(prompts, seeds)


@pytest.fixture(scope="module")
def reference(problem, calib):
    """The in-process search: the result every backend must reproduce."""
    with torch.no_grad():
        ev = make_evaluator("inprocess", problem, calib)
        return search(ev.losses, CFG), ev


def same_search(a, b) -> None:
    """Identical results: best set, bit-identical loss, and the same accepted path."""
    assert a.compute == b.compute
    assert a.loss == b.loss
    assert [(h["stage"], h["loss"], h["best_loss"]) for h in a.history] == \
        [(h["stage"], h["loss"], h["best_loss"]) for h in b.history]


# =============================================================================== NaN / Inf reporting
@dataclass(frozen=True)
class PoisonedTinyflow:
    """tinyflow whose block stack returns NaN at one step (only masks computing that step are hit)."""

    step: int
    steps: int = STEPS

    def __call__(self, device: str = "cpu") -> TinyflowProblem:
        p = TinyflowProblem(tinyflow.load(None, device), self.steps)
        poison(p, self.step)
        return p


def poison(p: TinyflowProblem, step: int) -> None:
    target = float(p.sigmas()[step])
    seen: dict[str, float] = {}

    def pre(module, args, kwargs):
        seen["t"] = float(kwargs["timestep"].reshape(-1)[0])

    def post(module, args, output):
        if abs(seen["t"] - target) < 1e-3:
            return tuple(o * float("nan") for o in output) if isinstance(output, tuple) else output * float("nan")
        return output

    p.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    p.transformer.transformer_blocks[0].attn.register_forward_hook(post)


def test_nan_is_reported_with_the_masks_and_step_that_produced_it(calib):
    bad = PoisonedTinyflow(NAN_STEP)()
    ev = Evaluator(bad.make_sampler, calib)  # batched candidates: the error isolates the culprit(s)
    rng = np.random.default_rng(0)
    cfg = SearchConfig(steps=STEPS, nfe=4)
    masks = list(dict.fromkeys(random_init(cfg, rng) for _ in range(12)))
    hit = [m for m in masks if NAN_STEP in m]
    clean = [m for m in masks if NAN_STEP not in m]
    assert hit and clean
    vals = ev.losses(clean)  # masks that cache the poisoned step never run the stack there: fine
    assert all(np.isfinite(vals))
    with pytest.raises(ModelOutputError) as info:
        ev.losses(masks)  # one batch mixing hit and clean masks
    err = info.value
    assert err.step == NAN_STEP
    # isolated within the failing group: only masks computing the poisoned step are named
    assert err.computes and set(err.computes) <= set(hit)
    assert f"at step {NAN_STEP}" in str(err) and str(list(err.computes[0])) in str(err)
    assert all(m not in ev.memo for m in hit)  # nothing non-finite was memoised


def test_nan_mid_search_stops_with_a_valid_checkpoint_and_resumes_to_the_clean_result(calib, reference, tmp_path):
    ref, ref_ev = reference
    init = random_init(CFG, np.random.default_rng(CFG.seed))
    step = min(k for m in ref_ev.memo for k in m if k not in init)  # first reached after the start
    bad = PoisonedTinyflow(step)()
    ck = tmp_path / "ck.json"
    with pytest.raises(ModelOutputError, match=f"step {step}.*compute set") as info:
        search(make_evaluator("inprocess", bad, calib).losses, CFG, checkpoint=ck, digest="d")
    assert step in info.value.computes[0]
    # the checkpoint of the last accepted move is intact and resumable
    st, memo = load_checkpoint(ck, CFG, "d", np.random.default_rng(0))
    assert st["cur"] is not None and all(np.isfinite(v) for _, v in memo)
    good = TinyflowProblem(tinyflow.load(), STEPS)
    same_search(search(make_evaluator("inprocess", good, calib).losses, CFG, checkpoint=ck, digest="d",
                       resume=True), ref)


# =============================================================================== exactness foundations
def test_canonical_losses_are_bit_identical_whatever_the_call_order_and_process_threads(problem, calib):
    """What both backends use: a mask's loss does not depend on the other masks of its call, the prefix it
    resumed from or the caller's thread count."""
    cfg = SearchConfig(steps=STEPS, nfe=4, far_jumps=1)
    rng = np.random.default_rng(1)
    neigh = hc_neighbourhood(random_init(cfg, rng), cfg, rng)[:10]
    together = make_evaluator("inprocess", problem, calib).losses(neigh)
    ev = make_evaluator("inprocess", problem, calib)
    alone_reversed = [ev.loss_of(m) for m in neigh[::-1]][::-1]  # later masks resume from stored prefixes
    naive = make_evaluator("inprocess", problem, calib, naive=True).losses(neigh)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the evaluator scores with its own fixed count and restores the caller's
        other = make_evaluator("inprocess", problem, calib).losses(neigh[::2] + neigh[1::2])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    interleaved = [None] * 10
    interleaved[::2], interleaved[1::2] = other[:5], other[5:]
    assert together == alone_reversed == naive == interleaved  # float equality: bit for bit
    assert ev.stats.item_evaluations < len(neigh) * len(calib) * 4  # prefix sharing did save work


def test_speculative_sa_batches_leave_the_search_unchanged():
    """sa_batch > 1 scores several proposals per call; the accepted path and result are the sequential ones."""
    rng = np.random.default_rng(7)
    table = rng.random((30, 30))
    calls: list[int] = []

    def losses(cands):
        calls.append(len(cands))
        return [float(sum(table[i, j] for i, j in zip(c, c[1:])) + 0.1 * len(set(c))) for c in cands]

    cfg = SearchConfig(steps=30, nfe=8, sa_iters=120, hc_rounds=5, seed=2)
    seq = search(losses, cfg)
    n_seq = len(calls)
    calls.clear()
    spec = search(losses, cfg, sa_batch=4)
    same_search(seq, spec)
    assert len(calls) < n_seq and max(calls) >= 2  # fewer round trips, several proposals per call
    with pytest.raises(ConfigError, match="sa_batch"):
        search(losses, cfg, sa_batch=0)


def test_backend_options_are_checked(problem, calib, monkeypatch):
    with pytest.raises(ConfigError, match="--backend 'dask' is unknown"):
        make_evaluator("dask", problem, calib)
    with pytest.raises(ConfigError, match="only with --backend ray"):
        make_evaluator("inprocess", problem, calib, workers=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # ray not installed
    with pytest.raises(MissingExtraError, match=r"budcache\[ray\]"):
        make_evaluator("ray", problem, calib, workers=2)


def test_to_device_moves_every_tensor_of_a_calibration_set(calib):
    moved = to_device(calib, "cpu")
    assert moved.prompts == calib.prompts and torch.equal(moved.teacher, calib.teacher)
    assert torch.equal(moved.cond.prompt_embeds, calib.cond.prompt_embeds)
    view = torch.arange(40.0)[2:34].view(4, 8)  # 8 bytes off the storage start
    out = to_device({"x": view}, "cpu")["x"]
    assert torch.equal(out, view) and out.data_ptr() % ALIGN == 0


def test_aligned_weights_make_a_copied_replica_bit_identical():
    """Kernels round differently at other alignments: a loaded model and its copy (as a worker holds it)
    agree bit for bit once the evaluator aligns both."""
    a = TinyflowProblem(tinyflow.load(), 28)
    b = copy.deepcopy(a)
    prompts, seeds = pairs_for(tinyflow_prompts(1, seed=0), 1, 0)
    cal = a.calibration(prompts, seeds)
    mask = (0, 1, 2, 3, 7, 9, 10, 13, 20, 27)
    la = make_evaluator("inprocess", a, cal).loss_of(mask)
    assert align_weights(a.transformer) == 0  # make_evaluator aligned it already
    assert la == make_evaluator("inprocess", b, cal).loss_of(mask)
    lin = torch.nn.Linear(4, 8)
    lin.weight.data = torch.arange(40.0)[2:34].view(8, 4)
    assert align_weights(lin) == 1 and lin.weight.data_ptr() % ALIGN == 0
    assert torch.equal(lin.weight, torch.arange(2.0, 34.0).view(8, 4))


# =============================================================================== Ray
@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="ray is not installed (pip install 'budcache[ray]'); CI installs it")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get this module's test models
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 4 logical: the hybrid split's W = 4
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_reproduce_the_in_process_search(ray_cluster, problem, calib, reference):
    ref, ref_ev = reference
    for workers in (2, 1):
        with RayEvaluator(Shipped(problem), calib, workers=workers, split="masks") as ev:
            assert ev.devices == ["cpu"] * workers and ev.sa_batch == workers
            got = search(ev.losses, CFG, sa_batch=ev.sa_batch)
            same_search(got, ref)
            # every mask either backend scored has the same loss, bit for bit
            common = set(ev.memo) & set(ref_ev.memo)
            assert len(common) >= 10 and all(ev.memo[m] == ref_ev.memo[m] for m in common)
            assert ev.stats.evaluations == len(ev.memo) and ev.stats.item_evaluations > 0
    assert ray_cluster.is_initialized()  # joined the running cluster: left it running


@pytest.mark.slow
def test_killed_workers_are_replaced_and_their_batch_retried(ray_cluster, problem, calib, reference, monkeypatch):
    ref, _ = reference
    with RayEvaluator(Shipped(problem), calib, workers=2, split="masks") as ev:
        first = ev.actors[0]

        def kill_between_batches(entry):  # a worker dies while idle: its next batch fails and is retried
            if entry["step"] == 4:
                ray_cluster.kill(ev.actors[0])

        real_wait = ray_cluster.wait
        state = {"armed": False}

        def kill_in_flight(refs, **kw):  # a worker dies with a batch in flight
            if state["armed"]:
                state["armed"] = False
                ray_cluster.kill(ev.actors[0])  # the first chunk always goes to worker 0
            return real_wait(refs, **kw)

        def on_step(entry):
            kill_between_batches(entry)
            if entry["step"] == 9:
                state["armed"] = True

        monkeypatch.setattr(ray_cluster, "wait", kill_in_flight)
        got = search(ev.losses, CFG, sa_batch=ev.sa_batch, on_step=on_step)
        same_search(got, ref)
        assert ev.restarts == 2 and ev.actors[0] is not first


@pytest.mark.slow
def test_ray_item_split_scores_each_share_as_in_process_and_replaces_a_killed_worker(ray_cluster, problem, calib):
    from budcache.search.evaluator import Evaluator
    from budcache.search.losses import mean_of_items

    align_weights(problem.transformer)
    parts = [Evaluator(problem.make_sampler, to_device(calib.items(a, a + 1), "cpu"), batch_candidates=False,
                       threads=1, keep_items=True) for a in range(len(calib))]
    masks = [(0, 2, 5), (0, 3, 6, 9), (0, 1, 4, 7)]
    per = [ev.item_losses(masks) for ev in parts]
    want = [mean_of_items([p[j] for p in per]) for j in range(len(masks))]
    with RayEvaluator(Shipped(problem), calib, workers=2) as ev:
        assert ev.split == "items" and ev.shares == [(0, 1), (1, 2)] and ev.sa_batch == 1
        assert ev.losses(masks[:2]) == want[:2]
        ray_cluster.kill(ev.actors[1])
        assert ev.losses(masks) == want  # the dead actor is replaced and its share scored again
        assert ev.restarts == 1 and ev.stats.evaluations == 3


@pytest.mark.slow
def test_ray_hybrid_split_routes_masks_to_groups_that_split_the_items(ray_cluster, problem, calib):
    from budcache.search.evaluator import Evaluator
    from budcache.search.losses import mean_of_items
    from budcache.search.parallel import TemperingConfig, search_tempering

    align_weights(problem.transformer)
    parts = [Evaluator(problem.make_sampler, to_device(calib.items(a, a + 1), "cpu"), batch_candidates=False,
                       threads=1, keep_items=True) for a in range(len(calib))]

    def want(masks):
        per = [ev.item_losses(masks) for ev in parts]
        return [mean_of_items([p[j] for p in per]) for j in range(len(masks))]

    with RayEvaluator(Shipped(problem), calib, workers=4) as ev:  # C = 2: 2 groups x 2 shares
        assert ev.split == "hybrid" and (ev.groups, ev.per_group) == (2, 2) and ev.sa_batch == ev.proposals == 2
        assert ev.shares == [(0, 1), (1, 2)] * 2
        cfg = SearchConfig(steps=STEPS, nfe=4, sa_iters=8, hc_rounds=2, seed=3)
        got = search_tempering(ev.losses, cfg, TemperingConfig(workers=ev.proposals))
        ref = search_tempering(want, cfg, TemperingConfig(workers=2))
        assert got.compute == ref.compute and got.loss == ref.loss and got.history == ref.history
        ray_cluster.kill(ev.actors[2])  # group 1's first share
        masks = [(0, 2, 5), (0, 3, 6, 9), (0, 1, 4, 7), (0, 4, 8)]
        assert ev.losses(masks) == want(masks) and ev.restarts == 1


@pytest.mark.slow
def test_nan_on_a_ray_worker_names_the_mask_and_step(ray_cluster, calib):
    with RayEvaluator(PoisonedTinyflow(NAN_STEP), calib, workers=2) as ev:
        mask = tuple(sorted({0, 1, NAN_STEP, 8}))
        assert np.isfinite(ev.loss_of((0, 1, 2, 8)))
        with pytest.raises(ModelOutputError, match=f"at step {NAN_STEP}") as info:
            ev.losses([(0, 1, 2, 3), mask])
        assert info.value.computes == [mask] and info.value.step == NAN_STEP
        assert ev.restarts == 0  # a model error is the model's, not a dead worker


@pytest.mark.slow
def test_cli_ray_backend_writes_the_in_process_policy(ray_cluster, tmp_path):
    from budcache import CachePolicy
    from budcache.cli import main

    args = ["search", "--steps", "8", "--nfe", "3", "--calib-pairs", "2", "--heldout", "2", "--sa-iters", "10",
            "--hc-rounds", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--backend", "inprocess"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--backend", "ray", "--workers", "2", "--split", "masks"]) == 0
    a, b = (CachePolicy.load(tmp_path / d / "policy_N8_K3.json") for d in ("a", "b"))
    assert a.compute == b.compute and a.meta["search_loss"] == b.meta["search_loss"]
    assert main([*args, "--out", str(tmp_path / "c"), "--backend", "inprocess", "--workers", "2"]) == 2


def test_more_workers_than_the_cluster_can_hold_is_a_config_error(ray_cluster, problem, calib):
    with pytest.raises(ConfigError, match="5 workers need 5 CPUs but the Ray cluster has 4"):
        RayEvaluator(Shipped(problem), calib, workers=5)
    with pytest.raises(ConfigError, match="--workers must be an integer >= 1"):
        RayEvaluator(Shipped(problem), calib, workers=0)
