"""What a trace may ask of a reader: size limits checked before anything is allocated.

A trace is data from someone else. Before ntrace hands a metadata document or a chunk to
zarr it checks it here, so that a hostile or corrupt trace fails with an
:class:`~ntrace.errors.InvalidTraceError` naming the object instead of exhausting memory,
recursing without end, or being decoded into a buffer it chose the size of. The limits are
ntrace's (``spec/security.md``), not the format's: a conforming trace written by ntrace stays
orders of magnitude below each of them.
"""

from __future__ import annotations

import math
import stat
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ntrace.errors import InvalidTraceError
from ntrace.format.layout import APPEND_DIMS

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

MAX_NODE_DOCUMENT_BYTES = 1 * MiB  # a group's or array's zarr.json
MAX_ROOT_DOCUMENT_BYTES = 16 * MiB  # the root zarr.json, which may hold consolidated metadata
MAX_JSON_DEPTH = 64  # nesting of objects and lists in a metadata document
MAX_DIMENSIONS = 32
MAX_CHUNK_BYTES = 1 * GiB  # one decoded chunk (or shard), and one row: all axes but the first
# a chunk of an append array (first axis round, taylor_round or snapshot) that spans more than
# one row: readers decode a chunk whole, so a block read of fewer rows would decode it again
MAX_SPAN_CHUNK_BYTES = 16 * MiB
MAX_NAMES = 10_000  # layers and modules the root lists: each costs a group and its arrays
MAX_RESULTS_BYTES = 4 * GiB  # an analysis results store, which is loaded whole
MAX_ARRAY_BYTES = 4 * TiB  # shape × itemsize of one array
MAX_STORED_OBJECT_BYTES = MAX_CHUNK_BYTES + 64 * MiB  # one stored key (a compressed chunk)
MAX_ZIP_MEMBERS = 1_000_000

# bytes per element of the Zarr v3 core data types; anything else counts as 16
ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2,
            "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
            "complex64": 8, "complex128": 16}

DOCUMENT = "zarr.json"
# the codecs of the Zarr v3 core specification: the only ones a reader lets zarr instantiate,
# so that no trace can name a codec that unpickles or runs code (e.g. numcodecs.pickle)
CORE_CODECS = frozenset({"bytes", "transpose", "gzip", "blosc", "crc32c", "sharding_indexed"})


def _fail(key: str, message: str) -> InvalidTraceError:
    return InvalidTraceError(f"{key}: {message}")


def document_limit(key: str) -> int:
    """The most bytes the metadata document at ``key`` may hold."""
    return MAX_ROOT_DOCUMENT_BYTES if key == DOCUMENT else MAX_NODE_DOCUMENT_BYTES


