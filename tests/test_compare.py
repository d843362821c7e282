"""budcache compare: the harness (pairs, metrics, outputs, merging), the CLI and its errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from budcache import tinyflow
from budcache.cli import main
from budcache.compare.harness import CompareConfig, pair_sets, quality, run_compare
from budcache.compare.report import markdown
from budcache.errors import ConfigError
from budcache.policy import CachePolicy
from budcache.problems.tinyflow import TinyflowProblem

torch.set_num_threads(1)

N = 8


@pytest.fixture(scope="module")
def tf():
    return tinyflow.load()


def test_evaluation_pairs_are_disjoint_from_calibration():
    (cp, cs), (ep, es) = pair_sets(CompareConfig(calib_pairs=16, eval_pairs=32))
    assert len(cp) == 16 and len(ep) == 32
    assert not set(zip(cp, cs)) & set(zip(ep, es)) and not set(cs) & set(es)


@torch.no_grad()
def test_quality_metrics_against_the_reference(tf):
    p = TinyflowProblem(tf, N)
    calib = p.calibration(["a red circle", "two squares"], [1, 2])
    same = quality(p, calib.teacher, calib.teacher, calib.prompts)
    assert np.all(same["latent_mse"] == 0) and np.allclose(same["ssim"], 1.0) and np.allclose(same["psnr"], 120.0)
    noisy = quality(p, calib.teacher + 0.3 * torch.randn_like(calib.teacher), calib.teacher, calib.prompts)
    assert np.all(noisy["latent_mse"] > 0.05) and np.all(noisy["psnr"] < 40) and np.all(noisy["ssim"] < 1)
    assert set(np.unique(noisy["checker_ok"])) <= {0.0, 1.0}


@pytest.mark.parametrize("cfg, message", [
    (CompareConfig(nfes=()), "at least one budget"),
    (CompareConfig(nfes=(6, 28)), "budget 28"),
    (CompareConfig(grid_nfe=7), "--grid-nfe 7"),
    (CompareConfig(calib_pairs=0), "pairs must be >= 1"),
    (CompareConfig(transfer_solvers=("heun",)), "solver 'heun'"),
    (CompareConfig(transfer_guidance=(-1.0,)), "guidance"),
    (CompareConfig(policies={6: CachePolicy.uniform(28, 8)}), "policy given for NFE 6"),
    (CompareConfig(given_only=True), "--given-only needs --policy"),
])
def test_bad_configurations_are_clear_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


TINY = ["compare", "--nfe", "3,4", "--steps", str(N), "--calib-pairs", "2", "--eval-pairs", "3",
        "--methods", "budcache,budcache-forecast,uniform,plain,fbcache,magcache,taylorseer", "--sa-iters", "3",
        "--hc-rounds", "1", "--transfer-solvers", "dpmpp2m", "--transfer-guidance", "2", "--grid-rows", "2",
        "--quiet"]


@pytest.mark.slow
def test_cli_end_to_end_writes_every_output(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## K = 3 of 8" in printed and "Transfer without re-searching" in printed
    for name in ("table.md", "results.csv", "results.json", "quality_vs_nfe.png", "grid_K4.png",
                 "policy_N8_K3.json", "policy_N8_K4.json", "policy_forecast_N8_K4.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == "budcache.compare" and res["meta"]["evaluation_pairs"] == 3
    main_rows = [r for r in res["rows"] if r["setting"] == "main"]
    assert len(main_rows) == 2 * 7
    for r in main_rows:
        assert r["nfe_min"] - 1e-9 <= r["nfe_mean"] <= r["nfe_max"] + 1e-9 and r["wall_ms"] > 0  # float mean
        if r["kind"] == "static":
            assert r["nfe_min"] == r["nfe_max"] == r["budget"], r["method"]
    assert {r["setting"] for r in res["transfer"]} == {"dpmpp2m, guidance 1", "euler, guidance 2"}
    assert {r["method"] for r in res["transfer"]} == {"budcache", "budcache-forecast", "uniform", "plain"}
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert len(rows) == len(res["rows"]) + len(res["transfer"]) and "psnr" in rows[0]
    grid = Image.open(out / "grid_K4.png")
    assert grid.size[0] > 8 * 32 * 3  # full + 7 method columns of 3x-scaled 32 px images
    assert CachePolicy.load(out / "policy_N8_K3.json").nfe == 3


@pytest.mark.parametrize("args, message", [
    (["--methods", "budcache,nope"], "unknown method"),
    (["--nfe", "3,8"], "budget 8"),
    (["--grid-nfe", "5"], "--grid-nfe 5"),
    (["--eval-pairs", "0"], "pairs must be >= 1"),
])
def test_cli_bad_inputs_exit_2_with_a_message(tmp_path, capsys, args, message):
    assert main([*TINY, "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_policy_files_must_match_the_budgets(tmp_path, capsys):
    f = CachePolicy(N, (0, 2, 5)).save(tmp_path / "p.json")
    assert main([*TINY, "--out", str(tmp_path / "x"), "--policy", str(f), "--nfe", "4"]) == 2
    assert "--policy files for NFE [3]" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([*TINY, "--out", str(tmp_path / "x"), "--policy", str(bad)]) == 2
    assert "bad.json': not valid JSON" in capsys.readouterr().err


def test_cli_lists_methods(capsys):
    assert main(["compare", "--list-methods"]) == 0
    names = capsys.readouterr().out.split()
    assert {"budcache", "uniform", "plain", "fbcache", "magcache", "taylorseer"} <= set(names)


@torch.no_grad()
def test_markdown_names_budgets_where_budcache_is_not_best(tmp_path):
    cfg = CompareConfig(nfes=(3,), steps=N, methods=("budcache", "plain"), calib_pairs=2, eval_pairs=2,
                        search_kw={"sa_iters": 2, "hc_rounds": 1}, transfer=False, grid_rows=1)
    res = run_compare(tmp_path, cfg, progress=False)
    assert "| budcache | static | 3.00 [3.00, 3.00]" in markdown(res)
    rows = {r["method"]: r for r in res.rows}
    # both outcomes, whichever the run gave: plain ahead by 1 dB, then behind by 1 dB
    rows["plain"]["psnr"] = rows["budcache"]["psnr"] + 1.0
    text = markdown(res)
    assert f"K=3: best mean PSNR is plain ({rows['plain']['psnr']:.2f} dB); budcache's best, budcache, has " \
           f"{rows['budcache']['psnr']:.2f} dB" in text
    rows["plain"]["psnr"] = rows["budcache"]["psnr"] - 1.0
    assert "K=3: best mean PSNR is plain" not in markdown(res)


@torch.no_grad()
def test_paired_wins_are_the_given_policys_whichever_method_runs_it(tmp_path):
    """A TaylorSeer-schedule policy (what `budcache search` keeps at some budgets) runs as taylorseer-searched:
    the other rows' wins are counted against it, pair by pair, and it is marked as the reference."""
    ts = CachePolicy(N, (0, 2, 5), meta={"mechanism": "taylorseer"})
    cfg = CompareConfig(nfes=(3,), steps=N, methods=("budcache", "taylorseer-searched", "taylorseer", "plain"),
                        calib_pairs=2, eval_pairs=3, transfer=False, grid_rows=1, policies={3: ts}, given_only=True)
    res = run_compare(tmp_path, cfg, progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"taylorseer-searched", "taylorseer", "plain"}  # given only: budcache does not search
    assert rows["taylorseer-searched"].get("wins_reference") and "budcache_wins" not in rows["taylorseer-searched"]
    per = json.loads((tmp_path / "results.json").read_text())
    assert rows["plain"]["pairs"] == 3 and 0 <= rows["plain"]["budcache_wins"] <= 3
    assert "(reference)" in markdown(res)
    assert per["rows"][0]["method"] == "taylorseer-searched"


