"""Learnable sigma schedules, strictly decreasing by construction.

Every schedule holds one flat parameter vector ``theta`` (float64) and maps it
to ``N + 1`` sigmas in the base schedule's dtype; at ``theta`` as initialised
the output equals the base schedule (to float rounding). Ends stay fixed:
``sigma_0 = base_0`` (noise) and ``sigma_N = base_N``.

- ``ld3`` (global softmax gaps): ``g = eps + (1 - N eps) softmax(theta)``
  (N gaps summing to 1), ``sigma_i = sigma_N + (sigma_0 - sigma_N) sum_{j>=i} g_j``.
  The reference writes it with ``N + 1`` logits and
  ``u = (c - c_N) / (c_0 - c_N)``, ``c = flip(cumsum(softmax(p)))``; its first
  logit cancels out of ``u``, so this form drops it and no parameter is dead.
- ``offset`` (bounded offsets): ``sigma_i = base_i + b_i tanh(theta_i)`` on chosen
  indices, ``b_i = min(bound, 0.49 min(base_{i-1} - base_i, base_i - base_{i+1}))``,
  so two neighbours together move less than their gap.
- ``segment`` (per-segment gaps): the sigmas of computed steps (and the end)
  are fixed anchors; inside a segment ``a < b`` the ``b - a`` gaps are
  ``(base_a - base_b) (eps + (1 - n eps) softmax(theta_seg))``.

``eps`` (a floor on every gap, relative to the span it divides) keeps the
schedule strictly decreasing in float32 however large an update is; it is
``min(min_gap, base_gap / 2)``, so the base schedule stays reachable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError

#: Relative floor on every gap (a fraction of the span the gaps divide).
MIN_GAP = 1e-5


def _check_base(base: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(base) or base.dim() != 1 or base.numel() < 2 or not base.is_floating_point():
        raise ConfigError("base sigmas must be a 1-D floating-point tensor of N+1 values")
    b = base.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(b).all()):
        raise ConfigError("base sigmas must be finite")
    if not bool((b[1:] < b[:-1]).all()):
        raise ConfigError(f"base sigmas must be strictly decreasing; got {[round(v, 6) for v in b.tolist()]}")
    return b


def _floor(gaps: torch.Tensor, min_gap: float) -> float:
    """``eps = min(min_gap, min(gaps) / 2)`` for gaps that sum to 1."""
    return min(float(min_gap), 0.5 * float(gaps.min()))


class Schedule(torch.nn.Module):
    """A learnable schedule: ``forward() -> (N+1,)`` sigmas; ``theta`` is the one parameter."""

    kind = ""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.dtype = base.dtype
        self.device = base.device
        self.register_buffer("base", _check_base(base), persistent=False)
        self.steps = self.base.numel() - 1
        self.theta = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))

    @property
    def learnable(self) -> tuple[int, ...]:
        """Indices of the sigmas that the parameters move."""
        raise NotImplementedError  # pragma: no cover - interface

    def sigmas64(self) -> torch.Tensor:
        """The schedule in float64 (differentiable in ``theta``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def forward(self) -> torch.Tensor:
        """The schedule in the base dtype and device (differentiable in ``theta``)."""
        return self.sigmas64().to(device=self.device, dtype=self.dtype)

    def describe(self) -> dict:
        """JSON description for policy metadata and checkpoints."""
        return {"kind": self.kind, "steps": self.steps, "parameters": int(self.theta.numel()),
                "learnable": list(self.learnable)}


class LD3Schedule(Schedule):
    """Global softmax gaps over all N steps with fixed ends (see module docstring)."""

    kind = "ld3"

    def __init__(self, base: torch.Tensor, min_gap: float = MIN_GAP) -> None:
        super().__init__(base)
        b = self.base
        self.span = float(b[0] - b[-1])
        g = (b[:-1] - b[1:]) / self.span                          # (N,) base gaps, sum 1
        n = g.numel()
        self.eps = _floor(g, min_gap)
        w = (g - self.eps) / (1.0 - n * self.eps)
        self.theta = torch.nn.Parameter(torch.log(w))

    @property
    def learnable(self) -> tuple[int, ...]:
        return tuple(range(1, self.steps))

    def sigmas64(self) -> torch.Tensor:
        n = self.theta.numel()
        g = self.eps + (1.0 - n * self.eps) * torch.softmax(self.theta, 0)   # (N,)
        tail = torch.flip(torch.cumsum(torch.flip(g, (0,)), 0), (0,))       # tail[i] = sum_{j>=i} g_j
        inner = self.base[-1] + self.span * tail[1:]                        # sigmas 1..N-1
        return torch.cat([self.base[:1], inner, self.base[-1:]])


class OffsetSchedule(Schedule):
    """``base + b tanh(theta)`` on chosen indices (see module docstring)."""

    kind = "offset"

    def __init__(self, base: torch.Tensor, indices: Sequence[int] | None = None, bound: float = 0.005) -> None:
        super().__init__(base)
        n = self.steps
        idx = list(range(1, n)) if indices is None else sorted(set(int(i) for i in indices))
        bad = [i for i in idx if not 1 <= i <= n - 1]
        if bad:
            raise ConfigError(f"offset indices {bad} out of range: only interior sigmas 1..{n - 1} can move")
        if not idx:
            raise ConfigError("offset parametrisation: no index to move (give at least one interior index)")
        if not bound > 0:
            raise ConfigError(f"offset bound must be > 0 (got {bound})")
        gaps = self.base[:-1] - self.base[1:]
        self.idx = tuple(idx)
        self.register_buffer("index", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.register_buffer("bounds", torch.tensor([min(float(bound), 0.49 * float(min(gaps[i - 1], gaps[i])))
                                                     for i in idx], dtype=torch.float64), persistent=False)
        self.theta = torch.nn.Parameter(torch.zeros(len(idx), dtype=torch.float64))

    @property
    def learnable(self) -> tuple[int, ...]:
        return self.idx

    def sigmas64(self) -> torch.Tensor:
        return self.base.index_add(0, self.index, self.bounds * torch.tanh(self.theta))


class SegmentSchedule(Schedule):
    """Per-segment softmax gaps between fixed anchors (computed steps and the end)."""

    kind = "segment"

    def __init__(self, base: torch.Tensor, compute: Sequence[int], min_gap: float = MIN_GAP) -> None:
        super().__init__(base)
        n = self.steps
        anchors = sorted(set(int(c) for c in compute) | {0, n})
        if anchors[0] < 0 or anchors[-1] > n:
            raise ConfigError(f"computed steps must lie in 0..{n - 1}")
        self.segments: list[tuple[int, int, int, float]] = []  # (start, end, theta offset, eps)
        thetas = []
        off = 0
        for a, b in zip(anchors[:-1], anchors[1:]):
            if b - a < 2:
                continue
            drop = self.base[a] - self.base[b]
            g = (self.base[a:b] - self.base[a + 1:b + 1]) / drop
            eps = _floor(g, min_gap)
            thetas.append(torch.log((g - eps) / (1.0 - g.numel() * eps)))
            self.segments.append((a, b, off, eps))
            off += b - a
        if not self.segments:
            raise ConfigError("segment parametrisation: every step computes, so no sigma lies between two "
                              "anchors; use 'ld3' or 'offset' (e.g. for a plain K-step sampler)")
        self.theta = torch.nn.Parameter(torch.cat(thetas))

    @property
    def learnable(self) -> tuple[int, ...]:
        return tuple(i for a, b, _, _ in self.segments for i in range(a + 1, b))

    def sigmas64(self) -> torch.Tensor:
        parts = []
        prev = 0
        for a, b, off, eps in self.segments:
            n = b - a
            g = eps + (1.0 - n * eps) * torch.softmax(self.theta[off:off + n], 0)
            drop = self.base[a] - self.base[b]
            inner = self.base[a] - drop * torch.cumsum(g, 0)[:-1]           # sigmas a+1..b-1
            parts += [self.base[prev:a + 1], inner]
            prev = b
        parts.append(self.base[prev:])
        return torch.cat(parts)


PARAMETRISATIONS = ("ld3", "offset", "segment")


def make_schedule(kind: str, base: torch.Tensor, mask: Sequence[bool] | None = None, *,
                  offset_bound: float = 0.005, offset_indices: str = "all",
                  min_gap: float = MIN_GAP) -> Schedule:
    """The learnable schedule ``kind`` initialised at ``base`` for a cache mask (``None``: all compute).

    ``offset_indices``: ``"all"`` interior sigmas, or ``"skipped"``: those of cached steps only.
    """
    n = base.numel() - 1
    m = [True] * n if mask is None else [bool(v) for v in mask]
    if len(m) != n:
        raise ConfigError(f"the mask has {len(m)} steps but the schedule has {n}")
    if kind == "ld3":
        return LD3Schedule(base, min_gap)
    if kind == "offset":
        if offset_indices == "all":
            idx = None
        elif offset_indices == "skipped":
            idx = [k for k in range(1, n) if not m[k]]
            if not idx:
                raise ConfigError("offset indices 'skipped': every step computes, so nothing would move; use 'all'")
        else:
            raise ConfigError(f"offset indices {offset_indices!r} unknown; choose 'all' or 'skipped'")
        return OffsetSchedule(base, idx, offset_bound)
    if kind == "segment":
        return SegmentSchedule(base, [k for k in range(n) if m[k]], min_gap)
    raise ConfigError(f"parametrisation {kind!r} is unknown; choose one of {list(PARAMETRISATIONS)}")
