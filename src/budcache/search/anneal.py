"""Budget-exact mask search: simulated annealing, then steepest-descent hill climbing.

Masks are compute sets with exactly K steps, the first ``P = max(1, K//4)``
forced. Every move keeps K:

- SA proposal: with probability ``p_single`` move one computed step (>= P) to a
  free step (>= P), within ``radius`` with probability ``p_local``, else
  anywhere; otherwise move two at once. Accept with Metropolis,
  ``exp(-(L_new - L_cur) / (T s))``, ``T = t_max (t_min / t_max)^(it / iters)``, with
  ``s = 1`` (the reference's absolute rule, default) or, with ``relative``, the
  restart's starting loss (then raise ``t_max``: neighbouring masks differ by
  10-50% of the loss, so a relative ``t_max`` of 0.05 anneals almost greedily).
- HC from SA's state: the neighbourhood is, for every movable computed step,
  each free step within ``radius`` plus ``far_jumps`` random far targets; take
  the best strictly improving neighbour, stop at a local minimum or after
  ``hc_rounds`` rounds. The whole neighbourhood is scored as one batch.

The loss memo is shared across SA, HC and restarts. Seeded and deterministic;
a checkpoint (JSON, atomic) is written after every accepted move, and
:func:`search` with ``resume=True`` continues a killed run to the same result.

SA is sequential; for parallel evaluators, ``sa_batch > 1`` scores the next
``sa_batch`` proposals in one call, speculating that each is rejected after its
Metropolis draw (the common case once the temperature has dropped). The loop
then replays them with the real generator, so the search is exactly the
sequential one; a wrong guess only costs the evaluations after it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelOutputError
from ..io import read_json_limited, write_json
from ..specs import COMPUTE, NAMES

Compute = tuple[int, ...]
LossesFn = Callable[[Sequence[Compute]], list[float]]


@dataclass(frozen=True)
class SearchConfig:
    """Search settings; defaults are the reference implementation's."""

    steps: int
    nfe: int
    sa_iters: int = 200
    t_max: float = 0.05
    t_min: float = 1e-5
    radius: int = 3
    p_single: float = 0.9
    p_local: float = 0.7
    hc_rounds: int = 20
    far_jumps: int = 2
    restarts: int = 1
    seed: int = 0
    prefix: int | None = None
    relative: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.nfe <= self.steps:
            raise ConfigError(f"nfe {self.nfe} must lie in 1..{self.steps} (the number of steps)")
        if self.sa_iters < 0 or self.hc_rounds < 0 or self.restarts < 1 or self.radius < 1:
            raise ConfigError("sa_iters and hc_rounds must be >= 0, restarts and radius >= 1")
        if not 0 < self.t_min <= self.t_max:
            raise ConfigError(f"temperatures must satisfy 0 < t_min <= t_max (got {self.t_min}, {self.t_max})")
        if self.prefix is not None and not 1 <= self.prefix <= self.nfe:
            raise ConfigError(f"prefix {self.prefix} must lie in 1..nfe={self.nfe}")

    @property
    def forced(self) -> int:
        """Number of forced leading computed steps ``P``."""
        return self.prefix if self.prefix is not None else max(1, self.nfe // 4)


@dataclass
class SearchResult:
    """Best compute set found, its loss, and the search's history."""

    compute: Compute
    loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    wall_s: float = 0.0


def memo_scores(memo: dict[Compute, float], losses: LossesFn, cands: Sequence[Compute], *,
                what: str = "compute set", stored: Callable[[], None] | None = None) -> list[float]:
    """The losses of ``cands``: those missing from ``memo`` are scored once each by ``losses`` (first-seen order)
    and stored, then ``stored()`` is called (e.g. to write a checkpoint). A non-finite loss raises
    :class:`ModelOutputError` naming its ``what`` (a compute set, or an estimator plan)."""
    todo = [c for c in dict.fromkeys(cands) if c not in memo]
    if todo:
        for c, v in zip(todo, losses(todo)):
            if not math.isfinite(v):
                raise ModelOutputError(f"loss of {what} {list(c)} is not finite ({v}): the model produced NaN or "
                                       f"Inf on this {'mask' if what == 'compute set' else what.split()[-1]}")
            memo[c] = v
        if stored is not None:
            stored()
    return [memo[c] for c in cands]


def random_init(cfg: SearchConfig, rng: np.random.Generator) -> Compute:
    """Forced prefix plus a random sample of the remaining budget."""
    p = cfg.forced
    rest = rng.choice(np.arange(p, cfg.steps), size=cfg.nfe - p, replace=False) if cfg.nfe > p else []
    return tuple(sorted([*range(p), *(int(r) for r in rest)]))


def fit_budget(compute: Sequence[int], cfg: SearchConfig) -> Compute:
    """Adapt a compute set to ``cfg.nfe`` (warm start across budgets): add or drop steps evenly."""
    cur = set(int(c) for c in compute) | set(range(cfg.forced))
    while len(cur) > cfg.nfe:
        movable = sorted(c for c in cur if c >= cfg.forced)
        # drop the step whose neighbours are closest together (least coverage lost)
        gaps = [(min((c - max([d for d in cur if d < c], default=-1)),
                     (min([d for d in cur if d > c], default=cfg.steps) - c)), c) for c in movable]
        cur.remove(min(gaps)[1])
    while len(cur) < cfg.nfe:
        free = [k for k in range(cfg.forced, cfg.steps) if k not in cur]
        cur.add(max(free, key=lambda k: min(abs(k - c) for c in cur)))
    return tuple(sorted(cur))


def sa_proposal(cur: Compute, cfg: SearchConfig, rng: np.random.Generator) -> Compute:
    """One budget-preserving SA move (see module docstring)."""
    p = cfg.forced
    cset = set(cur)
    movable = [c for c in cur if c >= p]
    free = [k for k in range(p, cfg.steps) if k not in cset]
    if not movable or not free:
        return cur
    if rng.random() < cfg.p_single or len(movable) < 2 or len(free) < 2:
        src = movable[rng.integers(len(movable))]
        local = [t for t in free if abs(t - src) <= cfg.radius]
        if rng.random() < cfg.p_local and local:
            dst = local[rng.integers(len(local))]
        else:
            dst = free[rng.integers(len(free))]
        cset.remove(src)
        cset.add(dst)
    else:
        for s in rng.choice(movable, 2, replace=False):
            cset.remove(int(s))
        for d in rng.choice(free, 2, replace=False):
            cset.add(int(d))
    return tuple(sorted(cset))


def block_shifts(cur: Compute, cfg: SearchConfig) -> list[Compute]:
    """Every budget-exact block shift: movable computed steps ``c_i..c_j`` (``i <= j``) all moved by ``d = +-1``.

    A shift keeps K and the prefix when the block neither meets its neighbour
    (``c_i - 1 > c_{i-1}`` for ``d = -1``, ``c_j + 1 < c_{j+1}`` for ``d = +1``) nor
    leaves ``P..N-1``. Deep minima of the loss often differ by a run of computed
    steps moved by one, which one-step moves can only reach through worse masks.
    """
    c, p = list(cur), cfg.forced
    first = next((i for i, k in enumerate(c) if k >= p), len(c))
    out: list[Compute] = []
    for i in range(first, len(c)):
        down = c[i] - 1 >= p and (i == first or c[i] - 1 > c[i - 1])
        for j in range(i, len(c)):
            up = c[j] + 1 <= cfg.steps - 1 and (j == len(c) - 1 or c[j] + 1 < c[j + 1])
            for d, ok in ((-1, down), (1, up)):
                if ok:
                    out.append(tuple(c[:i] + [k + d for k in c[i:j + 1]] + c[j + 1:]))
    return out


def hc_neighbourhood(cur: Compute, cfg: SearchConfig, rng: np.random.Generator) -> list[Compute]:
    """Local moves within ``radius`` of every movable computed step, plus random far jumps."""
    p = cfg.forced
    cset = set(cur)
    out: dict[Compute, None] = {}
    for c in cur:
        if c < p:
            continue
        for t in range(max(p, c - cfg.radius), min(cfg.steps - 1, c + cfg.radius) + 1):
            if t not in cset:
                out[tuple(sorted((cset - {c}) | {t}))] = None
    slots = list(range(p, cfg.steps))
    for c in cur:
        if c < p:
            continue
        for _ in range(cfg.far_jumps):
            t = slots[rng.integers(len(slots))]
            if t not in cset:
                out[tuple(sorted((cset - {c}) | {t}))] = None
    out.pop(tuple(cur), None)
    return list(out)


def _temperature(cfg: SearchConfig, it: int) -> float:
    return cfg.t_max * (cfg.t_min / cfg.t_max) ** (it / max(1, cfg.sa_iters))


def _save(path: Path, payload: dict[str, Any]) -> None:
    write_json(path, payload)


CHECKPOINT_FORMAT = "budcache.search-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a content digest ("sha256"); version 1 files (without it) are still read
_MAX_CHECKPOINT_BYTES = 64 * 2**20


def content_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's canonical JSON, its own ``sha256`` field left out."""
    import hashlib
    import json

    body = {k: v for k, v in payload.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_checkpoint(path: Path, *, kind: str, title: str, fmt: str, versions: Sequence[int],
                    identity: dict[str, Any], differs: str, foreign: str = "", max_depth: int = 8,
                    digest_from: int = 1) -> tuple[dict[str, Any], Callable[[str], ConfigError]]:
    """A checkpoint's JSON after the checks every kind shares; ``(data, bad)`` where ``bad(why)`` words a
    further problem. Each problem is a one-line ConfigError naming the file (``kind``: e.g. "search checkpoint").

    Checked in order: size and depth; ``format == fmt`` (else "not a ``title``", with the advice
    ``foreign``); ``version`` in ``versions``; the ``sha256`` content digest (:func:`content_digest`; versions
    from ``digest_from`` on); the fields of ``identity`` (the run's config and calibration digest), else
    ``differs`` names what may differ.
    """
    data = read_json_limited(path, max_bytes=_MAX_CHECKPOINT_BYTES, max_depth=max_depth, what=kind,
                             error=ConfigError)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{kind} '{path}': {why}")

    if not isinstance(data, dict) or data.get("format") != fmt:
        raise bad(f"not a {title} (expected format {fmt!r}){foreign}")
    if type(data.get("version")) is not int or data["version"] not in versions:
        raise bad(f"unsupported version {data.get('version')!r} (supported: {', '.join(map(str, versions))})")
    if data["version"] >= digest_from:
        try:
            ok = data.get("sha256") == content_digest(data)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise bad("its content digest does not match: the file was edited or damaged; remove it or run with "
                      "--force to start over")
    if any(data.get(k) != v for k, v in identity.items()):
        raise bad(f"it belongs to another search ({differs} differ); remove it or run without --resume")
    return data, bad


def load_checkpoint(path: Path, cfg: SearchConfig, digest: str,
                    rng: np.random.Generator) -> tuple[dict[str, Any], list[tuple[Compute, float]]]:
    """Read and validate a search checkpoint; restores ``rng``; every problem is a ConfigError naming it.

    Every field is checked before anything runs: the content digest, each
    mask (exactly K sorted steps with the forced prefix), each loss (a finite
    number), the counters against the config, the history entries, and the
    current and best losses against the memo.
    """
    data, bad = read_checkpoint(path, kind="search checkpoint", title="budcache search checkpoint",
                                fmt=CHECKPOINT_FORMAT, versions=(1, CHECKPOINT_VERSION),
                                identity={"config": asdict(cfg), "digest": digest},
                                differs="config or calibration set", digest_from=2)
    try:
        st, memo_items = _checked_content(data, cfg, bad)
        rng.bit_generator.state = data["rng"]
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise bad(f"malformed content ({type(exc).__name__}: {exc})") from None
    return st, memo_items


def _is_loss(v: Any) -> bool:
    """A finite real number (JSON ``true`` is not a loss, nor an integer too large for a float)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _checked_content(data: dict[str, Any], cfg: SearchConfig,
                     bad: Callable[[str], ConfigError]) -> tuple[dict[str, Any], list[tuple[Compute, float]]]:
    """The search state and memo of a checkpoint, every field range-checked against ``cfg``."""
    forced = list(range(cfg.forced))

    def compute_set(v: Any, field_name: str) -> Compute:
        if not isinstance(v, list) or not all(type(i) is int and 0 <= i < cfg.steps for i in v) or \
                len(v) != cfg.nfe or sorted(set(v)) != v or v[:1] != [0]:
            raise bad(f"field {field_name!r} is not a sorted set of {cfg.nfe} steps in 0..{cfg.steps - 1} "
                      "with step 0")
        return tuple(v)

    raw = data["state"]
    if not isinstance(raw, dict):
        raise bad("field 'state' must be an object")
    st = {"restart": raw["restart"], "phase": raw["phase"], "it": raw["it"], "history": raw["history"],
          "cur": None, "cur_loss": raw["cur_loss"], "best": None, "best_loss": raw["best_loss"],
          "scale": raw["scale"]}
    if not (_is_loss(st["scale"]) and st["scale"] > 0):
        raise bad("field 'state.scale' must be a positive finite number")
    if not (type(st["restart"]) is int and 0 <= st["restart"] <= cfg.restarts):
        raise bad(f"field 'state.restart' must lie in 0..{cfg.restarts}")
    limits = {"init": 0, "sa": cfg.sa_iters, "hc": cfg.hc_rounds, "done": max(cfg.sa_iters, cfg.hc_rounds)}
    if st["phase"] not in limits:
        raise bad(f"field 'state.phase' must be one of {list(limits)}")
    if not (type(st["it"]) is int and 0 <= st["it"] <= limits[st["phase"]]):
        raise bad(f"field 'state.it' must lie in 0..{limits[st['phase']]} in phase {st['phase']!r}")
    finished = st["restart"] == cfg.restarts
    if finished and st["phase"] not in ("init", "done"):
        raise bad(f"field 'state.phase' is {st['phase']!r} after the last restart")
    if st["phase"] == "done" and not finished:
        raise bad(f"field 'state.phase' is 'done' at restart {st['restart']} of {cfg.restarts}")
    if not isinstance(data["memo"], list):
        raise bad("field 'memo' must be a list")
    memo: dict[Compute, float] = {}
    for entry in data["memo"]:
        if not (isinstance(entry, list) and len(entry) == 2 and _is_loss(entry[1])):
            raise bad("field 'memo' must hold [compute set, finite loss] pairs")
        memo[compute_set(entry[0], "memo")] = float(entry[1])
    if raw["cur"] is None:
        if not (st["phase"] == "init" and st["restart"] == 0):
            raise bad("field 'state.cur' is missing")
        if raw["best"] is not None or st["history"]:
            raise bad("field 'state.cur' is missing while 'state.best' or 'state.history' is set")
    else:
        for key in ("cur", "best"):
            st[key] = compute_set(raw[key], f"state.{key}")
            if list(st[key][:len(forced)]) != forced:
                raise bad(f"field 'state.{key}' lacks the forced prefix {forced}")
            if not _is_loss(st[f"{key}_loss"]):
                raise bad(f"field 'state.{key}_loss' must be a finite number")
            if memo.get(st[key]) != st[f"{key}_loss"]:
                raise bad(f"field 'state.{key}_loss' does not match the memo's loss of 'state.{key}'")
        if st["best_loss"] > st["cur_loss"]:
            raise bad("field 'state.best_loss' is larger than 'state.cur_loss'")
    _check_history(st["history"], st, cfg, bad)
    return st, list(memo.items())


def _check_history(history: Any, st: dict[str, Any], cfg: SearchConfig, bad: Callable[[str], ConfigError]) -> None:
    """Each history entry as :func:`search`'s ``log`` writes it (the plots and the report read them)."""
    if not isinstance(history, list):
        raise bad("field 'state.history' must be a list")
    if len(history) > cfg.restarts * (1 + cfg.sa_iters + cfg.hc_rounds):
        raise bad(f"field 'state.history' has {len(history)} entries, more than the config allows")
    best = math.inf
    for i, h in enumerate(history):
        if not (isinstance(h, dict) and h.get("step") == i and type(h.get("step")) is int
                and type(h.get("restart")) is int and 0 <= h["restart"] <= st["restart"]
                and h.get("stage") in ("init", "sa", "hc") and _is_loss(h.get("loss")) and _is_loss(h.get("best_loss"))
                and type(h.get("evaluations")) is int and h["evaluations"] >= 0):
            raise bad(f"entry {i} of 'state.history' is malformed (expected step {i}, restart, stage init/sa/hc, "
                      "finite loss and best_loss, evaluations)")
        best = min(best, h["loss"])
        if h["best_loss"] != best:
            raise bad(f"entry {i} of 'state.history': best_loss {h['best_loss']} is not the lowest loss so far")
    if history and history[-1]["best_loss"] != st["best_loss"]:
        raise bad("the last entry of 'state.history' does not end at 'state.best_loss'")


def search(losses: LossesFn, cfg: SearchConfig, *, init: Sequence[int] | None = None,
           checkpoint: str | Path | None = None, resume: bool = False, digest: str = "",
           progress: bool = False, memo: dict[Compute, float] | None = None,
           on_step: Callable[[dict[str, Any]], None] | None = None, sa_batch: int = 1) -> SearchResult:
    """Search the compute set of ``cfg.nfe`` steps that minimises ``losses``.

    ``losses(list_of_compute_sets) -> list_of_losses`` scores candidates (an
    :class:`~budcache.search.evaluator.Evaluator`'s ``losses``). ``memo``
    pre-seeds known losses (e.g. from a checkpoint). ``sa_batch`` SA proposals
    are scored per call (speculation, see the module docstring; same result).
    """
    if type(sa_batch) is not int or sa_batch < 1:
        raise ConfigError(f"sa_batch must be an integer >= 1 (got {sa_batch!r})")
    t0 = time.perf_counter()
    memo = dict(memo or {})
    ckpt = Path(checkpoint) if checkpoint is not None else None

    def score(cands: Sequence[Compute]) -> list[float]:
        return memo_scores(memo, losses, cands)

    def speculate(n: int) -> None:
        """Score the next ``n`` proposals from the current state, as if each were rejected after its draw."""
        spec = np.random.Generator(type(rng.bit_generator)())
        spec.bit_generator.state = rng.bit_generator.state
        chain = []
        for _ in range(n):
            chain.append(sa_proposal(st["cur"], cfg, spec))
            spec.random()
        todo = [c for c in dict.fromkeys(chain) if c not in memo]
        if chain[0] in memo or len(todo) < 2:
            return  # nothing to gain: the loop scores its proposal itself
        try:
            vals = losses(todo)
        except ModelOutputError:
            return  # reported when (if) the sequential search reaches that mask
        for c, v in zip(todo, vals):
            if math.isfinite(v):
                memo[c] = v

    rng = np.random.default_rng(cfg.seed)
    st: dict[str, Any] = {"restart": 0, "phase": "init", "it": 0, "cur": None, "cur_loss": None, "scale": 1.0,
                          "best": None, "best_loss": math.inf, "history": []}
    if resume and ckpt is not None and ckpt.exists():
        st, memo_items = load_checkpoint(ckpt, cfg, digest, rng)
        for k, v in memo_items:
            memo.setdefault(k, v)
        if st["phase"] == "done":
            return SearchResult(st["best"], st["best_loss"], st["history"], len(memo), time.perf_counter() - t0)

    def save() -> None:
        if ckpt is None:
            return
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(cfg),
                   "digest": digest, "rng": rng.bit_generator.state,
                   "state": {**st, "cur": list(st["cur"]) if st["cur"] else None,
                             "best": list(st["best"]) if st["best"] else None},
                   "memo": [[list(k), v] for k, v in memo.items()]}
        _save(ckpt, {**payload, "sha256": content_digest(payload)})

    def log(stage: str) -> None:
        entry = {"step": len(st["history"]), "restart": st["restart"], "stage": stage,
                 "loss": st["cur_loss"], "best_loss": st["best_loss"], "evaluations": len(memo)}
        st["history"].append(entry)
        if on_step is not None:
            on_step(entry)

    def accept(cand: Compute, loss: float) -> None:
        st["cur"], st["cur_loss"] = cand, loss
        if loss < st["best_loss"]:
            st["best"], st["best_loss"] = cand, loss

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.restarts * (cfg.sa_iters + cfg.hc_rounds), desc=f"search K={cfg.nfe}",
                   dynamic_ncols=True)

    def tick(n: int = 1) -> None:
        if bar is not None:
            bar.update(n)
            bar.set_postfix(best=f"{st['best_loss']:.3e}", evals=len(memo))

    try:
        while st["restart"] < cfg.restarts:
            if st["phase"] == "init":
                start = fit_budget(init, cfg) if (init is not None and st["restart"] == 0) else random_init(cfg, rng)
                accept(start, score([start])[0])
                st["scale"] = max(st["cur_loss"], 1e-30)
                st["phase"], st["it"] = "sa", 0
                log("init")
                save()
            while st["phase"] == "sa" and st["it"] < cfg.sa_iters:
                temp = _temperature(cfg, st["it"])
                if sa_batch > 1:
                    speculate(min(sa_batch, cfg.sa_iters - st["it"]))
                cand = sa_proposal(st["cur"], cfg, rng)
                loss = score([cand])[0]
                delta = (loss - st["cur_loss"]) / (st["scale"] if cfg.relative else 1.0)
                ok = delta < 0 or rng.random() < math.exp(-delta / temp)
                st["it"] += 1
                if ok:
                    accept(cand, loss)
                log("sa")
                tick()
                if ok:
                    save()
            if st["phase"] == "sa":
                st["phase"], st["it"] = "hc", 0
                save()
            while st["phase"] == "hc" and st["it"] < cfg.hc_rounds:
                neigh = hc_neighbourhood(st["cur"], cfg, rng)
                st["it"] += 1
                tick()
                if not neigh:
                    break
                vals = score(neigh)
                i = int(np.argmin(vals))
                if vals[i] < st["cur_loss"]:
                    accept(neigh[i], vals[i])
                    log("hc")
                    save()
                else:
                    break
            st["restart"] += 1
            st["phase"], st["it"] = "init", 0
            save()
        st["phase"] = "done"
        save()
    finally:
        if bar is not None:
            bar.close()
    return SearchResult(st["best"], st["best_loss"], st["history"], len(memo), time.perf_counter() - t0)


