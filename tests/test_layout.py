"""The package's shape: imports inside functions only where the CLI loads lazily, never to hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "budcache"

#: Modules allowed to import budcache modules inside functions: the command line (its sub-commands load the
#: model stack only when they run, so ``budcache --help`` and ``budcache show`` start without torch), the
#: PEP 562 lazy exports of package ``__init__`` files, and the CLI's model options.
LAZY = {"cli.py", "align/cli.py", "compare/cli.py", "problems/options.py"}


def _function_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("budcache")):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} from {'.' * node.level}{node.module or ''}")
    return found


def test_no_function_level_import_of_budcache_outside_the_cli():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in LAZY or path.name == "__init__.py":
            continue
        offenders += _function_level_imports(path)
    assert not offenders, "imports inside functions (move them to the top; a cycle means a layer is wrong):\n" + \
        "\n".join(offenders)
