"""Data-parallel alignment: two local gloo processes learn the same sigmas as one process with the same
effective batch (fresh noise in the second epoch included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from budcache.align import AlignConfig, align
from budcache.align.distributed import spawn, world

torch.set_num_threads(1)

N = 8
MASK = (True, False, True, False, False, True, False, False)
ITEMS = 6
LR = 0.1
ATOL = 1e-6


def _setup():
    from budcache import tinyflow
    from budcache.problems.data import pairs_for
    from budcache.problems.tinyflow import TinyflowProblem, tinyflow_prompts

    problem = TinyflowProblem(tinyflow.load(), steps=N)
    prompts, seeds = pairs_for(tinyflow_prompts(ITEMS, seed=5), 1, 5)
    with torch.no_grad():
        calib = problem.calibration(prompts, seeds)
    return problem, calib


def _worker(out: str, micro_batch: int) -> None:
    problem, calib = _setup()
    rank, size = world()
    cfg = AlignConfig(lr=LR, accumulation=2, micro_batch=micro_batch, epochs=2, warmup=0.0)
    res = align(problem, calib, MASK, cfg)
    if rank == 0:
        Path(out).write_text(json.dumps({"size": size, "sigmas": res.sigmas.double().tolist(),
                                         "losses": [h["loss"] for h in res.history]}))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_same_effective_batch(tmp_path):
    problem, calib = _setup()
    # one process: 2 items per pass x 2 accumulated = 4 items per update
    one = align(problem, calib, MASK, AlignConfig(lr=LR, accumulation=2, micro_batch=2, epochs=2, warmup=0.0))
    # two processes: 1 item per pass x 2 accumulated x 2 ranks = 4 items per update
    out = tmp_path / "ddp.json"
    spawn(_worker, 2, str(out), 1)
    two = json.loads(out.read_text())
    assert two["size"] == 2
    assert len(two["losses"]) == len(one.history) == 4   # ceil(6 / 4) = 2 updates per epoch
    for a, b in zip(two["losses"], (h["loss"] for h in one.history)):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(torch.tensor(two["sigmas"], dtype=torch.float64), one.sigmas.double(), rtol=0, atol=ATOL)
    # the sigmas moved far more than the tolerance of the comparison above, so it cannot pass vacuously
    assert float((one.sigmas - problem.sigmas(N)).abs().max()) > 100 * ATOL


@pytest.mark.slow
def test_cli_nproc_2_learns_the_sigmas_of_one_process(tmp_path):
    from budcache import CachePolicy
    from budcache.cli import main

    common = ["align", "--uniform", "2", "--steps", "4", "--calib-pairs", "4", "--heldout", "1", "--micro-batch", "1",
              "--lr", "0.1", "--warmup", "0", "--quiet"]
    # the same effective batch of 2: two ranks x 1 accumulated pass, or one rank x 2
    assert main([*common, "--nproc", "2", "--accumulation", "1", "--out", str(tmp_path / "two")]) == 0
    assert main([*common, "--nproc", "1", "--accumulation", "2", "--out", str(tmp_path / "one")]) == 0
    two = CachePolicy.load(tmp_path / "two" / "policy_aligned_N4_K2.json")
    one = CachePolicy.load(tmp_path / "one" / "policy_aligned_N4_K2.json")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert "effective batch 2" in (tmp_path / "two" / "report.md").read_text() and summary["nfe"] == 2
    torch.testing.assert_close(torch.tensor(two.sigmas), torch.tensor(one.sigmas), rtol=0, atol=ATOL)
    start = CachePolicy.uniform(4, 2)
    assert max(abs(a - b) for a, b in zip(one.sigmas, _base_sigmas(4))) > 100 * ATOL  # it learned something
    assert two.compute == one.compute == start.compute


def _base_sigmas(n: int) -> list[float]:
    from budcache import tinyflow

    return tinyflow.load().sigmas(n).tolist()