@dataclass
class RefineResult:
    """Per-skipped-step estimators found by :func:`refine_estimators`, with their loss and history."""

    plan: tuple[int, ...]
    loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    wall_s: float = 0.0


REFINE_CHECKPOINT_FORMAT = "budcache.estimators-checkpoint"
REFINE_CHECKPOINT_VERSION = 1


def load_refine_checkpoint(path: Path, identity: dict[str, Any], digest: str) -> dict[tuple[int, ...], float]:
    """The scored plans of an estimator-choice checkpoint; every problem is a ConfigError naming the file.

    The file holds ``format``, ``version``, the mask's ``identity`` (``steps`` and the computed steps
    ``compute``), the calibration ``digest``, ``memo`` (``[plan, loss]`` pairs) and a ``sha256`` of the rest. A
    plan's loss depends on nothing else, so a resume may change the scheme, the rounds or the choices. Each plan
    must compute exactly the mask's steps and give every skipped step a known estimator code; each loss must be
    a finite number.
    """
    data, bad = read_checkpoint(path, kind="estimator checkpoint", title="budcache estimator checkpoint",
                                fmt=REFINE_CHECKPOINT_FORMAT, versions=(REFINE_CHECKPOINT_VERSION,),
                                identity={"mask": identity, "digest": digest},
                                differs="mask or calibration set", max_depth=6)
    steps, compute = identity["steps"], set(identity["compute"])
    memo = data.get("memo")
    if not isinstance(memo, list):
        raise bad("field 'memo' must be a list")
    known: dict[tuple[int, ...], float] = {}
    for entry in memo:
        if not (isinstance(entry, list) and len(entry) == 2 and _is_loss(entry[1])):
            raise bad("field 'memo' must hold [plan, finite loss] pairs")
        p = entry[0]
        if not (isinstance(p, list) and len(p) == steps and all(type(c) is int for c in p)
                and all((c == COMPUTE) == (k in compute) for k, c in enumerate(p))
                and all(c == COMPUTE or c in NAMES for c in p)):
            raise bad(f"a plan in field 'memo' ({str(p)[:80]}) does not compute exactly the mask's steps with a "
                      "known estimator at every other step")
        known[tuple(p)] = float(entry[1])
    return known


