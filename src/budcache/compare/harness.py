"""The comparison harness: every method at each budget on the same model, noise, sigmas and solver.

For each budget K (default 6, 8, 10, 14 of 28 steps) every method is fitted
on the calibration pairs and evaluated on prompt x seed pairs disjoint from
them. Quality is measured against the full-step output of the same noise:

- latent MSE ``mean((x - x_full)^2)``;
- PSNR ``10 log10(1 / mean((I - I_full)^2))`` and SSIM of the decoded images
  in [0, 1] (torchmetrics);
- LPIPS when torchvision and its backbone weights are already on disk;
- checker accuracy (does the image show what the prompt states);
- NFE mean / min / max over evaluation pairs and wall time per image.

Outputs (written atomically): ``table.md``, ``results.csv``, ``results.json``,
``quality_vs_nfe.png``, ``grid_K*.png``, and the searched policies. The
transfer study (paper Table 3) evaluates the policy searched with the base
solver and guidance under other solvers and guidance scales, without
re-searching.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ConfigError, MissingExtraError
from ..methods import (
    BudcacheMethod,
    GivenPolicies,
    PlainMethod,
    UniformMethod,
    available_methods,
    build_methods,
    given_lists,
    policy_method,
    route_policies,
)
from ..policy import CachePolicy
from ..problems.base import Problem
from ..problems.data import calibration_pairs, split_pairs
from ..problems.metrics import item_metrics, paired_gap
from ..problems.settings import SamplerSettings
from ..problems.tinyflow import TinyflowProblem, tinyflow_prompts
from ..sampler import select_items
from ..search.losses import get_loss
from ..solvers import SOLVERS
from .report import CompareResult, write_outputs

DEFAULT_NFES = (6, 8, 10, 14)
DEFAULT_METHODS = ("budcache", "budcache-reuse", "budcache-forecast", "uniform", "plain", "fbcache", "magcache",
                   "taylorseer", "taylorseer-searched")
#: Methods evaluated in the transfer study (static masks: no re-fitting per setting).
TRANSFER_METHODS = ("budcache", "uniform", "plain")


@dataclass
class CompareConfig:
    """What ``budcache compare`` runs."""

    nfes: tuple[int, ...] = DEFAULT_NFES
    steps: int = 28
    solver: str = "euler"
    guidance: float = 1.0
    methods: tuple[str, ...] | None = None      # None: DEFAULT_METHODS plus every installed extra/baseline
    calib_pairs: int = 12
    eval_pairs: int = 32
    seed: int = 0
    #: budget -> a policy to run instead of searching, or several that run as different methods (e.g. the
    #: default search's kept policy and its TaylorSeer-schedule policy); the first is the reference row
    policies: GivenPolicies = field(default_factory=dict)
    #: budcache's search inside compare: shorter than ``budcache search`` (200 / 20) to keep the run short
    search_kw: dict[str, Any] = field(default_factory=lambda: {"sa_iters": 40, "hc_rounds": 6})
    search_loss: str = "logmse"
    grid_nfe: int | None = None                 # None: the budget nearest 10
    grid_rows: int = 6
    transfer_solvers: tuple[str, ...] = ("dpmpp2m", "ipndm")
    transfer_guidance: tuple[float, ...] = (2.0, 4.0)
    transfer: bool = True
    batch: int = 1                              # evaluation batch (1: wall time is per-image latency)
    #: with ``policies``: budcache's methods run only the given policies; one without a policy at a budget
    #: is left out there instead of searching (``--given-only``)
    given_only: bool = False

    def validate(self) -> None:
        if not self.nfes:
            raise ConfigError("give at least one budget (--nfe)")
        if self.steps < 2:
            raise ConfigError(f"--steps must be >= 2 (got {self.steps})")
        for k in self.nfes:
            if not 1 <= k < self.steps:
                raise ConfigError(f"budget {k} must lie in 1..{self.steps - 1} (fewer than --steps {self.steps})")
        if self.calib_pairs < 1 or self.eval_pairs < 1:
            raise ConfigError(f"calibration and evaluation pairs must be >= 1 (got {self.calib_pairs}, "
                              f"{self.eval_pairs})")
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1 (got {self.batch})")
        if self.grid_rows < 1:
            raise ConfigError(f"--grid-rows must be >= 1 (got {self.grid_rows})")
        if self.grid_nfe is not None and self.grid_nfe not in self.nfes:
            raise ConfigError(f"--grid-nfe {self.grid_nfe} is not one of the budgets {list(self.nfes)}")
        for s in (self.solver, *self.transfer_solvers):
            if s not in SOLVERS:
                raise ConfigError(f"solver {s!r} is unknown; choose one of {sorted(SOLVERS)}")
        for g in (self.guidance, *self.transfer_guidance):
            if not (math.isfinite(g) and g > 0):
                raise ConfigError(f"guidance must be a positive number (got {g})")
        get_loss(self.search_loss)
        if self.given_only and not self.policies:
            raise ConfigError("--given-only needs --policy files (it runs only the given policies)")
        for k, pols in given_lists(self.policies).items():
            for pol in pols:
                if pol.nfe != k or pol.steps != self.steps:
                    raise ConfigError(f"policy given for NFE {k} computes {pol.nfe} of {pol.steps} steps; the "
                                      f"comparison needs {k} of {self.steps}")
        route_policies(self.policies)


def make_problem(cfg: CompareConfig) -> TinyflowProblem:
    """The default model of a comparison: tinyflow with the configured steps, solver and guidance."""
    return TinyflowProblem(settings=SamplerSettings(cfg.steps, cfg.solver, "reuse", cfg.guidance))


def pair_sets(cfg: CompareConfig, problem: Problem | None = None) -> tuple[tuple[list[str], list[int]],
                                                                          tuple[list[str], list[int]]]:
    """Calibration and evaluation (held-out split) prompt x seed pairs, which share no pair.

    Args:
        cfg: the comparison (pair counts and seed).
        problem: the problem whose prompts are drawn (default: tinyflow's grammar).
    """
    problem = problem if problem is not None else _PromptsOnly()
    cp, cs = calibration_pairs(problem, cfg.calib_pairs, cfg.seed)
    ep, es = split_pairs(problem, "heldout", cfg.eval_pairs, cfg.seed, cp)
    shared = set(zip(cp, cs)) & set(zip(ep, es))
    if shared or set(cs) & set(es):
        raise ConfigError(f"evaluation pairs overlap calibration pairs ({len(shared)} shared); use another --seed")
    return (cp, cs), (ep, es)


class _PromptsOnly:
    """tinyflow's prompt draws without its weights (to list a comparison's pairs)."""

    draws_prompts = True

    @staticmethod
    def prompts(n: int, seed: int) -> list[str]:
        return tinyflow_prompts(n, seed=seed)


# ------------------------------------------------------------------------------ metrics
def lpips_status() -> tuple[Any, str]:
    """An LPIPS metric when it can run offline, else ``(None, why not)``; never downloads."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None, "LPIPS skipped: it needs torchvision (not installed) and its AlexNet weights on disk"
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not ckpt.is_file():
        return None, f"LPIPS skipped: backbone weights {ckpt} are not on disk (budcache never downloads them)"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="mean"), "LPIPS (alex)"


