"""Architecture rules from the style guide, enforced: data flows one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ntrace"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_click_or_rich() -> None:
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if "cli" not in p.relative_to(PKG).parts
                 and imported_modules(p) & {"click", "rich"}]
    assert offenders == []


def test_format_never_imports_torch() -> None:
    offenders = [str(p.relative_to(PKG)) for p in (PKG / "format").rglob("*.py")
                 if "torch" in imported_modules(p)]
    assert offenders == []
    code = ("import sys, ntrace, ntrace.format.reader, ntrace.format.writer, "
            "ntrace.format.validate, ntrace.format.summary; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_errors_subclass_the_builtin_they_resemble() -> None:
    from ntrace import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, errors.NtraceError) \
                and obj is not errors.NtraceError:
            assert obj.__doc__ and "Raised" in obj.__doc__, name
            assert len(obj.__mro__) > 3, f"{name} subclasses no built-in besides Exception"
