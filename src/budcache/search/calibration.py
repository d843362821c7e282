"""Calibration sets: conditions x seeds with their full-step teacher outputs.

The search loss of a mask ``m`` is
``L(m) = mean_{(c,z)} loss(x_0^m(z, c), x_0^full(z, c))`` (default: latent MSE),
so the set holds the noise ``z``, the encoded conditions ``c`` and the
teacher latents ``x_0^full``, computed once.
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

#: Per-item loss between final latents and the teacher's: (C, ...) x (C, ...) -> (C,).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def latent_mse(x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item ``mean((x - x_full)^2)``."""
    return (x - teacher).pow(2).flatten(1).mean(1)


def latent_l1(x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item ``mean(|x - x_full|)``."""
    return (x - teacher).abs().flatten(1).mean(1)


def latent_log_mse(x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-item ``log(mean((x - x_full)^2))``: its mean is minus the mean latent PSNR (over ln 10 / 10).

    The plain MSE averages errors, so a few hard items dominate it; the log
    weighs every item's relative error equally, which is what a per-image
    quality metric (PSNR, paired wins) rewards.
    """
    return torch.log((x - teacher).pow(2).flatten(1).mean(1).clamp_min(1e-20))


LOSSES: dict[str, LossFn] = {"mse": latent_mse, "l1": latent_l1, "logmse": latent_log_mse}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ConfigError(f"loss {name!r} is unknown; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


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


def tinyflow_prompts(n: int, seed: int = 12345) -> list[str]:
    """``n`` distinct tinyflow prompts covering every template (single, fully specified, pair, count)."""
    from ..tinyflow import grammar

    rng = np.random.default_rng(seed)
    mixes = [
        grammar.TemplateMix(empty=0, single=1, pair=0, count=0),
        grammar.TemplateMix(empty=0, single=1, pair=0, count=0, p_size=1, p_colour=1, p_position=1),
        grammar.TemplateMix(empty=0, single=0, pair=1, count=0),
        grammar.TemplateMix(empty=0, single=0, pair=0, count=1),
    ]
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        p = grammar.prompt_of(grammar.sample_spec(rng, mixes[len(out) % len(mixes)]))
        tries += 1
        if p not in seen or tries > 50 * n:
            seen.add(p)
            out.append(p)
    return out


def pairs_for(prompts: Sequence[str], seeds_per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """Every prompt repeated ``seeds_per_prompt`` times with seeds drawn from ``seed``."""
    if seeds_per_prompt < 1:
        raise ConfigError(f"seeds per prompt must be >= 1 (got {seeds_per_prompt})")
    rng = np.random.default_rng(seed)
    ps = [p for p in prompts for _ in range(seeds_per_prompt)]
    return ps, [int(s) for s in rng.integers(0, 2**31 - 1, size=len(ps))]