def quality(problem: Problem, latents: torch.Tensor, teacher: torch.Tensor, prompts: Sequence[str],
            lpips: Any = None) -> dict[str, np.ndarray]:
    """Per-item metrics against the full-step outputs ``teacher`` (:func:`budcache.problems.item_metrics`)."""
    try:
        import torchmetrics  # noqa: F401  (SSIM)
    except ImportError:
        raise MissingExtraError("budcache compare needs torchmetrics: pip install torchmetrics") from None
    return item_metrics(problem, latents, teacher, prompts, lpips)


# ------------------------------------------------------------------------------ evaluation
def evaluate(problem: Any, method: Any, evalset: Any, batch: int, desc: str,
             progress: bool = True) -> tuple[torch.Tensor, np.ndarray, float]:
    """Final latents, per-item NFE and wall seconds per item of a fitted method on ``evalset``."""
    lat, nfe = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(evalset), batch), desc=desc, leave=False, unit="batch", disable=not progress):
        idx = torch.arange(i, min(i + batch, len(evalset)))
        run = method.sample(problem, evalset.noise[idx], select_items(evalset.cond, idx),
                            select_items(evalset.uncond, idx))
        if run.latent.shape != evalset.noise[idx].shape or run.nfe.shape != (len(idx),):
            raise ConfigError(f"method {method.name!r} returned latents {tuple(run.latent.shape)} and nfe "
                              f"{tuple(run.nfe.shape)} for a batch of {len(idx)}")
        lat.append(run.latent)
        nfe.append(run.nfe.double().numpy())
    wall = (time.perf_counter() - t0) / len(evalset)
    return torch.cat(lat), np.concatenate(nfe), wall


