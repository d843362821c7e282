"""benchmarks/regenerate.py: every registered section has its markers in BENCHMARKS.md, and splicing is exact."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def regen():
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "benchmarks" / "regenerate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["regenerate"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_section_has_its_markers_once_and_its_script_exists(regen):
    text = (ROOT / "BENCHMARKS.md").read_text()
    for s in regen.SECTIONS:
        assert text.count(f"<!-- generated: {s.name} -->") == 1, s.name
        assert text.count(f"<!-- end generated: {s.name} -->") == 1, s.name
        script = s.command[0]
        assert script == "-m" or (ROOT / script).is_file(), script
    assert regen.main(["--dry-run"]) == 0


def test_splice_replaces_only_the_named_block_and_headings_sit_under_the_file(regen):
    text = "intro\n<!-- generated: a -->\nold a\n<!-- end generated: a -->\nmid\n" \
           "<!-- generated: b -->\nold b\n<!-- end generated: b -->\nend"
    body = regen.markdown_of("K=5 done in 3 s\n# Title\n\n## Part\n| x |\n")
    assert body == "### Title\n\n#### Part\n| x |"
    out = regen.splice(text, "a", body)
    assert out == text.replace("old a", body)
    with pytest.raises(ValueError, match="exactly once"):
        regen.splice(text, "c", body)
    fresh = text + "\n<!-- generated: c -->\n<!-- end generated: c -->\nafter"  # a new section, not yet run
    assert regen.splice(fresh, "c", body) == text + f"\n<!-- generated: c -->\n{body}\n<!-- end generated: c -->\nafter"
    with pytest.raises(ValueError, match="no Markdown heading"):
        regen.markdown_of("only progress\n")


def test_unknown_section_is_a_usage_error(regen, capsys):
    assert regen.main(["--only", "nope", "--dry-run"]) == 2
    assert "unknown section" in capsys.readouterr().err
