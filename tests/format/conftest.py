"""Fixtures of the format tests: counting what a reader reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ntrace.format.files import TraceDirStore


@pytest.fixture
def store_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    keys: list[str] = []
    original = TraceDirStore.get  # the store every reader uses on a directory

    async def counting(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        keys.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(TraceDirStore, "get", counting)
    yield keys


def chunk_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if not k.endswith("zarr.json")]
