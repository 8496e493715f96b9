"""CI runs plain ``pytest`` (not ``python -m pytest``), where the repository root is not on
``sys.path``: a test importing ``tests.…`` or ``tools.…`` works locally and fails to collect
there (it did, three times). Test modules import each other relatively or through the
rootdir-relative package, and tools by path."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_imports_the_tests_package() -> None:
    bad = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            bad += [f"{path.relative_to(TESTS)}: {n}" for n in names
                    if n.split(".")[0] in ("tests", "tools")]
    assert not bad, bad
