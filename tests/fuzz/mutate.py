"""Structure-aware mutators for the two model-file kinds.

A mutant is a function of (seed file, mutant number) only, so any finding can be made
again from its number. Each mutant applies one to three mutations at the level where a
hostile file would lie:

* the JSON a file carries (graph document, meta, the ``.ppz`` manifest): a value
  replaced by a boundary or a Python-special one, a key dropped, an element duplicated
  or swapped, a value spliced in from elsewhere in the document (a node name into an
  argument, a target into another node), a value nested hundreds deep;
* the tensors: another dtype (float64, int8, bool, complex, ...), another shape, a
  sparse or non-contiguous tensor, NaN and inf, a key renamed, dropped or added, a
  tensor declared far larger than the file (zeros, which the codecs shrink);
* the container: a ``.ppz`` table field set to an extreme, bytes flipped or cut, with
  every CRC recomputed most of the time so the mutation reaches the structural checks;
  a graph file's zip entries flipped, cut, or deflated into a decompression bomb.

Every mutant is written with the library's own writers (``ppz.pack_bytes``,
``torch.save``) where the mutation is above the byte level, so it is well-formed
wherever it is not meant to be broken.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import struct
import sys
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from pyprune.encode import ppz
from pyprune.encode.model_ppz import _shared_values

from ..encode.test_ppz_fuzz import extremes
from ..encode.test_ppz_v2 import build, fix_table_crcs, set_field, split, table_fields

PY_SPECIAL = ["self", "__class__", "training", "forward", "__dict__", "*args", "__init__", "_modules", "cuda:7",
              "meta", "cpu", "os.system", "builtins.eval", "torch.load", "", " ", "a.b", "0", "x" * 300, "ª"]
NUMBERS = [0, -1, 1, 2, 7, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, -2**63, 10**12,
           0.0, -0.0, 0.5, 1e-30, 1e308, -1e308, 3.0]
JSON_ODD = [None, True, False, [], {}, [0], [1, 2, 3], [0.0] * 7, {"tuple": [1, 2]}, {"node": "x"},
            {"dtype": "float64"}, {"device": "cuda:7"}, {"device": "meta"}, {"slice": [None, None, None]}]
DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64,
          torch.bool, torch.complex64]
BOMB_ELEMENTS = 60_000_000  # 240 MB of float32 zeros, which a CSR stores in ~100 KB
ZIP_BOMB_BYTES = 64 << 20  # deflated to ~300 KB, in ~0.1 s


# ----------------------------------------------------------------------------- JSON

def _paths(obj: Any, prefix: tuple = (), out: list | None = None, limit: int = 20000) -> list[tuple]:
    """Every path to a value inside ``obj`` (dict keys and list indices)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    out.append(prefix)
    if isinstance(obj, dict):
        for k, v in obj.items():
            _paths(v, prefix + (k,), out, limit)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _paths(v, prefix + (i,), out, limit)
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def _nested(value: Any, depth: int, rng: random.Random) -> Any:
    """``value`` inside ``depth`` levels of JSON arrays and tuple objects."""
    while depth > 0:
        value, depth = ([value], depth - 1) if rng.random() < 0.5 or depth < 2 else ({"tuple": [value]}, depth - 2)
    return value


