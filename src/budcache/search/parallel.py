"""Parallel tempering with best-of-m moves: a budget-exact mask search whose work splits across W workers.

Why this scheme. Sequential annealing makes one Metropolis decision per
evaluation, so W workers can either split each evaluation's calibration items
(the item split, at most C ways) or speculate on its proposals (the mask
split's ``sa_batch``, most of them wasted after the first accepted move).
Here every round scores exactly W new proposals in one request, one per
worker, and all of them inform a decision:

- ``R = min(max_chains, ceil(W / 4))`` chains share the W proposals of a
  round as evenly as possible (``m`` each, the colder chains first) and run at
  ``T_c(r) = T(r) / ladder^c`` with ``T(r) = t_max (t_min / t_max)^(r / rounds)``:
  chain 0 anneals as the sequential search does and explores, the colder ones
  exploit early (the sequential schedule spends its first rounds far above the
  loss differences of neighbouring masks, a random walk);
- each chain draws its proposals either as a block shift (probability
  ``shift``: a run of computed steps ``c_i..c_j`` all moved by one, drawn
  uniformly from :func:`~budcache.search.anneal.block_shifts`) or with the
  sequential search's budget-preserving move
  (:func:`~budcache.search.anneal.sa_proposal`), and takes the best one,
  ``c* = argmin L(c_i)``, with Metropolis: accept if ``u < exp(-(L(c*) - L_cur) / T_c)``
  (always when it improves); best-of-m is a cheap steepest-descent step at low
  temperature and an ordinary annealing move at high temperature. Deep minima of
  the loss often differ by a run of computed steps moved by one step, which
  one-step moves reach only through worse masks;
- after every round neighbouring chains ``(c, c+1)`` (even pairs on even rounds,
  odd pairs on odd ones) swap states with probability
  ``min(1, exp((L_c - L_{c+1}) (1/T_c - 1/T_{c+1})))``: good states found by
  the hot, exploring chains sink to the cold ones, and the cold chains' states
  are perturbed by the hot ones;
- ``rounds = ceil(anneal * ceil(sa_iters / m))``: with ``anneal = 1`` every chain
  makes as many proposals as the sequential annealing; the default ``0.25``
  anneals for a quarter of that and leaves the rest to hill climbing, which
  uses all W workers on one descent. Few chains with several proposals each
  reached the sequential search's loss sooner (on the critical path) than many
  chains with one or two (BENCHMARKS.md, "Parallel search"), hence the cap;
- then hill climbing from the best state found: first improvement over the
  neighbourhood (:func:`~budcache.search.anneal.hc_neighbourhood` plus every
  block shift) in a random order, W masks per request (cut across the workers,
  masks sharing a prefix sent to the worker holding it); the first batch holding
  a better mask moves there and starts a new neighbourhood. Masks already scored
  are skipped: none of them is below the current state, which holds the lowest
  loss scored so far. A neighbourhood scored to the end is a local minimum and
  ends the climb.

Replica exchange was preferred to a population with selection because every
chain keeps a plain Metropolis walk (the sequential search's behaviour at
``W = 1``: one chain, one proposal per round), and to batched annealing with
several accepted moves per round because moves accepted together on one state
interact (their losses were measured apart).

Budget: every state is a proposal of :func:`~budcache.search.anneal.sa_proposal`,
a block shift or a hill-climbing neighbour, each exactly K steps with the forced prefix; the
search checks it for every accepted state and raises if it ever failed.

Determinism: all random draws come from one generator seeded with
``cfg.seed``, in a fixed order (chains in index order, proposals in draw
order), and a mask's loss is the same bits on any worker (see
:mod:`budcache.search.distributed`), so the same seed and worker count give the
same policy bit for bit, whichever backend scores the masks. The worker count
W changes the number of chains and proposals per round, hence the random
stream and the path: another W may give another policy (``--workers`` fixes it
on another machine). ``--scheme sequential`` is the paper's procedure and does
not depend on W.

A checkpoint (atomic JSON with a content digest) is written after every round
and every hill-climbing move; ``resume=True`` continues a killed run to the
uninterrupted result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io import write_json
from .anneal import (
    Compute,
    LossesFn,
    SearchConfig,
    SearchResult,
    block_shifts,
    content_digest,
    fit_budget,
    hc_neighbourhood,
    memo_scores,
    random_init,
    read_checkpoint,
    sa_proposal,
)

SCHEMES = ("sequential", "tempering")
CHECKPOINT_FORMAT = "budcache.tempering-checkpoint"
CHECKPOINT_VERSION = 2  # 2: block shifts, a shorter annealing and first-improvement hill climbing
_MAX_CHECKPOINT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TemperingConfig:
    """Settings of the parallel scheme (the move set, temperatures and hill climbing are ``SearchConfig``'s).

    Args:
        workers: W, the proposals scored per round: one per worker, or one per group of workers with the hybrid
            split (pass the evaluator's ``proposals``).
        max_chains: the most chains (replicas); ``R = min(max_chains, ceil(W / 4))``.
        ladder: temperature ratio between neighbouring chains (>= 1; chain c runs at ``T(r) / ladder^c``).
        shift: probability that a proposal is a block shift (:func:`~budcache.search.anneal.block_shifts`)
            rather than the sequential search's move; in ``[0, 1]``.
        anneal: the annealing's length as a fraction of the sequential one's, in ``(0, 1]``:
            ``rounds = ceil(anneal * ceil(sa_iters / m))``.
    """

    workers: int = 1
    max_chains: int = 4
    ladder: float = 4.0
    shift: float = 0.5
    anneal: float = 0.25

    def __post_init__(self) -> None:
        if type(self.workers) is not int or self.workers < 1:
            raise ConfigError(f"--workers must be an integer >= 1 (got {self.workers!r})")
        if type(self.max_chains) is not int or self.max_chains < 1:
            raise ConfigError(f"max_chains must be an integer >= 1 (got {self.max_chains!r})")
        if not (isinstance(self.ladder, (int, float)) and math.isfinite(self.ladder) and self.ladder >= 1):
            raise ConfigError(f"ladder must be a finite number >= 1 (got {self.ladder!r})")
        if not (isinstance(self.shift, (int, float)) and 0 <= self.shift <= 1):
            raise ConfigError(f"shift must be a probability in [0, 1] (got {self.shift!r})")
        if not (isinstance(self.anneal, (int, float)) and 0 < self.anneal <= 1):
            raise ConfigError(f"anneal must be a fraction in (0, 1] (got {self.anneal!r})")

    @property
    def chains(self) -> int:
        """Number of chains ``R = min(max_chains, ceil(W / 4))``."""
        return min(self.max_chains, -(-self.workers // 4))

    def proposals(self) -> list[int]:
        """Proposals per chain and round: W shared out as evenly as possible, the colder chains first."""
        r = self.chains
        return [self.workers // r + (c < self.workers % r) for c in range(r)]

    def rounds(self, cfg: SearchConfig) -> int:
        """Annealing rounds: ``ceil(anneal * ceil(sa_iters / m))`` (``anneal = 1``: each chain proposes as often
        as the sequential search)."""
        return math.ceil(self.anneal * -(-cfg.sa_iters // max(self.proposals())))


def budget_ok(compute: Sequence[int], cfg: SearchConfig) -> bool:
    """A sorted set of exactly K distinct steps in ``0..N-1`` holding the forced prefix ``0..P-1``."""
    c = list(compute)
    return (len(c) == cfg.nfe and c == sorted(set(c)) and all(0 <= k < cfg.steps for k in c)
            and c[:cfg.forced] == list(range(cfg.forced)))


def _temperature(cfg: SearchConfig, r: int, rounds: int) -> float:
    return cfg.t_max * (cfg.t_min / cfg.t_max) ** (r / max(1, rounds))


def search_tempering(losses: LossesFn, cfg: SearchConfig, tcfg: TemperingConfig, *,
                     init: Sequence[int] | None = None, checkpoint: str | Path | None = None,
                     resume: bool = False, digest: str = "", progress: bool = False,
                     on_step: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Search the compute set of ``cfg.nfe`` steps minimising ``losses`` by parallel tempering, then hill climbing.

    Args:
        losses: ``losses(list_of_compute_sets) -> list_of_losses``; each round's W proposals and each
            hill-climbing neighbourhood arrive as one call (an evaluator's ``losses``).
        cfg: the move set, temperatures, ``sa_iters`` (proposals per chain), ``hc_rounds``, ``restarts``, seed.
        tcfg: workers W, chains, temperature ladder.
        init: warm start of chain 0 at the first restart (fitted to the budget).
        checkpoint, resume, digest: the checkpoint file, whether to continue it, the calibration digest it
            must match.
        progress: show a progress bar.
        on_step: called with every history entry, plus ``"states"``: every chain's compute set.
    """
    t0 = time.perf_counter()
    memo: dict[Compute, float] = {}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    props = tcfg.proposals()
    n_chains, rounds = len(props), tcfg.rounds(cfg)

    def score(cands: Sequence[Compute]) -> list[float]:
        return memo_scores(memo, losses, cands)

    rng = np.random.default_rng(cfg.seed)
    st: dict[str, Any] = {"restart": 0, "phase": "init", "it": 0, "chains": [], "cur": None, "cur_loss": None,
                          "best": None, "best_loss": math.inf, "history": [], "queue": []}
    if resume and ckpt is not None and ckpt.exists():
        st, memo = _load(ckpt, cfg, tcfg, digest, rng)
        if st["phase"] == "done":
            return SearchResult(st["best"], st["best_loss"], st["history"], len(memo), time.perf_counter() - t0)

    def save() -> None:
        if ckpt is None:
            return
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(cfg),
                   "tempering": asdict(tcfg), "digest": digest, "rng": rng.bit_generator.state,
                   "state": {**st, "chains": [[list(c), v] for c, v in st["chains"]],
                             "queue": [list(c) for c in st["queue"]],
                             "cur": list(st["cur"]) if st["cur"] else None,
                             "best": list(st["best"]) if st["best"] else None},
                   "memo": [[list(k), v] for k, v in memo.items()]}
        write_json(ckpt, {**payload, "sha256": content_digest(payload)})

    def keep(c: Compute, loss: float) -> None:
        if not budget_ok(c, cfg):  # an invariant of the moves; never a user's mistake
            raise RuntimeError(f"internal error: state {list(c)} breaks the budget K={cfg.nfe}")
        if loss < st["best_loss"]:
            st["best"], st["best_loss"] = c, loss

    def log(stage: str) -> None:
        entry = {"step": len(st["history"]), "restart": st["restart"], "stage": stage, "loss": st["cur_loss"],
                 "best_loss": st["best_loss"], "evaluations": len(memo)}
        st["history"].append(entry)
        if on_step is not None:
            on_step({**entry, "states": [list(c) for c, _ in st["chains"]] or [list(st["cur"])]})

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.restarts * (rounds + cfg.hc_rounds), desc=f"search K={cfg.nfe} W={tcfg.workers}",
                   dynamic_ncols=True)

    def tick() -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{st['best_loss']:.3e}", evals=len(memo))

    try:
        while st["restart"] < cfg.restarts:
            if st["phase"] == "init":
                starts = [fit_budget(init, cfg) if (init is not None and st["restart"] == 0 and c == 0)
                          else random_init(cfg, rng) for c in range(n_chains)]
                vals = score(starts)
                st["chains"] = list(zip(starts, vals))
                for c, v in st["chains"]:
                    keep(c, v)
                st["cur"], st["cur_loss"] = st["chains"][0]
                st["phase"], st["it"] = "sa", 0
                log("init")
                save()
            while st["phase"] == "sa" and st["it"] < rounds:
                _tempering_round(st, cfg, tcfg, props, rounds, rng, score, keep)
                st["cur"], st["cur_loss"] = st["chains"][0]
                st["it"] += 1
                log("sa")
                tick()
                save()
            if st["phase"] == "sa":
                st["phase"], st["it"] = "hc", 0
                st["cur"], st["cur_loss"] = st["best"], st["best_loss"]
                st["chains"] = []
                save()
            while st["phase"] == "hc" and (st["queue"] or st["it"] < cfg.hc_rounds):
                if not st["queue"]:  # a new round: the neighbourhood in a random order, unscored masks only
                    neigh = [c for c in dict.fromkeys([*hc_neighbourhood(st["cur"], cfg, rng),
                                                       *block_shifts(st["cur"], cfg)]) if c not in memo]
                    st["queue"] = [neigh[i] for i in rng.permutation(len(neigh))]
                    st["it"] += 1
                    tick()
                    if not st["queue"]:
                        break
                batch, st["queue"] = st["queue"][:tcfg.workers], st["queue"][tcfg.workers:]
                vals = score(batch)
                i = int(np.argmin(vals))
                if vals[i] < st["cur_loss"]:
                    st["cur"], st["cur_loss"], st["queue"] = batch[i], vals[i], []
                    keep(batch[i], vals[i])
                    log("hc")
                elif not st["queue"]:  # the whole neighbourhood scored: a local minimum
                    st["it"] = cfg.hc_rounds
                save()
            st["restart"] += 1
            st["phase"], st["it"], st["chains"], st["queue"] = "init", 0, [], []
            save()
        st["phase"] = "done"
        save()
    finally:
        if bar is not None:
            bar.close()
    return SearchResult(st["best"], st["best_loss"], st["history"], len(memo), time.perf_counter() - t0)


