"""The ``budcache align`` job: calibrate, align a policy's sigmas (or the plain sampler's, or jointly with the
mask), evaluate on held-out pairs, report."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import atomic_write_text, check_writable_dir, write_json
from ..plots import pyplot, save_figure
from ..policy import CachePolicy
from ..problems.base import Problem
from ..problems.data import CalibrationSet, calibration_pairs, split_pairs
from ..problems.metrics import item_metrics
from ..problems.settings import SamplerSettings
from ..problems.tinyflow import TinyflowProblem
from ..progress import phase
from ..search.anneal import SearchConfig
from ..search.job import refuse_overwrite
from . import distributed
from .joint import joint
from .trainer import AlignConfig, align, final_latents

MODES = ("policy", "uniform", "plain", "joint")
#: The estimator of skipped steps when neither the settings nor the policy name one (as ``budcache search``'s
#: residual forecast of version 1).
DEFAULT_MECHANISM = "forecast1"


@dataclass
class AlignJob:
    """What an align run wrote: the aligned policy, its file, and the held-out rows of the report."""

    mode: str
    nfe: int
    policy: CachePolicy
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def target(policy: CachePolicy | None = None, uniform: int | None = None, plain: int | None = None,
           joint_k: int | None = None) -> tuple[str, int]:
    """The mode (exactly one of the four) and its budget K."""
    given = {m: v for m, v in zip(MODES, (policy, uniform, plain, joint_k)) if v is not None}
    if len(given) != 1:
        raise ConfigError("give one of --policy FILE, --uniform K, --plain K or --joint K")
    mode, v = next(iter(given.items()))
    return mode, (v.nfe if mode == "policy" else v)


def checkpoint_names(mode: str, k: int, steps: int, rounds: int) -> list[str]:
    """The checkpoint files a run of ``mode`` at budget ``k`` writes in its output folder."""
    if mode == "plain":
        return [f"checkpoint_plain_K{k}.safetensors"]
    if mode == "joint":
        return [f"joint_K{k}_round{r}_{part}" for r in range(rounds + 1)
                for part in ("search.json", "align.safetensors")]
    return [f"checkpoint_N{steps}_K{k}.safetensors"]


def check_counts(calib_pairs: int | None, seeds_per_prompt: int, heldout_pairs: int) -> None:
    """The pair counts in range (before any model is loaded)."""
    if calib_pairs is not None and calib_pairs < 1:
        raise ConfigError(f"--calib-pairs must be >= 1 (got {calib_pairs})")
    if seeds_per_prompt < 1:
        raise ConfigError(f"--seeds-per-prompt must be >= 1 (got {seeds_per_prompt})")
    if heldout_pairs < 1:
        raise ConfigError(f"--heldout must be >= 1 (got {heldout_pairs})")


def held_out_quality(problem: Problem, held: CalibrationSet, policy: CachePolicy | None,
                     plain_steps: int | None = None) -> dict[str, float]:
    """Held-out mean latent MSE and PSNR (dB; on images where the problem decodes them)."""
    lat = final_latents(problem, held, policy, plain_steps=plain_steps)
    m = item_metrics(problem, lat.float(), held.teacher.float())
    return {"latent_mse": float(m["latent_mse"].mean()), "psnr": float(m["psnr"].mean())}


@torch.no_grad()
def _sets(problem: Problem, calib_pairs: int | None, prompt_file: str | None, seeds_per_prompt: int,
          heldout_pairs: int, seed: int, validation: bool, progress: bool
          ) -> tuple[CalibrationSet, CalibrationSet, CalibrationSet | None]:
    cp, cs = calibration_pairs(problem, calib_pairs, seed, seeds_per_prompt=seeds_per_prompt, prompt_file=prompt_file)
    hp, hs = split_pairs(problem, "heldout", heldout_pairs, seed, cp)
    with phase("teacher (calibration)" if progress else None, len(cp) * problem.steps):
        calib = problem.calibration(cp, cs)
    with phase("teacher (held-out)" if progress else None, len(hp) * problem.steps):
        held = problem.calibration(hp, hs)
    val = None
    if validation:
        val = problem.calibration(*split_pairs(problem, "validation", max(8, heldout_pairs // 2), seed, cp))
    return calib, held, val


def run_align(out: str | Path, *, policy: CachePolicy | None = None, uniform: int | None = None,
              plain: int | None = None, joint_k: int | None = None, problem: Problem | None = None,
              settings: SamplerSettings | None = None, model: str | None = None,
              config: AlignConfig | None = None, calib_pairs: int | None = None, prompt_file: str | None = None,
              seeds_per_prompt: int = 1, heldout_pairs: int = 32, seed: int = 0, select_on_validation: bool = False,
              rounds: int = 4, tol: float = 1e-3, sa_iters: int = 200, later_sa_iters: int | None = None,
              hc_rounds: int = 20, resume: bool = False, force: bool = False, progress: bool = True) -> AlignJob:
    """Learn the sigma schedule of one target and write the aligned policy, report and plot to ``out``.

    Exactly one target: ``policy`` (its mask), ``uniform`` (the uniform K-of-N
    mask), ``plain`` (the plain K-step sampler, no caching) or ``joint_k``
    (alternate mask search and alignment at K). In a data-parallel run
    (``budcache align --nproc``) every rank calls this; rank 0 writes.

    Args:
        out: output folder (aligned policy, checkpoints, report.md, summary.json, sigmas.png).
        policy: the policy whose sigmas are learned.
        uniform: K of the uniform mask to align.
        plain: K of the plain sampler to align ("Original-Opt", the control).
        joint_k: K of a joint search and alignment.
        problem: what to align on (its settings apply). Default: tinyflow (weights from ``model``) with
            ``settings``, else the policy's ``meta`` (solver, mechanism, guidance), else the defaults.
        settings: the sampler settings when ``problem`` is not given.
        model: tinyflow weights folder (default: the shipped weights); only without ``problem``.
        config: the optimisation (:class:`AlignConfig`; default: the reference's settings, seed ``seed``).
        calib_pairs, prompt_file, seeds_per_prompt: the calibration split (as ``budcache search``).
        heldout_pairs: held-out pairs for the report.
        seed: seed of the pair draws (and of the joint search).
        select_on_validation: keep the schedule best on a validation split (never worse than the start).
        rounds, tol, sa_iters, later_sa_iters, hc_rounds: the joint alternation and its searches.
        resume: continue the checkpoints in ``out``; force: start over, overwriting them.
        progress: show progress bars (rank 0).
    """
    mode, k = target(policy, uniform, plain, joint_k)
    if problem is not None and (settings is not None or model is not None):
        raise ConfigError("give either a problem or settings/model (a problem carries its own settings)")
    if settings is None and problem is None:
        meta = policy.meta if policy is not None else {}
        settings = SamplerSettings(steps=policy.steps if policy is not None else 28,
                                   solver=str(meta.get("solver", "euler")),
                                   mechanism=str(meta.get("mechanism", "reuse" if policy is not None
                                                          else DEFAULT_MECHANISM)),
                                   guidance=float(meta.get("guidance", 1.0)))
    steps = problem.steps if problem is not None else settings.steps
    if not isinstance(k, int) or not 1 <= k <= steps:
        raise ConfigError(f"--{mode} {k}: the budget must lie in 1..{steps} (the number of steps)")
    if policy is not None and policy.steps != steps:
        raise ConfigError(f"the policy has {policy.steps} steps but the sampler runs {steps}")
    check_counts(calib_pairs, seeds_per_prompt, heldout_pairs)
    cfg = config or AlignConfig(seed=seed)
    distributed.init_from_env()
    main = distributed.is_main()
    out = Path(out)
    if main:
        refuse_overwrite(check_writable_dir(out, "--out"), checkpoint_names(mode, k, steps, rounds), resume, force)
    if problem is None:
        problem = TinyflowProblem(settings=settings, model=model)
    progress = progress and main
    calib, held, select = _sets(problem, calib_pairs, prompt_file, seeds_per_prompt, heldout_pairs, seed,
                                select_on_validation, progress)
    rows: list[dict[str, Any]] = []
    if mode in ("policy", "uniform"):
        base = policy if policy is not None else CachePolicy.uniform(steps, k, meta={"budget": k, "mask": "uniform"})
        res = align(problem, calib, base, cfg, checkpoint=out / f"checkpoint_N{steps}_K{k}.safetensors",
                    resume=resume, progress=progress, validation=select)
        name, final = f"policy_aligned_N{steps}_K{k}.json", res.policy
        if main:
            rows.append({"name": name, "before": held_out_quality(problem, held, base),
                         "aligned": held_out_quality(problem, held, res.policy), "history": res.history})
    elif mode == "plain":
        res = align(problem, calib, CachePolicy.full(k), cfg, init_sigmas=problem.sigmas(k),
                    checkpoint=out / f"checkpoint_plain_K{k}.safetensors", resume=resume, progress=progress,
                    validation=select)
        name, final = f"policy_plain_K{k}_aligned.json", res.policy
        if main:
            rows.append({"name": name, "before": held_out_quality(problem, held, None, plain_steps=k),
                         "aligned": held_out_quality(problem, held, res.policy), "history": res.history})
    else:
        scfg = SearchConfig(steps=steps, nfe=k, sa_iters=sa_iters, hc_rounds=hc_rounds, seed=seed)
        with torch.no_grad():
            val = problem.calibration(*split_pairs(problem, "validation", max(8, heldout_pairs // 2), seed,
                                                   calib.prompts))
        jr = joint(problem, calib, val, scfg, cfg, max_rounds=rounds, tol=tol, later_sa_iters=later_sa_iters,
                   out=out, resume=resume, progress=progress)
        name, final = f"policy_joint_N{steps}_K{k}.json", jr.policy
        if main:
            first = CachePolicy(steps, jr.rounds[0].compute)
            rows.append({"name": name, "before": held_out_quality(problem, held, first),
                         "aligned": held_out_quality(problem, held, jr.policy),
                         "search_then_align": held_out_quality(problem, held, jr.search_then_align.policy),
                         "rounds": [{"round": r.round, "compute": list(r.compute), "search_loss": r.search_loss,
                                     "validation_loss": r.aligned_loss, "wall_s": r.wall_s} for r in jr.rounds],
                         "best_round": jr.best, "stopped": jr.stopped, "history": []})
    job = AlignJob(mode, k, final, out / name, rows)
    if main:
        _write(job, problem, cfg, len(calib), len(held))
    return job


def _row(name: str, q: dict[str, float]) -> str:
    psnr = f"{q['psnr']:.2f}" if "psnr" in q else "-"
    return f"| {name} | {q['latent_mse']:.4e} | {psnr} |"


def _write(job: AlignJob, problem: Problem, cfg: AlignConfig, n_calib: int, n_held: int) -> None:
    """The aligned policy, report.md, summary.json and sigmas.png."""
    s = problem.settings
    job.policy.save(job.path)
    date = datetime.date.today().isoformat()
    lines = [f"# budcache align report ({date})", "",
             f"Model {problem.name}, {s.steps} steps, solver {s.solver}, mechanism {s.mechanism}, guidance "
             f"{s.guidance}; parametrisation {cfg.parametrisation}, {cfg.epochs} epoch(s) over {n_calib} "
             f"calibration pairs, effective batch {cfg.micro_batch * cfg.accumulation * distributed.world()[1]}, "
             f"lr {cfg.lr}; held-out {n_held} pairs.", "",
             "| run | held-out latent MSE | PSNR (dB) |", "|---|---|---|"]
    for r in job.rows:
        label = {"plain": f"plain {job.nfe} steps", "joint": "searched mask (round 0), base schedule"}.get(
            job.mode, "the mask on its starting schedule")
        lines.append(_row(label, r["before"]))
        if "search_then_align" in r:
            lines.append(_row("search then align (round 0)", r["search_then_align"]))
        lines.append(_row(f"aligned (`{r['name']}`)", r["aligned"]))
        for rd in r.get("rounds", []):
            lines.append(f"\nround {rd['round']}: mask {rd['compute']}, validation loss {rd['validation_loss']:.4e}")
        if "stopped" in r:
            lines.append(f"\nbest round {r['best_round']}; stopped: {r['stopped']}")
    lines.append("")
    out = job.path.parent
    atomic_write_text(out / "report.md", "\n".join(lines))
    write_json(out / "summary.json", {"date": date, "mode": job.mode, "nfe": job.nfe, "steps": s.steps,
                                      "config": asdict(cfg), "runs": job.rows, "policy": job.policy.to_dict()})
    _plot(out, job.policy, problem.sigmas(job.policy.steps), job.rows)


def _plot(out: Path, policy: CachePolicy, base: torch.Tensor, rows: list[dict[str, Any]]) -> None:
    """Base vs learned sigmas and the loss per update (PNG; skipped without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    learned = list(policy.sigmas or [])
    axes[0].plot(base.tolist(), "o-", ms=3, label="base")
    axes[0].plot(learned, "s--", ms=3, label="learned")
    for c in policy.compute:
        axes[0].axvline(c, color="grey", alpha=0.15)
    axes[0].set_xlabel("step (grey: computed)")
    axes[0].set_ylabel("sigma")
    axes[0].legend()
    hist = rows[0].get("history") or [] if rows else []
    if hist:
        axes[1].plot([h["loss"] for h in hist])
        axes[1].set_yscale("log")
    axes[1].set_xlabel("update")
    axes[1].set_ylabel("calibration loss")
    save_figure(plt, fig, out / "sigmas.png")
