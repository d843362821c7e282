"""``budcache align``: learn the sigmas of a cache policy (or of the plain K-step sampler, or jointly with the mask)."""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def calibration_pairs(a: argparse.Namespace, problem: Any) -> tuple[tuple[list[str], list[int]],
                                                                    tuple[list[str], list[int]]]:
    """(prompts, seeds) of the calibration split and of the held-out split (disjoint draws)."""
    from ..problems.data import calibration_pairs as draw
    from ..problems.data import split_pairs

    _check_counts(a)
    prompts, seeds = draw(problem, a.calib_pairs, a.seed, seeds_per_prompt=a.seeds_per_prompt, prompt_file=a.prompts)
    return (prompts, seeds), split_pairs(problem, "heldout", a.heldout, a.seed, prompts)


def validation_pairs(a: argparse.Namespace, problem: Any, calib_prompts: list[str]) -> tuple[list[str], list[int]]:
    """The validation split (joint's stopping set, --select-on-validation): disjoint from the other two."""
    from ..problems.data import split_pairs

    return split_pairs(problem, "validation", max(8, a.heldout // 2), a.seed, calib_prompts)


def _check_counts(a: argparse.Namespace) -> None:
    """The pair counts in range (before any model is loaded)."""
    if a.calib_pairs is not None and a.calib_pairs < 1:
        raise ConfigError(f"--calib-pairs must be >= 1 (got {a.calib_pairs})")
    if a.seeds_per_prompt < 1:
        raise ConfigError(f"--seeds-per-prompt must be >= 1 (got {a.seeds_per_prompt})")
    if a.heldout < 1:
        raise ConfigError(f"--heldout must be >= 1 (got {a.heldout})")


def _config(a: argparse.Namespace) -> Any:
    from .trainer import AlignConfig

    return AlignConfig(parametrisation=a.parametrisation, lr=a.lr, weight_decay=a.weight_decay, clip=a.clip,
                       warmup=a.warmup, accumulation=a.accumulation, micro_batch=a.micro_batch, epochs=a.epochs,
                       seed=a.seed, fresh_noise=not a.fixed_noise, loss=a.loss, offset_bound=a.offset_bound,
                       offset_indices=a.offset_indices, grad_checkpointing=not a.no_grad_checkpointing,
                       residual_grad=not a.detach_residuals)


def _quality(problem: Any, held: Any, policy: Any, plain_steps: int | None = None) -> dict[str, float]:
    """Held-out latent MSE, and PSNR (dB) where the problem can decode images."""
    from .trainer import final_latents

    lat = final_latents(problem, held, policy, plain_steps=plain_steps)
    mse = (lat.float() - held.teacher.float()).pow(2).flatten(1).mean(1)
    from ..problems.metrics import item_metrics

    # PSNR on decoded images where the problem decodes them, else on latents (see quality)
    return {"latent_mse": float(mse.mean()), "psnr": float(item_metrics(problem, lat, held.teacher)["psnr"].mean())}


def _row(name: str, q: dict[str, float]) -> str:
    psnr = f"{q['psnr']:.2f}" if "psnr" in q else "-"
    return f"| {name} | {q['latent_mse']:.4e} | {psnr} |"


def run(a: argparse.Namespace) -> int:
    """The command on one rank (every rank of a data-parallel run calls it)."""
    import torch

    from ..io import atomic_write_text, check_writable_dir, write_json
    from ..policy import CachePolicy
    from ..problems.options import build_problem
    from ..progress import phase
    from ..search.anneal import SearchConfig
    from . import distributed
    from .joint import joint
    from .trainer import align

    distributed.init_from_env()
    main = distributed.is_main()
    cfg = _config(a)
    mode, src, k, settings = _target(a)
    out = Path(a.out)
    if main:
        check_writable_dir(out, "--out")
    problem = build_problem(a, settings)
    steps = settings.steps
    (cp, cs), (hp, hs) = calibration_pairs(a, problem)
    progress = not a.quiet and main
    with torch.no_grad():
        with phase("teacher (calibration)" if progress else None, len(cp) * steps):
            calib = problem.calibration(cp, cs)
        with phase("teacher (held-out)" if progress else None, len(hp) * steps):
            held = problem.calibration(hp, hs)
        select = problem.calibration(*validation_pairs(a, problem, cp)) if a.select_on_validation else None
    rows: list[dict[str, Any]] = []
    if mode in ("policy", "uniform"):
        base = src if src is not None else CachePolicy.uniform(steps, k, meta={"budget": k, "mask": "uniform"})
        res = align(problem, calib, base, cfg, checkpoint=out / f"checkpoint_N{steps}_K{k}.safetensors",
                    resume=a.resume, progress=progress, validation=select)
        name, final = f"policy_aligned_N{steps}_K{k}.json", res.policy
        if main:
            rows.append({"name": name, "before": _quality(problem, held, base),
                         "aligned": _quality(problem, held, res.policy), "history": res.history})
    elif mode == "plain":
        res = align(problem, calib, CachePolicy.full(k), cfg, init_sigmas=problem.sigmas(k),
                    checkpoint=out / f"checkpoint_plain_K{k}.safetensors", resume=a.resume, progress=progress,
                    validation=select)
        name, final = f"policy_plain_K{k}_aligned.json", res.policy
        if main:
            rows.append({"name": name, "before": _quality(problem, held, None, plain_steps=k),
                         "aligned": _quality(problem, held, res.policy), "history": res.history})
    else:
        scfg = SearchConfig(steps=steps, nfe=k, sa_iters=a.sa_iters, hc_rounds=a.hc_rounds, seed=a.seed)
        with torch.no_grad():
            vp, vs = validation_pairs(a, problem, cp)
            val = problem.calibration(vp, vs)
        jr = joint(problem, calib, val, scfg, cfg, max_rounds=a.rounds, tol=a.tol, later_sa_iters=a.later_sa_iters,
                   out=out, resume=a.resume, progress=progress)
        name, final = f"policy_joint_N{steps}_K{k}.json", jr.policy
        if main:
            first = CachePolicy(steps, jr.rounds[0].compute)
            rows.append({"name": name, "before": _quality(problem, held, first),
                         "aligned": _quality(problem, held, jr.policy),
                         "search_then_align": _quality(problem, held, jr.search_then_align.policy),
                         "rounds": [{"round": r.round, "compute": list(r.compute), "search_loss": r.search_loss,
                                     "validation_loss": r.aligned_loss, "wall_s": r.wall_s} for r in jr.rounds],
                         "best_round": jr.best, "stopped": jr.stopped, "history": []})
    if not main:
        return 0
    final.save(out / name)
    date = datetime.date.today().isoformat()
    lines = [f"# budcache align report ({date})", "",
             f"Model {problem.name}, {steps} steps, solver {settings.solver}, "
             f"mechanism {settings.mechanism}, guidance {settings.guidance}; parametrisation {cfg.parametrisation}, "
             f"{cfg.epochs} epoch(s) over {len(calib)} calibration pairs, effective batch "
             f"{cfg.micro_batch * cfg.accumulation * distributed.world()[1]}, lr {cfg.lr}; "
             f"held-out {len(held)} pairs.", "",
             "| run | held-out latent MSE | PSNR (dB) |", "|---|---|---|"]
    for r in rows:
        label = {"plain": f"plain {k} steps", "joint": "searched mask (round 0), base schedule"}.get(
            mode, "the mask on its starting schedule")
        lines.append(_row(label, r["before"]))
        if "search_then_align" in r:
            lines.append(_row("search then align (round 0)", r["search_then_align"]))
        lines.append(_row(f"aligned (`{r['name']}`)", r["aligned"]))
        for rd in r.get("rounds", []):
            lines.append(f"\nround {rd['round']}: mask {rd['compute']}, validation loss {rd['validation_loss']:.4e}")
        if "stopped" in r:
            lines.append(f"\nbest round {r['best_round']}; stopped: {r['stopped']}")
    lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines))
    write_json(out / "summary.json", {"date": date, "mode": mode, "nfe": k, "steps": steps,
                                      "config": asdict(cfg), "runs": rows, "policy": final.to_dict()})
    _plot(out, final, problem.sigmas(final.steps), rows)
    print(f"aligned policy: {out / name}")
    for r in rows:
        b, al = r["before"], r["aligned"]
        print(f"held-out latent MSE {b['latent_mse']:.4e} -> aligned {al['latent_mse']:.4e}"
              + (f"; PSNR {b['psnr']:.2f} -> {al['psnr']:.2f} dB" if "psnr" in b else ""))
    return 0


