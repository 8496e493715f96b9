"""The library's one byte formatter, for messages (the CLI shows sizes with ``rich.filesize``)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units, as limits and ``max_memory`` are set: ``64 B``,
    ``1.5 KiB``, ``16 MiB`` (a whole number without decimals)."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
