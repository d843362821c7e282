"""The ``budcache search`` job: calibrate, search each budget, evaluate on held-out pairs, report."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .. import estimators as est
from ..errors import BudcacheError, ConfigError
from ..io import atomic_write_text, check_writable_dir, write_json
from ..peers import PEER_MECHANISMS, taylorseer_grid_computes
from ..plots import pyplot, save_figure
from ..policy import CachePolicy
from ..problems.base import Problem
from ..problems.data import CalibrationSet, calibration_pairs, split_pairs
from ..problems.metrics import gap_text, item_metrics, paired_gap
from ..problems.settings import SamplerSettings
from ..problems.tinyflow import TinyflowProblem
from ..progress import phase
from ..specs import ALL_MECHANISMS, plan_legend
from .anneal import DEFAULT_REFINE_ROUNDS, REFINE_SCHEMES, RefineResult, SearchConfig, SearchResult, refine_estimators
from .backends import make_backend, resolve_backend, resolve_workers, search_scheme
from .distributed import WORK_SPLITS, make_evaluator, resolve_split
from .evaluator import Evaluator, EvaluatorStats, plan_names, plan_of
from .losses import get_loss
from .parallel import SCHEMES

#: The estimator the default search fills skipped steps with, and the alternatives it may choose per step.
DEFAULT_MECHANISM = "vtaylor1"
DEFAULT_REFINE: tuple[str, ...] = ("vtaylor1", "vtaylor2", "output")
#: ``run_search(estimators=DEFAULT_CHOICES)``: :data:`DEFAULT_REFINE` for budcache's own mechanisms, none for a
#: peer's (its hooks fill skipped steps).
DEFAULT_CHOICES = "default"
#: How the per-step estimators are chosen (:func:`budcache.search.anneal.refine_estimators`).
DEFAULT_REFINE_SCHEME = "sweep"
#: ``--mechanism auto``: budcache's default estimator and diffusers' TaylorSeer on a searched schedule, and (with
#: ``peer_masks``) budcache's estimators chosen per step on TaylorSeer's searched schedule; each budget keeps one
#: candidate by :data:`DEFAULT_KEEP` (BENCHMARKS.md, "Default search").
AUTO: tuple[str, ...] = ("vtaylor1", "taylorseer")
#: Search settings for a peer mechanism where the call does not set them (``budcache search`` sets the annealing
#: and hill-climbing options itself, so only ``prefix`` applies there): start from the peer's best grid schedule
#: (which keeps step 1 free: prefix 1), anneal briefly, then hill-climb.
PEER_SEARCH: dict[str, Any] = {"sa_iters": 10, "hc_rounds": 2, "radius": 2, "far_jumps": 0, "prefix": 1}
#: Joins a peer-schedule candidate's name: ``vtaylor1@taylorseer`` is budcache's estimators chosen per step on
#: TaylorSeer's searched schedule (``run_search(peer_masks=True)``).
ON = "@"
#: Sweeps of the per-step estimator choice on a peer's searched schedule (``<mechanism>@<peer>``, ``sweep``
#: scheme; budcache's own mask takes :func:`~budcache.search.anneal.refine_estimators`' default, 2). On tinyflow
#: (BENCHMARKS.md, "Sweeps of the estimator choice"), at K = 6 and 8, where this candidate was kept under the
#: lowest-mean rule, a second sweep moved the calibration loss by 0.01 to 0.03 and the fresh pairs' loss by up
#: to 0.02 the wrong way, at about the first sweep's cost; it helped only at K = 10, where budcache's own
#: candidate is 1.3 lower anyway.
PEER_MASK_SWEEPS = 1


#: How a search with several candidates keeps one per budget: ``pairs``, the candidate whose calibration loss is
#: lower than each other candidate's on more calibration pairs than it is higher (the paired-comparison winner; the
#: ``mean`` rule where no candidate beats all the others), or ``mean``, the lowest mean calibration loss.
KEEP_RULES: tuple[str, ...] = ("pairs", "mean")
#: The rule ``budcache search`` keeps a candidate by (BENCHMARKS.md, "Keeping a candidate").
DEFAULT_KEEP = "pairs"


#: The phases of a search run whose wall time the report and ``summary.json`` (``meta.phases_s``) give.
PHASES: dict[str, str] = {
    "setup": "set-up and shut-down (the problem where run_search builds it, calibration pairs, evaluators and "
             "workers)",
    "teachers": "full-step outputs of the calibration and held-out pairs",
    "search": "searching the candidates (masks and per-step estimators)",
    "keep": "scoring the candidates per pair to keep one",
    "heldout": "held-out evaluation",
    "report": "policies, plots and report"}


def pair_wins(per_pair: dict[str, Sequence[float]]) -> dict[str, dict[str, int]]:
    """``wins[a][b]``: the pairs where candidate ``a``'s loss is lower than ``b``'s (ties count for neither)."""
    arrs = {m: np.asarray(v, dtype=np.float64) for m, v in per_pair.items()}
    return {m: {o: int((a < b).sum()) for o, b in arrs.items() if o != m} for m, a in arrs.items()}


def winner_of(wins: dict[str, dict[str, int]]) -> str | None:
    """The candidate that beats every other one in :func:`pair_wins`' counts (``wins[a][b] > wins[b][a]``), or
    None; at most one can."""
    return next((a for a, row in wins.items() if all(n > wins[b][a] for b, n in row.items())), None)


def paired_winner(per_pair: dict[str, Sequence[float]]) -> str | None:
    """The candidate that beats every other one on paired comparisons, or None.

    ``a`` beats ``b`` when ``#{i: loss_a[i] < loss_b[i]} > #{i: loss_a[i] > loss_b[i]}``.
    """
    return winner_of(pair_wins(per_pair))


def candidate_parts(name: str) -> tuple[str, str | None]:
    """``(mechanism, peer whose searched schedule it runs on, or None)`` of a candidate's name."""
    mech, _, peer = name.partition(ON)
    return mech, peer or None


