"""Hostile and broken files: the policy and checkpoint loaders only ever raise budcache's own clear errors."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from budcache import BudcacheError, CachePolicy
from budcache.search.anneal import CHECKPOINT_FORMAT, SearchConfig, load_checkpoint, search

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


def _valid_checkpoint(tmp_path):
    path = tmp_path / "ck.json"
    if not path.exists():
        search(lambda cs: [float(sum(c) % 7) + 0.1 for c in cs], CFG, checkpoint=path, digest="d")
    return path


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
    p.write_text(json.dumps(doc))
    with pytest.raises(BudcacheError):
        load_checkpoint(p, CFG, "d", np.random.default_rng())


@FUZZ
@given(st.sampled_from(["restart", "phase", "it", "cur", "best", "cur_loss", "best_loss", "history"]), json_values)
def test_corrupted_state_entries_are_rejected_or_consistent(tmp_path, key, value):
    src = _valid_checkpoint(tmp_path)
    doc = json.loads(src.read_text())
    doc["state"][key] = value
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    try:
        st_, _ = load_checkpoint(p, CFG, "d", np.random.default_rng())
    except BudcacheError:
        return
    assert st_["phase"] in ("init", "sa", "hc", "done")


def test_checkpoint_of_another_search_is_refused(tmp_path):
    path = _valid_checkpoint(tmp_path)
    other = SearchConfig(steps=10, nfe=5, sa_iters=6, hc_rounds=2)
    with pytest.raises(BudcacheError, match="another search"):
        load_checkpoint(path, other, "d", np.random.default_rng())
    with pytest.raises(BudcacheError, match="another search"):
        load_checkpoint(path, CFG, "other-digest", np.random.default_rng())
    doc = json.loads(path.read_text())
    assert doc["format"] == CHECKPOINT_FORMAT and doc["config"] == asdict(CFG)