def _tempering_round(st: dict[str, Any], cfg: SearchConfig, tcfg: TemperingConfig, props: list[int], rounds: int,
                     rng: np.random.Generator, score: Callable[[Sequence[Compute]], list[float]],
                     keep: Callable[[Compute, float], None]) -> None:
    """One round: every chain's proposals scored as one request, best-of-m Metropolis per chain, then swaps."""
    temps = [_temperature(cfg, st["it"], rounds) / tcfg.ladder ** c for c in range(len(props))]
    drawn = [[_propose(cur, cfg, tcfg, rng) for _ in range(m)] for (cur, _), m in zip(st["chains"], props)]
    vals = score([c for group in drawn for c in group])
    at = 0
    for c, group in enumerate(drawn):
        gv = vals[at:at + len(group)]
        at += len(group)
        i = int(np.argmin(gv))
        cur, cur_loss = st["chains"][c]
        delta = gv[i] - cur_loss
        u = rng.random()
        if group[i] != cur and (delta < 0 or u < math.exp(-delta / temps[c])):
            st["chains"][c] = (group[i], gv[i])
            keep(group[i], gv[i])
    for c in range(st["it"] % 2, len(props) - 1, 2):
        (_, lo), (_, hi) = st["chains"][c], st["chains"][c + 1]
        x = (lo - hi) * (1 / temps[c] - 1 / temps[c + 1])
        u = rng.random()
        if x >= 0 or u < math.exp(x):
            st["chains"][c], st["chains"][c + 1] = st["chains"][c + 1], st["chains"][c]