@dataclass
class BudgetOutcome:
    """One budget's search outcome and held-out comparison."""

    nfe: int
    result: SearchResult
    policy: CachePolicy
    stats: EvaluatorStats
    heldout: dict[str, dict[str, Any]] = field(default_factory=dict)
    refined: RefineResult | None = None
    mask_evaluations: int | None = None  # masks the mask search ran (``stats`` also counts estimator plans)


def heldout_table(problem: Any, held: CalibrationSet, policy: CachePolicy) -> dict[str, dict[str, Any]]:
    """Held-out quality of the policy vs uniform (same estimator) and plain K steps.

    Per method: mean latent MSE, mean and median PSNR, mean SSIM (on decoded
    images, when the problem decodes them), and, against budcache's, the pairs
    where budcache's latent MSE is lower (paired wins) and budcache's median PSNR
    minus the method's with its 95% paired bootstrap interval
    (:func:`budcache.problems.paired_gap`).
    """
    k = policy.nfe
    uniform = CachePolicy.uniform(policy.steps, k, meta={"mechanism": policy.meta.get("mechanism", "reuse")})
    if policy.estimators is not None:
        uniform = uniform.with_estimators(str(policy.meta.get("mechanism", policy.estimators[0])))
    runs = {"budcache": problem.final_latents(held, policy),
            "uniform": problem.final_latents(held, uniform),
            "plain": problem.final_latents(held, None, plain_steps=k)}
    q = {name: item_metrics(problem, lat, held.teacher) for name, lat in runs.items()}
    out = {}
    for name, m in q.items():
        row: dict[str, Any] = {"latent_mse": float(m["latent_mse"].mean()), "psnr": float(m["psnr"].mean()),
                               "psnr_median": float(np.median(m["psnr"]))}
        if "ssim" in m:
            row["ssim"] = float(m["ssim"].mean())
        if name != "budcache":
            row["budcache_wins"] = int((q["budcache"]["latent_mse"] < m["latent_mse"]).sum())
            row.update(paired_gap(q["budcache"]["psnr"], m["psnr"], "median").fields("median_gap"))
        out[name] = row
    out["_n"] = {"pairs": len(held)}
    return out


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Loss per search step with SA/HC marked and the best-so-far line; False if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [h["step"] for h in history]
    colours = {"init": "black", "sa": "tab:blue", "hc": "tab:red"}
    for stage, c in colours.items():
        pts = [(h["step"], h["loss"]) for h in history if h["stage"] == stage]
        if pts:
            ax.scatter(*zip(*pts), s=8, color=c, label={"init": "start", "sa": "annealing (current)",
                                                         "hc": "hill climbing"}[stage], zorder=3)
    ax.plot(xs, [h["best_loss"] for h in history], color="tab:green", label="best so far")
    if all(h["loss"] > 0 for h in history):  # log-MSE losses are negative: keep those linear
        ax.set_yscale("log")
    ax.set_xlabel("search step")
    ax.set_ylabel("calibration loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)
    return True


def plot_frontier(outcomes: list[BudgetOutcome], path: Path) -> bool:
    """Held-out PSNR vs NFE for the searched, uniform and plain K-step samplers."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [o.nfe for o in outcomes]
    for name, style in (("budcache", "o-"), ("uniform", "s--"), ("plain", "^:")):
        ax.plot(ks, [o.heldout[name]["psnr"] for o in outcomes], style, label=name)
    ax.set_xlabel("NFE (computed steps)")
    ax.set_ylabel("held-out PSNR vs full steps (dB)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)
    return True


def report(outcomes: list[BudgetOutcome], meta: dict[str, Any]) -> str:
    """The Markdown report of a search run."""
    lines = [f"# budcache search report ({meta['date']})", "",
             f"Model {meta['model']}, {meta['steps']} steps, solver {meta['solver']}, mechanism "
             f"{meta['mechanism']}, guidance {meta['guidance']}; calibration {meta['calibration_pairs']} pairs "
             f"(digest {meta['digest']}); held-out {meta['heldout_pairs']} pairs, disjoint from calibration.", "",
             f"Plan, one letter per step: {plan_legend('`')}.", "",
             "| NFE | mask search loss | with per-step estimators | masks evaluated | mask search (s) | "
             "estimator plans evaluated | estimator choice (s) | plan |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        r = o.refined
        lines.append(f"| {o.nfe} | {o.result.loss:.4e} | {r.loss if r else o.result.loss:.4e} | "
                     f"{o.stats.evaluations if o.mask_evaluations is None else o.mask_evaluations} | "
                     f"{o.result.wall_s:.1f} | {r.evaluations if r else 0} | "
                     f"{r.wall_s if r else 0.0:.1f} | `{o.policy.estimator_strip()}` |")
    if any("candidates" in o.policy.meta for o in outcomes):
        names = list(dict.fromkeys(n for o in outcomes for n in o.policy.meta.get("candidates", {})))
        rule = {"pairs": "the candidate with the lower loss than each other one on most calibration pairs (else the "
                         "lowest mean)",
                "mean": "the lowest mean calibration loss"}.get(meta.get("keep") or "mean", "")
        has_wins = any("pair_wins" in o.policy.meta for o in outcomes)
        lines += ["", "Each budget was searched with every candidate mechanism (`a@b`: estimators `a` chosen per "
                  f"step on `b`'s searched schedule); mean calibration loss per candidate, and in bold the one the "
                  f"budget keeps: {rule}" + ("; `wins`: the calibration pairs where each candidate's loss is lower "
                                             "than each other's, in the columns' order" if has_wins else "") + ":",
                  "",
                  "| NFE | " + " | ".join(names) + " | kept |" + (" wins |" if has_wins else ""),
                  "|---|" + "---|" * (len(names) + 1 + has_wins)]
        for o in outcomes:
            cand = o.policy.meta.get("candidates", {})
            kept = o.policy.meta.get("candidate", o.policy.meta.get("mechanism"))
            cells = [(f"**{cand[n]:.4f}**" if n == kept else f"{cand[n]:.4f}") if n in cand else "-" for n in names]
            row = f"| {o.nfe} | " + " | ".join(cells) + f" | {kept} |"
            if has_wins:
                w = o.policy.meta.get("pair_wins", {})
                row += " " + "; ".join(f"{a}: " + ", ".join(str(w[a][b]) if b in w.get(a, {}) else "-"
                                                            for b in names if b != a) for a in names if a in w) + " |"
            lines.append(row)
    if "wall_s" in meta:
        cpu = f", CPU time of this process {meta['cpu_s']:.0f} s" if "cpu_s" in meta else ""
        by = "; by phase: " + ", ".join(f"{PHASES[n]} {v:.1f} s" for n, v in meta["phases_s"].items()) \
            if "phases_s" in meta else ""
        lines += ["", f"Wall time of the whole run: {meta['wall_s']:.0f} s{cpu}{by}."]
    has_ssim = all("ssim" in o.heldout["budcache"] for o in outcomes)
    cols = ["latent MSE", "PSNR", "median PSNR"] + (["SSIM"] if has_ssim else [])
    lines += ["", "Held-out quality against the full-step output (mean latent MSE, mean and median PSNR"
              + (", mean SSIM" if has_ssim else "") + "; wins = pairs where budcache's latent MSE is lower; median "
              "gap = budcache's median PSNR minus the row's, with its 95% paired bootstrap interval over these pairs: "
              "an interval that holds 0 is a gap another draw of pairs can reverse):", "",
              "| NFE | method | " + " | ".join(cols) + " | budcache wins | median gap [95% CI] |",
              "|---|---|" + "---|" * len(cols) + "---|---|"]
    for o in outcomes:
        h = o.heldout
        n = h["_n"]["pairs"]
        for name in ("budcache", "uniform", "plain"):
            r = h[name]
            vals = [f"{r['latent_mse']:.4e}", f"{r['psnr']:.2f}", f"{r['psnr_median']:.2f}"]
            if has_ssim:
                vals.append(f"{r['ssim']:.4f}")
            wins = "" if name == "budcache" else f"{r['budcache_wins']}/{n}"
            gap = gap_text(r["median_gap"], r.get("median_gap_ci")) if "median_gap" in r else ""
            label = {"budcache": "budcache", "uniform": "uniform mask, same estimator", "plain": "plain K steps"}
            lines.append(f"| {o.nfe} | {label[name]} | " + " | ".join(vals) + f" | {wins} | {gap} |")
    lines.append("")
    return "\n".join(lines)


def check_settings(*, steps: int, nfes: Sequence[int], heldout_pairs: int, seeds_per_prompt: int,
                   calib_pairs: int | None, guidance: float) -> None:
    """Every number of a search run in range, before any model is loaded; errors name the CLI option."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {steps})")
    if not nfes:
        raise ConfigError("give at least one budget (--nfe)")
    for k in nfes:
        if not 1 <= k <= steps:
            raise ConfigError(f"--nfe {k} must lie in 1..{steps} (the number of steps)")
    if heldout_pairs < 1:
        raise ConfigError(f"--heldout must be >= 1 (got {heldout_pairs})")
    if seeds_per_prompt < 1:
        raise ConfigError(f"--seeds-per-prompt must be >= 1 (got {seeds_per_prompt})")
    if calib_pairs is not None and calib_pairs < 1:
        raise ConfigError(f"--calib-pairs must be >= 1 (got {calib_pairs})")
    if isinstance(guidance, bool) or not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0 (got {guidance})")