def _row(setting: str, nfe: int, name: str, kind: str, q: dict[str, np.ndarray], nfes: np.ndarray,
         wall: float, fit_s: float, info: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": setting, "budget": nfe, "method": name, "kind": kind,
                           "latent_mse": float(q["latent_mse"].mean()), "psnr": float(q["psnr"].mean()),
                           "psnr_median": float(np.median(q["psnr"])),
                           **({"ssim": float(q["ssim"].mean())} if "ssim" in q else {})}
    if "lpips" in q:
        row["lpips"] = float(q["lpips"].mean())
    if "checker_ok" in q:
        row["checker_acc"] = float(q["checker_ok"].mean())
    row.update({"nfe_mean": float(nfes.mean()), "nfe_min": float(nfes.min()), "nfe_max": float(nfes.max()),
                "wall_ms": 1000 * wall, "fit_s": fit_s, "info": info})
    return row


def paired_wins(rows: list[dict[str, Any]], psnr: dict[str, np.ndarray], ours: str = "budcache") -> None:
    """Mark ``ours`` with ``wins_reference`` and add to every other row, pair by pair against ``ours``:

    - ``budcache_wins``: pairs where ``ours`` has the higher PSNR, of ``pairs``;
    - ``psnr_gap`` / ``median_gap``: mean and median PSNR of ``ours`` minus this row's (dB), each with its 95%
      paired bootstrap interval (``psnr_gap_ci``, ``median_gap_ci``; :func:`budcache.problems.paired_gap`);
    - ``gap_reference``: ``ours``, the method the gaps are measured from.

    Args:
        rows: one budget's rows, updated in place.
        psnr: method name -> per-pair PSNR on the evaluation pairs (the same pairs, in the same order).
        ours: the reference method.
    """
    if ours not in psnr:
        return
    mine = psnr[ours]
    for r in rows:
        if r["method"] == ours:
            r["wins_reference"] = True
        elif r["method"] in psnr:
            r["budcache_wins"] = int((mine > psnr[r["method"]]).sum())
            r["pairs"] = int(len(mine))
            r["gap_reference"] = ours
            for key, stat in (("psnr_gap", "mean"), ("median_gap", "median")):
                r.update(paired_gap(mine, psnr[r["method"]], stat).fields(key))