#: How :func:`refine_estimators` moves: ``sweep`` (default) or ``steepest``.
REFINE_SCHEMES = ("sweep", "steepest")


#: The most rounds of :func:`refine_estimators` per scheme: sweeps, or steepest-descent moves.
DEFAULT_REFINE_ROUNDS: dict[str, int] = {"sweep": 2, "steepest": 8}


def refine_estimators(plan_losses: Callable[[Sequence[tuple[int, ...]]], list[float]], plan: Sequence[int],
                      choices: Sequence[int], *, rounds: int | None = None, scheme: str = "sweep",
                      progress: bool = False, checkpoint: str | Path | None = None, resume: bool = False,
                      digest: str = "") -> RefineResult:
    """Coordinate descent over the estimator of every skipped step; the computed steps never move.

    ``plan`` holds 0 for computed steps and an estimator code for skipped ones
    (:mod:`budcache.estimators`); a move sets one skipped step to another code
    of ``choices``. The budget K is the same at every move, since only skipped
    steps change. Deterministic.

    - ``sweep`` (default): visit the skipped steps from the last to the first;
      at each, score its alternatives as one batch (``plan_losses``) and take
      the best if it strictly improves. A round is one sweep; stop after a
      sweep without a move or after ``rounds`` (default 2) sweeps. A late step
      costs few model calls to re-score (prefix sharing resumes just before
      it), so a sweep costs about one steepest-descent round and makes up to
      one move per skipped step.
    - ``steepest``: score every single move as one batch and take the best
      strictly improving one; stop at a local minimum or after ``rounds``
      (default 8) rounds.

    Args:
        plan_losses: calibration loss of each plan.
        plan: the start plan (the searched mask, every skipped step with the search's estimator).
        choices: the estimator codes a skipped step may take.
        rounds: the most sweeps (``sweep``) or moves (``steepest``).
        scheme: ``sweep`` or ``steepest``.
        progress: show a progress bar.
        checkpoint: a JSON file that holds every plan scored so far with its loss, written atomically whenever a
            call scored a new plan (:func:`load_refine_checkpoint`); ``None``: no checkpoint.
        resume: continue from ``checkpoint`` (of the same mask and calibration set): its plans are not scored
            again, so a run killed at any point ends at the uninterrupted result, and a run with other
            ``rounds``, ``scheme`` or ``choices`` reuses every plan it shares with it.
        digest: the calibration set's digest, stored in the checkpoint and checked on resume.
    """
    if scheme not in REFINE_SCHEMES:
        raise ConfigError(f"estimator refinement scheme {scheme!r} is unknown; choose one of {list(REFINE_SCHEMES)}")
    rounds = DEFAULT_REFINE_ROUNDS[scheme] if rounds is None else rounds
    t0 = time.perf_counter()
    cur = tuple(int(c) for c in plan)
    mask = {"steps": len(cur), "compute": [k for k, c in enumerate(cur) if c == 0]}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    known: dict[tuple[int, ...], float] = {}
    if resume and ckpt is not None and ckpt.exists():
        known = load_refine_checkpoint(ckpt, mask, digest)

    def save() -> None:
        """Write every plan scored so far (atomic)."""
        if ckpt is not None:
            payload = {"format": REFINE_CHECKPOINT_FORMAT, "version": REFINE_CHECKPOINT_VERSION,
                       "mask": mask, "digest": digest, "memo": [[list(k), v] for k, v in known.items()]}
            _save(ckpt, {**payload, "sha256": content_digest(payload)})

    def scored(plans: Sequence[tuple[int, ...]]) -> list[float]:
        return memo_scores(known, plan_losses, plans, what="estimator plan", stored=save)

    loss = scored([cur])[0]
    history = [{"round": 0, "loss": loss, "plan": list(cur)}]
    evaluated = {cur}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=rounds, desc="estimators", dynamic_ncols=True)

    def moves(plan_: tuple[int, ...], steps: Sequence[int]) -> list[tuple[int, ...]]:
        return [plan_[:k] + (int(alt),) + plan_[k + 1:] for k in steps for alt in choices if alt != plan_[k]]

    try:
        for r in range(1, rounds + 1):
            skipped = [k for k, c in enumerate(cur) if c != 0]
            moved = False
            if scheme == "steepest":
                groups = [skipped]
            else:
                groups = [[k] for k in reversed(skipped)]
            for group in groups:
                neigh = moves(cur, group)
                if not neigh:
                    continue
                vals = scored(neigh)
                evaluated.update(neigh)
                i = int(np.argmin(vals))
                if vals[i] < loss:
                    cur, loss, moved = neigh[i], vals[i], True
            if bar is not None:
                bar.update(1)
            if not moved:
                break
            history.append({"round": r, "loss": loss, "plan": list(cur)})
    finally:
        if bar is not None:
            bar.close()
    return RefineResult(cur, loss, history, len(evaluated), time.perf_counter() - t0)
