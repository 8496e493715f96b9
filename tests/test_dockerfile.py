"""The Dockerfile's promises, checked statically (CI has no Docker daemon): a CUDA PyTorch
base pinned by exact tag or digest whose torch satisfies ntrace's range, a multi-stage build
that leaves no sources or wheels behind, and ``ntrace`` as the entrypoint."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def base_image() -> str:
    args = dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG"
                and "=" in rest)
    return args["BASE"]


def test_base_is_a_pinned_cuda_pytorch_image() -> None:
    base = base_image()
    assert base.startswith("pytorch/pytorch")
    assert "@sha256:" in base or re.fullmatch(
        r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert "latest" not in base


def test_base_torch_satisfies_the_dependency_range() -> None:
    from packaging.specifiers import SpecifierSet

    tag_version = re.search(r":(\d+\.\d+\.\d+)-", base_image())
    assert tag_version, "the base tag names no torch version"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if d.startswith("torch"))[len("torch"):]
    assert tag_version.group(1) in SpecifierSet(torch_spec)


def test_multi_stage_lean_and_entrypoint() -> None:
    ins = instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /wheels /wheels"], "only the wheel reaches the final image"
    run = " ".join(rest for word, rest in final if word == "RUN")
    assert "--no-cache-dir" in run and "rm -rf /wheels" in run
    entry = next(rest for word, rest in final if word == "ENTRYPOINT")
    assert json.loads(entry) == ["ntrace"]
