"""Comparison benchmark on tinyflow: every method at K = 6, 8, 10, 14 of 28 steps.

Runs ``budcache compare`` with its defaults (12 calibration pairs, 32
evaluation pairs, all installed methods, transfer to dpmpp2m / ipndm and
guidance 2 / 4) and prints a Markdown section for BENCHMARKS.md: machine,
date, command, the per-budget tables and the transfer table.

Usage: flock /tmp/budcache-heavy.lock python benchmarks/compare.py [--out runs/bench_compare] [budcache compare options]
       python benchmarks/compare.py --merge OUT DIR1 DIR2 ...   (one table from runs of disjoint method sets)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from budcache.compare.cli import config_from_args, register
from budcache.compare.harness import run_compare
from budcache.compare.report import load_result, markdown, merge_results, write_outputs


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--merge"]:
        from pathlib import Path

        out, dirs = Path(argv[1]), argv[2:]
        res = merge_results([load_result(d) for d in dirs])
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, res)
        print(markdown(res).split("\n", 2)[2])
        return
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    register(sub)
    if "--out" not in argv:
        argv += ["--out", "runs/bench_compare"]
    a = ap.parse_args(["compare", *argv])
    torch.set_num_threads(2)
    cfg = config_from_args(a)
    res = run_compare(a.out, cfg, progress=True)
    m = res.meta
    print(f"# Compare ({datetime.date.today().isoformat()}, {platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, no GPU)\n")
    print(f"Command: `flock /tmp/budcache-heavy.lock python benchmarks/compare.py {' '.join(argv)}` "
          f"(total {m['wall_s'] / 60:.1f} min)\n")
    print(markdown(res).split("\n", 2)[2])


if __name__ == "__main__":
    main()
