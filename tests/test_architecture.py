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
    code = ("import sys, ntrace, ntrace.format, ntrace.format.reader, ntrace.format.writer, "
            "ntrace.format.validate, ntrace.format.summary, ntrace.format.pack, ntrace.progress; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _module_imports() -> dict[str, set[str]]:
    """Every ntrace module and the ntrace modules it imports anywhere (function bodies and
    ``TYPE_CHECKING`` blocks included): ``from a import b`` counts ``a.b`` if it is a module."""
    mods: dict[str, Path] = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def module(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        names: list[str] = []
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names += [f"{node.module}.{a.name}" for a in node.names]
        graph[m] = {t for t in map(module, names) if t is not None and t != m}
    return graph


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or round a loop (the CLI's command
    registration is left to its own issue)."""
    graph = {m: d for m, d in _module_imports().items() if not m.startswith("ntrace.cli")}
    seen: set[str] = set()

    def reach(start: str) -> set[str]:
        found, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in found:
                    found.add(d)
                    todo.append(d)
        return found

    cycles = []
    for m in sorted(graph):
        if m not in seen and m in reach(m):
            loop = sorted(d for d in reach(m) if m in reach(d))
            seen.update(loop)
            cycles.append(loop)
    assert cycles == []


def test_no_module_imports_through_its_half_imported_package() -> None:
    """Inside a package whose ``__init__`` imports its own modules, a module names its
    siblings in full (``import ntrace.analyze.crossentropy as ce``), not through the package
    (``from ntrace.analyze import crossentropy``), which is still half-imported then."""
    offenders = []
    for init in PKG.rglob("__init__.py"):
        package = ".".join(init.relative_to(PKG.parent).parent.parts)
        if not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith(package + ".")
                   for n in ast.parse(init.read_text()).body) or package == "ntrace.cli":
            continue  # nothing of the package runs during its __init__ (the CLI: its issue)
        offenders += [f"{p.relative_to(PKG)}: from {n.module} import ..."
                      for p in init.parent.glob("*.py") if p != init
                      for n in ast.walk(ast.parse(p.read_text()))
                      if isinstance(n, ast.ImportFrom) and n.module == package]
    assert offenders == []


def test_errors_subclass_the_builtin_they_resemble() -> None:
    from ntrace import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, errors.NtraceError) \
                and obj is not errors.NtraceError:
            assert obj.__doc__ and "Raised" in obj.__doc__, name
            assert len(obj.__mro__) > 3, f"{name} subclasses no built-in besides Exception"


ZARR_PRIVATE = {"_async_group", "_async_array", "_sync_open", "_zf", "_is_open", "_store",
                "_open", "_set", "_lock", "_sync", "_sync_iter", "_get_loop", "_get_many"}
ZARR_CLASSES = {"Store", "LocalStore", "WrapperStore", "ZipStore", "FsspecStore", "Group",
                "Array"}


def _private_zarr_uses(tree: ast.AST, where: str) -> list[str]:
    """Private zarr names: imported, read from any object but ``self``, or read from
    ``self`` inside a subclass of a zarr class."""
    found = []

    def visit(node: ast.AST, in_zarr_class: bool) -> None:
        if isinstance(node, ast.ClassDef):
            bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                     for b in node.bases}
            in_zarr_class = bool(bases & ZARR_CLASSES)
        if isinstance(node, ast.Attribute) and node.attr in ZARR_PRIVATE:
            on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            if not on_self or in_zarr_class:
                found.append(f"{where}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zarr"):
            found.extend(f"{where}:{node.lineno} import {a.name}" for a in node.names
                         if a.name.startswith("_"))
        for child in ast.iter_child_nodes(node):
            visit(child, in_zarr_class)

    visit(tree, False)
    return found


def test_no_private_zarr_api() -> None:
    """zarr's private attributes change between minor releases (a ZipStore's ``_zf`` and
    ``_sync_open`` could break every .zip trace): ntrace uses its public API and fsspec only."""
    offenders = [use for p in PKG.rglob("*.py")
                 for use in _private_zarr_uses(ast.parse(p.read_text()), str(p.relative_to(PKG)))]
    assert offenders == []
