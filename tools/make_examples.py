"""Write the example traces of ``spec/examples``: tiny real recordings and broken copies.

    python tools/make_examples.py [--out spec/examples]

``valid/tiny-mlp.zarr`` (MSE) and ``valid/tiny-mlp-ce.zarr`` (cross-entropy) are recorded with
``ntrace.recording.record`` from a 6→4→3 ReLU MLP trained by SGD for 12 rounds of 4 samples
(Taylor data every 3 rounds on 2 samples; a probe set of 5 points every 2 rounds). Every other
example is a copy of one of them with ONE change, made by editing its JSON documents or by
rewriting one array through zarr; the table ``EXAMPLES`` below says which. The copies leave out
the (optional) consolidated metadata of the root, so each shows its change in the per-node
documents that a conforming reader uses. Everything is seeded;
``created`` and the ``producer`` versions are replaced by fixed values so that a rerun with the
same library versions writes the same bytes. ``README.md`` is generated from the same table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
ROUNDS, BATCH = 12, 4
CREATED = "2017-08-06T00:00:00+00:00"  # ICML 2017; a fixed value keeps reruns byte-stable
COMMAND = "python tools/make_examples.py"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "spec" / "examples"


# -- recording the valid examples ------------------------------------------------------------------
def record_tiny(path: Path, loss_id: str) -> None:
    """Record the tiny MLP with loss ``mse`` or ``cross_entropy`` to ``path``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import ntrace
    from ntrace.format.metadata import Sampling
    from ntrace.recording import record

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((ROUNDS * BATCH, 6)).astype(np.float32)
    teacher = rng.standard_normal((6, 3)).astype(np.float32)
    if loss_id == "mse":
        y = torch.from_numpy(np.tanh(x @ teacher).astype(np.float32))
        loss_fn: Callable[..., Any] = F.mse_loss
    else:
        y = torch.from_numpy(np.argmax(x @ teacher, axis=1).astype(np.int64))
        loss_fn = F.cross_entropy
    xt = torch.from_numpy(x)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 4), relu1=nn.ReLU(), fc2=nn.Linear(4, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe_index = np.array([1, 11, 21, 31, 41])
    with record(model, path, loss=loss_id, optimizer=opt,
                sampling=Sampling(taylor_every=3, samples_per_round=2),
                probe=xt[torch.from_numpy(probe_index)], probe_index=probe_index, probe_every=2,
                expected_rounds=ROUNDS, overwrite=True,
                run={"task": f"tiny-mlp ({COMMAND})", "seed": SEED, "batch_size": BATCH,
                     "epochs": 1, "dataset": {"name": "gaussian-teacher",
                                              "size": len(x), "features": 6}}) as rec:
        for n in range(ROUNDS):
            idx = np.arange(n * BATCH, (n + 1) * BATCH)
            out = model(xt[idx])
            loss = loss_fn(out, y[idx])
            rec.step(loss, out, y[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def normalise(a: dict[str, Any]) -> None:
        a["created"] = CREATED
        a["producer"] = {"ntrace": ntrace.__version__, "torch": "-", "zarr": "-", "numpy": "-",
                         "python": "-", "device": "cpu",
                         "note": f"versions blanked by {COMMAND} for byte-stable reruns"}
        a["run"]["optimizer"]["hyperparameters"] = {
            k: v for k, v in a["run"]["optimizer"]["hyperparameters"].items()
            if k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}

    edit_attrs(path, "", normalise)


# -- editing helpers -------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=True))  # zarr's own layout


def edit_attrs(trace: Path, node: str, fn: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``fn`` to the ``ntrace`` attribute document of group ``node`` ('' = root)."""
    meta = trace / node / "zarr.json"
    doc = read_json(meta)
    fn(doc["attributes"]["ntrace"])
    write_json(meta, doc)


def edit_array_meta(trace: Path, array: str, fn: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``fn`` to the zarr.json document of an array."""
    meta = trace / array / "zarr.json"
    doc = read_json(meta)
    fn(doc)
    write_json(meta, doc)


def _open_array(trace: Path, array: str) -> Any:
    import zarr
    import zarr.storage

    return zarr.open_array(zarr.storage.LocalStore(trace), path=array, mode="r+",
                           zarr_format=3)


def edit_rows(trace: Path, array: str, fn: Callable[[np.ndarray], None]) -> None:
    """Read an array whole, let ``fn`` change it in place, write it back through zarr (so
    chunks stay well-formed and checksummed)."""
    arr = _open_array(trace, array)
    data = np.asarray(arr[...])
    fn(data)
    arr[...] = data


def recreate(trace: Path, array: str, data: np.ndarray, dtype: str | None = None) -> None:
    """Replace an array by ``data`` (its shape, optionally another dtype), keeping its dims,
    codecs and chunking along the first axis."""
    import zarr
    import zarr.storage

    old = _open_array(trace, array)
    dtype = dtype or str(old.dtype)
    fill = {"f": float("nan"), "i": -1, "u": 0}[np.dtype(dtype).kind]
    chunks = (old.chunks[0], *data.shape[1:]) if data.ndim else ()
    dims = old.metadata.dimension_names
    compressors = old.compressors
    shutil.rmtree(trace / array)
    new = zarr.create_array(zarr.storage.LocalStore(trace), name=array, shape=data.shape,
                            chunks=chunks, dtype=dtype, fill_value=fill,
                            compressors=compressors, dimension_names=dims, zarr_format=3)
    new[...] = data.astype(dtype)


def resize(trace: Path, array: str, length: int) -> None:
    arr = _open_array(trace, array)
    arr.resize((length, *arr.shape[1:]))


def drop_consolidated(trace: Path) -> None:
    """Remove zarr-python's consolidated metadata (optional, spec section 2) from the root, so
    that an example shows its one change in the per-node documents whichever way a reader
    looks, and stays small."""
    meta = trace / "zarr.json"
    doc = read_json(meta)
    doc.pop("consolidated_metadata", None)
    write_json(meta, doc)


def _largest_state(trace: Path, layer: str) -> tuple[int, int, int]:
    """(t, s, j) of the pre-activation of largest magnitude in a layer's committed rows: a
    state that a tolerance can never excuse."""
    w = np.asarray(_open_array(trace, f"layers/{layer}/weight")[...], dtype=np.float64)
    b = np.asarray(_open_array(trace, f"layers/{layer}/bias")[...], dtype=np.float64)
    x = np.asarray(_open_array(trace, f"layers/{layer}/input")[...], dtype=np.float64)
    pre = np.einsum("tji,tsi->tsj", w, x) + b[:, None, :]
    t, s, j = np.unravel_index(int(np.argmax(np.abs(pre))), pre.shape)
    return int(t), int(s), int(j)


# -- the mutations ---------------------------------------------------------------------------------
def m_missing_array(p: Path) -> None:
    shutil.rmtree(p / "layers/fc1/jacobian")


def m_wrong_dims(p: Path) -> None:
    def f(doc: dict[str, Any]) -> None:
        doc["dimension_names"] = ["taylor_round", "sample", "feature"]
    edit_array_meta(p, "layers/fc1/input", f)


def m_wrong_dtype(p: Path) -> None:
    data = np.asarray(_open_array(p, "taylor/round_index")[...])
    recreate(p, "taylor/round_index", data, dtype="int32")


def m_inconsistent_length(p: Path) -> None:
    n = read_json(p / "zarr.json")["attributes"]["ntrace"]["commit"]["taylor_rounds"]
    resize(p, "taylor/sample_loss", n - 1)


def m_extra_rows(p: Path) -> None:
    n = read_json(p / "zarr.json")["attributes"]["ntrace"]["commit"]["rounds"]
    resize(p, "loss", n + 3)


def m_packed_length(p: Path) -> None:
    from ntrace.format.bits import unpack

    packed = np.asarray(_open_array(p, "layers/fc1/mask")[...])
    recreate(p, "layers/fc1/mask", unpack(packed, 4).astype(np.uint8))  # one byte per neuron


def m_unknown_major(p: Path) -> None:
    edit_attrs(p, "", lambda a: a.update(format_version="2.0"))


def m_corrupt_chunk(p: Path) -> None:
    chunk = p / "layers/fc1/weight/c/0/0/0"
    raw = bytearray(chunk.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):
        raw[i] ^= 0xFF
    chunk.write_bytes(bytes(raw))


def m_corrupt_json(p: Path) -> None:
    doc = p / "layers/fc1/zarr.json"
    doc.write_bytes(doc.read_bytes()[:-20])


def m_empty_chunk(p: Path) -> None:
    (p / "layers/fc1/weight/c/0/0/0").write_bytes(b"")


def m_wrong_size_chunk(p: Path) -> None:
    # a well-formed chunk (valid blosc, valid crc32c) of another array: wrong decoded size
    (p / "layers/fc1/bias/c/0/0").write_bytes((p / "layers/fc2/weight/c/0/0/0").read_bytes())


def m_loss_id(p: Path) -> None:
    edit_attrs(p, "", lambda a: a["loss"].update(id="hinge"))


def m_negative_every(p: Path) -> None:
    edit_attrs(p, "", lambda a: a["sampling"].update(taylor_every=-3))


def m_world_size(p: Path) -> None:
    edit_attrs(p, "", lambda a: a["sampling"].update(world_size=3))


def m_group_node(p: Path) -> None:
    meta = p / "taylor/zarr.json"
    doc = read_json(meta)
    doc["attributes"] = {}
    write_json(meta, doc)


def m_mask(p: Path) -> None:
    t, s, j = _largest_state(p, "fc1")

    def f(m: np.ndarray) -> None:
        m[t, s, j // 8] ^= np.uint8(1 << (j % 8))
    edit_rows(p, "layers/fc1/mask", f)


def m_sample_loss(p: Path) -> None:
    def f(v: np.ndarray) -> None:
        v[1, 0] *= 1.5
    edit_rows(p, "taylor/sample_loss", f)


def m_pad_bits(p: Path) -> None:
    def f(m: np.ndarray) -> None:
        m[1, 0, 0] |= np.uint8(0x80)  # bit 7 of a 4-neuron layer: a pad bit
    edit_rows(p, "layers/fc1/mask", f)


def m_round_policy(p: Path) -> None:
    def f(r: np.ndarray) -> None:
        r[1] += 1  # 3 → 4: still increasing, but 4 mod taylor_every 3 ≠ 0
    edit_rows(p, "taylor/round_index", f)


def m_nonfinite(p: Path) -> None:
    def f(w: np.ndarray) -> None:
        w[2, 0, 1] = np.inf
    edit_rows(p, "layers/fc2/weight", f)


def m_aborted(p: Path) -> None:
    edit_attrs(p, "", lambda a: a.update(status="aborted",
                                         status_reason="loss is nan at round 12"))


def m_tracked(p: Path) -> None:
    def f(t: np.ndarray) -> None:
        t[[0, 1]] = t[[1, 0]]
    edit_rows(p, "layers/fc1/tracked", f)


def m_input(p: Path) -> None:
    def f(x: np.ndarray) -> None:
        x[0, 0, 0] += 1.0
    edit_rows(p, "layers/fc2/input", f)


def m_target(p: Path) -> None:
    def f(y: np.ndarray) -> None:
        y[0, 1] = 3  # p = 3 classes: indices are 0, 1, 2
    edit_rows(p, "taylor/target", f)


def m_probe_size(p: Path) -> None:
    edit_attrs(p, "", lambda a: a["sampling"].update(probe_size=6))


def m_running(p: Path) -> None:
    """A writer that died: rows of rounds 8..11 are on disk but were never committed."""
    def f(a: dict[str, Any]) -> None:
        a.update(status="running", commit={"rounds": 8, "taylor_rounds": 3, "snapshots": 4})
    edit_attrs(p, "", f)  # (the copy loses its consolidated metadata, as a killed writer's has)

    def garbage(v: np.ndarray) -> None:
        v[-1] = np.nan
    edit_rows(p, "loss", garbage)

    def bad_loss(v: np.ndarray) -> None:
        v[3] = 1e9
    edit_rows(p, "taylor/sample_loss", bad_loss)


def m_newer_minor(p: Path) -> None:
    for node in ("", "taylor", "layers", "layers/fc1", "layers/fc2", "probe"):
        def f(a: dict[str, Any]) -> None:
            a["format_version"] = "1.9"
            a["added_in_1_9"] = {"readers of 1.0": "must ignore this key"}
        edit_attrs(p, node, f)


@dataclass(frozen=True)
class Example:
    name: str
    base: str  # the valid example it copies
    shows: str
    mutate: Callable[[Path], None] | None = None
    valid: bool = False


EXAMPLES: list[Example] = [
    Example("tiny-mlp", "", "6→4→3 ReLU MLP, MSE loss, 12 SGD rounds of 4 samples; Taylor data "
            "every 3 rounds on 2 samples; probe of 5 points every 2 rounds", valid=True),
    Example("tiny-mlp-ce", "", "the same network and schedule trained with cross-entropy "
            "(int64 class targets)", valid=True),
    Example("running-uncommitted-rows", "tiny-mlp", "a writer killed mid-run: status running, "
            "commit counts 8 rounds while rows of 12 are on disk (the uncommitted ones hold "
            "garbage a reader must ignore); no consolidated metadata", m_running, valid=True),
    Example("newer-minor-version", "tiny-mlp", "every node says format 1.9 and carries a key "
            "unknown to 1.0: a 1.0 reader must ignore the key and read the trace",
            m_newer_minor, valid=True),
    Example("missing-array", "tiny-mlp", "the array layers/fc1/jacobian is deleted",
            m_missing_array),
    Example("wrong-dims", "tiny-mlp", "layers/fc1/input names its last dimension 'feature' "
            "instead of 'in_feature'", m_wrong_dims),
    Example("wrong-dtype", "tiny-mlp", "taylor/round_index is stored as int32 (index arrays are "
            "int64)", m_wrong_dtype),
    Example("inconsistent-length", "tiny-mlp", "taylor/sample_loss holds one row fewer than "
            "commit.taylor_rounds", m_inconsistent_length),
    Example("extra-rows-complete", "tiny-mlp", "loss holds 3 rows past commit.rounds although "
            "the trace is complete (allowed only while running)", m_extra_rows),
    Example("packed-length-mismatch", "tiny-mlp", "layers/fc1/mask stores one byte per neuron "
            "(4) instead of ceil(4/8) = 1 packed byte", m_packed_length),
    Example("unknown-major-version", "tiny-mlp", "the root says format_version 2.0",
            m_unknown_major),
    Example("corrupt-chunk", "tiny-mlp", "4 bytes flipped in the chunk file "
            "layers/fc1/weight/c/0/0/0, so its crc32c checksum fails", m_corrupt_chunk),
    Example("corrupt-json", "tiny-mlp", "the last 20 bytes of layers/fc1/zarr.json cut off",
            m_corrupt_json),
    Example("empty-chunk", "tiny-mlp", "the chunk file layers/fc1/weight/c/0/0/0 truncated to "
            "0 bytes", m_empty_chunk),
    Example("wrong-size-chunk", "tiny-mlp", "a valid chunk of another array copied over "
            "layers/fc1/bias/c/0/0: checksum fine, decoded size wrong", m_wrong_size_chunk),
    Example("schema-violation", "tiny-mlp", "loss.id is 'hinge' (not one of the loss "
            "identifiers)", m_loss_id),
    Example("negative-taylor-every", "tiny-mlp", "sampling.taylor_every is -3", m_negative_every),
    Example("world-size-indivisible", "tiny-mlp", "sampling.world_size is 3 while "
            "samples_per_round is 2 (each of the 3 processes must record as many samples)",
            m_world_size),
    Example("group-attributes-missing", "tiny-mlp", "the taylor group has no 'ntrace' attribute",
            m_group_node),
    Example("mask-disagrees", "tiny-mlp", "one activation bit of layers/fc1/mask flipped (the "
            "unit whose pre-activation is largest in magnitude)", m_mask),
    Example("sample-loss-tampered", "tiny-mlp", "taylor/sample_loss[1, 0] multiplied by 1.5",
            m_sample_loss),
    Example("pad-bits-set", "tiny-mlp", "pad bit 7 set in layers/fc1/mask[1, 0] (the layer has "
            "4 neurons)", m_pad_bits),
    Example("round-index-breaks-policy", "tiny-mlp", "taylor/round_index[1] is 4 with "
            "taylor_every 3, taylor_offset 0", m_round_policy),
    Example("non-finite-weight", "tiny-mlp", "layers/fc2/weight[2, 0, 1] is +inf",
            m_nonfinite),
    Example("aborted-run", "tiny-mlp", "status aborted with status_reason 'loss is nan at round "
            "12': conforms structurally, but the run did not finish", m_aborted),
    Example("tracked-unsorted", "tiny-mlp", "layers/fc1/tracked starts 1, 0 (must be sorted)",
            m_tracked),
    Example("input-not-activation", "tiny-mlp", "layers/fc2/input[0, 0, 0] is not relu of "
            "layer fc1's pre-activation", m_input),
    Example("target-out-of-range", "tiny-mlp-ce", "a cross-entropy target is class 3 of a "
            "3-class output", m_target),
    Example("probe-size-mismatch", "tiny-mlp", "sampling.probe_size says 6 while the probe "
            "arrays hold 5 points", m_probe_size),
]


def make(out: Path) -> list[Path]:
    """Write every example under ``out/valid`` and ``out/invalid``; return their paths."""
    made = []
    for sub in ("valid", "invalid"):
        if (out / sub).exists():
            for old in (out / sub).glob("*.zarr"):
                shutil.rmtree(old)
        (out / sub).mkdir(parents=True, exist_ok=True)
    for ex in EXAMPLES:
        dest = out / ("valid" if ex.valid else "invalid") / f"{ex.name}.zarr"
        if not ex.base:
            record_tiny(dest, "cross_entropy" if ex.name.endswith("-ce") else "mse")
        else:
            shutil.copytree(out / "valid" / f"{ex.base}.zarr", dest)
            assert ex.mutate is not None
            ex.mutate(dest)
            drop_consolidated(dest)
        made.append(dest)
    (out / "README.md").write_text(readme())
    return made


def readme() -> str:
    lines = [
        "# Example traces",
        "",
        f"Every example here was made by `{COMMAND}` (run from the repository root;",
        "seeded; `created` and the `producer` versions are fixed values, so a rerun with the",
        "same library versions rewrites the same bytes); the last column names the function",
        "of that script that made each one. Each `invalid/` example is a copy of a valid one",
        "with ONE change, named for what it shows; `tests/format/test_validate.py` pins the",
        "reason `ntrace validate` gives for each. The copies leave out zarr-python's",
        "consolidated metadata (optional, spec section 2), so that every reader sees the",
        "change in the per-node `zarr.json` and the copies stay small; the two recorded",
        "traces keep it, exactly as the recorder wrote it.",
        "Check one with `ntrace validate spec/examples/<valid|invalid>/<name>.zarr`.",
        "",
        "| example | copy of | what it shows | made by |",
        "| --- | --- | --- | --- |",
    ]
    for ex in EXAMPLES:
        where = "valid" if ex.valid else "invalid"
        base = f"`{ex.base}`" if ex.base else "recorded"
        how = (f"`{ex.mutate.__name__}`" if ex.mutate is not None else
               f"`record_tiny(\"{'cross_entropy' if ex.name.endswith('-ce') else 'mse'}\")`")
        lines.append(f"| `{where}/{ex.name}.zarr` | {base} | {ex.shows} | {how} |")
    lines += ["", "Regenerate all of them (from the repository root): `python "
              "tools/make_examples.py`; write them elsewhere with `--out DIR`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory to write valid/, invalid/ and README.md into "
                             f"[default: {DEFAULT_OUT}]")
    args = parser.parse_args(argv)
    made = make(args.out)
    total = sum(f.stat().st_size for p in made for f in p.rglob("*") if f.is_file())
    print(f"wrote {len(made)} examples ({total / 1000:.0f} kB) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