@torch.no_grad()
def test_one_budget_takes_policies_for_several_methods_the_first_is_the_reference(tmp_path, capsys):
    """`budcache search` writes the kept policy and TaylorSeer's searched schedule: one compare runs both, counts
    wins and paired gaps against the first, and names every metric the reference does not lead."""
    own = CachePolicy(N, (0, 1, 4), meta={"mechanism": "vtaylor1"}).with_estimators(("vtaylor1",) * 5)
    ts = CachePolicy(N, (0, 2, 5), meta={"mechanism": "taylorseer"})
    cfg = CompareConfig(nfes=(3,), steps=N, methods=("budcache", "taylorseer-searched", "plain"), calib_pairs=2,
                        eval_pairs=6, transfer=False, grid_rows=1, policies={3: [own, ts]}, given_only=True)
    res = run_compare(tmp_path, cfg, progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == {"budcache", "taylorseer-searched", "plain"}
    assert rows["budcache"]["info"]["compute"] == [0, 1, 4] and rows["taylorseer-searched"]["info"]["compute"] == [
        0, 2, 5]
    assert rows["budcache"].get("wins_reference") and "psnr_gap" not in rows["budcache"]
    for name in ("taylorseer-searched", "plain"):
        r = rows[name]
        assert r["pairs"] == 6
        lo, hi = r["median_gap_ci"]
        assert lo <= hi and r["psnr_gap_ci"][0] <= r["psnr_gap_ci"][1]
        assert r["median_gap"] == pytest.approx(rows["budcache"]["psnr_median"] - r["psnr_median"], abs=1e-4)
        assert r["psnr_gap"] == pytest.approx(rows["budcache"]["psnr"] - r["psnr"], abs=1e-4)
    text = markdown(res)
    assert "| PSNR gap [95% CI] | median gap [95% CI] |" in text
    ts_row = rows["taylorseer-searched"]
    assert f"| {ts_row['median_gap']:+.2f} [{ts_row['median_gap_ci'][0]:+.2f}, " in text
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["plain"]["median_gap_low"]) == pytest.approx(rows["plain"]["median_gap_ci"][0])
    # a metric the reference does not lead is named with its paired gap and interval
    ts_row["psnr_median"] = rows["budcache"]["psnr_median"] + 5.0
    assert "K=3: best median PSNR is taylorseer-searched" in markdown(res)
    assert f"(paired gap {ts_row['median_gap']:+.2f} dB, 95% CI [" in markdown(res)
    ts_row["ssim"] = 2.0
    assert "K=3: best SSIM is taylorseer-searched (2.0000)" in markdown(res)
    # the reference itself has the best median: the gap is budcache's row's, flipped to read from budcache's side
    res.rows[:] = [r for r in res.rows if r["method"] != "plain"]
    for r in res.rows:
        r.pop("wins_reference", None)
    for r in res.rows:
        r.pop("gap_reference", None)
    from budcache.compare.harness import paired_wins

    ts_psnr = np.array([30.0, 40.0, 50.0, 60.0, 70.0, 80.0])
    paired_wins(res.rows, {"taylorseer-searched": ts_psnr, "budcache": ts_psnr - 2.0}, ours="taylorseer-searched")
    own_row = next(r for r in res.rows if r["method"] == "budcache")
    assert own_row["gap_reference"] == "taylorseer-searched" and own_row["median_gap"] == pytest.approx(2.0)
    own_row["psnr_median"], ts_row["psnr_median"] = 53.0, 55.0
    assert "best median PSNR is taylorseer-searched (55.00 dB); budcache's best, budcache, has 53.00 dB (paired gap " \
           "-2.00 dB, 95% CI [-2.00, -2.00])" in markdown(res)
    # two different policies of one budget for the same method are refused, in the API and on the command line
    other_ts = CachePolicy(N, (0, 3, 5), meta={"mechanism": "taylorseer"})
    with pytest.raises(ConfigError, match="two different policies for NFE 3 run as method 'taylorseer-searched'"):
        CompareConfig(nfes=(3,), steps=N, policies={3: [ts, other_ts]}).validate()
    # ... but the same schedule twice (the kept policy and the candidate's own file) is run once
    kept = CachePolicy(N, (0, 2, 5), meta={"mechanism": "taylorseer", "kept": "taylorseer"})
    from budcache.methods import route_policies

    assert route_policies({3: [kept, ts]}) == {"taylorseer-searched": {3: kept}}
    for bad in ([], "p.json", [ts, "p.json"]):
        with pytest.raises(ConfigError, match="must be a CachePolicy or a non-empty list"):
            CompareConfig(nfes=(3,), steps=N, policies={3: bad}).validate()
    a, b = ts.save(tmp_path / "a.json"), other_ts.save(tmp_path / "b.json")
    assert main([*TINY, "--out", str(tmp_path / "x"), "--policy", str(a), "--policy", str(b)]) == 2
    err = capsys.readouterr().err
    assert "b.json: two different policies for NFE 3 run as method 'taylorseer-searched'" in err
    assert "Traceback" not in err