def _propose(cur: Compute, cfg: SearchConfig, tcfg: TemperingConfig, rng: np.random.Generator) -> Compute:
    """A block shift drawn uniformly with probability ``tcfg.shift``, else the sequential search's move."""
    if tcfg.shift > 0 and rng.random() < tcfg.shift:
        shifts = block_shifts(cur, cfg)
        if shifts:
            return shifts[int(rng.integers(len(shifts)))]
    return sa_proposal(cur, cfg, rng)


# ------------------------------------------------------------------------------ checkpoints
def _load(path: Path, cfg: SearchConfig, tcfg: TemperingConfig, digest: str,
          rng: np.random.Generator) -> tuple[dict[str, Any], dict[Compute, float]]:
    """Read and validate a tempering checkpoint (every problem a ConfigError naming it); restores ``rng``."""
    data, bad = read_checkpoint(path, kind="search checkpoint", title="tempering search checkpoint",
                                fmt=CHECKPOINT_FORMAT, versions=(CHECKPOINT_VERSION,),
                                identity={"config": asdict(cfg), "tempering": asdict(tcfg), "digest": digest},
                                differs="config, worker count or calibration set",
                                foreign="; it may belong to another --scheme: remove it or run with --force")
    try:
        memo: dict[Compute, float] = {}
        for k, v in data["memo"]:
            key = tuple(k)
            if not (budget_ok(key, cfg) and all(type(i) is int for i in key)
                    and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise bad("field 'memo' must hold [compute set of K steps, finite loss] pairs")
            memo[key] = float(v)
        raw = data["state"]
        if not isinstance(raw["queue"], list):
            raise bad("field 'state.queue' must be a list of compute sets")
        st = {**raw, "chains": [(tuple(c), float(v)) for c, v in raw["chains"]],
              "queue": [tuple(c) for c in raw["queue"]],
              "cur": tuple(raw["cur"]) if raw["cur"] is not None else None,
              "best": tuple(raw["best"]) if raw["best"] is not None else None}
        if st["phase"] not in ("init", "sa", "hc", "done") or type(st["it"]) is not int or \
                not 0 <= st["restart"] <= cfg.restarts or not isinstance(st["history"], list):
            raise bad("field 'state' is malformed (phase, it, restart or history)")
        for c, v in [*st["chains"], *([(st["cur"], st["cur_loss"])] if st["cur"] else []),
                     *([(st["best"], st["best_loss"])] if st["best"] else [])]:
            if memo.get(c) != v:
                raise bad(f"state {list(c)} has a loss that does not match the memo's")
        if not all(budget_ok(c, cfg) and all(type(i) is int for i in c) for c in st["queue"]):
            raise bad("field 'state.queue' must hold compute sets of K steps")
        if st["phase"] == "sa" and len(st["chains"]) != tcfg.chains:
            raise bad(f"field 'state.chains' must hold {tcfg.chains} chains")
        rng.bit_generator.state = data["rng"]
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise bad(f"malformed content ({type(exc).__name__}: {exc})") from None
    return st, memo
