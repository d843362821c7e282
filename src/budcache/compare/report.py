"""The comparison's outputs: the result record, Markdown table, CSV/JSON, plot and image grids; merging runs."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import atomic_write_bytes, atomic_write_text, read_json_limited, write_json
from ..plots import pyplot, save_figure
from ..policy import CachePolicy
from ..problems.metrics import PairedGap, gap_text


@dataclass
class CompareResult:
    """Every row of the comparison, the grid images and the run's metadata."""

    rows: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    meta: dict[str, Any]
    policies: dict[str, dict[int, CachePolicy]]  # budcache method name -> budget -> searched policy




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
           "checker_acc", "budcache_wins", "pairs", "wins_reference", "psnr_gap", "psnr_gap_low", "psnr_gap_high",
           "median_gap", "median_gap_low", "median_gap_high", "nfe_mean", "nfe_min", "nfe_max", "wall_ms", "fit_s")

#: The metrics "Where budcache is not best" checks: (row key, label, unit, better, paired gap key).
CHECKED = (("psnr", "mean PSNR", " dB", max, "psnr_gap"), ("psnr_median", "median PSNR", " dB", max, "median_gap"),
           ("ssim", "SSIM", "", max, None), ("latent_mse", "latent MSE", "", min, None))


def gap_cell(r: dict[str, Any], key: str) -> str:
    """``+1.23 [-0.40, +2.95]``: the reference's lead over this row in dB, with its 95% paired interval."""
    return gap_text(r[key], r.get(f"{key}_ci")) if key in r else ""


def paired_gap_of(mine: dict[str, Any], best: dict[str, Any], key: str) -> tuple[float, list[float] | None] | None:
    """``mine``'s paired lead over ``best`` in ``key`` (``psnr_gap`` or ``median_gap``) with its interval, from
    whichever of the two rows was the reference of the other; ``None`` when neither was."""
    if key in best and best.get("gap_reference") == mine["method"]:
        return best[key], best.get(f"{key}_ci")
    if key in mine and mine.get("gap_reference") == best["method"]:  # the gap is best - mine: flip it
        ci = mine.get(f"{key}_ci")
        return -mine[key], ([-ci[1], -ci[0]] if ci else None)
    return None


def _fmt(metric: str, v: float, unit: str) -> str:
    return f"{v:.3e}" if metric == "latent_mse" else (f"{v:.4f}" if metric == "ssim" else f"{v:.2f}{unit}")


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
    lines.append("budcache wins: pairs where the reference row (marked; budcache's, or the method that ran the "
                 "(first) policy given for that budget) has the higher PSNR. PSNR gap and median gap: the reference's "
                 "mean and median PSNR minus the row's, in dB, with a 95% paired bootstrap interval over the "
                 "evaluation pairs; an interval that holds 0 is a gap another draw of pairs can reverse.")
    has_lpips = any("lpips" in r for r in res.rows)
    head = "| method | kind | NFE mean [min, max] | latent MSE | PSNR (dB) | median PSNR | SSIM |" + \
        (" LPIPS |" if has_lpips else "") + " checker | budcache wins | PSNR gap [95% CI] | median gap [95% CI] |" + \
        " ms/image | fit (s) |"
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
            wins = f"{r['budcache_wins']}/{r['pairs']}" if "budcache_wins" in r else \
                ("(reference)" if r.get("wins_reference") else "")
            lines.append(f"| {r['method']} | {r['kind']} | {r['nfe_mean']:.2f} [{r['nfe_min']:.2f}, "
                         f"{r['nfe_max']:.2f}] | {mse} | {psnr} | {med} | {ssim} |{lp} {acc} | {wins} | "
                         f"{gap_cell(r, 'psnr_gap')} | {gap_cell(r, 'median_gap')} | "
                         f"{r['wall_ms']:.1f} | {r['fit_s']:.1f} |")
        ours = [r for r in group if r["method"].startswith("budcache")]
        for metric, label, unit, better, gap in CHECKED:
            have = [r for r in ours if metric in r]
            best = f.get(metric)
            if not have or best is None or best.startswith("budcache"):
                continue
            mine = better(have, key=lambda r: r[metric])
            row = next(r for r in group if r["method"] == best)
            line = (f"K={k}: best {label} is {best} ({_fmt(metric, row[metric], unit)}); budcache's best, "
                    f"{mine['method']}, has {_fmt(metric, mine[metric], unit)}")
            pair = paired_gap_of(mine, row, gap) if gap is not None else None
            if pair is not None:
                g, ci = pair
                line += f" (paired gap {g:+.2f} dB" + (
                    f", 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" + ("" if PairedGap(g, *ci).excludes_zero() else
                                                                 ": another draw of pairs can reverse it")
                    if ci else "") + ")"
            misses.append(line)
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
        names = [label for metric, label, *_ in CHECKED if any(metric in r for r in res.rows)]
        named = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        lines.append(f"A budcache method has the best {named} at every budget.")
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
        flat = {**r, **{f"{g}_{end}": r[f"{g}_ci"][i] for g in ("psnr_gap", "median_gap") if f"{g}_ci" in r
                        for i, end in enumerate(("low", "high"))}}
        w.writerow({c: flat.get(c, "") for c in COLUMNS})
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




__all__ = ["CompareResult", "load_result", "merge_results", "best_flags", "markdown", "write_outputs",
           "plot_quality", "write_grid"]
