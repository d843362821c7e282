"""The per-step estimator choice keeps a checkpoint: a run killed at any point resumes to the uninterrupted
result without scoring a known plan again, and a damaged, edited or foreign checkpoint is a one-line error."""

from __future__ import annotations

import hashlib
import json

import pytest

from budcache import ConfigError
from budcache import estimators as est
from budcache.errors import ModelOutputError
from budcache.search.anneal import REFINE_CHECKPOINT_FORMAT, content_digest, load_refine_checkpoint, refine_estimators

V1, V2, OUT = est.CODES["vtaylor1"], est.CODES["vtaylor2"], est.CODES["output"]
START = (0, V1, V1, 0, V1, V1, 0, V1)
CHOICES = [V1, V2, OUT]


class Killed(Exception):
    pass


def _loss(p: tuple[int, ...]) -> float:
    """Non-separable: the first skipped step prefers OUT, each later one the previous skipped step's estimator,
    so each sweep (last step first) carries OUT one step further; a small hash term breaks ties."""
    skipped = [c for c in p if c != 0]
    value = float(skipped[0] != OUT) + sum(0.5 * (b != a) for a, b in zip(skipped, skipped[1:]))
    return value + int.from_bytes(hashlib.sha256(repr(p).encode()).digest()[:4], "big") / 2**40


class TableLoss:
    """:func:`_loss` of each plan; raises :class:`Killed` on call ``fail_after + 1`` (the driver killed while
    that request runs), and records every plan it is asked."""

    def __init__(self, fail_after: int | None = None, nan: tuple[int, ...] | None = None) -> None:
        self.calls, self.asked, self.fail_after, self.nan = 0, [], fail_after, nan

    def __call__(self, plans):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Killed
        self.asked.extend(plans)
        return [float("nan") if p == self.nan else _loss(p) for p in plans]


def _run(loss, path=None, resume=False, scheme="sweep", digest="abc", **kw):
    return refine_estimators(loss, START, CHOICES, scheme=scheme, rounds=3, checkpoint=path, resume=resume,
                             digest=digest, **kw)


@pytest.mark.parametrize("scheme", ["sweep", "steepest"])
def test_resume_after_a_kill_anywhere_gives_the_uninterrupted_choice(tmp_path, scheme):
    ref_loss = TableLoss()
    ref = _run(ref_loss, scheme=scheme)
    assert len(ref.history) > 2  # it moves more than once, so there is a middle to be killed in
    for m in range(1, ref_loss.calls):
        path = tmp_path / f"kill{m}.json"
        with pytest.raises(Killed):
            _run(TableLoss(fail_after=m), path, scheme=scheme)
        saved = json.loads(path.read_text())
        assert saved["format"] == REFINE_CHECKPOINT_FORMAT and len(saved["memo"]) >= 1
        again = TableLoss()
        res = _run(again, path, resume=True, scheme=scheme)
        assert (res.plan, res.loss, res.history, res.evaluations) == (ref.plan, ref.loss, ref.history,
                                                                       ref.evaluations), m
        known = {tuple(p) for p, _ in saved["memo"]}
        assert not known & set(again.asked), "a plan of the checkpoint was scored again"
        assert len(again.asked) + len(known) == len(ref_loss.asked)
        # the finished checkpoint holds every plan the uninterrupted run scored
        assert {tuple(p) for p, _ in json.loads(path.read_text())["memo"]} == set(ref_loss.asked)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json"] * (ref_loss.calls - 1)  # no temp files


def test_resuming_a_finished_choice_scores_nothing_and_without_resume_it_starts_over(tmp_path):
    path = tmp_path / "est.json"
    ref = _run(TableLoss(), path)
    again = TableLoss()
    assert _run(again, path, resume=True).plan == ref.plan and again.asked == []
    data = json.loads(path.read_text())
    data["memo"] = data["memo"][:1]  # a shorter run's file: without resume it is not read, and then replaced
    _forged(path, lambda d: d.update(memo=data["memo"]))
    fresh = TableLoss()
    assert _run(fresh, path).plan == ref.plan and len(fresh.asked) == ref.evaluations
    assert len(json.loads(path.read_text())["memo"]) == ref.evaluations


