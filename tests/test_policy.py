"""Tests for budcache.policy.CachePolicy and the JSON helpers in budcache.io."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from budcache import io as bio
from budcache.errors import ConfigError, PolicyError
from budcache.policy import MAX_FILE_BYTES, CachePolicy


def _doc(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": "budcache.policy",
        "version": 1,
        "steps": 8,
        "compute": [0, 2, 5],
        "sigmas": None,
        "meta": {},
    }
    doc.update(overrides)
    return doc


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0, "compute": [0]}, r"'steps'.*0 out of range \(allowed 1\.\.10000\)"),
        ({"steps": 10001, "compute": [0]}, r"'steps'.*out of range"),
        ({"steps": 10**30, "compute": [0]}, r"'steps'.*digits.*out of range"),
        ({"steps": 10**5000, "compute": [0]}, r"'steps'.*out of range"),
        ({"steps": True, "compute": [0]}, r"'steps'.*must be an int.*bool"),
        ({"steps": 8.0, "compute": [0]}, r"'steps'.*must be an int"),
        ({"steps": "8", "compute": [0]}, r"'steps'.*must be an int"),
        ({"steps": 28, "compute": [1, 5, 9]}, r"'compute': step 0 must always be computed \(got \[1, 5, 9\]\)"),
        ({"steps": 28, "compute": list(range(28)) + [0, 1]}, r"'compute': budget 30 exceeds steps 28 \(allowed 1\.\.28\)"),
        ({"steps": 8, "compute": []}, r"'compute': at least one step.*1\.\.8"),
        ({"steps": 8, "compute": [0, 3, 3]}, r"'compute': duplicate step index 3"),
        ({"steps": 8, "compute": [0, 8]}, r"'compute': step index 8 out of range \(allowed 0\.\.7\)"),
        ({"steps": 8, "compute": [0, -1]}, r"'compute': step index -1 out of range \(allowed 0\.\.7\)"),
        ({"steps": 8, "compute": [0, 5, 2]}, r"'compute': step indices must be sorted.*2 at position 2 follows 5"),
        ({"steps": 8, "compute": [0, True]}, r"'compute': entry at position 1 must be an int.*True"),
        ({"steps": 8, "compute": [0, 2.0]}, r"'compute': entry at position 1 must be an int"),
        ({"steps": 8, "compute": "0"}, r"'compute': must be a list"),
        ({"steps": 2, "compute": [0], "sigmas": [1.0, 0.5]}, r"'sigmas': expected 3 values \(steps \+ 1\), got 2"),
        ({"steps": 3, "compute": [0], "sigmas": [1.0, 0.5, 0.6, 0.0]}, r"'sigmas': must be strictly decreasing: index 2"),
        ({"steps": 3, "compute": [0], "sigmas": [1.0, 0.5, 0.5, 0.0]}, r"'sigmas': must be strictly decreasing: index 2"),
        ({"steps": 2, "compute": [0], "sigmas": [1.0, float("nan"), 0.0]}, r"'sigmas': value at index 1 is not finite"),
        ({"steps": 2, "compute": [0], "sigmas": [float("inf"), 0.5, 0.0]}, r"'sigmas': value at index 0 is not finite"),
        ({"steps": 2, "compute": [0], "sigmas": [1e300, 0.5, 0.0]}, r"'sigmas': value at index 0 is 1e\+300, out of range"),
        ({"steps": 2, "compute": [0], "sigmas": [1.0, 0.5, -2e4]}, r"'sigmas': value at index 2 is -20000.0, out of range"),
        ({"steps": 2, "compute": [0], "sigmas": [10**400, 0.5, 0.0]}, r"'sigmas': value at index 0 is not finite"),
        ({"steps": 2, "compute": [0], "sigmas": [1.0, 0.5, -0.1]}, r"'sigmas': last value must be >= 0"),
        ({"steps": 2, "compute": [0], "sigmas": [1.0, "x", 0.0]}, r"'sigmas': value at index 1 must be a number"),
        ({"steps": 2, "compute": [0], "sigmas": [1.0, False, 0.0]}, r"'sigmas': value at index 1 must be a number"),
        ({"steps": 2, "compute": [0], "sigmas": "abc"}, r"'sigmas': must be a list"),
        ({"steps": 2, "compute": [0], "meta": [1]}, r"'meta': must be a mapping"),
        ({"steps": 2, "compute": [0], "meta": {1: "a"}}, r"'meta': keys must be str"),
        ({"steps": 2, "compute": [0], "meta": {"x": object()}}, r"'meta': must be JSON-serialisable"),
        ({"steps": 2, "compute": [0], "meta": {"loss": float("nan")}}, r"'meta': must be JSON-serialisable"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        CachePolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        CachePolicy(8, [1])


def test_lists_become_tuples_and_ints_become_floats() -> None:
    p = CachePolicy(2, [0, 1], sigmas=[1, 0.5, 0], meta={"a": [1, {"b": 2}]})
    assert p.compute == (0, 1)
    assert p.sigmas == (1.0, 0.5, 0.0)
    assert all(type(s) is float for s in p.sigmas)
    assert p.meta["a"] == (1, {"b": 2})


def test_sigmas_from_tensor() -> None:
    p = CachePolicy(2, [0]).with_sigmas(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert p.sigmas == (1.0, 0.5, 0.0)
    assert p.with_sigmas(None).sigmas is None
    np = pytest.importorskip("numpy")
    assert p.with_sigmas(np.array([2.0, 1.0, 0.0], dtype=np.float32)).sigmas == (2.0, 1.0, 0.0)
    with pytest.raises(PolicyError, match=r"'sigmas': expected a 1-D array"):
        p.with_sigmas(torch.zeros(3, 1))


# ------------------------------------------------------------- immutability
def test_fields_are_frozen() -> None:
    p = CachePolicy.uniform(8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.steps = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.compute = (0,)  # type: ignore[misc]


def test_meta_is_read_only_deep_copy() -> None:
    source = {"model": "tiny", "calib": {"digest": "abc", "prompts": [1, 2]}}
    p = CachePolicy(4, [0], meta=source)
    source["calib"]["digest"] = "changed"  # type: ignore[index]
    assert p.meta["calib"]["digest"] == "abc"
    with pytest.raises(TypeError):
        p.meta["model"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        p.meta["calib"]["digest"] = "x"  # type: ignore[index]
    assert isinstance(p.meta["calib"]["prompts"], tuple)


def test_hash_pickle_and_equality() -> None:
    p = CachePolicy(4, [0, 2], sigmas=[1.0, 0.7, 0.4, 0.1, 0.0], meta={"a": {"b": [1]}})
    q = pickle.loads(pickle.dumps(p))
    assert q == p and hash(q) == hash(p)
    assert dataclasses.replace(p) == p
    assert p != p.with_meta(a=1)


# ----------------------------------------------------------- views/helpers
def test_views() -> None:
    p = CachePolicy(6, [0, 1, 4])
    assert p.nfe == 3
    assert p.skipped == (2, 3, 5)
    assert p.mask == (True, True, False, False, True, False)
    assert p.strip() == "CC..C."
    assert p.speedup_bound == pytest.approx(2.0)
    assert p.is_computed(4) and not p.is_computed(5)
    t = p.mask_tensor()
    assert t.dtype == torch.bool and t.tolist() == list(p.mask)
    assert str(p) == "CachePolicy(N=6, K=3, speed-up<=2.00x, mask=CC..C.)"


@pytest.mark.parametrize("step", [-1, 6, True, 1.0])
def test_is_computed_rejects_bad_step(step: object) -> None:
    with pytest.raises(ConfigError, match=r"0\.\.5"):
        CachePolicy(6, [0]).is_computed(step)  # type: ignore[arg-type]


def test_str_summary_example() -> None:
    p = CachePolicy(28, [0, 1, 4, 6, 10, 13, 16, 19, 22, 25])
    assert str(p).startswith("CachePolicy(N=28, K=10, speed-up<=2.80x, mask=CC..C.C...C")


@pytest.mark.parametrize(
    ("steps", "nfe", "expected"),
    [
        (28, 7, (0, 4, 8, 12, 16, 20, 24)),
        (10, 3, (0, 3, 6)),
        (5, 1, (0,)),
        (5, 5, (0, 1, 2, 3, 4)),
    ],
)
def test_uniform(steps: int, nfe: int, expected: tuple[int, ...]) -> None:
    p = CachePolicy.uniform(steps, nfe)
    assert p.compute == expected and p.nfe == nfe


@pytest.mark.parametrize("nfe", [0, 29, -3, True, 2.5])
def test_uniform_rejects_nfe(nfe: object) -> None:
    with pytest.raises(PolicyError, match=r"'compute': nfe .* \(allowed 1\.\.28\)"):
        CachePolicy.uniform(28, nfe)  # type: ignore[arg-type]


def test_uniform_rejects_steps() -> None:
    with pytest.raises(PolicyError, match="'steps'"):
        CachePolicy.uniform(10**30, 3)


def test_full() -> None:
    p = CachePolicy.full(4)
    assert p.compute == (0, 1, 2, 3) and p.skipped == () and p.speedup_bound == 1.0
    assert p == CachePolicy.uniform(4, 4)


@pytest.mark.parametrize(
    "mask",
    [
        [True, False, True, True],
        [1, 0, 1, 1],
        (True, 0, 1, True),
        torch.tensor([True, False, True, True]),
        torch.tensor([1, 0, 1, 1]),
    ],
)
def test_from_mask_round_trip(mask: object) -> None:
    p = CachePolicy.from_mask(mask, meta={"solver": "euler"})  # type: ignore[arg-type]
    assert p.steps == 4 and p.compute == (0, 2, 3)
    assert CachePolicy.from_mask(p.mask) == CachePolicy(4, [0, 2, 3])
    assert CachePolicy.from_mask(p.mask_tensor()).mask == p.mask


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        ([True, 2], r"position 1 must be a bool or 0/1"),
        ([1.0, 0.0], r"position 0 must be a bool or 0/1"),
        ("C.C", r"expected a sequence"),
        (torch.ones(2, 2, dtype=torch.bool), r"1-D tensor"),
        ([False, True], r"'compute': step 0 must always be computed"),
        ([], r"'steps'"),
    ],
)
def test_from_mask_errors(mask: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        CachePolicy.from_mask(mask)  # type: ignore[arg-type]


def test_from_steps_sorts() -> None:
    assert CachePolicy.from_steps(8, [5, 0, 2]).compute == (0, 2, 5)
    assert CachePolicy.from_steps(8, torch.tensor([3, 0])).compute == (0, 3)
    with pytest.raises(PolicyError, match="'compute': duplicate"):
        CachePolicy.from_steps(8, [2, 0, 2])
    with pytest.raises(PolicyError, match="'compute': entry at position 1"):
        CachePolicy.from_steps(8, [0, True])


# -------------------------------------------------------------------- JSON
def test_to_dict_format() -> None:
    p = CachePolicy(2, [0], sigmas=[1.0, 0.5, 0.0], meta={"model": "m"})
    assert p.to_dict() == {
        "format": "budcache.policy",
        "version": 1,
        "steps": 2,
        "compute": [0],
        "sigmas": [1.0, 0.5, 0.0],
        "meta": {"model": "m"},
    }
    assert list(p.to_dict()) == ["format", "version", "steps", "compute", "sigmas", "meta"]
    assert p.to_json().endswith("}\n")
    assert json.loads(p.to_json()) == p.to_dict()


@pytest.mark.parametrize("with_sigmas", [False, True])
def test_save_load_round_trip(tmp_path: Path, with_sigmas: bool) -> None:
    sigmas = [1.0, 0.8123456789012345, 0.5, 0.25, 1e-3, 0.0] if with_sigmas else None
    meta = {
        "model": "tinyflow-s",
        "solver": "euler",
        "budget": 3,
        "search_loss": 0.0123,
        "calibration": {"digest": "sha256:ab", "prompts": ["a cat", "ünïcode"]},
        "version": "0.1.0",
    }
    p = CachePolicy(5, [0, 1, 3], sigmas=sigmas, meta=meta)
    path = tmp_path / "sub" / "dir" / "policy.json"
    assert p.save(path) == path
    q = CachePolicy.load(path)
    assert q == p
    assert q.to_dict() == p.to_dict()
    assert CachePolicy.loads(path.read_text("utf-8")) == p
    assert CachePolicy.loads(path.read_bytes()) == p
    assert [f.name for f in path.parent.iterdir()] == ["policy.json"]


def test_save_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    CachePolicy.full(3).save(path)
    CachePolicy.uniform(3, 1).save(path)
    assert CachePolicy.load(path) == CachePolicy.uniform(3, 1)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([1, 2], r"expected a JSON object.*got an array"),
        ("policy", r"expected a JSON object"),
        (_doc(extra=1), r"unknown key\(s\) \['extra'\] \(allowed keys: format, version, steps, compute, sigmas, meta\)"),
        ({k: v for k, v in _doc().items() if k != "meta"}, r"missing key\(s\) \['meta'\]"),
        (_doc(format="other.policy"), r"'format': expected 'budcache.policy', got 'other.policy'"),
        (_doc(format=None), r"'format': expected 'budcache.policy'"),
        (_doc(version=3), r"'version': unsupported version 3 \(supported versions: 1, 2\)"),
        (_doc(version="1"), r"'version': unsupported version"),
        (_doc(version=True), r"'version': unsupported version"),
        (_doc(steps="8"), r"'steps': must be an integer.*str"),
        (_doc(steps=8.0), r"'steps': must be an integer"),
        (_doc(steps=10**30), r"'steps': .* out of range \(allowed 1\.\.10000\)"),
        (_doc(compute={"0": 1}), r"'compute': must be an array.*object"),
        (_doc(compute=[2, 0]), r"'compute': step indices must be sorted"),
        (_doc(sigmas=1.0), r"'sigmas': must be an array of numbers or null"),
        (_doc(sigmas=[1.0, 0.0]), r"'sigmas': expected 9 values"),
        (_doc(meta=[]), r"'meta': must be an object"),
    ],
)
def test_from_dict_errors(doc: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        CachePolicy.from_dict(doc)


def test_from_dict_valid() -> None:
    p = CachePolicy.from_dict(_doc(sigmas=[8, 7, 6, 5, 4, 3, 2, 1, 0]))
    assert p.compute == (0, 2, 5) and p.sigmas is not None and p.sigmas[-1] == 0.0


# -------------------------------------------------------------- load errors
DEEP = 100_000


def _nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("hello world", r"not valid JSON: Expecting value at line 1, column 1"),
        (b"\xff\xfe{}", r"not UTF-8 text \(invalid byte 0xff at offset 0\)"),
        ('{"format": "budcache.policy", "meta": "\xe9"}'.encode("latin-1"), r"not UTF-8 text"),
        ("", r"empty"),
        ("  \n", r"empty"),
        ('{"format": "budcache.policy", "version": 1, "steps": 8,\n "compute": [0, 2', r"not valid JSON: .* at line 2"),
        ("[1, 2, 3]", r"expected a JSON object.*array"),
        ("[" * DEEP, r"nested too deeply"),
        ("[" * DEEP + "]" * DEEP, r"nested too deeply"),
        ('{"a":' * DEEP + "1" + "}" * DEEP, r"nested too deeply"),
        (json.dumps(_doc(meta={"a": _nested(15)})), r"nested too deeply \(limit 16"),
        (json.dumps(_doc(steps=10**30)), r"'steps': .*out of range \(allowed 1\.\.10000\)"),
        (json.dumps(_doc()).replace('"steps": 8', '"steps": ' + "9" * 5000), r"integer with 5000 digits is too large"),
        (json.dumps(_doc()).replace('"steps": 8', '"steps": 1e400'), r"out of range"),
        (json.dumps(_doc()).replace('"sigmas": null', '"sigmas": [NaN, 1, 0]'), r"NaN is not allowed"),
        (json.dumps(_doc()).replace('"sigmas": null', '"sigmas": [Infinity, 1, 0]'), r"Infinity is not allowed"),
        (json.dumps(_doc()).replace('"sigmas": null', '"sigmas": [-Infinity, 1, 0]'), r"-Infinity is not allowed"),
        (json.dumps(_doc(format="budcache.other")), r"'format': expected 'budcache.policy'"),
        (json.dumps(_doc(version=3)), r"'version': unsupported version 3 \(supported versions: 1, 2\)"),
        (json.dumps(_doc(compute=[5, 0])), r"'compute': step indices must be sorted"),
        ("\ufeff" + json.dumps(_doc()), r"not valid JSON: Unexpected UTF-8 BOM"),
    ],
)
def test_load_errors(tmp_path: Path, content: str | bytes, match: str) -> None:
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(PolicyError, match=match) as info:
        CachePolicy.load(path)
    assert str(path) in str(info.value)
    # the in-memory parser reports the same problem
    with pytest.raises(PolicyError, match=match):
        CachePolicy.loads(content)


def test_load_accepts_depth_16(tmp_path: Path) -> None:
    p = CachePolicy(8, [0], meta={"a": _nested(14)})
    assert CachePolicy.load(p.save(tmp_path / "deep.json")) == p


def test_load_huge_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "huge.json", " " * (MAX_FILE_BYTES + 1))
    with pytest.raises(PolicyError, match=rf"{MAX_FILE_BYTES + 1} bytes, larger than the limit of {MAX_FILE_BYTES} bytes") as info:
        CachePolicy.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(PolicyError, match="larger than the limit"):
        CachePolicy.loads(" " * (MAX_FILE_BYTES + 1))


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(PolicyError, match=r"file not found") as info:
        CachePolicy.load(path)
    assert str(path) in str(info.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"directory"):
        CachePolicy.load(tmp_path)


# ----------------------------------------------------------- io helpers
def test_read_json_limited_custom_error(tmp_path: Path) -> None:
    class MyError(Exception):
        pass

    path = _write(tmp_path / "x.json", "[[[1]]]")
    with pytest.raises(MyError, match=r"config '.*x\.json': JSON is nested too deeply \(limit 2"):
        bio.read_json_limited(path, max_bytes=100, max_depth=2, what="config", error=MyError)
    assert bio.read_json_limited(path, max_bytes=100, max_depth=3, what="config") == [[[1]]]
    with pytest.raises(MyError, match=r"7 bytes, larger than the limit of 6 bytes"):
        bio.read_json_limited(path, max_bytes=6, max_depth=3, what="config", error=MyError)


def test_write_json_format(tmp_path: Path) -> None:
    path = bio.write_json(tmp_path / "a" / "b.json", {"z": 1, "a": [1, 2]})
    assert path.read_text("utf-8") == '{\n  "z": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    with pytest.raises(ValueError):
        bio.write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    bio.atomic_write_text(path, "a\nb\n")
    assert path.read_bytes() == b"a\nb\n"


def _fail_os_replace(src: object, dst: object) -> None:
    raise OSError("simulated failure in os.replace")


def _fail_fsync(fd: int) -> None:
    raise OSError("simulated failure in os.fsync")


@pytest.mark.parametrize(("attr", "fake"), [("replace", _fail_os_replace), ("fsync", _fail_fsync)])
def test_atomic_write_failure_keeps_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attr: str, fake: object
) -> None:
    path = tmp_path / "policy.json"
    original = CachePolicy.uniform(8, 2)
    original.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, attr, fake)
    with pytest.raises(OSError, match="simulated failure"):
        CachePolicy.uniform(8, 4).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]
    assert CachePolicy.load(path) == original


def test_atomic_write_serialisation_failure_keeps_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.json"
    CachePolicy.full(3).save(path)
    before = path.read_bytes()

    def boom(obj: object) -> str:
        raise TypeError("simulated serialisation failure")

    monkeypatch.setattr(bio, "dumps_json", boom)
    with pytest.raises(TypeError, match="simulated"):
        CachePolicy.uniform(3, 1).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]


def test_atomic_write_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    bio.write_json(path, {})
    os.chmod(path, 0o600)
    bio.write_json(path, {"a": 1})
    assert (path.stat().st_mode & 0o777) == 0o600
