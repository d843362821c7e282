"""Regenerate BENCHMARKS.md's generated sections on the shipped weights: one command for all of them.

A generated section sits between two markers in BENCHMARKS.md::

    <!-- generated: NAME -->
    ...the Markdown the section's script printed...
    <!-- end generated: NAME -->

Each is produced by one script run (``SECTIONS`` below: name, command, rough minutes on the 2-core machine).
The script's output, from its first Markdown heading on (progress lines before it are dropped), replaces the
text between the markers; prose outside the markers is kept, and a section that fails keeps its old text.
BENCHMARKS.md is rewritten atomically after each section, so an interrupted run loses nothing already done.

Every run takes the heavy-job lock (``/tmp/budcache-heavy.lock``), one section at a time.

Usage: python benchmarks/regenerate.py [--only NAME,...] [--list] [--file BENCHMARKS.md] [--dry-run]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = "/tmp/budcache-heavy.lock"


@dataclass(frozen=True)
class Section:
    """One generated block of BENCHMARKS.md.

    Args:
        name: the marker name.
        command: the script and its arguments (run with this Python, from the repository root).
        minutes: rough wall time on the project's 2-core machine, for planning.
        output: a file the command writes its Markdown to (read instead of its standard output).
    """

    name: str
    command: tuple[str, ...]
    minutes: float
    output: str | None = None


SECTIONS: tuple[Section, ...] = (
    Section("foundation", ("benchmarks/foundation.py", "--pairs", "256"), 12),
    Section("pipeline-hooks", ("benchmarks/pipeline.py", "--batch", "8", "--repeats", "21"), 2),
    Section("default-search", ("-m", "budcache.cli", "search", "--nfe", "6,8,10,14", "--heldout", "32",
                               "--out", "runs/regenerate/default", "--force", "--quiet"), 10,
            output="runs/regenerate/default/report.md"),
    # each budget's kept policy (the reference) and TaylorSeer's searched schedule from the same search
    Section("compare-default", ("benchmarks/compare.py", "--nfe", "6,8,10,14",
                                *(a for k in (6, 8, 10, 14) for a in
                                  ("--policy", f"runs/regenerate/default/policy_N28_K{k}.json",
                                   "--policy", f"runs/regenerate/default/policy_N28_K{k}_taylorseer.json")),
                                "--methods",
                                "budcache,taylorseer-searched,taylorseer,magcache,fbcache,uniform,plain",
                                "--given-only", "--eval-pairs", "128", "--out", "runs/regenerate/compare"), 19),
    Section("compare-taylorseer", ("benchmarks/compare.py", "--nfe", "6,8,10,14",
                                   *(a for k in (6, 8, 10, 14) for a in
                                     ("--policy", f"runs/regenerate/default/policy_N28_K{k}_taylorseer.json")),
                                   "--methods", "taylorseer-searched,taylorseer,plain", "--given-only",
                                   "--no-transfer", "--eval-pairs", "128", "--out",
                                   "runs/regenerate/compare-taylorseer"), 6),
    Section("candidates", ("benchmarks/candidates.py", "--pairs", "128"), 11),
    Section("candidates-wide", ("benchmarks/candidates.py", "--pairs", "128", "--wide", "512", "--wide-only"), 12),
    Section("candidate-rules", ("benchmarks/candidate_rules.py",), 3),
    Section("sweeps", ("benchmarks/sweeps.py",), 10),
    Section("peer-estimator", ("benchmarks/peer_estimator.py",), 25),
    Section("alignment", ("benchmarks/align.py", "--budgets", "5,6,7", "--calib", "24", "--val", "16", "--heldout",
                          "64", "--epochs", "3", "--lr", "0.5", "--accumulation", "2", "--micro-batch", "4",
                          "--sa-iters", "100", "--hc-rounds", "10", "--rounds", "3", "--mechanism", "reuse",
                          "--search-loss", "mse", "--parametrisation", "segment", "--plain-parametrisation", "ld3",
                          "--plain-lr", "0.05"), 13),
    Section("ray", ("benchmarks/ray_search.py", "--calib", "4", "--sa-iters", "60", "--hc-rounds", "10"), 10),
    Section("item-split", ("benchmarks/item_split.py",), 17),
    Section("tempering-seeds", ("benchmarks/item_split.py", "--spread-seeds", "0-15", "--paper-runs",
                                "1x1,8x1,4x2,32x1,16x2", "--heldout", "16"), 32),
    Section("compile-time", ("benchmarks/compile.py", "--parts", "1", "--repeats", "5"), 5),
    Section("compile-breaks", ("benchmarks/compile.py", "--parts", "2"), 3),
    Section("context-parallel", ("benchmarks/context_parallel.py", "--batch", "2", "--steps", "28", "--nfe", "10",
                                 "--repeats", "3"), 3),
)

_BLOCK = "<!-- generated: {name} -->\n{body}\n<!-- end generated: {name} -->"


def markdown_of(stdout: str, top: int = 3) -> str:
    """The printed Markdown from the first heading on (progress lines before it are not part of the section),
    its headings shifted so that the highest is of level ``top`` (a section sits under BENCHMARKS.md's ``##``)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#")), None)
    if start is None:
        raise ValueError("the command printed no Markdown heading")
    lines = lines[start:]
    heads = [len(m.group(1)) for line in lines if (m := re.match(r"(#+) ", line))]
    shift = top - min(heads)
    if shift:
        lines = [("#" * (len(m.group(1)) + shift) + line[len(m.group(1)):]) if (m := re.match(r"(#+) ", line))
                 else line for line in lines]
    return "\n".join(lines).strip()


def splice(text: str, name: str, body: str) -> str:
    """``text`` with the block of ``name`` replaced by ``body``; the markers must be present exactly once."""
    pattern = re.compile(rf"<!-- generated: {re.escape(name)} -->\n(?:.*?\n)?<!-- end generated: {re.escape(name)} -->",
                         re.S)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"BENCHMARKS.md must hold the markers of section {name!r} exactly once "
                         f"(found {len(found)})")
    return pattern.sub(lambda _: _BLOCK.format(name=name, body=body), text)


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(section: Section) -> str:
    """Run one section's command under the heavy-job lock; its Markdown."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, *section.command], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0]}")
    return markdown_of((ROOT / section.output).read_text() if section.output else proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated section names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the sections and their commands")
    ap.add_argument("--file", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--dry-run", action="store_true", help="check the markers and print the commands only")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or [s.name for s in SECTIONS]
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown:
        print(f"regenerate: unknown section(s) {unknown}; known: {[s.name for s in SECTIONS]}", file=sys.stderr)
        return 2
    chosen = [s for s in SECTIONS if s.name in names]
    if a.list:
        for s in SECTIONS:
            print(f"{s.name:<18} ~{s.minutes:>4.0f} min  python {shlex.join(s.command)}")
        return 0
    path = Path(a.file)
    text = path.read_text()
    for s in chosen:  # every marker first, so no run is wasted on a section that cannot be written
        try:
            splice(text, s.name, "")
        except ValueError as e:
            print(f"regenerate: {e}", file=sys.stderr)
            return 2
    if a.dry_run:
        for s in chosen:
            print(f"python {shlex.join(s.command)}")
        return 0
    failed = []
    for s in chosen:
        t0 = time.perf_counter()
        print(f"[{s.name}] python {shlex.join(s.command)}", flush=True)
        try:
            body = run(s)
        except (RuntimeError, ValueError) as e:
            print(f"[{s.name}] failed, its old text is kept: {e}", file=sys.stderr)
            failed.append(s.name)
            continue
        text = splice(path.read_text(), s.name, body)
        atomic_write(path, text)
        print(f"[{s.name}] written in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    if failed:
        print(f"regenerate: {len(failed)} section(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("regenerate: interrupted; sections written so far are kept", file=sys.stderr)
        sys.exit(130)