def check_search_kw(search_kw: dict[str, Any]) -> None:
    """Only :class:`SearchConfig` fields; a sampler setting passed here names where it belongs."""
    fields = {f.name for f in dataclasses.fields(SearchConfig)} - {"steps", "nfe"}
    for key in search_kw:
        if key in ("steps", "solver", "mechanism", "guidance"):
            raise ConfigError(f"{key} is a sampler setting: pass settings=SamplerSettings({key}=...) or a problem")
        if key not in fields:
            raise ConfigError(f"unknown search option {key!r}; the options are {sorted(fields)}")


def refuse_overwrite(out: Path, names: Sequence[str], resume: bool, force: bool,
                     stale: Sequence[str] = ()) -> None:
    """Refuse to start over where ``out`` holds checkpoints of an earlier run (without ``resume`` or ``force``).

    With ``force`` the files ``stale`` names are removed first: a new run replaces a checkpoint only when it
    reaches that budget, so a forced run killed before then would leave the earlier run's file for its
    ``--resume`` to refuse.
    """
    if force:
        for n in stale:
            with contextlib.suppress(FileNotFoundError):
                (out / n).unlink()
    if resume or force:
        return
    found = [n for n in names if (out / n).exists()]
    if found:
        raise ConfigError(f"--out {out} holds the checkpoint of an earlier run ({', '.join(found)}); give --resume "
                          "to continue it, or --force to start over and overwrite it")


