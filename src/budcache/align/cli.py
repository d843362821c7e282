"""``budcache align``: learn the sigmas of a cache policy (or of the plain K-step sampler, or jointly with the mask).

The job itself is :func:`budcache.align.job.run_align`; this module parses the
options and loads the model stack only once a command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError


def _config(a: argparse.Namespace) -> Any:
    from .trainer import AlignConfig

    return AlignConfig(parametrisation=a.parametrisation, lr=a.lr, weight_decay=a.weight_decay, clip=a.clip,
                       warmup=a.warmup, accumulation=a.accumulation, micro_batch=a.micro_batch, epochs=a.epochs,
                       seed=a.seed, fresh_noise=not a.fixed_noise, loss=a.loss, offset_bound=a.offset_bound,
                       offset_indices=a.offset_indices, grad_checkpointing=not a.no_grad_checkpointing,
                       residual_grad=not a.detach_residuals)


def _target(a: argparse.Namespace) -> tuple[Any, Any]:
    """The source policy (or None) and the sampler settings: options first, then the policy's meta."""
    from ..policy import CachePolicy
    from ..problems.options import settings_from

    modes = [m for m in ("policy", "uniform", "plain", "joint") if getattr(a, m) is not None]
    if len(modes) != 1:
        raise ConfigError("give one of --policy FILE, --uniform K, --plain K or --joint K")
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {a.steps})")
    src = CachePolicy.load(a.policy) if a.policy is not None else None
    settings = settings_from(src, steps=a.steps, solver=a.solver, mechanism=a.mechanism, guidance=a.guidance,
                             default_mechanism="reuse" if src is not None else "forecast1", source=a.policy or "")
    k = src.nfe if src is not None else getattr(a, modes[0])
    if not isinstance(k, int) or not 1 <= k <= settings.steps:
        raise ConfigError(f"--{modes[0]} {k}: the budget must lie in 1..{settings.steps} (the number of steps)")
    return src, settings


def run(a: argparse.Namespace) -> int:
    """The command on one rank (every rank of a data-parallel run calls it)."""
    from ..problems.options import build_problem
    from .job import run_align

    src, settings = _target(a)
    job = run_align(a.out, policy=src, uniform=a.uniform, plain=a.plain, joint_k=a.joint,
                    problem=build_problem(a, settings), config=_config(a), calib_pairs=a.calib_pairs,
                    prompt_file=a.prompts, seeds_per_prompt=a.seeds_per_prompt, heldout_pairs=a.heldout, seed=a.seed,
                    select_on_validation=a.select_on_validation, rounds=a.rounds, tol=a.tol, sa_iters=a.sa_iters,
                    later_sa_iters=a.later_sa_iters, hc_rounds=a.hc_rounds, resume=a.resume, force=a.force,
                    progress=not a.quiet)
    if job.rows:
        print(f"aligned policy: {job.path}")
        for r in job.rows:
            b, al = r["before"], r["aligned"]
            print(f"held-out latent MSE {b['latent_mse']:.4e} -> aligned {al['latent_mse']:.4e}"
                  + (f"; PSNR {b['psnr']:.2f} -> {al['psnr']:.2f} dB" if "psnr" in b else ""))
    return 0


def cmd_align(a: argparse.Namespace) -> int:
    """Run locally, or in ``--nproc`` processes (gloo) over the calibration items."""
    from ..io import check_writable_dir
    from ..search.job import refuse_overwrite
    from .job import check_counts, checkpoint_names

    src, settings = _target(a)
    mode = next(m for m in ("policy", "uniform", "plain", "joint") if getattr(a, m) is not None)
    k = src.nfe if src is not None else getattr(a, mode)
    check_counts(a.calib_pairs, a.seeds_per_prompt, a.heldout)
    if isinstance(a.nproc, bool) or a.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {a.nproc})")
    refuse_overwrite(check_writable_dir(a.out, "--out"), checkpoint_names(mode, k, settings.steps, a.rounds),
                     a.resume, a.force)
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