def test_a_gap_is_only_quoted_against_its_own_reference_and_old_results_still_render(tmp_path):
    """Merged comparisons can hold two references at one budget: a miss quotes a gap only when it was measured
    between budcache's best and the best row; results written before the gaps existed still render."""
    from budcache.compare.report import CompareResult, load_result, write_outputs

    meta = {"date": "d", "model": "m", "steps": N, "solver": "euler", "guidance": 1.0, "calibration_pairs": 2,
            "evaluation_pairs": 6, "batch": 1, "threads": 1, "lpips": "LPIPS skipped", "budgets": [3],
            "grid_nfe": 3}
    base = {"setting": "main", "budget": 3, "kind": "static", "latent_mse": 1e-2, "nfe_mean": 3.0, "nfe_min": 3.0,
            "nfe_max": 3.0, "wall_ms": 1.0, "fit_s": 0.0, "info": {}}
    rows = [{**base, "method": "budcache", "psnr": 30.0, "psnr_median": 30.0, "wins_reference": True},
            {**base, "method": "taylorseer-searched", "psnr": 31.0, "psnr_median": 29.0, "wins_reference": True},
            {**base, "method": "magcache", "psnr": 35.0, "psnr_median": 20.0, "budcache_wins": 1, "pairs": 6,
             "psnr_gap": -4.0, "psnr_gap_ci": [-6.0, -2.0], "gap_reference": "taylorseer-searched"}]
    text = markdown(CompareResult(rows, [], meta, {}))
    assert "best mean PSNR is magcache (35.00 dB); budcache's best, budcache, has 30.00 dB\n" in text + "\n"
    assert "paired gap" not in text
    # rows without the gap keys (results.json of an earlier version): empty cells, no error
    for r in rows:
        r.pop("psnr_gap", None), r.pop("psnr_gap_ci", None), r.pop("gap_reference", None)
    write_outputs(tmp_path, CompareResult(rows, [], meta, {}))
    again = markdown(load_result(tmp_path))
    assert "| magcache | static | 3.00 [3.00, 3.00] | 1.000e-02 | **35.00** | 20.00 | n/a | n/a | 1/6 |  |  |" in again
    # no SSIM in any row (a latent-only problem): the all-clear names only the metrics measured
    rows[2]["psnr"] = 1.0
    rows[1]["psnr"] = rows[1]["psnr_median"] = 1.0
    assert "A budcache method has the best mean PSNR, median PSNR and latent MSE at every budget." in markdown(
        CompareResult(rows, [], meta, {}))