def test_a_resume_with_other_rounds_scheme_or_choices_reuses_the_plans_it_shares(tmp_path):
    """A plan's loss depends only on the plan and the calibration set, so the checkpoint serves any scheme."""
    path = tmp_path / "est.json"
    first = TableLoss()
    _run(first, path)
    saved = path.read_bytes()
    for kw in ({"scheme": "steepest"}, {"rounds": 1}, {"choices": [V1, OUT]}):
        path.write_bytes(saved)
        asked = TableLoss()
        args = {"rounds": 3, "scheme": "sweep", "choices": CHOICES, **kw}
        res = refine_estimators(asked, START, args.pop("choices"), checkpoint=path, resume=True, digest="abc",
                                **args)
        alone = TableLoss()
        ref = refine_estimators(alone, START, kw.get("choices", CHOICES),
                                **{"rounds": 3, "scheme": "sweep", **{k: v for k, v in kw.items() if k != "choices"}})
        assert (res.plan, res.loss, res.history) == (ref.plan, ref.loss, ref.history), kw
        assert set(asked.asked) == set(alone.asked) - set(first.asked), kw  # only the plans not scored before


def test_a_non_finite_loss_names_the_plan_and_the_checkpoint_keeps_only_finite_losses(tmp_path):
    ref_loss = TableLoss()
    _run(ref_loss)
    bad = ref_loss.asked[-1]
    path = tmp_path / "est.json"
    with pytest.raises(ModelOutputError, match=r"estimator plan \[.*\] is not finite"):
        _run(TableLoss(nan=bad), path)
    memo = json.loads(path.read_text())["memo"]
    assert tuple(memo[-1][0]) != bad and all(v == v for _, v in memo)
    assert load_refine_checkpoint(path, json.loads(path.read_text())["mask"], "abc")  # still valid


def _forged(path, edit):
    """Rewrite the checkpoint with ``edit`` applied and a matching content digest (a deliberate forgery)."""
    data = json.loads(path.read_text())
    edit(data)
    data.pop("sha256", None)
    data["sha256"] = content_digest(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, match", [
    ("garbage", "estimator checkpoint"),
    ("other format", "not a budcache estimator checkpoint"),
    ("version", "unsupported version"),
    ("edited loss", "content digest does not match"),
    ("other digest", "belongs to another search"),
    ("other mask", "belongs to another search"),
    ("moved computed step", "does not compute exactly the mask's steps"),
    ("unknown estimator", "does not compute exactly the mask's steps"),
    ("loss not a number", "finite loss"),
    ("memo not a list", "field 'memo' must be a list"),
    ("loss too large for a float", "finite loss"),
    ("plan not a list", "does not compute exactly the mask's steps"),
])
def test_a_damaged_or_foreign_checkpoint_is_a_clear_error(tmp_path, case, match):
    path = tmp_path / "est.json"
    _run(TableLoss(), path)
    digest, start = "abc", START
    if case == "garbage":
        path.write_bytes(b"\x00{not json")
    elif case == "other format":
        _forged(path, lambda d: d.update(format="budcache.search-checkpoint"))
    elif case == "version":
        _forged(path, lambda d: d.update(version=2))
    elif case == "edited loss":
        data = json.loads(path.read_text())
        data["memo"][0][1] -= 1.0
        path.write_text(json.dumps(data))
    elif case == "other digest":
        digest = "xyz"
    elif case == "other mask":
        start = (0, V1, 0, V1, V1, V1, 0, V1)
    elif case == "moved computed step":
        _forged(path, lambda d: d["memo"][0].__setitem__(0, [0, 0, V1, V1, V1, V1, 0, V1]))
    elif case == "unknown estimator":
        _forged(path, lambda d: d["memo"][0].__setitem__(0, [0, 99, V1, 0, V1, V1, 0, V1]))
    elif case == "loss not a number":
        _forged(path, lambda d: d["memo"][0].__setitem__(1, True))
    elif case == "loss too large for a float":
        _forged(path, lambda d: d["memo"][0].__setitem__(1, 10**400))
    elif case == "plan not a list":
        _forged(path, lambda d: d["memo"][0].__setitem__(0, {"0": 0}))
    elif case == "memo not a list":
        _forged(path, lambda d: d.update(memo={"a": 1}))
    asked = TableLoss()
    with pytest.raises(ConfigError, match=match) as err:
        refine_estimators(asked, start, CHOICES, rounds=3, checkpoint=path, resume=True, digest=digest)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert asked.asked == []  # checked before anything is scored
