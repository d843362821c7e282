"""Hostile and broken files: the policy and checkpoint loaders only ever raise budcache's own clear errors."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from budcache import BudcacheError, CachePolicy
from budcache.search.anneal import CHECKPOINT_FORMAT, SearchConfig, content_digest, load_checkpoint, search

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
policy_keys = ["format", "version", "steps", "compute", "sigmas", "meta"]


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_policy_loader(tmp_path, data):
    p = tmp_path / "p.json"
    p.write_bytes(data)
    with pytest.raises(BudcacheError):
        CachePolicy.load(p)


@FUZZ
@given(json_values)
def test_random_json_never_crashes_the_policy_loader(tmp_path, value):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(value))
    with pytest.raises(BudcacheError):
        CachePolicy.load(p)


@FUZZ
@given(st.dictionaries(st.sampled_from(policy_keys), json_values, min_size=3, max_size=6))
def test_policy_shaped_garbage_is_rejected_or_valid(tmp_path, fields):
    doc = {"format": "budcache.policy", "version": 1, **fields}
    p = tmp_path / "p.json"
    p.write_text(json.dumps(doc))
    try:
        pol = CachePolicy.load(p)
    except BudcacheError:
        return
    assert pol.compute[0] == 0 and 1 <= pol.nfe <= pol.steps  # anything accepted is a valid policy


@FUZZ
@given(st.integers(min_value=0, max_value=200))
def test_truncated_policy_files_are_clear_errors(tmp_path, cut):
    text = CachePolicy.uniform(28, 10).with_sigmas([1 - i / 28 for i in range(29)]).with_meta(m="x").to_json()
    p = tmp_path / "p.json"
    p.write_text(text[: min(cut, len(text) - 2)])
    with pytest.raises(BudcacheError):
        CachePolicy.load(p)


@pytest.mark.parametrize("doc", [
    '{"format": "budcache.policy", "version": 1, "steps": 1e999, "compute": [0], "sigmas": null, "meta": {}}',
    '{"format": "budcache.policy", "version": 1, "steps": ' + "9" * 5000 + ', "compute": [0], "sigmas": null, "meta": {}}',
    '{"format": "budcache.policy", "version": 1, "steps": 28, "compute": [0, ' + "1" * 300 + '], "sigmas": null, "meta": {}}',
    "[" * 50000 + "]" * 50000,
    '{"a": ' * 5000 + "1" + "}" * 5000,
])
def test_huge_numbers_and_deep_nesting(tmp_path, doc):
    p = tmp_path / "p.json"
    p.write_text(doc)
    with pytest.raises(BudcacheError):
        CachePolicy.load(p)


# ----------------------------------------------------------------------------- search checkpoints
CFG = SearchConfig(steps=10, nfe=4, sa_iters=6, hc_rounds=2)


def LOSS(cs):  # noqa: N802 - a synthetic loss of compute sets
    return [float(sum(c) % 7) + 0.1 for c in cs]


def _valid_checkpoint(tmp_path):
    path = tmp_path / "ck.json"
    if not path.exists():
        search(LOSS, CFG, checkpoint=path, digest="d")
    return path


class _Stop(Exception):
    pass


def _midrun_checkpoint(tmp_path, entries: int = 5):
    """The checkpoint of a search stopped during annealing, after ``entries`` history entries."""
    path = tmp_path / "mid.json"

    def stop(entry):
        if entry["step"] + 1 >= entries:
            raise _Stop

    with pytest.raises(_Stop):
        search(LOSS, CFG, checkpoint=path, digest="d", on_step=stop)
    return path


def _write_signed(path, doc):
    """Write an edited checkpoint with a matching content digest (a deliberate edit, not damage)."""
    doc["sha256"] = content_digest(doc)
    path.write_text(json.dumps(doc))


def test_valid_checkpoint_loads(tmp_path):
    st_, memo = load_checkpoint(_valid_checkpoint(tmp_path), CFG, "d", np.random.default_rng())
    assert st_["phase"] == "done" and memo


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_checkpoint_loader(tmp_path, data):
    p = tmp_path / "ck.json"
    p.write_bytes(data)
    with pytest.raises(BudcacheError):
        load_checkpoint(p, CFG, "d", np.random.default_rng())


@FUZZ
@given(st.sampled_from(["state", "memo", "rng", "config", "version"]), json_values)
def test_corrupted_checkpoint_fields_are_clear_errors(tmp_path, field, value):
    assume(not (field == "memo" and value == []))  # an empty memo is valid content
    assume(not (field == "version" and type(value) is int and value == 1))
    src = _valid_checkpoint(tmp_path)
    doc = json.loads(src.read_text())
    doc[field] = value
    p = tmp_path / "bad.json"
    _write_signed(p, doc)
    with pytest.raises(BudcacheError):
        load_checkpoint(p, CFG, "d", np.random.default_rng())


@FUZZ
@given(st.sampled_from(["restart", "phase", "it", "cur", "best", "cur_loss", "best_loss", "history"]), json_values)
def test_corrupted_state_entries_are_rejected_or_resume_to_the_true_result(tmp_path, key, value):
    truth = search(LOSS, CFG)
    for src in (_valid_checkpoint(tmp_path), _midrun_checkpoint(tmp_path)):
        doc = json.loads(src.read_text())
        doc["state"][key] = value
        p = tmp_path / "bad.json"
        _write_signed(p, doc)
        try:
            got = search(LOSS, CFG, checkpoint=p, resume=True, digest="d")
        except BudcacheError:
            continue
        # accepted: the reported loss is the mask's true loss (a wrong best or loss was resumed silently before)
        assert got.loss == LOSS([got.compute])[0]
        assert len(got.compute) == CFG.nfe and got.compute[0] == 0 and list(got.compute) == sorted(set(got.compute))
        if src.name == "ck.json":  # a finished search: an accepted edit cannot change its result
            assert (got.compute, got.loss) == (truth.compute, truth.loss)


@pytest.mark.parametrize("edit, why", [
    ({"best": [0, 1, 2, 3], "best_loss": 0.1}, "does not match the memo"),
    ({"best_loss": True}, "state.best_loss' must be a finite number"),
    ({"best_loss": -1}, "does not match the memo"),
    ({"history": [0]}, "entry 0 of 'state.history' is malformed"),
    ({"it": 10**6}, "'state.it' must lie in 0..6"),
    ({"cur": [0, 1, 2]}, "sorted set of 4 steps"),
    ({"cur": [1, 2, 3, 4]}, "with step 0"),
    ({"restart": 1}, "'state.phase' is 'sa' after the last restart"),
])
def test_edited_checkpoint_fields_are_refused_before_resuming(tmp_path, edit, why):
    src = _midrun_checkpoint(tmp_path)
    doc = json.loads(src.read_text())
    assert doc["state"]["phase"] == "sa"
    doc["state"].update(edit)
    p = tmp_path / "edited.json"
    _write_signed(p, doc)
    with pytest.raises(BudcacheError, match=re.escape(why)):
        search(LOSS, CFG, checkpoint=p, resume=True, digest="d")


def test_a_damaged_checkpoint_fails_its_content_digest(tmp_path):
    doc = json.loads(_midrun_checkpoint(tmp_path).read_text())
    doc["state"]["it"] = 3 if doc["state"]["it"] != 3 else 2  # in range, but not what was written
    p = tmp_path / "damaged.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(BudcacheError, match="content digest does not match"):
        load_checkpoint(p, CFG, "d", np.random.default_rng())


def test_checkpoint_of_another_search_is_refused(tmp_path):
    path = _valid_checkpoint(tmp_path)
    other = SearchConfig(steps=10, nfe=5, sa_iters=6, hc_rounds=2)
    with pytest.raises(BudcacheError, match="another search"):
        load_checkpoint(path, other, "d", np.random.default_rng())
    with pytest.raises(BudcacheError, match="another search"):
        load_checkpoint(path, CFG, "other-digest", np.random.default_rng())
    doc = json.loads(path.read_text())
    assert doc["format"] == CHECKPOINT_FORMAT and doc["config"] == asdict(CFG)