def _fit_info(m: Any) -> dict[str, Any]:
    """What a fitted method chose (mask, threshold, schedule), for the JSON output."""
    info: dict[str, Any] = {}
    for key in ("threshold", "calib_nfe", "before", "interval", "max_skip_steps", "retention_ratio", "warmup",
                "start_loss", "search_loss", "evaluations"):
        v = getattr(m, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            info[key] = v
    pol = getattr(m, "policy", None)
    if isinstance(pol, CachePolicy):
        info["mask"] = pol.strip()
        info["compute"] = list(pol.compute)
    elif isinstance(getattr(m, "mask", None), list):  # a peer's static steps mask (cache-dit)
        info["mask"] = "".join("C" if v else "." for v in m.mask)
    return info


@torch.no_grad()
def run_compare(out: str | Path, cfg: CompareConfig, progress: bool = True,
                problem: Problem | None = None) -> CompareResult:
    """Fit every method at every budget, evaluate, and write all outputs to ``out``.

    ``problem`` (a :class:`budcache.problems.Problem`) defaults to
    :func:`make_problem` (tinyflow); a PipelineProblem works the same.
    """
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    problem = make_problem(cfg) if problem is None else problem
    names = tuple(cfg.methods) if cfg.methods is not None else _default_names()
    methods = build_methods(names, policies=cfg.policies, search_kw={"seed": cfg.seed, **cfg.search_kw},
                            search_loss=cfg.search_loss)
    (cp, cs), (ep, es) = pair_sets(cfg, problem)
    calib = problem.calibration(cp, cs)
    evalset = problem.calibration(ep, es)
    lpips, lpips_note = lpips_status()
    grid_nfe = cfg.grid_nfe if cfg.grid_nfe is not None else min(cfg.nfes, key=lambda k: (abs(k - 10), k))
    full_q = quality(problem, evalset.teacher, evalset.teacher, ep)
    rows: list[dict[str, Any]] = []
    full_images = problem.images(evalset.teacher[:cfg.grid_rows])
    grid: dict[str, torch.Tensor] = {} if full_images is None else {"full": full_images}  # no decoder: no grid
    policies: dict[str, dict[int, CachePolicy]] = {}
    per_item: dict[tuple[int, str], np.ndarray] = {}
    given = given_lists(cfg.policies)
    bar = tqdm(total=len(cfg.nfes) * len(methods), desc="compare", disable=not progress, unit="method")
    for k in sorted(cfg.nfes):
        for m in methods:
            if cfg.given_only and isinstance(m, BudcacheMethod) and k not in m.policies:
                bar.update(1)
                continue
            bar.set_postfix_str(f"K={k} {m.name}")
            t0 = time.perf_counter()
            m.fit(problem, calib, k)
            fit_s = time.perf_counter() - t0
            lat, nfes, wall = evaluate(problem, m, evalset, cfg.batch, f"{m.name} K={k}", progress)
            q = quality(problem, lat, evalset.teacher, ep, lpips)
            rows.append(_row("main", k, m.name, getattr(m, "kind", "?"), q, nfes, wall, fit_s, _fit_info(m)))
            per_item[(k, m.name)] = q["psnr"]
            if k == grid_nfe and grid:
                grid[m.name] = problem.images(lat[:cfg.grid_rows])
            if isinstance(m, BudcacheMethod) and m.policy is not None:
                policies.setdefault(m.name, {})[k] = m.policy
                tag = "" if m.name == "budcache" else m.name.replace("budcache-", "") + "_"
                m.policy.save(out / f"policy_{tag}N{cfg.steps}_K{k}.json")
            bar.update(1)
        # with a given policy at this budget, the wins are that (first) policy's, whichever method runs it
        ours = policy_method(given[k][0]) if k in given else "budcache"
        paired_wins([r for r in rows if r["budget"] == k], {n: v for (kk, n), v in per_item.items() if kk == k},
                    ours=ours)
    bar.close()
    transfer = _transfer(problem, cfg, policies, (ep, es), lpips, progress) if cfg.transfer and policies else []
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": problem.name, "steps": cfg.steps, "solver": cfg.solver,
            "guidance": cfg.guidance, "budgets": sorted(cfg.nfes), "methods": list(names),
            "calibration_pairs": len(calib), "evaluation_pairs": len(evalset), "seed": cfg.seed,
            "search": {**cfg.search_kw, "loss": cfg.search_loss},
            "batch": cfg.batch, "grid_nfe": grid_nfe, "lpips": lpips_note, "threads": torch.get_num_threads(),
            "full_checker_acc": float(full_q["checker_ok"].mean()) if "checker_ok" in full_q else None,
            "wall_s": time.perf_counter() - t_start}
    res = CompareResult(rows, transfer, meta, policies)
    write_outputs(out, res, grid, ep[:cfg.grid_rows])
    return res


def _default_names() -> tuple[str, ...]:
    extra = [n for n in available_methods() if n not in DEFAULT_METHODS]
    return (*DEFAULT_METHODS, *extra)


def _transfer(problem: Any, cfg: CompareConfig, policies: dict[str, dict[int, CachePolicy]],
              pairs: tuple[list[str], list[int]], lpips: Any, progress: bool) -> list[dict[str, Any]]:
    """The policies searched with the base solver/guidance, evaluated unchanged under other settings."""
    settings = [(s, cfg.guidance) for s in cfg.transfer_solvers] + [(cfg.solver, g) for g in cfg.transfer_guidance]
    ep, es = pairs
    budgets = sorted({k for by_k in policies.values() for k in by_k})
    rows = []
    bar = tqdm(total=len(settings) * len(budgets), desc="transfer", disable=not progress, unit="budget")
    for solver, g in settings:
        p = problem.with_settings(solver=solver, guidance=g)
        evalset = p.calibration(ep, es)  # the full-step output under this setting is the reference
        label = f"{solver}, guidance {g:g}"
        for k in budgets:
            fixed = [BudcacheMethod(name=name, mechanism=str(by_k[k].meta.get("mechanism", "reuse")),
                                    policies={k: by_k[k]})
                     for name, by_k in policies.items() if k in by_k]
            for m in (*fixed, UniformMethod(), PlainMethod()):
                m.fit(p, None, k)
                lat, nfes, wall = evaluate(p, m, evalset, max(cfg.batch, len(evalset)), f"{label} {m.name}",
                                           progress)
                q = quality(p, lat, evalset.teacher, ep, lpips)
                rows.append(_row(label, k, m.name, m.kind, q, nfes, wall, 0.0, _fit_info(m)))
            bar.update(1)
    bar.close()
    return rows


__all__ = ["CompareConfig", "run_compare", "make_problem", "quality", "DEFAULT_NFES", "DEFAULT_METHODS",
           "lpips_status", "pair_sets", "evaluate"]