def search_estimators(mechanism: str, estimators: Sequence[str] | None) -> tuple[str | None, list[str]]:
    """The evaluator's estimator and the per-step choices of a search with ``mechanism``.

    A version-1 mechanism without per-step choices keeps version 1's evaluator
    (``None``: masks run with the sampler's mechanism, bit for bit as before);
    a peer mechanism has neither (its own hooks fill skipped steps).
    """
    if mechanism in PEER_MECHANISMS:
        if estimators and set(estimators) - {mechanism}:
            raise ConfigError(f"mechanism {mechanism!r} fills skipped steps with its own estimator; "
                              "per-step estimators (--estimators) do not apply (use --estimators none)")
        return None, []
    est.get(mechanism)
    refine = [est.get(n).name for n in (estimators or ())]
    if set(refine) <= {mechanism}:
        refine = []
    legacy = mechanism in ("reuse", "forecast1", "forecast2", "output") and not refine
    return (None if legacy else mechanism), refine


def refine_plan(problem: Any, calib: CalibrationSet, evaluator: Any, compute: Sequence[int], mechanism: str,
                refine: Sequence[str], loss_fn: Any, *, naive: bool = False, progress: bool = False,
                scheme: str = DEFAULT_REFINE_SCHEME, rounds: int | None = None,
                checkpoint: Path | None = None,
                resume: bool = False) -> tuple[RefineResult | None, tuple[str, ...] | None]:
    """Per-skipped-step estimators for a searched mask: ``(refinement or None, names or None)``.

    ``None`` names: a version-1 search (the policy states its mechanism in ``meta``). ``rounds``: the most sweeps
    or steepest moves (default: :func:`~budcache.search.anneal.refine_estimators`' for ``scheme``).
    ``checkpoint``: the file that keeps the scored plans, continued with ``resume``.
    """
    if getattr(evaluator, "estimator", None) is None:
        return None, None
    plan = plan_of(len(plan_of(problem.steps, compute, mechanism)), compute, mechanism)
    if not refine:
        return None, plan_names(plan)
    planner = evaluator
    if not isinstance(planner, Evaluator) and not hasattr(planner, "plan_losses"):  # scored here instead
        planner = make_evaluator("inprocess", problem, calib, loss=loss_fn, naive=naive, estimator=mechanism)
    refined = refine_estimators(planner.plan_losses, plan, [est.CODES[n] for n in dict.fromkeys(
        [mechanism, *refine])], scheme=scheme, rounds=rounds, progress=progress, checkpoint=checkpoint, resume=resume,
        digest=calib.digest)
    return refined, plan_names(refined.plan)


def refine_checkpoint(steps: int, nfe: int, candidate: str) -> str:
    """File name of a candidate's estimator-choice checkpoint in the output folder (one per budget)."""
    return f"estimators_N{steps}_K{nfe}_{candidate}.json"


def peer_grid_start(evaluator: Any, steps: int, nfe: int) -> tuple[int, ...] | None:
    """The best of TaylorSeer's own (warm-up, interval) schedules with exactly ``nfe`` computed steps, scored by
    ``evaluator``: the searched schedule starts from it, so it can only improve on the peer's grid
    (``None`` when no grid point computes exactly ``nfe`` steps)."""
    options = taylorseer_grid_computes(steps, nfe)
    if not options:
        return None
    losses = evaluator.losses(options)
    return options[int(np.argmin(losses))]


class Cancellable:
    """An evaluator whose scoring calls (``losses``, and ``plan_losses`` where it has one) raise
    :class:`SearchCancelled` once ``cancel`` is set; other attributes pass through. A candidate searched in a
    thread stops at its next request, or its next annealing step (:meth:`check`), when another one failed."""

    def __init__(self, evaluator: Any, cancel: threading.Event) -> None:
        self._ev, self._cancel = evaluator, cancel

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ev, name)
        if name not in ("losses", "plan_losses"):
            return attr

        def scored(items: Sequence[Sequence[int]]) -> list[float]:
            self.check()
            return attr(items)
        return scored

    def check(self, *_: Any) -> None:
        """Raise :class:`SearchCancelled` if another candidate failed (also an ``on_step`` callback)."""
        if self._cancel.is_set():
            raise SearchCancelled("stopped: another candidate mechanism's search failed or was interrupted")


class SearchCancelled(BudcacheError):
    """A candidate's search stopped because another candidate's failed (never reaches the user on its own)."""