def json_depth(doc: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion."""
    depth, stack = 0, [(doc, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        depth = max(depth, d)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((c, d + 1) for c in children)
    return depth


def _ints(data: object, minimum: int) -> list[int] | None:
    if not isinstance(data, list) or len(data) > MAX_DIMENSIONS:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= minimum for n in data):
        return None
    return list(data)


def itemsize(data_type: object) -> int:
    """Bytes per element; a fixed-length string type (results stores) says its own."""
    if isinstance(data_type, str):
        return ITEMSIZE.get(data_type, 16)
    conf = data_type.get("configuration") if isinstance(data_type, dict) else None
    n = conf.get("length_bytes") if isinstance(conf, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20 else 16


@dataclass(frozen=True)
class ChunkSpec:
    """What a stored chunk of one array must decode to: ``nbytes`` bytes, and which
    bytes-to-bytes codec comes first after ``bytes`` (``None`` when there is none); ``rows``
    is the chunk's extent along the first axis and ``separator`` that of its chunk keys
    (``c/0/1`` or ``c.0.1``; ``v2`` keys have no ``c`` prefix), to tell which rows a chunk
    key holds."""

    nbytes: int
    first_compressor: str | None
    rows: int = 1
    separator: str = "/"
    v2: bool = False

    def first_index(self, rest: str) -> int | None:
        """Index along the first axis of the chunk key ``rest`` (the key below the array),
        None when ``rest`` is no chunk key of this array."""
        if not self.v2:
            if rest == "c":
                return 0
            if not rest.startswith("c" + self.separator):
                return None
            rest = rest[2:]
        head = rest.split(self.separator, 1)[0]
        return int(head) if head.isdigit() else None


def check_array_document(key: str, doc: Mapping[str, Any]) -> ChunkSpec | None:
    """Refuse an array whose shape or chunks exceed the limits; return its chunk spec.

    Only the fields that size allocations are checked here; zarr checks the rest. Returns
    ``None`` when the grid is not a plain regular grid (zarr then refuses or handles it).
    """
    _check_codecs(key, doc)
    if doc.get("storage_transformers") not in (None, []):
        raise _fail(key, f"storage_transformers {_short(doc.get('storage_transformers'))}: "
                         "ntrace reads no storage transformers (spec/security.md)")
    shape = _ints(doc.get("shape"), 0)
    if shape is None:
        raise _fail(key, f"'shape' must be a list of at most {MAX_DIMENSIONS} non-negative "
                         f"integers, found {_short(doc.get('shape'))}")
    size = itemsize(doc.get("data_type"))
    total = math.prod(shape) * size
    if total > MAX_ARRAY_BYTES:
        raise _fail(key, f"shape {shape} of {size}-byte items needs {total} bytes, more than "
                         f"the {MAX_ARRAY_BYTES >> 40} TiB ntrace reads (spec/security.md)")
    row = math.prod(shape[1:]) * size
    if row > MAX_CHUNK_BYTES:
        raise _fail(key, f"one row of shape {shape} needs {row} bytes, more than the "
                         f"{MAX_CHUNK_BYTES >> 30} GiB ntrace reads at once (spec/security.md)")
    grid = doc.get("chunk_grid")
    config = grid.get("configuration") if isinstance(grid, dict) else None
    chunks = _ints(config.get("chunk_shape") if isinstance(config, dict) else None, 1)
    if chunks is None:
        return None
    nbytes = _check_chunk_shape(key, chunks, size)
    dims = doc.get("dimension_names")
    if isinstance(dims, list) and dims and dims[0] in APPEND_DIMS and chunks and chunks[0] > 1 \
            and nbytes > MAX_SPAN_CHUNK_BYTES:
        raise _fail(key, f"chunk shape {chunks} spans {chunks[0]} rows of {dims[0]!r} in "
                         f"{nbytes} bytes, more than the {MAX_SPAN_CHUNK_BYTES >> 20} MiB a "
                         "chunk of several rows may hold (readers would decode it once per "
                         "block of rows; spec/security.md)")
    encoding = doc.get("chunk_key_encoding")
    name = encoding.get("name") if isinstance(encoding, dict) else None
    conf = encoding.get("configuration") if isinstance(encoding, dict) else None
    sep = conf.get("separator") if isinstance(conf, dict) else None
    sep = sep if sep in ("/", ".") else ("." if name == "v2" else "/")
    spec = ChunkSpec(nbytes, None, chunks[0] if chunks else 1, sep, name == "v2")
    codecs = doc.get("codecs")
    if not isinstance(codecs, list):
        return spec
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs]
    for c in codecs:
        if isinstance(c, dict) and c.get("name") == "sharding_indexed":
            inner = c.get("configuration")
            inner_shape = _ints(inner.get("chunk_shape") if isinstance(inner, dict) else None, 1)
            if inner_shape is not None:
                _check_chunk_shape(key, inner_shape, size)
            return replace(spec, first_compressor="sharding_indexed")
    if "bytes" in names:
        after = names[names.index("bytes") + 1:]  # the first bytes-to-bytes codec, if any
        if after and isinstance(after[0], str):
            return replace(spec, first_compressor=after[0])
    return spec


def codec_names(codecs: object) -> list[str]:
    """Names of every codec in a codec list, those nested in ``sharding_indexed`` included
    (non-strings are given as their ``repr``)."""
    names: list[str] = []
    stack = [codecs]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            name = item.get("name")
            names.append(name if isinstance(name, str) else repr(name))
            config = item.get("configuration")
            if isinstance(config, dict):
                stack.extend(config.get(k) for k in ("index_codecs", "codecs") if k in config)
        elif isinstance(item, str):
            names.append(item)
        elif item is not None:
            names.append(repr(item))
    return names


def _check_codecs(key: str, doc: Mapping[str, Any]) -> None:
    odd = [n for n in codec_names(doc.get("codecs")) if n not in CORE_CODECS]
    if odd:
        where = key[: -len(DOCUMENT)].rstrip("/") or key
        raise _fail(where, f"codecs {odd} are not Zarr v3 core codecs "
                           f"({', '.join(sorted(CORE_CODECS))}); ntrace decodes no others "
                           "(spec/security.md)")


def _check_chunk_shape(key: str, chunks: list[int], size: int) -> int:
    nbytes = math.prod(chunks) * size
    if nbytes > MAX_CHUNK_BYTES:
        raise _fail(key, f"chunk shape {chunks} of {size}-byte items needs {nbytes} bytes per "
                         f"chunk, more than the {MAX_CHUNK_BYTES >> 30} GiB ntrace decodes "
                         "(spec/security.md)")
    return nbytes


def check_chunk(key: str, data: bytes | memoryview, spec: ChunkSpec) -> None:
    """Refuse a stored chunk that is too large, whose blosc header declares a decoded size
    other than the array's chunk size (blosc allocates what the header says), or whose gzip
    stream inflates past it (checked with a bounded trial decompression)."""
    if len(data) > MAX_STORED_OBJECT_BYTES:
        raise _fail(key, f"{len(data)} bytes stored, more than ntrace reads for one chunk")
    if spec.first_compressor == "gzip":
        try:
            inflated = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, spec.nbytes + 1)
        except zlib.error:
            return  # not gzip: the codec reports it
        if len(inflated) > spec.nbytes:
            raise _fail(key, f"the chunk's gzip stream inflates past the {spec.nbytes} bytes "
                             "a chunk of this array holds (corrupt or a decompression bomb)")
        return
    if spec.first_compressor == "blosc":
        if len(data) < 16:
            raise _fail(key, f"chunk of {len(data)} bytes is shorter than a blosc header "
                             "(truncated)")
        declared = int.from_bytes(bytes(data[4:8]), "little")
        if declared != spec.nbytes:  # the message never echoes the stored bytes
            raise _fail(key, f"the chunk's blosc header declares a decoded size other than the "
                             f"{spec.nbytes} bytes a chunk of this array holds (corrupt or "
                             "forged)")


def check_zip_members(infos: Iterable[zipfile.ZipInfo], where: str) -> None:
    """Refuse a zip whose member names could escape a directory, repeat, or whose declared
    sizes exceed what ntrace reads for one object."""
    seen: set[str] = set()
    for n, info in enumerate(infos):
        if n >= MAX_ZIP_MEMBERS:
            raise _fail(where, f"more than {MAX_ZIP_MEMBERS} members")
        name = info.filename
        parts = name.split("/")
        if (name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts
                or (len(name) > 1 and name[1] == ":")):
            raise _fail(where, f"member {name!r} has an absolute or '..' path; refusing to read "
                               "a zip whose members could escape its root")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _fail(where, f"member {name!r} is a symbolic link")
        if name in seen:
            raise _fail(where, f"member {name!r} appears twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise _fail(where, f"member {name!r} is encrypted")
        if info.file_size > MAX_STORED_OBJECT_BYTES:
            raise _fail(where, f"member {name!r} declares {info.file_size} bytes, more than "
                               "ntrace reads for one object (spec/security.md)")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