def _plot(out: Path, policy: Any, base: Any, rows: list[dict[str, Any]]) -> None:
    """Base vs learned sigmas and the loss per update (PNG; skipped without matplotlib)."""
    from ..plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    learned = list(policy.sigmas)
    axes[0].plot(base.tolist(), "o-", ms=3, label="base")
    axes[0].plot(learned, "s--", ms=3, label="learned")
    for c in policy.compute:
        axes[0].axvline(c, color="grey", alpha=0.15)
    axes[0].set_xlabel("step (grey: computed)")
    axes[0].set_ylabel("sigma")
    axes[0].legend()
    hist = rows[0].get("history") or []
    if hist:
        axes[1].plot([h["loss"] for h in hist])
        axes[1].set_yscale("log")
    axes[1].set_xlabel("update")
    axes[1].set_ylabel("calibration loss")
    save_figure(plt, fig, out / "sigmas.png")


def _mode(a: argparse.Namespace) -> str:
    modes = [m for m in ("policy", "uniform", "plain", "joint") if getattr(a, m) is not None]
    if len(modes) != 1:
        raise ConfigError("give one of --policy FILE, --uniform K, --plain K or --joint K")
    return modes[0]


def _target(a: argparse.Namespace) -> tuple[str, Any, int, Any]:
    """(mode, source policy or None, budget K, sampler settings): options first, then the policy's meta."""
    from ..policy import CachePolicy
    from ..problems.options import settings_from

    mode = _mode(a)
    src = CachePolicy.load(a.policy) if mode == "policy" else None
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {a.steps})")
    settings = settings_from(a, src, "reuse" if src is not None else "forecast1")  # as sample and compare
    k = getattr(a, mode) if mode != "policy" else src.nfe
    if not isinstance(k, int) or not 1 <= k <= settings.steps:
        raise ConfigError(f"--{mode} {k}: the budget must lie in 1..{settings.steps} (the number of steps)")
    return mode, src, k, settings