@torch.no_grad()
def test_runs_of_disjoint_methods_merge_into_one_table(tmp_path):
    from budcache.compare.report import load_result, merge_results

    base = dict(nfes=(3,), steps=N, calib_pairs=2, eval_pairs=2, transfer=False, grid_rows=1)
    run_compare(tmp_path / "a", CompareConfig(methods=("plain",), **base), progress=False)
    run_compare(tmp_path / "b", CompareConfig(methods=("uniform",), **base), progress=False)
    merged = merge_results([load_result(tmp_path / "a"), load_result(tmp_path / "b")])
    assert [r["method"] for r in merged.rows] == ["plain", "uniform"]
    assert "| uniform | static | 3.00" in markdown(merged)
    assert "No budcache method in this comparison." in markdown(merged)
    with pytest.raises(ConfigError, match="two comparisons"):
        merge_results([load_result(tmp_path / "a"), load_result(tmp_path / "a")])
    run_compare(tmp_path / "c", CompareConfig(methods=("uniform",), **{**base, "eval_pairs": 3}), progress=False)
    with pytest.raises(ConfigError, match="evaluation_pairs"):
        merge_results([load_result(tmp_path / "a"), load_result(tmp_path / "c")])
    with pytest.raises(ConfigError, match="does not exist"):
        load_result(tmp_path / "nowhere")


@torch.no_grad()
def test_cachedit_then_budcache_in_one_run(tmp_path):
    """cache-dit patches the model it touches; compare gives it a copy, so budcache's hooks still work after."""
    pytest.importorskip("cache_dit")
    cfg = CompareConfig(nfes=(3, 4), steps=N, methods=("dbcache", "cachedit-steps", "budcache"), calib_pairs=2,
                        eval_pairs=2, search_kw={"sa_iters": 2, "hc_rounds": 1}, transfer=False, grid_rows=1)
    res = run_compare(tmp_path, cfg, progress=False)
    assert [r["method"] for r in res.rows] == ["dbcache", "cachedit-steps", "budcache"] * 2
    assert all(r["nfe_max"] == r["budget"] for r in res.rows if r["method"] == "budcache")