def concurrent_candidates(where: dict[str, str]) -> bool:
    """Whether the candidates (mechanism -> backend) can be searched at the same time: more than one, at most one
    of them in this process (in-process evaluators share the model and its hooks), the others on local worker
    processes (which score estimator plans themselves; a Ray candidate's plans are scored in this process, so
    Ray candidates run one after another)."""
    return (len(where) > 1 and sum(b == "inprocess" for b in where.values()) <= 1
            and set(where.values()) <= {"inprocess", "local"})


def run_concurrently(attempt: Callable[..., tuple[Any, ...]], k: int, candidates: Sequence[str],
                     where: dict[str, str]) -> list[tuple[Any, ...]]:
    """``attempt(k, i, m)`` for every candidate at once: the in-process ones on this thread, one after another in
    candidate order, each other on its own thread (its evaluator waits on worker processes or actors). Results in
    candidate order. An error or Ctrl-C on any stops the others at their next request, then the first error is
    raised."""
    results: dict[int, Any] = {}
    cancel = threading.Event()

    def work(i: int, m: str) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                results[i] = attempt(k, i, m, cancel)
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            results[i] = e
            cancel.set()

    threads = [threading.Thread(target=work, args=(i, m), daemon=True, name=f"budcache-search-{m}")
               for i, m in enumerate(candidates) if where[m] != "inprocess"]
    for t in threads:
        t.start()
    try:
        for i, m in enumerate(candidates):
            if where[m] == "inprocess":
                results[i] = attempt(k, i, m, cancel)
        for t in threads:
            t.join()
    except SearchCancelled:
        for t in threads:
            t.join()
    except BaseException:
        cancel.set()
        for t in threads:
            t.join()
        raise
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, SearchCancelled)), errors[0])
    return [results[i] for i in range(len(candidates))]


