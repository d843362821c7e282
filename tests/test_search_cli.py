"""``budcache search`` end to end on tinyflow: policies, report, summary, plots, resume and clear errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from budcache import CachePolicy, ConfigError
from budcache.cli import main
from budcache.search.job import PHASES

torch.set_num_threads(1)

ARGS = ["search", "--steps", "6", "--nfe", "2,3", "--calib-pairs", "2", "--heldout", "2", "--sa-iters", "4",
        "--hc-rounds", "1", "--quiet"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    rc = main([*ARGS, "--out", str(out)])
    assert rc == 0
    return out


def _policies(out):
    return {k: CachePolicy.load(out / f"policy_N6_K{k}.json") for k in (2, 3)}


def test_search_writes_one_budget_exact_policy_per_budget(searched):
    pols = _policies(searched)
    digests = set()
    for k, pol in pols.items():
        assert pol.steps == 6 and pol.nfe == k
        assert pol.compute[0] == 0 and len(set(pol.compute)) == k
        assert pol.meta["budget"] == k and pol.meta["model"] == "tinyflow"
        assert pol.meta["calibration_pairs"] == 2
        assert isinstance(pol.meta["search_loss"], float) and math.isfinite(pol.meta["search_loss"])
        # the default (--mechanism auto): budcache's velocity forecast in sigma with per-step estimators
        # (policy version 2), TaylorSeer's searched schedule, and budcache's estimators on that schedule; one kept by
        # the pairs rule (test_default_search_keeps_the_paired_comparisons_winner)
        cand = pol.meta["candidates"]
        assert set(cand) == {"vtaylor1", "taylorseer", "vtaylor1@taylorseer"} and pol.meta["loss"] == "logmse"
        assert pol.meta["search_loss"] == cand[pol.meta["candidate"]] and pol.meta["keep"] == "pairs"
        assert pol.meta["kept"] == pol.meta["candidate"]
        assert pol.meta["mechanism"] == pol.meta["candidate"].partition("@")[0]
        if pol.meta["mechanism"] == "vtaylor1":
            assert pol.estimators is not None and len(pol.estimators) == 6 - k
            assert set(pol.estimators) <= {"vtaylor1", "vtaylor2", "output"}
        else:
            assert pol.estimators is None and pol.estimator == "taylorseer"
        digests.add(pol.meta["calibration_digest"])
    assert len(digests) == 1 and len(digests.pop()) == 16


def test_search_writes_report_summary_and_plots(searched):
    report = (searched / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 2 |") or line.startswith("| 3 |")]
    # the search table and the candidates' table: one row per budget each; held-out: budcache, uniform, plain
    assert len(rows) == 2 + 2 + 2 * 3
    pols = _policies(searched)
    for k in (2, 3):
        assert f"`{pols[k].estimator_strip()}`" in report

    summary = json.loads((searched / "summary.json").read_text())
    assert [b["nfe"] for b in summary["budgets"]] == [2, 3]
    # wall time per phase: every phase named, none negative, together the whole run (to the last measurement)
    phases = summary["meta"]["phases_s"]
    assert list(phases) == list(PHASES) and min(phases.values()) >= 0 and phases["search"] > 0
    assert summary["meta"]["wall_s"] - 0.5 <= sum(phases.values()) <= summary["meta"]["wall_s"]
    assert "; by phase: " + ", ".join(f"{PHASES[n]} {v:.1f} s" for n, v in phases.items()) + "." in report
    assert summary["meta"]["digest"] == pols[2].meta["calibration_digest"]
    assert summary["meta"]["calibration_pairs"] == 2 and summary["meta"]["heldout_pairs"] == 2
    for b in summary["budgets"]:
        assert tuple(b["compute"]) == pols[b["nfe"]].compute
        # the mask search's loss, then the per-step estimators' (never worse: steepest descent from it)
        assert b["estimator_loss"] == pols[b["nfe"]].meta["search_loss"] and b["estimator_loss"] <= b["loss"]
        assert b["estimators"] == list(pols[b["nfe"]].estimators)
        assert b["stats"]["evaluations"] >= 1
        # the report's "masks evaluated" is the mask search's own count; the evaluator's stats add the estimator
        # plans (the sweep's start plan is the searched mask, already scored)
        masks, plans = b["mask_evaluations"], b["estimator_evaluations"]
        assert masks >= 1 and masks + plans - 1 <= b["stats"]["evaluations"] <= masks + plans
        refined = b["loss"] if b["estimator_loss"] is None else b["estimator_loss"]
        assert f"| {b['nfe']} | {b['loss']:.4e} | {refined:.4e} | {masks} |" in report
        assert set(b["heldout"]) >= {"budcache", "uniform", "plain"}
        # against budcache's held-out row: the median PSNR gap, with its paired interval, in JSON and the report
        h = b["heldout"]
        for name in ("uniform", "plain"):
            r = h[name]
            assert r["median_gap"] == pytest.approx(h["budcache"]["psnr_median"] - r["psnr_median"], abs=1e-4)
            lo, hi = r["median_gap_ci"]
            assert lo <= hi
            assert f"| {r['budcache_wins']}/2 | {r['median_gap']:+.2f} [{lo:+.2f}, {hi:+.2f}] |" in report
        assert "median_gap" not in h["budcache"]

    for name in ("history_N6_K2.png", "history_N6_K3.png", "frontier.png"):
        data = (searched / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints are finished; no temp files are left behind
    for k in (2, 3):
        ck = json.loads((searched / f"checkpoint_N6_K{k}.json").read_text())
        assert ck["state"]["phase"] == "done"
    assert not [p for p in searched.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_resume_returns_the_same_policies(searched, capsys):
    before = _policies(searched)
    rc = main([*ARGS, "--out", str(searched), "--resume"])
    assert rc == 0
    after = _policies(searched)
    for k in (2, 3):
        assert after[k].compute == before[k].compute
        assert after[k].meta["search_loss"] == before[k].meta["search_loss"]
    out = capsys.readouterr().out
    assert "K=  2" in out and "K=  3" in out


def test_resume_with_other_settings_is_a_clear_error(searched, capsys):
    args = [a if a != "4" else "5" for a in ARGS]  # --sa-iters 5
    rc = main([*args, "--out", str(searched), "--resume"])
    assert rc == 2
    assert "another search" in capsys.readouterr().err


def test_mechanism_taylorseer_needs_no_other_option(tmp_path, capsys):
    # a peer fills skipped steps with its own estimator: no per-step choices unless asked for
    out = tmp_path / "ts"
    rc = main([*ARGS[:4], "3", *ARGS[5:], "--mechanism", "taylorseer",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    pol = CachePolicy.load(out / "policy_N6_K3.json")
    assert pol.estimators is None and pol.estimator == "taylorseer" and pol.nfe == 3
    # asking for per-step estimators with it is a clear usage error
    rc = main([*ARGS, "--mechanism", "taylorseer", "--estimators", "vtaylor2", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--estimators none" in capsys.readouterr().err


def test_budget_beyond_steps_is_a_clear_error(tmp_path, capsys):
    rc = main(["search", "--steps", "6", "--nfe", "9", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nfe" in err and "9" in err and "1..6" in err
    assert not list((tmp_path / "o").glob("policy_*.json"))


def test_bad_budget_list_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--nfe", "2,x", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_search_on_a_prompt_file_with_calib_pairs_and_prefix(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\nthree triangles\na small yellow circle\n")
    out = tmp_path / "o"
    rc = main(["search", "--steps", "6", "--nfe", "3", "--prompts", str(prompts), "--seeds-per-prompt", "2",
               "--calib-pairs", "5", "--prefix", "2", "--heldout", "2", "--sa-iters", "4", "--hc-rounds", "1",
               "--quiet", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["calibration_pairs"] == 5  # 5 of the file's 4 x 2 pairs, not all 8 (nor 32)
    pol = CachePolicy.load(out / "policy_N6_K3.json")
    assert pol.compute[:2] == (0, 1) and pol.meta["calibration_pairs"] == 5  # the forced prefix of 2
    # more pairs than the file gives is refused, naming both numbers
    rc = main(["search", "--steps", "6", "--nfe", "3", "--prompts", str(prompts), "--calib-pairs", "9",
               "--quiet", "--out", str(tmp_path / "o2")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--calib-pairs 9 but the prompt file" in err and "gives 4 pairs" in err


def test_a_budget_searched_with_others_equals_it_searched_alone_unless_warm_started(tmp_path):
    """Budgets are independent by default (K=3's policy does not depend on K=2 being asked for too); with
    --warm-start K=3 starts from K=2's mask, visible in the first entry of its search history."""
    base = ["search", "--steps", "6", "--calib-pairs", "2", "--heldout", "1", "--sa-iters", "6", "--hc-rounds", "1",
            "--mechanism", "vtaylor1", "--estimators", "none", "--quiet"]
    assert main([*base, "--nfe", "3", "--out", str(tmp_path / "alone")]) == 0
    assert main([*base, "--nfe", "2,3", "--out", str(tmp_path / "both")]) == 0
    assert main([*base, "--nfe", "2,3", "--warm-start", "--out", str(tmp_path / "warm")]) == 0
    alone, both = (json.loads((tmp_path / d / "policy_N6_K3.json").read_text()) for d in ("alone", "both"))
    assert alone["compute"] == both["compute"] and alone["meta"]["search_loss"] == both["meta"]["search_loss"]
    k2 = json.loads((tmp_path / "warm" / "policy_N6_K2.json").read_text())["compute"]
    assert json.loads((tmp_path / "warm" / "summary.json").read_text())["meta"]["warm_start"] is True
    assert json.loads((tmp_path / "both" / "summary.json").read_text())["meta"]["warm_start"] is False
    assert re.search(r"Wall time of the whole run: \d+ s, CPU time of this process \d+ s; by phase: set-up",
                     (tmp_path / "both" / "report.md").read_text())
    assert json.loads((tmp_path / "both" / "summary.json").read_text())["meta"]["cpu_s"] > 0
    starts = {d: json.loads((tmp_path / d / "checkpoint_N6_K3.json").read_text())["memo"][0][0]
              for d in ("alone", "warm")}
    assert set(k2) < set(starts["warm"]) and len(starts["warm"]) == 3  # K=3 began from K=2's mask plus one step
    assert starts["alone"] != starts["warm"]


ORDER = ("vtaylor1", "taylorseer", "vtaylor1@taylorseer")  # the candidates; mean ties go to the earlier one


def _per_pair_losses(out, k):
    """Each candidate's log latent MSE on each of the search's 2 calibration pairs, recomputed from its policy file."""
    from budcache import tinyflow
    from budcache.problems.data import calibration_pairs
    from budcache.problems.tinyflow import TinyflowProblem
    from budcache.search.losses import latent_log_mse

    problem = TinyflowProblem(tinyflow.load(), 6)
    calib = problem.calibration(*calibration_pairs(problem, 2, 0))
    return {m: latent_log_mse(problem.final_latents(calib, CachePolicy.load(out / f"policy_N6_K{k}_{m}.json")),
                              calib.teacher).tolist() for m in ORDER}


def test_default_search_keeps_the_paired_comparisons_winner(searched):
    """`budcache search` without --mechanism searches budcache's estimators and TaylorSeer's schedule per budget and
    keeps the candidate with the lower loss than each other one on more calibration pairs than the higher (recomputed
    here from the candidates' policy files), else the lowest mean; the report and the meta give the paired wins."""
    report = (searched / "report.md").read_text()
    assert "| NFE | vtaylor1 | taylorseer | vtaylor1@taylorseer | kept | wins |" in report
    for k, pol in _policies(searched).items():
        cand, wins = pol.meta["candidates"], pol.meta["pair_wins"]
        per_pair = _per_pair_losses(searched, k)
        for a in ORDER:
            for b in ORDER:
                if a != b:
                    assert wins[a][b] == sum(x < y for x, y in zip(per_pair[a], per_pair[b]))
        beats_all = [a for a in ORDER if all(wins[a][b] > wins[b][a] for b in ORDER if b != a)]
        kept = beats_all[0] if beats_all else min(cand, key=lambda n: (cand[n], ORDER.index(n)))
        assert pol.meta["candidate"] == kept and pol.meta["search_loss"] == cand[kept]
        assert f"**{cand[kept]:.4f}**" in report
        assert f"{kept}: " + ", ".join(str(wins[kept][b]) for b in ORDER if b != kept) in report


def test_keep_mean_keeps_the_lowest_mean_calibration_loss(searched, tmp_path):
    """--keep mean: the candidate with the lowest mean calibration loss, the searches themselves unchanged."""
    assert main([*ARGS, "--keep", "mean", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "in bold the one the budget keeps: the lowest mean calibration loss:" in report and "| wins |" not in report
    for k in (2, 3):
        pol = CachePolicy.load(tmp_path / f"policy_N6_K{k}.json")
        cand = pol.meta["candidates"]
        assert cand == _policies(searched)[k].meta["candidates"]
        kept = min(cand, key=lambda n: (cand[n], ORDER.index(n)))
        assert pol.meta["candidate"] == kept and pol.meta["keep"] == "mean" and "pair_wins" not in pol.meta
        assert json.loads((tmp_path / "summary.json").read_text())["meta"]["keep"] == "mean"


def test_keep_is_refused_without_candidates(tmp_path, capsys):
    """--keep names a rule for --mechanism auto only; an unknown rule is refused by run_search too."""
    from budcache.search.job import run_search

    assert main([*ARGS, "--mechanism", "vtaylor1", "--keep", "mean", "--out", str(tmp_path / "a")]) == 2
    assert "--keep applies only with --mechanism auto" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--keep 'best' is unknown"):
        run_search(tmp_path / "b", nfes=[2], keep="best", progress=False)


def test_default_search_also_writes_each_candidates_policy(searched):
    """Beside the kept policy, policy_N*_K*_<mechanism>.json holds each candidate's own searched policy (TaylorSeer's
    searched schedule too when budcache's is kept), with its own loss; the kept one is the lower."""
    names = ("vtaylor1", "taylorseer", "vtaylor1@taylorseer")
    for k, kept in _policies(searched).items():
        cands = {m: CachePolicy.load(searched / f"policy_N6_K{k}_{m}.json") for m in names}
        for m, pol in cands.items():
            assert pol.nfe == k and pol.meta["mechanism"] == m.partition("@")[0] and pol.meta["candidate"] == m
            assert pol.meta["search_loss"] == kept.meta["candidates"][m]
        assert cands["taylorseer"].estimators is None and cands["taylorseer"].estimator == "taylorseer"
        # budcache's estimators per skipped step on TaylorSeer's searched schedule, the budget unchanged
        hybrid = cands["vtaylor1@taylorseer"]
        assert hybrid.compute == cands["taylorseer"].compute and hybrid.meta["mask_from"] == "taylorseer"
        assert hybrid.estimators is not None and set(hybrid.estimators) <= {"vtaylor1", "vtaylor2", "output"}
        same = cands[kept.meta["candidate"]]
        assert same.compute == kept.compute and same.estimators == kept.estimators and same.meta == kept.meta


def test_default_search_runs_its_candidates_at_once_and_matches_the_in_process_search(searched, tmp_path):
    """The default backend (auto) scores budcache's candidate on worker processes while TaylorSeer's schedule is
    searched in this process at the same time. With whole masks per worker (--split masks) the policies are those
    of the one-process search, bit for bit; the default item split averages per-item losses of smaller batches,
    which may round differently (here: one item per worker)."""
    from budcache.search.local import default_workers

    meta = json.loads((searched / "summary.json").read_text())["meta"]
    assert meta["backend"] == "local" and meta["concurrent_candidates"] is True
    assert meta["workers"] == default_workers()  # one per core, beside the in-process candidate
    w = default_workers()  # 2 calibration pairs: one per worker, else groups of 2 when W is even
    assert meta["split"] == ("items" if w <= 2 else "hybrid" if w % 2 == 0 else "masks")
    assert main([*ARGS, "--backend", "inprocess", "--out", str(tmp_path / "one")]) == 0
    assert main([*ARGS, "--split", "masks", "--workers", "2", "--out", str(tmp_path / "masks")]) == 0
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["meta"]["concurrent_candidates"] is False
    for k in (2, 3):
        one = json.loads((tmp_path / "one" / f"policy_N6_K{k}.json").read_text())
        a = json.loads((tmp_path / "masks" / f"policy_N6_K{k}.json").read_text())
        assert a["compute"] == one["compute"] and a.get("estimators") == one.get("estimators")
        assert a["meta"]["search_loss"] == one["meta"]["search_loss"]
        assert a["meta"]["candidates"] == one["meta"]["candidates"]
        d = json.loads((searched / f"policy_N6_K{k}.json").read_text())
        assert d["meta"]["candidates"]["taylorseer"] == one["meta"]["candidates"]["taylorseer"]  # in-process both
        assert d["meta"]["candidates"]["vtaylor1"] == pytest.approx(one["meta"]["candidates"]["vtaylor1"], rel=1e-4)


def test_options_given_apply_to_every_candidate_and_the_peer_keeps_its_short_search_otherwise(searched, monkeypatch,
                                                                                               tmp_path):
    """--sa-iters / --hc-rounds given on the command line set both candidates' searches; the options not given keep
    each candidate's own default: budcache's annealing (radius 3, 2 far jumps) and, for TaylorSeer's schedule, the
    short search from its best grid point (PEER_SEARCH: radius 2, no far jumps, prefix 1)."""
    from budcache.search import job

    own = json.loads((searched / "checkpoint_N6_K3.json").read_text())["config"]
    peer = json.loads((searched / "checkpoint_N6_K3_taylorseer.json").read_text())["config"]
    assert (own["sa_iters"], own["hc_rounds"], own["radius"], own["far_jumps"]) == (4, 1, 3, 2)
    assert (peer["sa_iters"], peer["hc_rounds"], peer["radius"], peer["far_jumps"], peer["prefix"]) == (4, 1, 2, 0, 1)
    seen = {}

    def fake_run_search(out, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(job, "run_search", fake_run_search)
    assert main(["search", "--nfe", "3", "--quiet", "--backend", "inprocess", "--out", str(tmp_path / "a")]) == 0
    assert not {"sa_iters", "hc_rounds", "radius", "far_jumps", "t_max", "t_min", "restarts"} & set(seen)
    seen.clear()
    assert main(["search", "--nfe", "3", "--quiet", "--backend", "inprocess", "--radius", "1", "--t-max", "0.1",
                 "--out", str(tmp_path / "b")]) == 0
    assert seen["radius"] == 1 and seen["t_max"] == 0.1 and "sa_iters" not in seen


def test_no_peer_masks_needs_the_auto_mechanism(tmp_path, capsys):
    assert main([*ARGS, "--mechanism", "vtaylor1", "--no-peer-masks", "--out", str(tmp_path / "a")]) == 2
    assert "--no-peer-masks applies only with --mechanism auto" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_split_option_is_checked(tmp_path, capsys):
    assert main([*ARGS, "--backend", "inprocess", "--split", "items", "--out", str(tmp_path / "a")]) == 2
    assert "--split applies only with workers" in capsys.readouterr().err
    assert main([*ARGS, "--split", "items", "--workers", "3", "--out", str(tmp_path / "b")]) == 2
    assert "--split items needs at most one worker per calibration item (3 workers, 2 items)" in \
        capsys.readouterr().err


def test_more_workers_than_pairs_split_both_ways_and_temper_one_proposal_per_group(tmp_path):
    out = tmp_path / "hybrid"
    assert main([*ARGS, "--workers", "4", "--scheme", "tempering", "--mechanism", "vtaylor1", "--out", str(out)]) == 0
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["split"] == "hybrid" and meta["workers"] == 4
    for k in (2, 3):
        pol = CachePolicy.load(out / f"policy_N6_K{k}.json")
        assert len(pol.compute) == k and math.isfinite(pol.meta["search_loss"])
    ckpt = json.loads((out / "checkpoint_N6_K3.json").read_text())
    assert ckpt["tempering"]["workers"] == 2  # W / S = 4 / 2 proposals per round


def test_run_search_takes_names_none_or_the_default_for_estimators(tmp_path):
    from budcache.errors import ConfigError
    from budcache.problems.settings import SamplerSettings
    from budcache.search import run_search

    with pytest.raises(ConfigError, match="estimators='vtaylor2'"):  # a bare name, not a list
        run_search(tmp_path, nfes=[3], settings=SamplerSettings(6), estimators="vtaylor2", progress=False)
    assert not list(tmp_path.glob("policy_*.json"))


def test_no_peer_masks_searches_the_two_candidates_alone(searched, tmp_path):
    """--no-peer-masks leaves out budcache's estimators on TaylorSeer's schedule; the other two candidates are
    searched as with it, to the same losses."""
    out = tmp_path / "two"
    assert main([*ARGS, "--backend", "inprocess", "--no-peer-masks", "--out", str(out)]) == 0
    for k, pol in _policies(out).items():
        assert set(pol.meta["candidates"]) == {"vtaylor1", "taylorseer"}
        assert not (out / f"policy_N6_K{k}_vtaylor1@taylorseer.json").exists()
        three = CachePolicy.load(searched / f"policy_N6_K{k}.json").meta["candidates"]
        assert pol.meta["candidates"]["taylorseer"] == three["taylorseer"]
        assert pol.meta["candidates"]["vtaylor1"] == pytest.approx(three["vtaylor1"], rel=1e-4)  # items split there


def test_estimators_on_the_peers_schedule_take_one_sweep_and_budcaches_own_the_default(tmp_path, monkeypatch):
    """The third candidate's estimator choice runs PEER_MASK_SWEEPS (1) sweep; budcache's own candidate the sweep
    default (2); ``--refine-scheme steepest`` keeps its own default for both."""
    from budcache.search import anneal, job

    calls = []

    def spy(plan_losses, plan, choices, *, rounds=None, scheme="sweep", **kw):
        res = anneal.refine_estimators(plan_losses, plan, choices, rounds=rounds, scheme=scheme, **kw)
        calls.append((rounds, scheme, len(res.history) - 1))
        return res

    monkeypatch.setattr(job, "refine_estimators", spy)
    kw = dict(nfes=[3], calib_pairs=2, heldout_pairs=2, progress=False)
    from budcache.problems.settings import SamplerSettings
    from budcache.search.job import AUTO, PEER_MASK_SWEEPS, run_search

    settings = SamplerSettings(steps=6, mechanism="vtaylor1")
    run_search(tmp_path / "a", settings=settings, mechanisms=AUTO, sa_iters=4, hc_rounds=1, **kw)
    assert PEER_MASK_SWEEPS == 1 and [c[:2] for c in calls] == [(None, "sweep"), (1, "sweep")]
    meta = json.loads((tmp_path / "a" / "summary.json").read_text())["meta"]
    assert meta["refine_rounds"] == {"own": 2, "peer_mask": 1}
    calls.clear()
    run_search(tmp_path / "b", settings=settings, mechanisms=AUTO, sa_iters=4, hc_rounds=1,
               refine_scheme="steepest", **kw)
    assert [c[:2] for c in calls] == [(None, "steepest"), (None, "steepest")]
    meta = json.loads((tmp_path / "b" / "summary.json").read_text())["meta"]
    assert meta["refine_rounds"] == {"own": 8, "peer_mask": 8}


def test_the_estimator_choice_keeps_a_checkpoint_and_resumes_where_it_was_killed(tmp_path, monkeypatch):
    """A search killed during the per-step estimator choice resumes to the uninterrupted policies without scoring
    a plan it already scored; a finished run resumed scores no plan; the checkpoint alone makes an unflagged run
    refuse to start over."""
    from budcache.problems.settings import SamplerSettings
    from budcache.search import anneal, job
    from budcache.search.job import AUTO, run_search

    class Killed(Exception):
        pass

    asked: list[tuple[int, ...]] = []
    budget = {"calls": None}

    def spy(plan_losses, plan, choices, **kw):
        def counted(plans):
            if budget["calls"] is not None:
                if budget["calls"] == 0:
                    raise Killed
                budget["calls"] -= 1
            asked.extend(plans)
            return plan_losses(plans)
        return anneal.refine_estimators(counted, plan, choices, **kw)

    monkeypatch.setattr(job, "refine_estimators", spy)
    settings = SamplerSettings(steps=6, mechanism="vtaylor1")
    kw = dict(nfes=[3], calib_pairs=2, heldout_pairs=2, progress=False, settings=settings, mechanisms=AUTO,
              sa_iters=4, hc_rounds=1)
    run_search(tmp_path / "ref", **kw)
    ref, total = CachePolicy.load(tmp_path / "ref" / "policy_N6_K3.json"), len(asked)
    names = sorted(p.name for p in (tmp_path / "ref").glob("estimators_*.json"))
    assert names == ["estimators_N6_K3_vtaylor1.json", "estimators_N6_K3_vtaylor1@taylorseer.json"]

    asked.clear()
    run_search(tmp_path / "ref", resume=True, **kw)  # finished: nothing is scored again
    assert asked == [] and CachePolicy.load(tmp_path / "ref" / "policy_N6_K3.json").to_dict() == ref.to_dict()

    asked.clear()
    budget["calls"] = 3
    with pytest.raises(Killed):
        run_search(tmp_path / "run", **kw)
    first = len(asked)
    assert 0 < first < total and not (tmp_path / "run" / "policy_N6_K3.json").exists()
    budget["calls"] = None
    asked.clear()
    run_search(tmp_path / "run", resume=True, **kw)
    assert len(asked) == total - first  # only the plans the killed run had not scored
    got = CachePolicy.load(tmp_path / "run" / "policy_N6_K3.json")
    assert got.compute == ref.compute and got.estimators == ref.estimators
    assert got.meta["candidates"] == ref.meta["candidates"]

    for p in (tmp_path / "run").glob("checkpoint_*.json"):
        p.unlink()
    with pytest.raises(ConfigError, match=r"estimators_N6_K3_vtaylor1\.json.*--resume"):
        run_search(tmp_path / "run", **kw)


def test_force_removes_the_earlier_checkpoints_of_its_budgets_before_it_starts(tmp_path, monkeypatch):
    """A forced run killed before it reaches a budget leaves no checkpoint of the earlier run there, so its
    --resume does not refuse a file that belongs to another search."""
    from budcache.problems.settings import SamplerSettings
    from budcache.search import job
    from budcache.search.job import AUTO, run_search

    settings = SamplerSettings(steps=6, mechanism="vtaylor1")
    kw = dict(nfes=[3], calib_pairs=2, heldout_pairs=2, progress=False, settings=settings, mechanisms=AUTO,
              hc_rounds=1)
    run_search(tmp_path, sa_iters=4, **kw)
    earlier = sorted(p.name for p in tmp_path.glob("*.json") if not p.name.startswith(("policy", "summary")))
    assert "estimators_N6_K3_vtaylor1.json" in earlier and "checkpoint_N6_K3.json" in earlier

    class Killed(Exception):
        pass

    def killed(*a, **k):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(job, "search_scheme", killed)
        with pytest.raises(Killed):
            run_search(tmp_path, sa_iters=5, force=True, **kw)
    assert not [n for n in earlier if (tmp_path / n).exists()]
    assert run_search(tmp_path, sa_iters=5, resume=True, **kw)[0].policy.nfe == 3  # nothing of the other run in the way
