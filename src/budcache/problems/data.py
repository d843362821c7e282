"""Calibration data: prompt files, (prompt, seed) pairs with named splits, and sets with their teacher outputs.

The search loss of a mask ``m`` is
``L(m) = mean_{(c,z)} loss(x_0^m(z, c), x_0^full(z, c))``, so a
:class:`CalibrationSet` holds the noise ``z``, the encoded conditions ``c`` and
the full-step teacher latents ``x_0^full``, computed once.

Every stage draws its pairs here, by split name, so that the calibration,
held-out and validation pairs of one seed never overlap (see :data:`SPLITS`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import step_counter
from ..sampler import Sampler, run_batches, select_items

#: Seed offset of each split: a split's pairs are drawn from ``seed + SPLITS[split]``, so the splits of one
#: seed are disjoint (held-out: quality reports; validation: alignment's stopping set).
SPLITS: dict[str, int] = {"calibration": 0, "heldout": 7_777_777, "validation": 3_333_333}

#: Calibration pairs drawn when neither a count nor a prompt file is given.
DEFAULT_CALIB_PAIRS = 32

Pairs = tuple[list[str], list[int]]


@dataclass
class CalibrationSet:
    """Calibration items: noise (C, ...), conditioning, and the full-step teacher latents."""

    prompts: list[str]
    seeds: list[int]
    noise: torch.Tensor
    cond: Any
    uncond: Any = None
    teacher: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def items(self, start: int, stop: int) -> CalibrationSet:
        """Items ``start:stop`` (a copy: noise, conditioning and teacher rows; the same ``info``)."""
        if not 0 <= start < stop <= len(self):
            raise ConfigError(f"items {start}:{stop} are not a non-empty range of the {len(self)} calibration items")
        idx = torch.arange(start, stop, device=self.noise.device)
        return CalibrationSet(self.prompts[start:stop], self.seeds[start:stop], self.noise[start:stop].clone(),
                              select_items(self.cond, idx), select_items(self.uncond, idx),
                              None if self.teacher is None else self.teacher[start:stop].clone(), dict(self.info))

    @property
    def digest(self) -> str:
        """A short hash of what defines the set (prompts, seeds, sampler settings)."""
        h = hashlib.sha256(json.dumps({"p": self.prompts, "s": self.seeds, "i": self.info},
                                      sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl (``{"prompt": ...}`` or a string per line) or .csv file
    (a ``prompt`` column, else the first column)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")  # tolerate the byte-order mark spreadsheets write
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"prompt file {p} cannot be read: {exc.strerror or exc}") from None
    suffix = p.suffix.lower()
    out: list[str] = []
    if suffix == ".txt":
        out = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"prompt file {p}, line {i}: not JSON ({exc.msg})") from None
            if isinstance(obj, str):
                out.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                out.append(obj["prompt"])
            else:
                raise ConfigError(f"prompt file {p}, line {i}: expected a string or an object with a 'prompt' string")
    elif suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            raise ConfigError(f"prompt file {p} is empty")
        header = [h.strip().lower() for h in rows[0]]
        col = header.index("prompt") if "prompt" in header else 0
        body = rows[1:] if "prompt" in header else rows
        out = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        raise ConfigError(f"prompt file {p}: unknown extension {p.suffix!r}; use .txt, .jsonl or .csv")
    if not out:
        raise ConfigError(f"prompt file {p} holds no prompts")
    return out


def pairs_for(prompts: Sequence[str], seeds_per_prompt: int, seed: int) -> Pairs:
    """Every prompt repeated ``seeds_per_prompt`` times with seeds drawn from ``seed``."""
    if seeds_per_prompt < 1:
        raise ConfigError(f"seeds per prompt must be >= 1 (got {seeds_per_prompt})")
    rng = np.random.default_rng(seed)
    ps = [p for p in prompts for _ in range(seeds_per_prompt)]
    return ps, [int(s) for s in rng.integers(0, 2**31 - 1, size=len(ps))]


def subsample_pairs(prompts: list[str], seeds: list[int], n: int, seed: int, source: str) -> Pairs:
    """A seeded draw of ``n`` of the (prompt, seed) pairs, in file order (``--calib-pairs`` with ``--prompts``)."""
    if n > len(prompts):
        raise ConfigError(f"--calib-pairs {n} but the prompt file {source} gives {len(prompts)} pairs "
                          "(prompts x --seeds-per-prompt)")
    keep = sorted(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False).tolist())
    return [prompts[i] for i in keep], [seeds[i] for i in keep]


def calibration_pairs(problem: Any, n: int | None, seed: int, *, seeds_per_prompt: int = 1,
                      prompt_file: str | Path | None = None) -> Pairs:
    """The calibration split: ``n`` (prompt, seed) pairs.

    With ``prompt_file``: its prompts x ``seeds_per_prompt`` (a seeded draw of
    ``n`` of them when given). Otherwise the problem's own prompts
    (:meth:`Problem.prompts`; ``n`` defaults to :data:`DEFAULT_CALIB_PAIRS`, or
    to all of them for a problem with a fixed prompt list), each with
    ``seeds_per_prompt`` seeds drawn from ``seed``.

    Args:
        problem: the problem whose prompts are drawn (unused with ``prompt_file``).
        n: number of pairs, or ``None`` for the default.
        seed: the run's seed.
        seeds_per_prompt: seeds per prompt (>= 1).
        prompt_file: a .txt, .jsonl or .csv prompt file.
    """
    if seeds_per_prompt < 1:
        raise ConfigError(f"--seeds-per-prompt must be >= 1 (got {seeds_per_prompt})")
    if n is not None and n < 1:
        raise ConfigError(f"--calib-pairs must be >= 1 (got {n})")
    if prompt_file is not None:
        prompts, seeds = pairs_for(read_prompt_file(prompt_file), seeds_per_prompt, seed)
        if n is not None:
            prompts, seeds = subsample_pairs(prompts, seeds, n, seed, str(prompt_file))
        return prompts, seeds
    if n is None and not problem.draws_prompts:
        return pairs_for(problem.prompts(0, seed), seeds_per_prompt, seed)
    n = DEFAULT_CALIB_PAIRS if n is None else n
    n_prompts = -(-n // seeds_per_prompt)  # ceil: then keep exactly n pairs
    base = problem.prompts(n_prompts, seed)
    prompts, seeds = pairs_for([base[i % len(base)] for i in range(n_prompts)], seeds_per_prompt, seed)
    return prompts[:n], seeds[:n]


def split_pairs(problem: Any, split: str, n: int, seed: int, calib_prompts: Sequence[str] = ()) -> Pairs:
    """``n`` pairs of a split other than calibration (``heldout``, ``validation``), disjoint from it.

    A problem that draws prompts (tinyflow's grammar) draws fresh prompts and
    seeds from ``seed + SPLITS[split]``; one with a fixed prompt list cycles
    the calibration prompts with the seeds ``seed + SPLITS[split] + i``.

    Args:
        problem: the problem whose prompts are drawn.
        split: ``"heldout"`` or ``"validation"``.
        n: number of pairs (>= 1).
        seed: the run's seed (the calibration split's).
        calib_prompts: the calibration prompts (cycled by problems with a fixed prompt list).
    """
    if split not in SPLITS or split == "calibration":
        raise ConfigError(f"split {split!r} is unknown; choose one of {sorted(set(SPLITS) - {'calibration'})}")
    if n < 1:
        raise ConfigError(f"the {split} split needs >= 1 pairs (got {n})")
    s = seed + SPLITS[split]
    if problem.draws_prompts:
        return pairs_for(problem.prompts(n, s), 1, s)
    base = list(dict.fromkeys(calib_prompts)) or problem.prompts(0, seed)
    return [base[i % len(base)] for i in range(n)], [s + i for i in range(n)]


def run_items(sampler: Sampler, noise: torch.Tensor, cond: Any, uncond: Any = None, batch: int = 64) -> torch.Tensor:
    """Final latents of every item under one sampler, ``batch`` items at a time (progress: :func:`step_counter`)."""
    return run_batches(sampler, noise, cond, uncond, batch, callback=lambda offset, size: step_counter(size)).latent


def make_calibration(make_sampler: Callable[[Any], Sampler], prompts: list[str], seeds: list[int],
                     noise: torch.Tensor, cond: Any, uncond: Any = None, info: dict[str, Any] | None = None,
                     batch: int = 64) -> CalibrationSet:
    """A calibration set with its full-step teacher latents (computed once, in batches)."""
    teacher = run_items(make_sampler(None), noise, cond, uncond, batch)
    return CalibrationSet(list(prompts), list(seeds), noise, cond, uncond, teacher, dict(info or {}))


def weights_digest(module: torch.nn.Module) -> str:
    """Short hash of a model's weights (so a checkpoint never resumes against other weights)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