def _odd_value(rng: random.Random, old: Any) -> Any:
    r = rng.random()
    if isinstance(old, bool) or r < 0.2:
        return rng.choice(JSON_ODD)
    if isinstance(old, (int, float)) and r < 0.7:
        return rng.choice([rng.choice(NUMBERS), old + 1, old - 1, -old, old * 1000])
    if isinstance(old, str) and r < 0.7:
        return rng.choice(PY_SPECIAL + [old + "_", old.upper(), old[: len(old) // 2]])
    return rng.choice(NUMBERS + PY_SPECIAL + JSON_ODD)


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """One structure-aware mutation of a JSON value; returns the (new) value."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    path = rng.choice(paths)
    target = _get(obj, path)
    op = rng.choice(["replace", "replace", "splice", "splice", "delete", "duplicate", "swap", "nest"])
    if op == "replace":
        return _set(obj, path, _odd_value(rng, target))
    if op == "splice":  # a value from elsewhere in the document: names, targets, shapes
        return _set(obj, path, copy.deepcopy(_get(obj, rng.choice(paths))))
    if op == "nest":
        return _set(obj, path, _nested(target, rng.choice([3, 40, 500, 800]), rng))
    containers = [p for p in paths if isinstance(_get(obj, p), (dict, list)) and _get(obj, p)]
    if not containers:
        return _set(obj, path, _odd_value(rng, target))
    holder = _get(obj, rng.choice(containers))
    keys = list(holder) if isinstance(holder, dict) else list(range(len(holder)))
    key = rng.choice(keys)
    if op == "delete":
        del holder[key]
    elif op == "duplicate":
        if isinstance(holder, list):
            holder.insert(rng.randrange(len(holder) + 1), copy.deepcopy(holder[key]))
        else:
            holder[f"{key}_copy" if rng.random() < 0.5 else rng.choice(PY_SPECIAL)] = copy.deepcopy(holder[key])
    else:  # swap
        other = rng.choice(keys)
        holder[key], holder[other] = holder[other], holder[key]
    return obj


# ----------------------------------------------------------------------------- tensors

def _reshaped(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    shape = list(t.shape)
    op = rng.choice(["grow", "shrink", "add_dim", "drop_dim", "zero"])
    if op == "add_dim" or not shape:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([1, 2, 3]))
    elif op == "drop_dim":
        shape.pop(rng.randrange(len(shape)))
    else:
        i = rng.randrange(len(shape))
        shape[i] = {"grow": shape[i] + rng.choice([1, 2, shape[i]]), "shrink": max(shape[i] - 1, 1), "zero": 0}[op]
    n = math.prod(shape)
    if n > 1 << 22:
        shape, n = [1], 1
    flat = t.reshape(-1)
    return flat.repeat(-(-n // max(flat.numel(), 1)) if n else 0)[:n].reshape(shape) if flat.numel() else torch.zeros(
        shape, dtype=t.dtype)


def mutate_tensors(tensors: dict[str, torch.Tensor], rng: random.Random, compressed: bool) -> dict[str, torch.Tensor]:
    """One mutation of a state dict (names kept in order unless renamed or dropped).
    ``compressed``: the container codes tensors (a ``.ppz``), so a huge tensor of zeros
    costs little file; graph files store them raw, and get sparse and strided ones."""
    tensors = dict(tensors)
    if not tensors:
        return {"x": torch.zeros(3)}
    name = rng.choice(list(tensors))
    t = tensors[name]
    ops = ["dtype", "dtype", "shape", "shape", "values", "rename", "drop", "add"]
    ops += ["bomb"] if compressed else ["sparse", "strided"]
    op = rng.choice(ops)
    if op == "dtype":
        tensors[name] = t.to(rng.choice(DTYPES))
    elif op == "shape" and t.layout == torch.strided:
        tensors[name] = _reshaped(t, rng)
    elif op == "values" and t.is_floating_point() and t.numel():
        t = t.clone().reshape(-1)
        t[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38, 0.0])
        tensors[name] = t.reshape(tensors[name].shape)
    elif op == "rename":
        new = rng.choice(PY_SPECIAL + [name + "_", name.rsplit(".", 1)[0] + ".extra", name.replace(".", "..")])
        tensors = {new if k == name else k: v for k, v in tensors.items()}
    elif op == "drop":
        del tensors[name]
    elif op == "add":
        tensors[rng.choice(PY_SPECIAL + ["extra.weight", name + ".copy"])] = t.clone()
    elif op == "bomb":
        tensors[name] = torch.zeros(1, BOMB_ELEMENTS)
    elif op == "sparse" and t.dim() >= 1:
        tensors[name] = t.to_sparse()
    elif op == "strided" and t.dim() >= 2:
        tensors[name] = t.transpose(0, 1)  # a view: torch.save keeps the strides
    return tensors


# ----------------------------------------------------------------------------- .ppz

def _codebooks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and not t.is_sparse:
            try:
                found = _shared_values(t)
            except RuntimeError:
                found = None
            if found is not None:
                out[name] = found
    return out


def _ppz_semantic(data: bytes, rng: random.Random) -> bytes:
    manifest, tensors = ppz.unpack_bytes(data)
    manifest.pop("tensors", None)
    for _ in range(rng.choice([1, 1, 2])):
        part = rng.choice(["graph", "graph", "meta", "manifest", "tensors", "tensors"])
        if part == "tensors":
            tensors = mutate_tensors(tensors, rng, compressed=True)
        elif part == "manifest":
            manifest = mutate_json(manifest, rng)
            if not isinstance(manifest, dict) or "tensors" in manifest:
                manifest = {"format": "pyprune.model", "graph": manifest}
        elif isinstance(manifest.get(part), (dict, list)):
            manifest[part] = mutate_json(manifest[part], rng)
    try:
        return ppz.pack_bytes(manifest, tensors, _codebooks(tensors))
    except (ValueError, TypeError, RuntimeError):  # a mutation the writer refuses: write the rest
        return ppz.pack_bytes(manifest, {k: v for k, v in tensors.items()
                                         if isinstance(k, str) and k and not v.is_complex() and not v.is_sparse})


def _ppz_container(data: bytes, rng: random.Random) -> bytes:
    v2 = split(data)
    head, blob = v2.head, v2.blob
    op = rng.choice(["field", "field", "field", "head_byte", "blob_byte", "blob_cut", "blob_grow"])
    if op == "field":
        fields, _ = table_fields(head, v2.count)
        f = rng.choice(fields)
        old = int.from_bytes(head[f.offset:f.offset + f.width], "little") if f.kind != "varint" else 1
        width = 8 if f.kind == "varint" else f.width
        head = set_field(head, f, rng.choice(extremes(width, old)))
    elif op == "head_byte":
        b = bytearray(head)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        head = bytes(b)
    elif op == "blob_byte" and blob:
        b = bytearray(blob)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        blob = bytes(b)
    elif op == "blob_cut":
        blob = blob[:rng.randrange(len(blob) + 1)]
    else:
        blob = blob + bytes(rng.randrange(1, 64))
    if rng.random() < 0.85:  # past the CRCs, into the structural checks
        head = fix_table_crcs(head, v2.count, blob)
        return build(v2.count, head, blob)
    out = bytearray(build(v2.count, head, blob))
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def mutate_ppz(seed: bytes, rng: random.Random) -> bytes:
    data = seed
    if rng.random() < 0.75:
        data = _ppz_semantic(data, rng)
    if rng.random() < 0.4:
        data = _ppz_container(data, rng)
    elif rng.random() < 0.05:
        data = data[:rng.randrange(len(data))]
    return data


# ----------------------------------------------------------------------------- graph files

def _torch_save(payload: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _graph_semantic(seed: bytes, rng: random.Random) -> bytes:
    payload = torch.load(io.BytesIO(seed), weights_only=True)
    for _ in range(rng.choice([1, 1, 2, 3])):
        part = rng.choice(["graph", "graph", "graph", "meta", "state", "state", "payload"])
        if part in ("graph", "meta") and isinstance(payload.get(part), str):
            try:
                doc = mutate_json(json.loads(payload[part]), rng)
            except json.JSONDecodeError:  # cut short by an earlier mutation
                continue
            payload[part] = json.dumps(doc) if rng.random() < 0.97 else json.dumps(doc)[:-1]
        elif part == "state" and isinstance(payload.get("state_dict"), dict):
            payload["state_dict"] = mutate_tensors(payload["state_dict"], rng, compressed=False)
        elif part == "payload":
            key = rng.choice(list(payload))
            payload[key] = rng.choice([None, 1, "x", 2, [], {"a": torch.zeros(2)}, torch.zeros(2), payload[key]])
    return _torch_save(payload)


def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def rezip(entries: list[tuple[str, bytes]], deflated: set[str] = frozenset()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compresslevel=1) as zf:
        for name, body in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # not the clock: the same bytes each time
            zf.writestr(info, body, compress_type=zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED)
    return buf.getvalue()


def _graph_zip(data: bytes, rng: random.Random) -> bytes:
    entries = zip_entries(data)
    i = rng.randrange(len(entries))
    name, body = entries[i]
    op = rng.choice(["flip", "flip", "cut", "grow", "bomb", "lie", "pickle"])
    if op == "bomb":  # the entry inflates to 64 MiB from a few hundred KB
        entries[i] = (name, bytes(ZIP_BOMB_BYTES) if not name.endswith(".pkl") else body)
        return rezip(entries, {name})
    if op == "lie":  # a deflated entry whose headers declare it inflates to 4 GB
        return declare_entry_size(rezip(entries, {name}), i, 0xFFFF_FFF0)
    if op == "pickle":  # data.pkl: the unpickler meets opcodes it must refuse
        i = next((j for j, (n, _) in enumerate(entries) if n.endswith("data.pkl")), i)
        name, body = entries[i]
        b = bytearray(body)
        at = rng.randrange(len(b))
        b[at:at] = rng.choice([b"cos\nsystem\n", b"c__builtin__\neval\n", b"\x80\x05", b"R", b"}" * 50, b"(" * 2000])
        entries[i] = (name, bytes(b))
    elif op == "flip" and body:
        b = bytearray(body)
        for _ in range(rng.choice([1, 1, 4])):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        entries[i] = (name, bytes(b))
    elif op == "cut":
        entries[i] = (name, body[:rng.randrange(len(body) + 1)])
    else:
        entries[i] = (name, body + bytes(rng.randrange(1, 4096)))
    return rezip(entries)


def declare_entry_size(data: bytes, index: int, size: int) -> bytes:
    """The zip ``data`` with entry ``index``'s uncompressed size set to ``size`` in both
    its local header and the central directory (what an unzipper allocates from)."""
    b = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        local = zf.infolist()[index].header_offset
    struct.pack_into("<I", b, local + 22, size)
    central = struct.unpack_from("<I", b, b.rfind(b"PK\x05\x06") + 16)[0]  # the end record's directory offset
    for _ in range(index):  # each directory record: 46 bytes, then name, extra and comment
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", b, central + 28)
        central += 46 + name_len + extra_len + comment_len
    struct.pack_into("<I", b, central + 24, size)
    return bytes(b)


def mutate_graph(seed: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.75:
        return _graph_semantic(seed, rng)
    if rng.random() < 0.9:
        return _graph_zip(seed, rng)
    b = bytearray(seed[:rng.randrange(len(seed))] if rng.random() < 0.5 else seed)
    if b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


MUTATORS: dict[str, Callable[[bytes, random.Random], bytes]] = {"ppz": mutate_ppz, "graph": mutate_graph}


def mutant(kind: str, seed: bytes, number: int, run_seed: int = 0) -> bytes:
    """Mutant ``number`` of ``seed``: the same bytes for the same arguments."""
    rng = random.Random(f"{run_seed}:{kind}:{number}")
    torch.manual_seed(rng.randrange(1 << 31))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # copying a value nested 800 deep, twice
    try:
        return MUTATORS[kind](seed, rng)
    finally:
        sys.setrecursionlimit(limit)
