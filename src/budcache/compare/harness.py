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

import csv
import datetime
import io
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
from ..io import atomic_write_bytes, atomic_write_text, read_json_limited, write_json
from ..methods import BudcacheMethod, PlainMethod, UniformMethod, available_methods, build_methods
from ..plots import pyplot, save_figure
from ..policy import CachePolicy
from ..problems.base import Problem
from ..problems.data import calibration_pairs, split_pairs
from ..problems.metrics import item_metrics
from ..problems.settings import SamplerSettings
from ..problems.tinyflow import TinyflowProblem, tinyflow_prompts
from ..sampler import select_items
from ..search.losses import get_loss
from ..solvers import SOLVERS

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
    policies: dict[int, CachePolicy] = field(default_factory=dict)
    #: budcache's search inside compare: shorter than ``budcache search`` (200 / 20) to keep the run short
    search_kw: dict[str, Any] = field(default_factory=lambda: {"sa_iters": 40, "hc_rounds": 6})
    search_loss: str = "logmse"
    grid_nfe: int | None = None                 # None: the budget nearest 10
    grid_rows: int = 6
    transfer_solvers: tuple[str, ...] = ("dpmpp2m", "ipndm")
    transfer_guidance: tuple[float, ...] = (2.0, 4.0)
    transfer: bool = True
    batch: int = 1                              # evaluation batch (1: wall time is per-image latency)

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
        for k, pol in self.policies.items():
            if pol.nfe != k or pol.steps != self.steps:
                raise ConfigError(f"policy given for NFE {k} computes {pol.nfe} of {pol.steps} steps; the "
                                  f"comparison needs {k} of {self.steps}")


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
    """Add ``budcache_wins`` (pairs where ``ours`` has the higher PSNR) and ``pairs`` to every other row."""
    if ours not in psnr:
        return
    mine = psnr[ours]
    for r in rows:
        if r["method"] != ours and r["method"] in psnr:
            r["budcache_wins"] = int((mine > psnr[r["method"]]).sum())
            r["pairs"] = int(len(mine))


