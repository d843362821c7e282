"""Static cache policies: which sampler steps run the full transformer.

A policy for an ``N``-step sampler lists the ``K`` steps computed in full; the
other steps reuse cached work. Policies are immutable and stored as small JSON
files (see :meth:`CachePolicy.to_dict` for the format).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import numbers
import operator
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError, PolicyError
from .io import PathLike, dumps_json, loads_json_limited, read_json_limited, write_json
from .specs import ESTIMATORS

FORMAT = "budcache.policy"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MAX_STEPS = 10_000
MAX_FILE_BYTES = 1 << 20
MAX_FILE_DEPTH = 16
MAX_SIGMA = 1e4  # flow-matching sigmas lie in [0, 1], EDM-style ones below ~1e3; float32 must hold sigma**2 safely
KEYS = ("format", "version", "steps", "compute", "sigmas", "meta")
KEYS_V2 = (*KEYS, "estimators")

_P = TypeVar("_P", bound="CachePolicy")

if TYPE_CHECKING:
    import torch


def _is_tensor(v: object) -> bool:
    """Whether ``v`` is a torch tensor, without importing torch (a policy is read, checked and shown without it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, torch.Tensor)


@dataclass(frozen=True)
class CachePolicy:
    """Which of ``steps`` solver steps are computed in full (the rest reuse the cache).

    ``compute`` must be sorted, unique and contain step 0. ``sigmas`` is an optional
    learned schedule of ``steps + 1`` values, strictly decreasing, ending >= 0 and
    at most ``MAX_SIGMA``.
    ``meta`` is free JSON metadata, stored as a deep read-only copy (objects become
    read-only mappings, arrays become tuples).

    ``estimators`` (version 2) names, for every skipped step in ascending order,
    how it is filled (a name of :data:`budcache.estimators.ESTIMATORS`). A
    policy without it (every version-1 file) says nothing itself: its
    ``meta["mechanism"]``, when present, or the sampler's mechanism applies.

    Args:
        steps: N, the solver steps.
        compute: the K computed steps (sorted, unique, containing 0).
        sigmas: optional learned schedule, N + 1 values.
        meta: free JSON metadata.
        estimators: optional estimator name per skipped step (N - K names).
    """

    steps: int
    compute: tuple[int, ...]
    sigmas: tuple[float, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    estimators: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        steps = _check_steps(self.steps)
        object.__setattr__(self, "compute", _check_compute(self.compute, steps))
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", _check_sigmas(self.sigmas, steps))
        object.__setattr__(self, "meta", _freeze_meta(self.meta))
        if self.estimators is not None:
            object.__setattr__(self, "estimators", _check_estimators(self.estimators, steps - len(self.compute)))

    @property
    def estimator(self) -> str | None:
        """The estimator every skipped step uses: the policy's own (``"mixed"`` when they differ), else
        ``meta["mechanism"]``, else ``None`` (the sampler's mechanism decides)."""
        if self.estimators is not None:
            names = set(self.estimators)
            return next(iter(names)) if len(names) == 1 else ("mixed" if names else None)
        mech = self.meta.get("mechanism")
        return mech if isinstance(mech, str) else None

    def estimator_at(self, step: int, default: str = "reuse") -> str | None:
        """The estimator of ``step`` (``None`` for a computed step)."""
        if self.is_computed(step):
            return None
        if self.estimators is not None:
            return self.estimators[self.skipped.index(step)]
        return self.estimator or default

    def with_estimators(self: _P, estimators: str | Sequence[str] | None) -> _P:
        """A copy whose skipped steps use ``estimators`` (one name for all, one per skipped step, or ``None``)."""
        if isinstance(estimators, str):
            estimators = (estimators,) * (self.steps - self.nfe)
        return dataclasses.replace(self, estimators=None if estimators is None else tuple(estimators))

    # ----------------------------------------------------------------- views
    @property
    def nfe(self) -> int:
        """Number of full transformer evaluations (``K``)."""
        return len(self.compute)

    @property
    def skipped(self) -> tuple[int, ...]:
        """Steps that reuse cached work, ascending."""
        computed = set(self.compute)
        return tuple(i for i in range(self.steps) if i not in computed)

    @property
    def mask(self) -> tuple[bool, ...]:
        """``mask[i]`` is True when step ``i`` is computed in full."""
        computed = set(self.compute)
        return tuple(i in computed for i in range(self.steps))

    def mask_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The mask as a 1-D ``torch.bool`` tensor of length ``steps``."""
        import torch

        return torch.tensor(self.mask, dtype=torch.bool, device=device)

    @property
    def speedup_bound(self) -> float:
        """``N / K``: the speed-up if cached steps cost nothing."""
        return self.steps / self.nfe

    def is_computed(self, step: int) -> bool:
        """Whether ``step`` (0..steps-1) is computed in full."""
        if not _is_int(step) or not 0 <= step < self.steps:
            raise ConfigError(f"step must be an int in 0..{self.steps - 1}, got {_brief(step)}")
        pos = bisect.bisect_left(self.compute, step)
        return pos < len(self.compute) and self.compute[pos] == step

    def strip(self) -> str:
        """The mask as text: 'C' for computed steps, '.' for cached ones."""
        return "".join("C" if m else "." for m in self.mask)

    def estimator_strip(self) -> str:
        """One character per step: 'C' computed, else the skipped step's estimator letter
        (:func:`budcache.specs.plan_legend`; '.' where no estimator of budcache's is named, e.g. a peer's)."""
        out = []
        for k, m in enumerate(self.mask):
            if m:
                out.append("C")
            else:
                name = self.estimators[self.skipped.index(k)] if self.estimators is not None else self.estimator
                spec = ESTIMATORS.get(name) if name else None
                out.append(spec.letter if spec is not None else ".")
        return "".join(out)

    def __str__(self) -> str:
        text = self.strip()
        if len(text) > 80:
            text = f"{text[:80]}...(+{len(text) - 80})"
        return (
            f"CachePolicy(N={self.steps}, K={self.nfe}, "
            f"speed-up<={self.speedup_bound:.2f}x, mask={text})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.steps, self.compute, self.sigmas, _thaw(self.meta), self.estimators))

    # ------------------------------------------------------- derived policies
    def with_sigmas(self: _P, sigmas: Sequence[float] | torch.Tensor | None) -> _P:
        """A copy with another schedule (``None`` removes it)."""
        return dataclasses.replace(self, sigmas=sigmas)  # type: ignore[arg-type]

    def with_meta(self: _P, **kv: Any) -> _P:
        """A copy whose metadata is updated with ``kv``."""
        merged = _thaw(self.meta)
        merged.update(kv)
        return dataclasses.replace(self, meta=merged)

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_steps(cls: type[_P], steps: int, compute: Any, **kw: Any) -> _P:
        """Build from step indices in any order (ints, NumPy ints or a 1-D tensor)."""
        if _is_tensor(compute):
            compute = compute.detach().cpu().reshape(-1).tolist()
        if isinstance(compute, (str, bytes, Mapping)) or not hasattr(compute, "__iter__"):
            raise _fail("compute", f"must be a sequence of step indices, got {_type(compute)}")
        values = [_as_index(v, pos) for pos, v in enumerate(compute)]
        return cls(steps, tuple(sorted(values)), **kw)

    @classmethod
    def from_mask(cls: type[_P], mask: Sequence[bool | int] | torch.Tensor, **kw: Any) -> _P:
        """Build from a per-step mask (True/1 = computed); ``steps`` is ``len(mask)``."""
        if _is_tensor(mask):
            if mask.ndim != 1:
                shape = tuple(mask.shape)
                raise PolicyError(f"policy mask: expected a 1-D tensor, got shape {shape}")
            values: list[Any] = mask.detach().cpu().tolist()
        elif isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
            raise PolicyError(
                f"policy mask: expected a sequence of bools or 0/1, got {_type(mask)}"
            )
        else:
            values = list(mask)
        for pos, v in enumerate(values):
            if not (isinstance(v, bool) or (_is_int(v) and v in (0, 1))):
                raise PolicyError(
                    f"policy mask: entry at position {pos} must be a bool or 0/1, got {_brief(v)}"
                )
        return cls(len(values), tuple(i for i, v in enumerate(values) if v), **kw)

    @classmethod
    def full(cls: type[_P], steps: int, **kw: Any) -> _P:
        """Compute every step (no caching)."""
        return cls(_check_steps(steps), tuple(range(steps)), **kw)

    @classmethod
    def uniform(cls: type[_P], steps: int, nfe: int, estimator: str | None = None, **kw: Any) -> _P:
        """Compute ``nfe`` evenly spaced steps: ``floor(i * steps / nfe)`` for i < nfe.

        Args:
            steps: N.
            nfe: K.
            estimator: the estimator of every skipped step (stored in the policy, version 2);
                ``None`` leaves it to the sampler's mechanism, as version 1 did.
        """
        steps = _check_steps(steps)
        if not _is_int(nfe) or not 1 <= nfe <= steps:
            raise _fail(
                "compute", f"nfe {_brief(nfe)} out of range for {steps} steps (allowed 1..{steps})"
            )
        if estimator is not None:
            kw["estimators"] = (estimator,) * (steps - nfe)
        return cls(steps, tuple(i * steps // nfe for i in range(nfe)), **kw)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON form: format, version, steps, compute, sigmas (or None), meta; version 2 adds
        ``estimators`` (one name per skipped step). A policy without estimators is written as version 1,
        so files readable by earlier releases stay so."""
        out = {
            "format": FORMAT,
            "version": 1 if self.estimators is None else VERSION,
            "steps": self.steps,
            "compute": list(self.compute),
            "sigmas": None if self.sigmas is None else list(self.sigmas),
            "meta": _thaw(self.meta),
        }
        if self.estimators is not None:
            out["estimators"] = list(self.estimators)
        return out

    @classmethod
    def from_dict(cls: type[_P], d: Any) -> _P:
        """Strictly validate and build from the JSON form produced by :meth:`to_dict`."""
        allowed = ", ".join(KEYS)
        if not isinstance(d, Mapping):
            raise PolicyError(f"policy: expected a JSON object with keys {allowed}, got {_type(d)}")
        v2 = d.get("version") == 2 and _is_int(d.get("version"))
        if v2:
            allowed = ", ".join(KEYS_V2)
        unknown = [k for k in d if k not in (KEYS_V2 if v2 else KEYS)]
        if unknown:
            raise PolicyError(f"policy: unknown key(s) {_short(unknown)} (allowed keys: {allowed})")
        missing = [k for k in KEYS if k not in d]
        if missing:
            raise PolicyError(
                f"policy: missing key(s) {_short(missing)} (required keys: {allowed})"
            )
        if d["format"] != FORMAT or not isinstance(d["format"], str):
            raise _fail("format", f"expected {FORMAT!r}, got {_brief(d['format'])}")
        if not _is_int(d["version"]) or d["version"] not in SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            raise _fail(
                "version",
                f"unsupported version {_brief(d['version'])} (supported versions: {supported})",
            )
        if not _is_int(d["steps"]):
            raise _fail("steps", f"must be an integer in 1..{MAX_STEPS}, got {_type(d['steps'])}")
        if not isinstance(d["compute"], (list, tuple)):
            raise _fail("compute", f"must be an array of step indices, got {_type(d['compute'])}")
        if d["sigmas"] is not None and not isinstance(d["sigmas"], (list, tuple)):
            raise _fail("sigmas", f"must be an array of numbers or null, got {_type(d['sigmas'])}")
        if not isinstance(d["meta"], Mapping):
            raise _fail("meta", f"must be an object, got {_type(d['meta'])}")
        est = d.get("estimators")
        if v2 and est is not None and not isinstance(est, (list, tuple)):
            raise _fail("estimators", f"must be an array of estimator names or null, got {_type(est)}")
        return cls(d["steps"], d["compute"], d["sigmas"], d["meta"], None if est is None else tuple(est))

    def to_json(self) -> str:
        """The JSON text written by :meth:`save`."""
        return dumps_json(self.to_dict())

    @classmethod
    def loads(cls: type[_P], text: str | bytes) -> _P:
        """Parse a policy from JSON text (same limits as :meth:`load`)."""
        data = loads_json_limited(
            text, max_bytes=MAX_FILE_BYTES, max_depth=MAX_FILE_DEPTH, what="policy JSON"
        )
        return cls.from_dict(data)

    def save(self, path: PathLike) -> Path:
        """Write the policy to ``path`` atomically; returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[_P], path: PathLike) -> _P:
        """Read a policy file; every problem is a :class:`PolicyError` naming the path."""
        data = read_json_limited(
            path, max_bytes=MAX_FILE_BYTES, max_depth=MAX_FILE_DEPTH, what="policy file"
        )
        try:
            return cls.from_dict(data)
        except PolicyError as exc:
            raise PolicyError(f"invalid policy file '{Path(path)}': {exc}") from exc


# ---------------------------------------------------------------- validation
def _fail(name: str, message: str) -> PolicyError:
    return PolicyError(f"policy field {name!r}: {message}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _brief(v: object) -> str:
    """A short repr, safe for huge ints and long values."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"<int with about {int(v.bit_length() * 0.30103) + 1} digits>"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(values: Sequence[Any], limit: int = 12) -> str:
    items = ", ".join(_brief(v) for v in values[:limit])
    more = f", ... ({len(values)} total)" if len(values) > limit else ""
    return f"[{items}{more}]"


def _type(v: object) -> str:
    """Describe a value's type in JSON terms (with the value for scalars)."""
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, (str, bool, int, float)):
        return f"{type(v).__name__} {_brief(v)}"
    return type(v).__name__