def checkpoint_names(a: argparse.Namespace, mode: str, k: int, steps: int) -> list[str]:
    """The checkpoint files a run of ``mode`` at budget ``k`` writes in ``--out``."""
    if mode == "plain":
        return [f"checkpoint_plain_K{k}.safetensors"]
    if mode == "joint":
        return [f"joint_K{k}_round{r}_{part}" for r in range(a.rounds + 1)
                for part in ("search.json", "align.safetensors")]
    return [f"checkpoint_N{steps}_K{k}.safetensors"]


def cmd_align(a: argparse.Namespace) -> int:
    """Run locally, or in ``--nproc`` processes (gloo) over the calibration items."""
    from ..io import check_writable_dir
    from ..search.job import refuse_overwrite

    mode, _, k, settings = _target(a)
    _check_counts(a)
    if isinstance(a.nproc, bool) or a.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {a.nproc})")
    refuse_overwrite(check_writable_dir(a.out, "--out"), checkpoint_names(a, mode, k, settings.steps), a.resume,
                     a.force)
    if a.nproc > 1:
        import torch.multiprocessing as mp

        from . import distributed

        try:
            distributed.spawn(_worker, a.nproc, a)
        except mp.ProcessRaisedException as exc:
            raise ConfigError(f"a data-parallel worker failed: {str(exc).strip().splitlines()[-1]}") from None
        return 0
    return run(a)


def _worker(a: argparse.Namespace) -> None:
    from ..errors import BudcacheError

    try:
        run(a)
    except BudcacheError as exc:
        print(f"budcache align: error: {exc}", file=sys.stderr)
        raise