def _fit_info(m: Any) -> dict[str, Any]:
    """What a fitted method chose (mask, threshold, schedule), for the JSON output."""
    info: dict[str, Any] = {}
    for key in ("threshold", "calib_nfe", "before", "interval", "max_skip_steps", "retention_ratio"):
        v = getattr(m, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            info[key] = v
    pol = getattr(m, "policy", None)
    if isinstance(pol, CachePolicy):
        info["mask"] = pol.strip()
        info["compute"] = list(pol.compute)
    return info


@dataclass
class CompareResult:
    """Every row of the comparison, the grid images and the run's metadata."""

    rows: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    meta: dict[str, Any]
    policies: dict[str, dict[int, CachePolicy]]  # budcache method name -> budget -> searched policy


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
    bar = tqdm(total=len(cfg.nfes) * len(methods), desc="compare", disable=not progress, unit="method")
    for k in sorted(cfg.nfes):
        for m in methods:
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
        paired_wins([r for r in rows if r["budget"] == k], {n: v for (kk, n), v in per_item.items() if kk == k})
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


def load_result(path: str | Path) -> CompareResult:
    """A comparison from its ``results.json`` (or the directory holding it); policies are not reloaded."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"{p} does not exist (run budcache compare first)")
    d = read_json_limited(p, max_bytes=64 << 20, max_depth=32, what="compare result", error=ConfigError)
    if not isinstance(d, dict) or d.get("format") != "budcache.compare":
        raise ConfigError(f"{p} is not a budcache compare result")
    return CompareResult(list(d["rows"]), list(d["transfer"]), dict(d["meta"]), {})


def merge_results(parts: Sequence[CompareResult]) -> CompareResult:
    """One comparison from runs on the same model, steps, settings and pairs (e.g. methods run separately)."""
    if not parts:
        raise ConfigError("nothing to merge")
    keys = ("model", "steps", "solver", "guidance", "calibration_pairs", "evaluation_pairs", "seed")
    first = parts[0].meta
    for other in parts[1:]:
        diff = [k for k in keys if other.meta.get(k) != first.get(k)]
        if diff:
            raise ConfigError(f"cannot merge comparisons that differ in {diff}")
    seen: set[tuple[str, int, str]] = set()
    rows = []
    for part in parts:
        for r in part.rows:
            key = (r["setting"], r["budget"], r["method"])
            if key in seen:
                raise ConfigError(f"method {r['method']!r} at K={r['budget']} appears in two comparisons")
            seen.add(key)
            rows.append(r)
    meta = {**first, "budgets": sorted({r["budget"] for r in rows}),
            "methods": list(dict.fromkeys(r["method"] for r in rows)),
            "wall_s": sum(p.meta.get("wall_s", 0.0) for p in parts)}
    return CompareResult(rows, [r for p in parts for r in p.transfer], meta, {})


# ------------------------------------------------------------------------------ outputs
COLUMNS = ("setting", "budget", "method", "kind", "latent_mse", "psnr", "psnr_median", "ssim", "lpips",
           "checker_acc", "budcache_wins", "pairs", "nfe_mean", "nfe_min", "nfe_max", "wall_ms", "fit_s")


def best_flags(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, str]]:
    """Per (setting, budget): the method with the best mean PSNR, median PSNR and SSIM, and the lowest MSE."""
    out: dict[tuple[str, int], dict[str, str]] = {}
    for key in {(r["setting"], r["budget"]) for r in rows}:
        group = [r for r in rows if (r["setting"], r["budget"]) == key]
        out[key] = {"psnr": max(group, key=lambda r: r["psnr"])["method"],
                    "latent_mse": min(group, key=lambda r: r["latent_mse"])["method"]}
        for metric in ("psnr_median", "ssim"):
            have = [r for r in group if metric in r]
            if have:
                out[key][metric] = max(have, key=lambda r: r[metric])["method"]
    return out


def markdown(res: CompareResult) -> str:
    """The Markdown report: one table per budget, the transfer table and a note where budcache is not best."""
    m = res.meta
    lines = [f"# budcache compare ({m['date']})", "",
             f"Model {m['model']}, {m['steps']} steps, solver {m['solver']}, guidance {m['guidance']:g}; "
             f"{m['calibration_pairs']} calibration pairs, {m['evaluation_pairs']} evaluation pairs (disjoint); "
             f"quality against the {m['steps']}-step output of the same noise. Wall time per image at batch "
             f"{m['batch']}, {m['threads']} thread(s). {m['lpips']}."]
    if m.get("full_checker_acc") is not None:
        lines.append(f"Checker accuracy of the full {m['steps']}-step images: {m['full_checker_acc']:.1%}.")
    has_lpips = any("lpips" in r for r in res.rows)
    head = "| method | kind | NFE mean [min, max] | latent MSE | PSNR (dB) | median PSNR | SSIM |" + \
        (" LPIPS |" if has_lpips else "") + " checker | budcache wins | ms/image | fit (s) |"
    sep = "|" + "---|" * (head.count("|") - 1)
    flags = best_flags(res.rows)
    misses = []
    for k in res.meta["budgets"]:
        group = [r for r in res.rows if r["budget"] == k]
        f = flags[("main", k)]
        lines += ["", f"## K = {k} of {m['steps']}", "", head, sep]
        for r in group:
            mse = f"**{r['latent_mse']:.3e}**" if f["latent_mse"] == r["method"] else f"{r['latent_mse']:.3e}"
            psnr = f"**{r['psnr']:.2f}**" if f["psnr"] == r["method"] else f"{r['psnr']:.2f}"
            lp = f" {r['lpips']:.4f} |" if has_lpips else ""
            acc = f"{r['checker_acc']:.1%}" if "checker_acc" in r else "n/a"
            ssim = f"{r['ssim']:.4f}" if "ssim" in r else "n/a"
            med = f"{r['psnr_median']:.2f}" if "psnr_median" in r else "n/a"
            if f.get("psnr_median") == r["method"]:
                med = f"**{med}**"
            if f.get("ssim") == r["method"]:
                ssim = f"**{ssim}**"
            wins = f"{r['budcache_wins']}/{r['pairs']}" if "budcache_wins" in r else ""
            lines.append(f"| {r['method']} | {r['kind']} | {r['nfe_mean']:.2f} [{r['nfe_min']:.2f}, "
                         f"{r['nfe_max']:.2f}] | {mse} | {psnr} | {med} | {ssim} |{lp} {acc} | {wins} | "
                         f"{r['wall_ms']:.1f} | {r['fit_s']:.1f} |")
        ours = [r for r in group if r["method"].startswith("budcache")]
        for metric, unit, better in (("psnr", " dB", max), ("latent_mse", "", min)):
            if not ours:
                continue
            best, mine = f[metric], better(ours, key=lambda r: r[metric])
            fmt = (lambda v, u=unit: f"{v:.2f}{u}") if metric == "psnr" else (lambda v: f"{v:.3e}")
            val = {r["method"]: r[metric] for r in group}
            label = metric.replace("_", " ").replace("psnr", "PSNR")
            if not best.startswith("budcache"):
                misses.append(f"K={k}: best {label} is {best} ({fmt(val[best])}); budcache's best, "
                              f"{mine['method']}, has {fmt(mine[metric])}")
    if res.transfer:
        tnames = list(dict.fromkeys(r["method"] for r in res.transfer))
        lines += ["", "## Transfer without re-searching", "",
                  f"The policies searched with {m['solver']} at guidance {m['guidance']:g}, evaluated unchanged; "
                  "the reference is the full-step output under each setting.", "",
                  "| setting | K | " + " | ".join(f"{n} MSE | PSNR" for n in tnames) + " |",
                  "|---|---|" + "---|---|" * len(tnames)]
        for (setting, k) in sorted({(r["setting"], r["budget"]) for r in res.transfer}):
            by = {r["method"]: r for r in res.transfer if (r["setting"], r["budget"]) == (setting, k)}
            cells = " | ".join(f"{by[n]['latent_mse']:.3e} | {by[n]['psnr']:.2f}" if n in by else "- | -"
                               for n in tnames)
            lines.append(f"| {setting} | {k} | {cells} |")
    lines += ["", "## Where budcache is not best", ""]
    if misses:
        lines += [f"- {s}" for s in misses]
    elif any(r["method"].startswith("budcache") for r in res.rows):
        lines.append("A budcache method has the best PSNR and latent MSE at every budget.")
    else:
        lines.append("No budcache method in this comparison.")
    lines.append("")
    return "\n".join(lines)


def write_outputs(out: Path, res: CompareResult, grid: dict[str, torch.Tensor] | None = None,
                  grid_prompts: Sequence[str] = ()) -> None:
    """table.md, results.csv, results.json, quality_vs_nfe.png and the image grid, each atomically."""
    atomic_write_text(out / "table.md", markdown(res))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in res.rows + res.transfer:
        w.writerow({c: r.get(c, "") for c in COLUMNS})
    atomic_write_text(out / "results.csv", buf.getvalue())
    write_json(out / "results.json", {"format": "budcache.compare", "version": 1, "meta": res.meta,
                                      "rows": res.rows, "transfer": res.transfer})
    plot_quality(res.rows, out / "quality_vs_nfe.png")
    if grid:
        write_grid(grid, grid_prompts, out / f"grid_K{res.meta['grid_nfe']}.png")


def plot_quality(rows: list[dict[str, Any]], path: Path) -> bool:
    """PSNR and latent MSE against mean NFE, one line per method; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["nfe_mean"], r["psnr"], r["latent_mse"]) for r in rows if r["method"] == name)
        style = "o-" if name.startswith("budcache") else ".--"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=name)
    axes[0].set_ylabel("PSNR vs full steps (dB)")
    axes[1].set_ylabel("latent MSE vs full steps")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("mean NFE (full evaluations per image)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(plt, fig, path)
    return True


def write_grid(columns: dict[str, torch.Tensor], prompts: Sequence[str], path: Path, scale: int = 3) -> None:
    """PNG grid: one row per prompt, columns full then each method, a title row with the column names."""
    from PIL import Image, ImageDraw

    names = list(columns)
    rows = len(prompts)
    h, w = columns[names[0]].shape[-2:]
    cw, ch, pad, head = w * scale, h * scale, 4, 14
    canvas = Image.new("RGB", (len(names) * (cw + pad) + pad, head + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        x = pad + c * (cw + pad)
        draw.text((x, 1), name[: max(4, cw // 6)], fill="black")
        imgs = (columns[name].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for r in range(rows):
            tile = Image.fromarray(imgs[r]).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (x, head + pad + r * (ch + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["CompareConfig", "CompareResult", "run_compare", "load_result", "merge_results", "write_outputs",
           "make_problem",
           "quality", "markdown", "DEFAULT_NFES",
           "DEFAULT_METHODS", "lpips_status", "pair_sets", "evaluate"]
