"""Command line: ``budcache search | align | compare | sample | show | train-tinyflow``.

A user's mistake never ends in a traceback: :func:`main` prints one line,
``budcache <command>: error: ...``, and returns one of the exit codes below
(README, "Errors and exit codes"). Only the chosen sub-command's options are
built, so ``budcache --help`` and ``budcache show`` start without torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BudcacheError, ConfigError
from .io import check_writable_dir, check_writable_file, printable
from .problems.options import MAX_SEED, add_pipeline_args, build_problem, guidance_arg, seed_arg, settings_from
from .problems.settings import SamplerSettings

EXIT_OK = 0
EXIT_USAGE = 2  #: a bad option, input file, policy or checkpoint (argparse's code for usage errors too)
EXIT_IO = 3  #: the system refused a read or write during the run (disk full, permissions, I/O error)
EXIT_INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT); search and align keep their checkpoints
EXIT_BROKEN_PIPE = 141  #: the reader of the output went away (128 + SIGPIPE), e.g. ``budcache show P | head -1``



def _read_prompts(values: list[str]) -> list[str]:
    """Prompts given inline, or one per line from a file when a value names an existing .txt file."""
    from .problems.data import read_prompt_file

    out: list[str] = []
    for v in values:
        p = Path(v)
        if p.suffix == ".txt" and p.is_file():
            out += read_prompt_file(p)
        else:
            out.append(v)
    if not out:
        raise ConfigError("no prompts given")
    return out


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 4) -> Path:  # noqa: F821
    """Write images (B, 3, H, W) in [0, 1] as one PNG grid, atomically."""
    import io

    import numpy as np
    from PIL import Image

    from .io import atomic_write_bytes

    b, _, h, w = images.shape
    rows = (b + columns - 1) // columns
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), dtype=np.uint8) + 40
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = arr[i]
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def cmd_sample(a: argparse.Namespace) -> int:
    import torch

    from .policy import CachePolicy
    from .problems.tinyflow import TinyflowProblem

    if a.per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1 (got {a.per_prompt})")
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {a.steps})")
    prompts = _read_prompts(a.prompts)
    prompts = [p for p in prompts for _ in range(a.per_prompt)]
    if a.seed + len(prompts) - 1 > MAX_SEED:
        raise ConfigError(f"--seed {a.seed}: image i uses seed+i, and {len(prompts)} images run past {MAX_SEED}")
    seeds = [a.seed + i for i in range(len(prompts))]
    if a.policy is not None and a.nfe is not None:
        raise ConfigError("give either --policy FILE or --nfe K (uniform policy), not both")
    steps = 28 if a.steps is None else a.steps
    if a.nfe is not None and not 1 <= a.nfe <= steps:
        raise ConfigError(f"--nfe {a.nfe} must lie in 1..{steps} (the number of steps)")
    policy = CachePolicy.load(a.policy) if a.policy else (
        CachePolicy.uniform(steps, a.nfe, estimator=a.mechanism) if a.nfe else None)
    mechanism = a.mechanism
    if policy is not None and a.policy is not None:
        if policy.estimator is not None and a.mechanism not in (None, policy.estimator) and \
                a.mechanism != policy.meta.get("mechanism"):
            raise ConfigError(f"--mechanism {a.mechanism} but the policy's skipped steps use {policy.estimator}; "
                              "a policy runs with its own estimators (omit --mechanism)")
        mechanism = None if policy.estimator == "mixed" else (policy.estimator or a.mechanism)
    settings = settings_from(policy, steps=a.steps, solver=a.solver, mechanism=mechanism, guidance=a.guidance,
                             source=a.policy or "")
    out = check_writable_file(a.out, "--out")  # before minutes of sampling, not after
    if a.compile is not None:
        if settings.solver != "euler":
            raise ConfigError(f"--compile runs tinyflow's FluxPipeline, whose scheduler is Euler; the solver is "
                              f"{settings.solver}")
        if policy is not None and policy.sigmas is not None:
            raise ConfigError("--compile runs tinyflow's FluxPipeline with its own sigmas; this policy carries a "
                              "learned schedule (sample it without --compile)")
        import torch._dynamo

        if a.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"--compile {printable(a.compile)}: no such torch.compile backend (choose one of "
                              f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}; put --compile after "
                              "the prompts or write --compile=BACKEND)")
    problem = TinyflowProblem(settings=settings, model=a.model)
    mech = None if policy is not None and policy.estimator == "mixed" else settings.mechanism
    t0 = time.perf_counter()
    with torch.no_grad():
        if a.compile is not None:
            latent = problem.tf.pipeline_sample(prompts, seeds, settings.steps, policy=policy, mechanism=mech,
                                                guidance=settings.guidance, compile=a.compile)
            nfe = policy.nfe if policy is not None else settings.steps
        else:
            res = problem.tf.sample(prompts, seeds, steps=settings.steps, solver=settings.solver, policy=policy,
                                    mechanism=mech, guidance=settings.guidance, progress=not a.quiet)
            latent, nfe = res.latent, int(res.nfe.max())
    wall = time.perf_counter() - t0
    images = problem.images(latent)
    out = save_grid(images, out, columns=a.per_prompt if a.per_prompt > 1 else min(8, len(prompts)))
    verdicts = problem.checker_accuracy(prompts, images)
    summary = {"images": len(prompts), "steps": settings.steps, "nfe": nfe, "solver": settings.solver,
               "policy": str(policy) if policy else "none (all steps)", "guidance": settings.guidance,
               "wall_s": round(wall, 3), "checker_accuracy": float(verdicts.mean()), "grid": str(out)}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from .policy import CachePolicy
    from .specs import plan_legend

    pol = CachePolicy.load(a.policy)
    if a.plot:
        check_writable_file(a.plot, "--plot")
    print(f"policy      {printable(a.policy)}")
    print(f"steps (N)   {pol.steps}")
    print(f"NFE (K)     {pol.nfe}")
    print(f"speed-up    <= {pol.speedup_bound:.2f}x (if cached steps cost nothing)")
    print(f"mask        {pol.strip()}   (C computed, . cached)")
    print(f"computed    {list(pol.compute)}")
    if pol.estimator is not None:
        print(f"estimators  {pol.estimator_strip()}   ({plan_legend()})")
        if pol.estimators is not None:
            print("per step    " + ", ".join(f"{k}:{n}" for k, n in zip(pol.skipped, pol.estimators)))
        else:
            print(f"estimator   {pol.estimator} (every skipped step, from meta.mechanism)")
    if pol.sigmas is not None:
        print("sigmas      " + " ".join(f"{s:.4f}" for s in pol.sigmas))
    for k, v in pol.meta.items():  # a shared file's strings may hold escape codes: never print them raw
        print(f"meta.{printable(k):<7} {printable(str(v))}")
    if a.plot:
        _plot_policy(pol, a.plot)
        print(f"plot        {printable(a.plot)}")
    return 0


def _plot_policy(pol: CachePolicy, path: str) -> None:  # noqa: F821
    import io

    from .errors import require
    from .io import atomic_write_bytes

    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, pol.steps * 0.3), 2.6 if pol.sigmas is None else 4))
    xs = list(range(pol.steps))
    if pol.sigmas is not None:
        ax.plot(range(pol.steps + 1), pol.sigmas, "-", color="0.6", label="sigma")
        ys = [pol.sigmas[k] for k in xs]
    else:
        ys = [1.0] * pol.steps
    ax.scatter([k for k in xs if pol.mask[k]], [ys[k] for k in xs if pol.mask[k]],
               marker="s", color="tab:blue", label="computed", zorder=3)
    ax.scatter([k for k in xs if not pol.mask[k]], [ys[k] for k in xs if not pol.mask[k]], marker="o",
               facecolors="none", edgecolors="tab:orange", label="cached", zorder=3)
    ax.set_xlabel("step")
    ax.set_title(f"N={pol.steps}, K={pol.nfe}, speed-up <= {pol.speedup_bound:.2f}x")
    if pol.sigmas is None:
        ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _name_list(text: str) -> list[str]:
    """Comma-separated estimator names ('none': an empty list)."""
    from .specs import ESTIMATORS

    if text.strip().lower() == "none":
        return []
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ESTIMATORS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown estimator(s) {bad or [text]}; choose from {list(ESTIMATORS)} "
                                         "or 'none'")
    return names


def cmd_search(a: argparse.Namespace) -> int:
    if a.keep is not None and a.mechanism != "auto":
        raise ConfigError("--keep applies only with --mechanism auto (the only search with candidates to keep one of)")
    if a.no_peer_masks and a.mechanism != "auto":
        raise ConfigError("--no-peer-masks applies only with --mechanism auto (the only search with a peer's "
                          "schedule to choose budcache's estimators on)")
    check_writable_dir(a.out, "--out")  # before the model stack is imported
    from .search.procs import auto_backend, start_worker_server

    pipeline = getattr(a, "pipeline", None) is not None
    if (a.backend if a.backend != "auto" else auto_backend(pipeline=pipeline, mechanism=a.mechanism)) == "local":
        start_worker_server()  # the local workers' fork server imports the model stack beside this process

    from .search.backends import backend_kwargs
    from .search.job import AUTO, DEFAULT_CHOICES, DEFAULT_KEEP, run_search

    # only the options given: a peer's schedule keeps its own short search (PEER_SEARCH) unless one is set
    kw = {k: getattr(a, k) for k in ("sa_iters", "t_max", "t_min", "radius", "hc_rounds", "restarts", "far_jumps")
          if getattr(a, k) is not None}
    if a.prefix is not None:
        kw["prefix"] = a.prefix
    kw["relative"] = a.relative_temperature
    t0 = time.perf_counter()
    auto = a.mechanism == "auto"
    problem = build_problem(a, SamplerSettings(a.steps, a.solver, AUTO[0] if auto else a.mechanism, a.guidance))
    estimators = DEFAULT_CHOICES if a.estimators is None else a.estimators  # the default depends on the mechanism
    outcomes = run_search(a.out, nfes=a.nfe, problem=problem, estimators=estimators, calib_pairs=a.calib_pairs,
                          prompt_file=a.prompts, seeds_per_prompt=a.seeds_per_prompt, heldout_pairs=a.heldout,
                          seed=a.seed, loss=a.loss, resume=a.resume, force=a.force, progress=not a.quiet,
                          naive=a.naive, mechanisms=AUTO if auto else None, warm_start=a.warm_start,
                          refine_scheme=a.refine_scheme, peer_masks=not a.no_peer_masks,
                          keep=a.keep or DEFAULT_KEEP,
                          **backend_kwargs(a), **kw)
    for o in outcomes:
        h = o.heldout
        print(f"K={o.nfe:>3}  loss {o.policy.meta['search_loss']:.4e}  {o.policy.estimator_strip()}  "
              f"held-out PSNR: budcache "
              f"{h['budcache']['psnr']:.2f} | uniform {h['uniform']['psnr']:.2f} | plain {h['plain']['psnr']:.2f} dB")
    print(f"wrote policies, plots and report.md to {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .tinyflow import train

    train.main(a.rest)
    return 0


#: Sub-commands and their one-line help, in the order ``budcache --help`` lists them.
COMMANDS = {
    "sample": "sample tinyflow with an optional cache policy; writes a PNG grid",
    "search": "search the best cache policy for each budget (default: tinyflow, K=10 of 28)",
    "align": "learn the sigma schedule of a cache policy (stage 2), of the plain K-step sampler, or jointly with "
             "the mask",
    "compare": "compare budcache with the baselines at equal NFE; writes tables and plots",
    "show": "print a policy: mask strip, estimators, NFE, speed-up bound, sigmas",
    "train-tinyflow": "train (or resume) the embedded model; see --help after it",
}


def _add_sample(sub: Any) -> None:
    from .solvers import SOLVERS
    from .specs import ALL_MECHANISMS

    s = sub.add_parser("sample", help=COMMANDS["sample"])
    s.add_argument("prompts", nargs="*", default=["a red circle", "a large square in the top left",
                                                  "a blue triangle and a yellow circle", "three circles"],
                   help="prompts of tinyflow's grammar, or .txt files with one prompt per line")
    s.add_argument("--steps", type=int, default=None, help="solver steps N (default 28, or the policy's)")
    s.add_argument("--policy", default=None, help="policy JSON file (budcache search writes them)")
    s.add_argument("--nfe", type=int, default=None, help="uniform policy with this many computed steps")
    s.add_argument("--solver", default=None, choices=sorted(SOLVERS), help="default: the policy's, else euler")
    s.add_argument("--mechanism", default=None, choices=list(ALL_MECHANISMS),
                   help="for --nfe or a policy that names no estimator (default reuse); a policy's own "
                        "estimators always apply")
    s.add_argument("--guidance", type=guidance_arg, default=None,
                   help="classifier-free guidance scale (1 = off); default: the policy's, else 1")
    s.add_argument("--seed", type=seed_arg, default=0, help="seed of the first image; image i uses seed+i")
    s.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    s.add_argument("--model", default=None, help="tinyflow weights directory (default: the shipped model)")
    s.add_argument("--out", default="samples.png", help="PNG grid to write")
    s.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="sample through tinyflow's FluxPipeline with the policy applied by budcache.diffusers and "
                        "the transformer under torch.compile(fullgraph=True) (backend default inductor; Euler "
                        "only; the first call compiles, which pays off over many images)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)


def _add_search(sub: Any) -> None:
    from .search.backends import add_backend_args
    from .solvers import SOLVERS
    from .specs import ALL_MECHANISMS

    se = sub.add_parser("search", help=COMMANDS["search"])
    se.add_argument("--nfe", type=_int_list, default=[10], help="budget(s) K, e.g. 10 or 6,8,10,14")
    se.add_argument("--steps", type=int, default=28, help="solver steps N")
    se.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    se.add_argument("--mechanism", default="auto", choices=["auto", *ALL_MECHANISMS],
                    help="how skipped steps are filled while the mask is searched: auto (default: search both "
                         "vtaylor1 and taylorseer at each budget, and vtaylor1's estimators on taylorseer's schedule, "
                         "and keep one by --keep), vtaylor1 (the "
                         "velocity, linear in sigma), vtaylor2, output (velocity reuse), vforecast1/vforecast2 (the "
                         "velocity in the step index; vforecast1 is TaylorSeer lite's), taylor1/taylor2 (the "
                         "block-stack residual in sigma), forecast1/forecast2 (residual in the step index), reuse "
                         "(the paper's); or taylorseer: search the compute schedule of diffusers' TaylorSeer, its own "
                         "estimator")
    se.add_argument("--estimators", type=_name_list, default=None,
                    help="after the mask search, each skipped step may switch to any of these estimators "
                         "(comma-separated; default vtaylor1,vtaylor2,output, or none with --mechanism taylorseer, "
                         "whose own hooks fill skipped steps; 'none': keep --mechanism everywhere)")
    se.add_argument("--refine-scheme", default="sweep", choices=["sweep", "steepest"],
                    help="how those per-step estimators are chosen: sweep (default: visit the skipped steps from "
                         "the last to the first and keep each improving change, up to 2 sweeps, 1 on a peer's "
                         "schedule) or steepest (the best single change of all per round, up to 8 rounds; slower)")
    se.add_argument("--guidance", type=guidance_arg, default=1.0)
    se.add_argument("--prompts", default=None, help="calibration prompts (.txt, .jsonl or .csv); default: "
                    "tinyflow prompts covering every template")
    se.add_argument("--calib-pairs", type=int, default=None,
                    help="calibration prompt x seed pairs (default 32; with --prompts: a seeded draw of this many "
                         "of the file's pairs, default all)")
    se.add_argument("--seeds-per-prompt", type=int, default=1)
    se.add_argument("--heldout", type=int, default=64, help="held-out pairs for the report")
    se.add_argument("--loss", default="logmse", choices=["mse", "l1", "logmse"],
                    help="per-item loss averaged over the calibration set: logmse (default: log of each item's MSE, "
                         "every item counts equally, like mean PSNR), mse (the paper's) or l1")
    se.add_argument("--seed", type=seed_arg, default=0)
    peer = ("budcache's own estimators; a peer's schedule (taylorseer) is searched from its best grid point "
            "with a short search, {}, unless this option is given")
    se.add_argument("--sa-iters", type=int, default=None,
                    help="annealing iterations (default 200 for " + peer.format("10") + ")")
    se.add_argument("--t-max", type=float, default=None, help="start temperature (default 0.05)")
    se.add_argument("--t-min", type=float, default=None, help="end temperature (default 1e-5)")
    se.add_argument("--radius", type=int, default=None,
                    help="hill climbing's local radius (default 3 for " + peer.format("2") + ")")
    se.add_argument("--hc-rounds", type=int, default=None,
                    help="hill-climbing rounds (default 20 for " + peer.format("2") + ")")
    se.add_argument("--far-jumps", type=int, default=None,
                    help="random far moves per computed step in hill climbing (default 2 for "
                         + peer.format("0") + ")")
    se.add_argument("--restarts", type=int, default=None, help="annealing restarts (default 1)")
    se.add_argument("--prefix", type=int, default=None, help="forced computed prefix (default max(1, K//4))")
    se.add_argument("--relative-temperature", action="store_true",
                    help="Metropolis on the loss difference relative to the start loss (default: the raw difference, "
                         "as the reference does)")
    se.add_argument("--no-peer-masks", action="store_true",
                    help="with --mechanism auto: do not also choose budcache's per-step estimators on TaylorSeer's "
                         "searched schedule (the candidate vtaylor1@taylorseer; default: it is searched too)")
    se.add_argument("--keep", choices=["pairs", "mean"], default=None,
                    help="with --mechanism auto: how each budget keeps one candidate: pairs (default: the candidate "
                         "with the lower calibration loss than each other one on most calibration pairs, else the "
                         "lowest mean) or mean (the lowest mean calibration loss)")
    se.add_argument("--warm-start", action="store_true",
                    help="start each budget's annealing from the previous budget's mask (default: every budget "
                         "is searched on its own, so its policy does not depend on the other budgets asked for)")
    se.add_argument("--naive", action="store_true", help="evaluate masks one by one from step 0 (for comparison)")
    se.add_argument("--resume", action="store_true",
                    help="continue from the checkpoints in --out (the mask search's and the estimator choice's)")
    se.add_argument("--force", action="store_true",
                    help="start over even though --out holds checkpoints of an earlier run (they are overwritten)")
    se.add_argument("--model", default=None, help="tinyflow weights directory (default: the shipped model)")
    se.add_argument("--out", default="runs/search", help="output directory")
    se.add_argument("--quiet", action="store_true")
    add_pipeline_args(se)
    add_backend_args(se)
    se.set_defaults(func=cmd_search, resumable=True)


def _add_align(sub: Any) -> None:
    from .align.cli import register

    register(sub)


def _add_compare(sub: Any) -> None:
    from .compare.cli import register

    register(sub)


def _add_show(sub: Any) -> None:
    sh = sub.add_parser("show", help=COMMANDS["show"])
    sh.add_argument("policy")
    sh.add_argument("--plot", default=None, help="also write a PNG of the mask (needs budcache[plot])")
    sh.set_defaults(func=cmd_show)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train-tinyflow", help=COMMANDS["train-tinyflow"], add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)


_BUILDERS: dict[str, Callable[[Any], None]] = {
    "sample": _add_sample, "search": _add_search, "align": _add_align, "compare": _add_compare, "show": _add_show,
    "train-tinyflow": _add_train,
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: every sub-command's options, or with ``only`` just that one's.

    The others are then listed with their help line but no options, so that
    ``budcache --help`` and ``budcache show`` import no model code (``only=""``:
    none built).
    """
    ap = argparse.ArgumentParser(prog="budcache", description="Budget-exact step caching for diffusion transformers.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, add in _BUILDERS.items():
        if only is None or name == only:
            add(sub)
        else:
            sub.add_parser(name, help=COMMANDS[name], add_help=name != "train-tinyflow")
    return ap


def _os_error_message(exc: OSError) -> str:
    """``PATH: reason`` for an OSError (disk full, permission denied, ...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{printable(str(exc.filename))}: {reason}" if exc.filename else reason


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring and README)."""
    args = sys.argv[1:] if argv is None else list(argv)
    # transformers warns at import that torchvision is missing (budcache never needs it); the user can override.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args[:1] == ["train-tinyflow"]:
        # argparse's REMAINDER drops a sub-command's leading options ("--out ..."), so these go to the
        # trainer's own parser untouched.
        a = argparse.Namespace(command="train-tinyflow", func=cmd_train, rest=args[1:])
    else:
        a = build_parser(args[0] if args and args[0] in COMMANDS else "").parse_args(args)
    prefix = f"budcache {a.command}"
    try:
        code = a.func(a)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BudcacheError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if getattr(a, "resumable", False):
            print(f"{prefix}: interrupted; the checkpoints in {printable(str(a.out))} are kept: run the same command "
                  "with --resume to continue", file=sys.stderr)
        else:
            print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        print(f"{prefix}: error: {_os_error_message(exc)}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
