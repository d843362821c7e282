"""Driver kill: a ``budcache search`` process killed with SIGKILL after a few accepted moves, then run again
with ``--resume``, writes the policy of an uninterrupted run; the killed driver's worker processes and their fork
server exit with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from budcache import CachePolicy
from budcache.cli import main
from helpers import parent_pid

torch.set_num_threads(1)

# The mask search is killed here (the per-step estimator choice has a checkpoint of its own, tested in
# test_search_estimator_checkpoint.py and test_search_cli.py); the residual forecast keeps this tiny search
# accepting moves long enough to kill it mid-annealing.
ARGS = ["search", "--steps", "8", "--nfe", "3", "--calib-pairs", "2", "--heldout", "2", "--sa-iters", "150",
        "--hc-rounds", "3", "--seed", "4", "--mechanism", "forecast1", "--estimators", "none", "--quiet"]
CKPT = "checkpoint_N8_K3.json"
POLICY = "policy_N8_K3.json"


def _read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (files are replaced atomically, never partial)
        return None


def _descendants(pid: int) -> set[int]:
    """Live descendants of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                parent[int(entry)] = parent_pid(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p} - found
        found |= kids
        todo.extend(kids)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a gone process does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_resume_after_sigkill_of_the_driver_gives_the_uninterrupted_policy(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    assert main([*ARGS, "--out", str(ref_dir)]) == 0
    ref = CachePolicy.load(ref_dir / POLICY)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    code = "import sys, torch; torch.set_num_threads(1); from budcache.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *ARGS, "--out", str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            data = _read(run_dir / CKPT)
            if data is not None:
                seen.add(json.dumps(data["state"]["history"]))
            if len(seen) >= 4:  # the start and at least 3 later checkpoints (accepted moves)
                break
            time.sleep(0.01)
        helpers = _descendants(proc.pid)  # the workers' fork server, the workers, multiprocessing's tracker
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the search ended before it was killed: {err.decode()[-2000:]}"
    if os.path.isdir("/proc"):
        assert helpers, "the search ran no worker process"
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in helpers if _alive(p)], "a killed driver left processes behind"
    killed = _read(run_dir / CKPT)
    assert killed["state"]["phase"] in ("sa", "hc"), "killed too late to test a resume"
    assert not (run_dir / POLICY).exists()

    assert main([*ARGS, "--out", str(run_dir), "--resume"]) == 0
    got = CachePolicy.load(run_dir / POLICY)
    assert got.compute == ref.compute
    assert got.meta["search_loss"] == ref.meta["search_loss"]
    hist = lambda d: [(h["stage"], h["loss"]) for h in _read(d / CKPT)["state"]["history"]]  # noqa: E731
    assert hist(run_dir) == hist(ref_dir)  # the same path, step for step