def register(sub: Any) -> None:
    """Add ``budcache align`` to the CLI's subparsers."""
    from ..hooks import MECHANISMS
    from ..problems.options import add_pipeline_args, guidance_arg, seed_arg
    from ..solvers import SOLVERS
    from .params import PARAMETRISATIONS

    p = sub.add_parser("align", help="learn the sigma schedule of a cache policy (stage 2), of the plain K-step "
                                     "sampler, or jointly with the mask")
    src = p.add_argument_group("what to align (one of)")
    src.add_argument("--policy", default=None, help="a policy JSON file (budcache search writes them)")
    src.add_argument("--uniform", type=int, default=None, metavar="K", help="the uniform K-of-N mask")
    src.add_argument("--plain", type=int, default=None, metavar="K",
                     help="the plain K-step sampler without caching ('Original-Opt', the control)")
    src.add_argument("--joint", type=int, default=None, metavar="K",
                     help="alternate mask search and alignment at K computed steps")
    p.add_argument("--steps", type=int, default=None, help="solver steps N (default 28, or the policy's)")
    p.add_argument("--parametrisation", default="ld3", choices=list(PARAMETRISATIONS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the updates")
    p.add_argument("--accumulation", type=int, default=8, help="micro-batches accumulated per update")
    p.add_argument("--micro-batch", type=int, default=1, help="items per forward/backward pass")
    p.add_argument("--offset-bound", type=float, default=0.005, help="bound b of the offset parametrisation")
    p.add_argument("--offset-indices", default="all", choices=["all", "skipped"])
    p.add_argument("--fixed-noise", action="store_true", help="reuse the calibration noise in every epoch")
    p.add_argument("--detach-residuals", action="store_true",
                   help="stop the gradient at the cached residuals (the reference's truncated gradient)")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="keep every step's activations instead")
    p.add_argument("--select-on-validation", action="store_true",
                   help="measure a validation set (disjoint from calibration and held-out pairs) at the start and "
                        "after every epoch; keep the best schedule (never worse than the start on it)")
    p.add_argument("--loss", default="mse", choices=["mse", "l1"])
    p.add_argument("--prompts", default=None, help="calibration prompts (.txt, .jsonl or .csv)")
    p.add_argument("--calib-pairs", type=int, default=None,
                   help="calibration pairs (default 32; with --prompts: a seeded draw of this many of the file's "
                        "pairs, default all)")
    p.add_argument("--seeds-per-prompt", type=int, default=1)
    p.add_argument("--heldout", type=int, default=32, help="held-out pairs for the report")
    p.add_argument("--solver", default=None, choices=sorted(SOLVERS), help="default: the policy's, else euler")
    p.add_argument("--mechanism", default=None, choices=list(MECHANISMS),
                   help="default: the policy's (reuse if it names none, as sample and compare); "
                   "forecast1 for --uniform/--plain/--joint (as budcache search)")
    p.add_argument("--guidance", type=guidance_arg, default=None)
    p.add_argument("--rounds", type=int, default=4, help="joint: at most this many search + align rounds")
    p.add_argument("--tol", type=float, default=1e-3, help="joint: relative held-out improvement to go on")
    p.add_argument("--sa-iters", type=int, default=200, help="joint: annealing iterations of the first search")
    p.add_argument("--later-sa-iters", type=int, default=None,
                   help="joint: annealing iterations of later rounds (default: as the first; 0: hill climbing)")
    p.add_argument("--hc-rounds", type=int, default=20)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--nproc", type=int, default=1, help="local data-parallel processes (gloo)")
    p.add_argument("--model", default=None, help="tinyflow weights directory (default: the shipped model)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
    p.add_argument("--force", action="store_true",
                   help="start over even though --out holds checkpoints of an earlier run (they are overwritten)")
    p.add_argument("--out", default="runs/align")
    p.add_argument("--quiet", action="store_true")
    add_pipeline_args(p)
    p.set_defaults(func=cmd_align, resumable=True)