@torch.no_grad()
def run_search(out: str | Path, *, nfes: Sequence[int], problem: Problem | None = None,
               settings: SamplerSettings | None = None, estimators: Sequence[str] | str | None = DEFAULT_CHOICES,
               calib_pairs: int | None = None, prompt_file: str | None = None, seeds_per_prompt: int = 1,
               heldout_pairs: int = 64, seed: int = 0, loss: str = "logmse", resume: bool = False,
               force: bool = False, progress: bool = True, naive: bool = False, model: str | None = None,
               backend: str = "inprocess", workers: int | None = None, ray_address: str | None = None,
               scheme: str = "sequential", mechanisms: Sequence[str] | None = None, warm_start: bool = False,
               refine_scheme: str = DEFAULT_REFINE_SCHEME, split: str = "auto", peer_masks: bool = True,
               keep: str = DEFAULT_KEEP, **search_kw: Any) -> list[BudgetOutcome]:
    """Search one policy per budget and write all outputs to ``out``.

    Each budget is searched on its own by default, so a budget's policy is the
    same whichever other budgets the call names; ``warm_start`` starts each
    budget from the previous budget's mask instead (fitted to the new budget).

    ``backend="ray"`` scores masks on ``workers`` Ray actors (joining
    ``ray_address`` if given), ``"local"`` on worker processes, ``"auto"``
    picks (:mod:`budcache.search.backends`); ``scheme="sequential"`` gives the
    in-process policy with any of them, ``"tempering"`` searches with
    ``workers`` proposals per round (its policy depends on the seed and the
    worker count). A
    checkpoint of an earlier run in ``out`` (the mask search's, ``checkpoint_N*_K*.json``, and the per-step
    estimator choice's, ``estimators_N*_K*_<candidate>.json``, which serves any refine scheme, sweep limit or
    set of choices) is continued with ``resume``,
    removed with ``force``, and otherwise an error (it may hold hours of
    work).

    Args:
        out: output folder (policies, checkpoints, plots, report).
        nfes: the budgets K to search.
        problem: what the search runs on (a :class:`budcache.problems.Problem`); its settings apply.
            Default: tinyflow (weights from ``model``) with ``settings``.
        settings: the sampler the policies are for, when ``problem`` is not given. Default:
            28 Euler steps, guidance 1, skipped steps filled by ``vtaylor1`` while the mask is searched.
            A peer mechanism (``taylorseer``) searches that peer's compute schedule instead.
        estimators: after the mask search, each skipped step may switch to another of these
            estimators (``refine_scheme``, the budget unchanged); ``None`` or empty: no per-step
            choice; ``"default"``: :data:`DEFAULT_REFINE`, or none for a peer mechanism. A peer searched
            beside other candidates takes none either way. Version-1 mechanisms without it reproduce
            version 1's search bit for bit.
        refine_scheme: how the per-step estimators are chosen: ``sweep`` (default: the skipped steps from
            last to first, up to 2 sweeps; :data:`PEER_MASK_SWEEPS` on a peer's schedule) or ``steepest`` (the
            best single change per round, up to 8 rounds).
        calib_pairs: calibration pairs (default 32 drawn prompts, or all of ``prompt_file``'s pairs).
        prompt_file: calibration prompts (.txt, .jsonl, .csv) instead of the problem's own.
        seeds_per_prompt: seeds per calibration prompt.
        heldout_pairs: held-out pairs for the quality report (disjoint from calibration).
        seed: seed of the pair draws and of the search.
        loss: the search loss (``logmse``, ``mse``, ``l1``).
        resume: continue the checkpoints in ``out``.
        force: start over, overwriting them.
        progress: show progress bars.
        naive: turn prefix sharing off (for benchmarks).
        model: tinyflow weights folder (default: the shipped weights); only without ``problem``.
        backend: ``inprocess`` (default), ``local``, ``ray`` or ``auto`` (``budcache search``'s default).
            With several ``mechanisms``, candidates on different processes are searched at the same time
            (an in-process candidate runs beside the local workers); the policies are unchanged.
        workers: worker processes or Ray actors (default: every core for ``local``, else 1).
        split: how local workers or Ray actors share the work: ``items`` (each scores every mask on its share of the
            calibration pairs), ``masks`` (whole masks routed by prefix) or ``auto`` (default: ``items``
            while workers <= calibration pairs); see :class:`budcache.search.local.LocalEvaluator`.
        ray_address: a Ray cluster to join.
        scheme: ``sequential`` (the paper's annealing, default) or ``tempering``.
        mechanisms: search each budget with each of these mechanisms (an estimator of budcache's, or a
            peer's schedule such as ``taylorseer``) and keep one policy by ``keep``
            (:data:`AUTO` is ``budcache search --mechanism auto``); default: the settings' mechanism alone.
        warm_start: start each budget's annealing from the previous budget's mask (default: from the
            seed's random mask, as a budget searched alone; a peer's schedule starts from its best grid
            point either way).
        peer_masks: with a peer mechanism and one of budcache's (with per-step estimators) among
            ``mechanisms``, also choose budcache's estimators per step on the peer's searched schedule: one
            more candidate, ``<mechanism>@<peer>`` (default on; searched in this process after the peer, with
            :data:`PEER_MASK_SWEEPS` sweeps).
        keep: with several candidates, the rule that keeps one per budget (:data:`KEEP_RULES`): ``pairs``
            (default: the candidate with the lower calibration loss than each other one on most pairs, scored
            once more on the calibration pairs in this process; else the lowest mean) or ``mean``.
        **search_kw: fields of :class:`budcache.search.SearchConfig` (``sa_iters``, ``hc_rounds``, ...).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if problem is not None and (settings is not None or model is not None):
        raise ConfigError("give either a problem or settings/model (a problem carries its own settings)")
    check_search_kw(search_kw)
    settings = problem.settings if problem is not None else (settings or SamplerSettings(mechanism=DEFAULT_MECHANISM))
    steps, mechanism = settings.steps, settings.mechanism
    check_settings(steps=steps, nfes=nfes, heldout_pairs=heldout_pairs, seeds_per_prompt=seeds_per_prompt,
                   calib_pairs=calib_pairs, guidance=settings.guidance)
    backend = resolve_backend(backend, pipeline=problem is not None and not isinstance(problem, TinyflowProblem),
                              mechanism=mechanism)
    workers = resolve_workers(backend, workers)
    if split not in WORK_SPLITS:
        raise ConfigError(f"--split {split!r} is unknown; choose one of {list(WORK_SPLITS)}")
    if split != "auto" and backend not in ("local", "ray"):
        raise ConfigError(f"--split applies only with workers, --backend local or ray (the backend here is "
                          f"{backend})")
    if scheme not in SCHEMES:
        raise ConfigError(f"--scheme {scheme!r} is unknown; choose one of {list(SCHEMES)}")
    if keep not in KEEP_RULES:
        raise ConfigError(f"--keep {keep!r} is unknown; choose one of {list(KEEP_RULES)}")
    if refine_scheme not in REFINE_SCHEMES:
        raise ConfigError(f"--refine-scheme {refine_scheme!r} is unknown; choose one of {list(REFINE_SCHEMES)}")
    out = check_writable_dir(out, "--out")
    earlier = [*(f"checkpoint_N{steps}_K{k}{tag}.json" for k in sorted(set(nfes))
                 for tag in ("", *(f"_{m}" for m in (mechanisms or ())[1:]))),
               *sorted(p.name for k in set(nfes) for p in out.glob(f"estimators_N{steps}_K{k}_*.json"))]
    refuse_overwrite(out, earlier, resume, force, stale=earlier)
    if problem is None:
        problem = TinyflowProblem(settings=settings, model=model)
    candidates = tuple(dict.fromkeys(mechanisms or (mechanism,)))
    for m in candidates:
        if m not in ALL_MECHANISMS:
            raise ConfigError(f"mechanism {m!r} is unknown; choose one of {list(ALL_MECHANISMS)}")
    default = isinstance(estimators, str)
    if default and estimators != DEFAULT_CHOICES:
        raise ConfigError(f"estimators={estimators!r}: give a list of names, None, or {DEFAULT_CHOICES!r}")

    def choices(m: str) -> Sequence[str] | None:
        if m in PEER_MECHANISMS and (default or len(candidates) > 1):
            return None  # the peer's own hooks fill its skipped steps
        return DEFAULT_REFINE if default else estimators

    plans = {m: search_estimators(m, choices(m)) for m in candidates}
    own = next((m for m in candidates if m not in PEER_MECHANISMS and plans[m][1]), None)
    hybrids = tuple(f"{own}{ON}{p}" for p in candidates if p in PEER_MECHANISMS) if peer_masks and own else ()
    peer_rounds = PEER_MASK_SWEEPS if refine_scheme == "sweep" else None  # None: the scheme's default
    kw_of = {m: ({**PEER_SEARCH, **search_kw} if m in PEER_MECHANISMS else search_kw) for m in candidates}
    configs = {m: {k: SearchConfig(steps=steps, nfe=k, seed=seed, **kw_of[m]) for k in sorted(set(nfes))}
               for m in candidates}
    loss_fn = get_loss(loss)
    prompts, seeds = calibration_pairs(problem, calib_pairs, seed, seeds_per_prompt=seeds_per_prompt,
                                       prompt_file=prompt_file)
    if backend in ("local", "ray"):
        resolve_split(split, workers, len(prompts))  # a split that cannot be made fails before the teacher runs
    phases = dict.fromkeys(PHASES, 0.0)  # wall seconds per phase of the run, for the report
    t_phase = time.perf_counter()
    phases["setup"] = t_phase - t_start
    with phase("teacher (calibration)" if progress else None, len(prompts) * steps):
        calib = problem.calibration(prompts, seeds)
    calib.info["loss"] = loss
    hp, hs = split_pairs(problem, "heldout", heldout_pairs, seed, prompts)
    with phase("teacher (held-out)" if progress else None, len(hp) * steps):
        held = problem.calibration(hp, hs)

    def lap(name: str) -> None:
        """Add the wall time since the last lap to phase ``name``."""
        nonlocal t_phase
        now = time.perf_counter()
        phases[name] += now - t_phase
        t_phase = now

    lap("teachers")
    where = {m: backend if m not in PEER_MECHANISMS else "inprocess" for m in candidates}
    concurrent = concurrent_candidates(where)
    evaluators = {m: make_backend(where[m], problem.with_settings(mechanism=m), calib, loss=loss_fn, naive=naive,
                                  workers=workers if where[m] != "inprocess" else 1, address=ray_address,
                                  estimator=plans[m][0], mechanism=m,
                                  split=split if where[m] != "inprocess" else "auto") for m in candidates}
    for h in hybrids:  # after its peer, on this process's thread (beside budcache's own candidate's workers)
        where[h] = "inprocess"
        evaluators[h] = make_backend("inprocess", problem.with_settings(mechanism=own), calib, loss=loss_fn,
                                     naive=naive, workers=1, estimator=plans[own][0], mechanism=own)
    outcomes: list[BudgetOutcome] = []
    prev: dict[str, tuple[int, ...] | None] = dict.fromkeys(candidates)
    peer_done: dict[tuple[int, str], tuple[SearchResult, int, EvaluatorStats]] = {}  # (budget, peer) -> its outcome

    def attempt(k: int, i: int, m: str, cancel: threading.Event | None = None) -> tuple[Any, ...]:
        """Search budget ``k`` with candidate ``m``: ``(loss, i, m, result, refinement, names, stats, masks run)``."""
        ev = evaluators[m] if cancel is None else Cancellable(evaluators[m], cancel)
        before = EvaluatorStats(**asdict(ev.stats))
        mech, peer = candidate_parts(m)
        if peer is not None:  # budcache's estimators chosen per step on the peer's searched schedule
            res, masks_run, searched = peer_done[(k, peer)]
            refined, names = refine_plan(problem.with_settings(mechanism=mech), calib, ev, res.compute, mech,
                                         plans[mech][1], loss_fn, naive=naive, progress=progress,
                                         scheme=refine_scheme, rounds=peer_rounds,
                                         checkpoint=out / refine_checkpoint(steps, k, m), resume=resume)
            if refined is None:  # cannot happen: ``own`` has per-step choices and its evaluator an estimator
                raise BudcacheError(f"candidate {m}: no per-step estimators to choose")
            stats = EvaluatorStats(**{f: getattr(ev.stats, f) - getattr(before, f) + getattr(searched, f)
                                      for f in asdict(before)})  # the peer's mask search and these plans
            return (refined.loss, i, m, res, refined, names, stats, masks_run)
        if m in PEER_MECHANISMS:
            prev[m] = peer_grid_start(ev, steps, k) or (prev[m] if warm_start else None)
        name = f"checkpoint_N{steps}_K{k}.json" if i == 0 else f"checkpoint_N{steps}_K{k}_{m}.json"
        res = search_scheme(scheme, ev.losses, configs[m][k], workers=getattr(evaluators[m], "proposals", workers),
                            sa_batch=ev.sa_batch,
                            init=prev[m], checkpoint=out / name, resume=resume, digest=calib.digest,
                            progress=progress, on_step=None if cancel is None else ev.check)
        masks_run = ev.stats.evaluations - before.evaluations
        refined, names = refine_plan(problem.with_settings(mechanism=m), calib, ev, res.compute, m,
                                     plans[m][1], loss_fn, naive=naive, progress=progress, scheme=refine_scheme,
                                     checkpoint=out / refine_checkpoint(steps, k, m), resume=resume)
        stats = EvaluatorStats(**{f: getattr(ev.stats, f) - getattr(before, f) for f in asdict(before)})
        peer_done[(k, m)] = (res, masks_run, stats)
        if warm_start:
            prev[m] = res.compute
        return (refined.loss if refined is not None else res.loss, i, m, res, refined, names, stats, masks_run)

    def policy_of(k: int, tried: list[tuple[Any, ...]], value: float, m: str, res: SearchResult,
                  names: Sequence[str] | None, kept: str | None = None,
                  wins: dict[str, dict[str, int]] | None = None) -> CachePolicy:
        """Budget ``k``'s policy of candidate ``m`` (``tried``: every candidate's outcome, for the meta; ``kept``:
        the candidate the budget keeps; ``wins``: the calibration pairs each candidate wins against each other)."""
        mech, peer = candidate_parts(m)
        meta = {"model": problem.name, "solver": settings.solver, "schedule": problem.schedule,
                "mechanism": mech, "guidance": settings.guidance, "budget": k, "search_loss": value, "loss": loss,
                "calibration_digest": calib.digest, "calibration_pairs": len(calib),
                "budcache_version": __version__}
        if peer is not None:
            meta["mask_from"] = peer
        if len(tried) > 1:
            meta["candidates"] = {t[2]: t[0] for t in tried}
            meta["candidate"] = m
            meta["kept"] = kept or m
            meta["keep"] = keep
            if wins is not None:
                meta["pair_wins"] = wins
        return CachePolicy(steps, res.compute, meta=meta, estimators=names)

    def choose(k: int, tried: list[tuple[Any, ...]]) -> tuple[tuple[Any, ...], dict[str, dict[str, int]] | None]:
        """The outcome budget ``k`` keeps by ``keep``, and the paired wins (``pairs`` rule, several candidates)."""
        by_mean = min(tried, key=lambda t: (t[0], t[1]))
        if keep == "mean" or len(tried) < 2:
            return by_mean, None
        per_pair = {}
        with phase(f"keeping K={k}" if progress else None, len(tried) * len(calib) * steps):
            for t in tried:
                pol = policy_of(k, tried, t[0], t[2], t[3], t[5])
                per_pair[t[2]] = loss_fn(problem.final_latents(calib, pol), calib.teacher).double().numpy()
        wins = pair_wins(per_pair)
        winner = winner_of(wins)
        return (next(t for t in tried if t[2] == winner) if winner is not None else by_mean), wins

    lap("setup")  # the evaluators' start (worker processes)
    for k in sorted(set(nfes)):
        names_k = (*candidates, *hybrids)
        if concurrent:
            tried = run_concurrently(attempt, k, names_k, where)
        else:
            tried = [attempt(k, i, m) for i, m in enumerate(names_k)]
        lap("search")
        chosen, wins = choose(k, tried)
        lap("keep")
        value, _, m, res, refined, names, stats, masks_run = chosen
        policy = policy_of(k, tried, value, m, res, names, m, wins)
        if len(tried) > 1:  # every candidate's own policy too, e.g. to compare TaylorSeer's searched schedule
            for t in tried:
                pol = policy if t[2] == m else policy_of(k, tried, t[0], t[2], t[3], t[5], m, wins)
                pol.save(out / f"policy_N{steps}_K{k}_{t[2]}.json")
        policy.save(out / f"policy_N{steps}_K{k}.json")
        plot_history(res.history, out / f"history_N{steps}_K{k}.png", f"search N={steps}, K={k} ({m})")
        lap("report")
        o = BudgetOutcome(k, res, policy, stats, refined=refined, mask_evaluations=masks_run)
        with phase(f"held-out K={k}" if progress else None, len(held) * (2 * steps + k)):
            o.heldout = heldout_table(problem, held, policy)
        lap("heldout")
        outcomes.append(o)
    for ev in evaluators.values():
        ev.close()
    lap("setup")  # the workers' shut-down
    mechanism = "+".join((*candidates, *hybrids))
    meta = {"date": datetime.date.today().isoformat(), "model": problem.name, "steps": steps,
            "solver": settings.solver, "mechanism": mechanism, "guidance": settings.guidance,
            "calibration_pairs": len(calib),
            "digest": calib.digest, "heldout_pairs": len(held), "backend": backend, "workers": workers,
            "scheme": scheme, "warm_start": warm_start, "concurrent_candidates": concurrent,
            "keep": keep if len(candidates) + len(hybrids) > 1 else None,
            "refine_scheme": refine_scheme,
            "refine_rounds": {"own": DEFAULT_REFINE_ROUNDS[refine_scheme],
                              "peer_mask": (peer_rounds or DEFAULT_REFINE_ROUNDS[refine_scheme]) if hybrids else None},
            "split": next((e.split for e in evaluators.values() if hasattr(e, "split")), None)}
    if len(outcomes) > 1:
        plot_frontier(outcomes, out / "frontier.png")
    lap("report")
    meta["phases_s"] = phases
    meta["wall_s"] = time.perf_counter() - t_start
    meta["cpu_s"] = time.process_time() - cpu_start  # this process only (local or Ray workers are apart)
    atomic_write_text(out / "report.md", report(outcomes, meta))
    write_json(out / "summary.json", {"meta": meta, "budgets": [
        {"nfe": o.nfe, "compute": list(o.result.compute), "loss": o.result.loss, "stats": asdict(o.stats),
         "mask_evaluations": o.mask_evaluations,
         "wall_s": o.result.wall_s, "heldout": o.heldout,
         "estimators": list(o.policy.estimators) if o.policy.estimators is not None else None,
         "estimator_loss": o.refined.loss if o.refined else None,
         "estimator_evaluations": o.refined.evaluations if o.refined else 0,
         "estimator_wall_s": o.refined.wall_s if o.refined else 0.0} for o in outcomes]})
    return outcomes
