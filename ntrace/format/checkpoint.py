"""Training checkpoints inside a trace, for ``ntrace record --resume`` (spec 'Checkpoints').

A checkpoint is a Zarr group ``checkpoints/<slot>`` (slots ``a`` and ``b`` alternate) of plain
numeric arrays — model parameters and buffers, optimizer state, RNG states, data order — and a
JSON document for the rest. Nothing is pickled, so loading a checkpoint cannot run code. The
root attribute ``checkpoint`` names the complete slot; it is written in the same atomic root
document as the commit, so a writer killed while writing a checkpoint leaves the previous one.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.api.asynchronous import create_array
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from ntrace.errors import InvalidTraceError
from ntrace.format.metadata import ATTR_KEY, FORMAT_VERSION, Commit

SLOTS = ("a", "b")
NAME = re.compile(r"^[A-Za-z0-9_.@:-]+$")


@dataclass
class Checkpoint:
    """The state of training at the start of round ``round`` (before its forward)."""

    round: int
    commit: Commit
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def other_slot(slot: str | None) -> str:
    return "b" if slot == "a" else "a"


def write_checkpoint(root: Any, slot: str, ck: Checkpoint) -> None:
    """Write ``ck`` into ``checkpoints/<slot>``, replacing what was there."""
    path = f"checkpoints/{slot}"
    if "checkpoints" not in root:
        root.create_group("checkpoints", attributes={
            ATTR_KEY: {"format_version": FORMAT_VERSION, "node": "checkpoints"}})
    group = root.create_group(path, overwrite=True, attributes={ATTR_KEY: {
        "format_version": FORMAT_VERSION, "node": "checkpoint", "round": ck.round,
        "commit": ck.commit.to_dict(), "meta": ck.meta, "arrays": sorted(ck.arrays)}})
    values = {}
    for name, value in ck.arrays.items():
        if not NAME.match(name):
            raise ValueError(f"checkpoint array name {name!r} must match {NAME.pattern}")
        values[name] = np.require(value, requirements="C")  # keeps 0-d arrays 0-d
    sync(_write_all(group, values))  # all arrays concurrently: per-array latency dominates


async def _write_all(group: Any, values: dict[str, np.ndarray]) -> None:
    async def one(name: str, v: np.ndarray) -> None:
        dims = tuple(f"{name}:{i}" for i in range(v.ndim))  # own dims: arrays never align
        arr = await create_array(
            group.store_path, name=name, shape=v.shape, dtype=v.dtype, dimension_names=dims,
            chunks=v.shape if v.ndim else (),
            compressors=(BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
                         Crc32cCodec()))
        await arr.setitem(Ellipsis, v)

    await asyncio.gather(*(one(k, v) for k, v in values.items()))


def read_checkpoint(root: Any, slot: str) -> Checkpoint:
    """Read the checkpoint in ``checkpoints/<slot>``; a precise error if it is unusable."""
    path = f"checkpoints/{slot}"
    try:
        group = root[path]
        doc = group.attrs.asdict()[ATTR_KEY]
        names = doc["arrays"]
        arrays = {name: np.asarray(group[name][...]) for name in names}
        return Checkpoint(int(doc["round"]), Commit.from_dict(doc["commit"]), arrays,
                          dict(doc["meta"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidTraceError(f"{path}: the checkpoint is missing or unreadable ({exc}); "
                                "the run cannot be resumed from it") from exc
