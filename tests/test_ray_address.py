"""Joining a running Ray cluster with ``--ray-address`` (a head started by ``ray start``, as on a real cluster)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from budcache import CachePolicy

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
       "RAY_AUTH_MODE": "disabled"}  # a test cluster on one host; real clusters keep their token auth
ARGS = ["search", "--steps", "8", "--nfe", "3", "--calib-pairs", "2", "--heldout", "2", "--sa-iters", "6",
        "--hc-rounds", "1", "--mechanism", "vtaylor1", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_search_joins_a_running_cluster_and_writes_the_in_process_policy(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'budcache[ray]'); CI installs it")
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray command is not on PATH")
    port = _free_port()
    head = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "1",
                           "--include-dashboard=false", "--disable-usage-stats"], env=ENV, capture_output=True,
                          text=True, timeout=180)
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        cli = [sys.executable, "-m", "budcache.cli", *ARGS]
        here = subprocess.run([*cli, "--out", str(tmp_path / "a"), "--backend", "inprocess"], env=ENV, capture_output=True, text=True,
                              timeout=900)
        assert here.returncode == 0, here.stderr[-2000:]
        joined = subprocess.run([*cli, "--out", str(tmp_path / "b"), "--backend", "ray", "--workers", "1",
                                 "--ray-address", f"127.0.0.1:{port}"], env=ENV, capture_output=True, text=True,
                                timeout=900)
        assert joined.returncode == 0, joined.stderr[-2000:]
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=ENV, capture_output=True, timeout=180)
    a, b = (CachePolicy.load(tmp_path / d / "policy_N8_K3.json") for d in ("a", "b"))
    assert a.compute == b.compute and a.meta["search_loss"] == b.meta["search_loss"]  # bit for bit
    assert a.estimators == b.estimators
