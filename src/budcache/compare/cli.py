"""``budcache compare``: every method side by side at equal NFE; outputs a table, CSV, JSON and plots."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one name")
    return vals


def config_from_args(a: argparse.Namespace) -> Any:
    """A :class:`CompareConfig` from parsed arguments (policy files loaded and matched to budgets)."""
    from ..methods import route_policies
    from ..policy import CachePolicy
    from .harness import CompareConfig

    policies: dict[int, list[CachePolicy]] = {}
    for path in a.policy or []:
        pol = CachePolicy.load(path)
        policies.setdefault(pol.nfe, []).append(pol)
        try:
            route_policies({pol.nfe: policies[pol.nfe]})
        except ConfigError as e:
            raise ConfigError(f"--policy {path}: {e}") from None
    nfes = a.nfe if a.nfe is not None else (tuple(sorted(policies)) if policies else (6, 8, 10, 14))
    missing = sorted(set(policies) - set(nfes))
    if missing:
        raise ConfigError(f"--policy files for NFE {missing} but --nfe is {list(nfes)}")
    search_kw = {"sa_iters": a.sa_iters, "hc_rounds": a.hc_rounds}
    return CompareConfig(nfes=tuple(nfes), steps=a.steps, solver=a.solver, guidance=a.guidance, methods=a.methods,
                         calib_pairs=a.calib_pairs, eval_pairs=a.eval_pairs, seed=a.seed, policies=policies,
                         search_kw=search_kw, search_loss=a.search_loss, grid_nfe=a.grid_nfe, grid_rows=a.grid_rows,
                         transfer_solvers=a.transfer_solvers, transfer_guidance=a.transfer_guidance,
                         transfer=not a.no_transfer, batch=a.batch, given_only=a.given_only)


def problem_for(a: argparse.Namespace, cfg: Any) -> Any:
    """The model to compare on: tinyflow by default, or the diffusers pipeline of ``--pipeline``."""
    from ..problems.options import build_problem
    from ..problems.settings import SamplerSettings

    return build_problem(a, SamplerSettings(cfg.steps, cfg.solver, "reuse", cfg.guidance))


def cmd_compare(a: argparse.Namespace) -> int:
    from ..methods import available_methods
    from .harness import run_compare
    from .report import markdown

    if a.list_methods:
        for name in available_methods():
            print(name)
        return 0
    cfg = config_from_args(a)
    cfg.validate()
    res = run_compare(a.out, cfg, progress=not a.quiet, problem=problem_for(a, cfg))
    print(markdown(res))
    print(f"wrote {a.out}/table.md, results.csv, results.json, quality_vs_nfe.png, grid_K{res.meta['grid_nfe']}.png "
          f"in {res.meta['wall_s']:.0f} s")
    return 0


def register(sub: Any) -> None:
    """Add ``budcache compare`` to the CLI's subparsers."""
    from ..problems.options import guidance_arg, seed_arg
    from ..search.losses import LOSSES
    from ..solvers import SOLVERS

    c = sub.add_parser("compare", help="compare budcache with the baselines at equal NFE; writes tables and plots")
    c.add_argument("--nfe", type=_ints, default=None, help="budgets K (default 6,8,10,14, or those of --policy)")
    c.add_argument("--steps", type=int, default=28, help="full step count N")
    c.add_argument("--methods", type=_names, default=None,
                   help="comma-separated method names (default: all; see --list-methods)")
    c.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    c.add_argument("--given-only", action="store_true",
                   help="with --policy: budcache's methods run only the given policies (a method without one at a "
                        "budget is left out there instead of searching), e.g. the policies of budcache search, "
                        "some of which run as taylorseer-searched")
    c.add_argument("--policy", action="append", default=None, metavar="FILE",
                   help="use this policy for its budget instead of searching (repeatable). It runs as the method of "
                   "its mechanism: a TaylorSeer-schedule policy as taylorseer-searched, a version-1 reuse or "
                   "forecast1 policy as budcache-reuse or budcache-forecast, any other as budcache. One budget may "
                   "take several that run as different methods; the first is the reference for paired wins and gaps")
    c.add_argument("--solver", default="euler", choices=sorted(SOLVERS))
    c.add_argument("--guidance", type=guidance_arg, default=1.0, help="classifier-free guidance scale (1 = off)")
    c.add_argument("--calib-pairs", type=int, default=12, help="calibration prompt x seed pairs (fitting)")
    c.add_argument("--eval-pairs", type=int, default=32, help="evaluation pairs, disjoint from calibration")
    c.add_argument("--seed", type=seed_arg, default=0)
    c.add_argument("--sa-iters", type=int, default=40,
                   help="budcache's search: annealing iterations (budcache search uses 200; or pass --policy files)")
    c.add_argument("--hc-rounds", type=int, default=6, help="budcache's search: hill-climbing rounds")
    c.add_argument("--search-loss", default="logmse", choices=sorted(LOSSES),
                   help="budcache's search loss on the calibration set (default logmse, as budcache search; "
                        "mse: the paper's)")
    c.add_argument("--grid-nfe", type=int, default=None, help="budget of the image grid (default: nearest 10)")
    c.add_argument("--grid-rows", type=int, default=6, help="prompts in the image grid")
    c.add_argument("--transfer-solvers", type=_names, default=("dpmpp2m", "ipndm"),
                   help="solvers the searched policy is transferred to")
    c.add_argument("--transfer-guidance", type=_floats, default=(2.0, 4.0),
                   help="guidance scales the searched policy is transferred to")
    c.add_argument("--no-transfer", action="store_true", help="skip the transfer study")
    c.add_argument("--batch", type=int, default=1, help="evaluation batch (1: wall time is per-image latency)")
    c.add_argument("--out", default="runs/compare", help="output directory")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    from ..problems.options import add_pipeline_args

    add_pipeline_args(c)
    c.set_defaults(func=cmd_compare)