def _as_index(v: object, pos: int) -> int:
    if not isinstance(v, bool):
        try:
            return operator.index(v)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise _fail("compute", f"entry at position {pos} must be an int step index, got {_brief(v)}")


def _check_steps(steps: object) -> int:
    if not _is_int(steps):
        raise _fail("steps", f"must be an int in 1..{MAX_STEPS}, got {_type(steps)}")
    if not 1 <= steps <= MAX_STEPS:  # type: ignore[operator]
        raise _fail("steps", f"{_brief(steps)} out of range (allowed 1..{MAX_STEPS})")
    return steps  # type: ignore[return-value]


def _check_compute(compute: object, steps: int) -> tuple[int, ...]:
    if not isinstance(compute, (list, tuple, range)):
        raise _fail("compute", f"must be a list of step indices, got {_type(compute)}")
    values = tuple(compute)
    for pos, v in enumerate(values):
        if not _is_int(v):
            raise _fail(
                "compute", f"entry at position {pos} must be an int step index, got {_brief(v)}"
            )
    if not values:
        raise _fail("compute", f"at least one step must be computed (allowed budget 1..{steps})")
    if len(values) > steps:
        raise _fail("compute", f"budget {len(values)} exceeds steps {steps} (allowed 1..{steps})")
    seen: set[int] = set()
    for v in values:
        if not 0 <= v < steps:
            raise _fail("compute", f"step index {_brief(v)} out of range (allowed 0..{steps - 1})")
        if v in seen:
            raise _fail("compute", f"duplicate step index {v} (got {_short(values)})")
        seen.add(v)
    for pos in range(1, len(values)):
        if values[pos] < values[pos - 1]:
            raise _fail(
                "compute",
                f"step indices must be sorted ascending: {values[pos]} at position {pos} "
                f"follows {values[pos - 1]} (got {_short(values)})",
            )
    if values[0] != 0:
        raise _fail("compute", f"step 0 must always be computed (got {_short(values)})")
    return values


