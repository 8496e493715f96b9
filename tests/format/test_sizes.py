"""The library's one byte formatter (limits, max_memory and `ntrace info` messages)."""

from __future__ import annotations

from ntrace.format.sizes import human_bytes


def test_sizes_read_in_binary_units_without_needless_decimals() -> None:
    assert [human_bytes(n) for n in (64, 1536, 16 << 20, 4 << 30, 5 << 40, 1 << 50)] == [
        "64 B", "1.5 KiB", "16 MiB", "4 GiB", "5 TiB", "1024 TiB"]
