"""A peer's cache installed on the transformer for one generation, its cost counted from real block runs.

Shared by the diffusers peers (:mod:`.diffusers_peers`) and cache-dit
(:mod:`.cachedit`). Peer hooks decide with one scalar per transformer call,
so input-dependent ones (FirstBlockCache, DBCache) sample one element per
call: batching would tie the images' decisions together. Their cost is
counted exactly: a forward hook on an inner module of every block counts the
block runs, and

    nfe = sum_b runs_b w_b / (sum_b w_b * passes)

with ``w_b`` the block's parameter count (a probe block on a skipped step
costs its fraction of the stack) and ``passes`` the transformer calls per
step (2 with guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..sampler import select_items
from .base import MethodRun
from .common import run_sampler


def passes(problem: Any) -> int:
    """Transformer calls per step: 2 with classifier-free guidance, else 1."""
    return 2 if float(problem.guidance) != 1.0 else 1


def _elements(n: int) -> Iterator[torch.Tensor]:
    for i in range(n):
        yield torch.tensor([i])


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's repeated blocks in call order (every ``ModuleList`` child named ``*blocks*``)."""
    blocks: list[torch.nn.Module] = []
    for name, child in transformer.named_children():
        if "block" in name and isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    if not blocks:
        raise ConfigError(f"{type(transformer).__name__} has no block lists (a ModuleList named '*blocks*')")
    return blocks


class BlockWork:
    """Counts real block runs: a forward hook on each block's first parametrised child module.

    A cache hook that skips a block replaces the block's forward, so the inner
    module does not run and is not counted. ``work`` is the parameter-weighted
    number of stack runs: ``sum_b runs_b w_b / sum_b w_b``.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.blocks = transformer_blocks(transformer)
        self.weights = [sum(p.numel() for p in b.parameters()) for b in self.blocks]
        self.runs = [0] * len(self.blocks)
        self._handles = []
        for i, block in enumerate(self.blocks):
            inner = next((m for m in block.children() if any(True for _ in m.parameters())), None)
            if inner is None:
                raise ConfigError(f"block {i} of {type(transformer).__name__} has no parametrised child to count")
            self._handles.append(inner.register_forward_hook(self._counter(i)))

    def _counter(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.runs[i] += 1
        return hook

    @property
    def work(self) -> float:
        return sum(r * w for r, w in zip(self.runs, self.weights)) / sum(self.weights)

    @property
    def full_runs(self) -> int:
        """Runs of the last block: how many times the whole stack ran."""
        return self.runs[-1]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> BlockWork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



@dataclass
class HookMethod:
    """A peer's cache applied unchanged to the transformer for each generation, then removed.

    ``install(transformer)`` applies the peer's hooks and returns a function
    that removes them. A diffusers pipeline resets stateful hooks at the end
    of every call; budcache's sampler has no such call, and without a reset
    TaylorSeer's step counter runs on into the next generation (its second
    image differs from the first). Fresh hooks per generation give every
    generation the state of a pipeline call, even after an interrupted one.
    """

    name: str = "hook"
    kind: str = "threshold"
    per_element: bool = False

    def install(self, transformer: torch.nn.Module) -> Callable[[], None]:  # pragma: no cover - interface
        raise NotImplementedError

    def generate(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        """One hooked generation of the whole batch; NFE counted from block runs (one value for the batch)."""
        tr = problem.transformer
        remove = self.install(tr)
        try:
            with BlockWork(tr) as work:
                res = run_sampler(problem.make_sampler(None), noise, cond, uncond)
        finally:
            remove()
        nfe = work.work / passes(problem)
        b = noise.shape[0]
        return MethodRun(res.latent, torch.full((b,), nfe, dtype=torch.float64),
                         {"full_runs": work.full_runs / passes(problem)})

    def sample(self, problem: Any, noise: torch.Tensor, cond: Any, uncond: Any = None) -> MethodRun:
        if not self.per_element or noise.shape[0] == 1:
            return self.generate(problem, noise, cond, uncond)
        runs = [self.generate(problem, noise[i], select_items(cond, i), select_items(uncond, i))
                for i in _elements(len(noise))]
        return MethodRun(torch.cat([r.latent for r in runs]), torch.cat([r.nfe for r in runs]),
                         {"full_runs": [r.extra["full_runs"] for r in runs]})

    def mean_nfe(self, problem: Any, calib: Any) -> float:
        """Mean NFE over the calibration set with the current settings."""
        return float(self.sample(problem, calib.noise, calib.cond, calib.uncond).nfe.mean())