def _check_estimators(estimators: object, skipped: int) -> tuple[str, ...]:
    if isinstance(estimators, (str, bytes, Mapping)) or not isinstance(estimators, Sequence):
        raise _fail("estimators", f"must be a sequence of estimator names, got {_type(estimators)}")
    if len(estimators) != skipped:
        raise _fail("estimators", f"has {len(estimators)} names but the policy skips {skipped} steps "
                    "(one name per skipped step, ascending)")
    for pos, name in enumerate(estimators):
        if not isinstance(name, str) or name not in ESTIMATORS:
            raise _fail("estimators", f"entry {pos} is {_brief(name)}, not an estimator "
                        f"(allowed: {', '.join(ESTIMATORS)})")
    return tuple(estimators)


def _check_sigmas(sigmas: object, steps: int) -> tuple[float, ...]:
    if _is_tensor(sigmas):
        sigmas = sigmas.detach().cpu()
    if hasattr(sigmas, "ndim") and hasattr(sigmas, "tolist"):  # tensor or NumPy array
        if sigmas.ndim != 1:
            raise _fail("sigmas", f"expected a 1-D array, got shape {tuple(sigmas.shape)}")
        sigmas = sigmas.tolist()
    if not isinstance(sigmas, (list, tuple)):
        raise _fail("sigmas", f"must be a list of {steps + 1} numbers or None, got {_type(sigmas)}")
    if len(sigmas) != steps + 1:
        raise _fail("sigmas", f"expected {steps + 1} values (steps + 1), got {len(sigmas)}")
    values: list[float] = []
    for pos, v in enumerate(sigmas):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise _fail("sigmas", f"value at index {pos} must be a number, got {_brief(v)}")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise _fail("sigmas", f"value at index {pos} is not finite ({_brief(v)})")
        if abs(f) > MAX_SIGMA:
            raise _fail("sigmas", f"value at index {pos} is {f!r}, out of range (allowed 0..{MAX_SIGMA:g})")
        if values and f >= values[-1]:
            raise _fail(
                "sigmas",
                f"must be strictly decreasing: index {pos} has {f!r} "
                f">= {values[-1]!r} at index {pos - 1}",
            )
        values.append(f)
    if values[-1] < 0:
        raise _fail("sigmas", f"last value must be >= 0, got {values[-1]!r}")
    return tuple(values)


def _json_default(obj: object) -> object:
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _freeze_meta(meta: object) -> Mapping[str, Any]:
    if not isinstance(meta, Mapping):
        raise _fail("meta", f"must be a mapping with str keys, got {_type(meta)}")
    for key in meta:
        if not isinstance(key, str):
            raise _fail("meta", f"keys must be str, got {_brief(key)}")
    try:
        text = json.dumps(dict(meta), allow_nan=False, default=_json_default)
        return _freeze(json.loads(text))
    except RecursionError:
        raise _fail("meta", "nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise _fail(
            "meta",
            "must be JSON-serialisable (str, int, float, bool, None, lists, "
            f"str-keyed mappings; no NaN/Infinity): {exc}",
        ) from None


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_thaw(v) for v in obj]
    return obj
