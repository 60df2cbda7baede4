"""Container version 2: the manifest and the tensor table in one zlib-compressed head,
then the section bodies (docs/format.md). Its layout, the version-1 files it still
reads, its errors, decompression bombs and lying sizes refused within the declared
bound, and structure-aware fuzzing past every CRC and through the compressed head."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from pyprune.encode import huffman_ref as ref
from pyprune.encode import load_ppz
from pyprune.encode.ppz import CorruptFileError, inspect_bytes, pack_bytes, unpack_bytes

from .test_ppz_fuzz import (_mutation, apply, assert_every_bit_flip_is_corrupt, assert_every_truncation_is_corrupt,
                             build_file, check, extremes)

hypothesis = pytest.importorskip("hypothesis", reason="the decoder fuzz tests need hypothesis (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DATA = Path(__file__).parent / "data"
HEAD_AT = 32


def varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


@dataclass
class Field:
    offset: int  # in the decompressed head
    width: int  # bytes as stored now (a varint's current length)
    label: str
    kind: str  # "varint", "u8" or "u32"


@dataclass
class V2:
    count: int
    head: bytes  # decompressed
    blob: bytes  # the section bodies, as stored after the head


def split(data: bytes) -> V2:
    """A valid version-2 file, taken apart."""
    version, _, size, count, _ = struct.unpack_from("<IIQII", data, 8)
    assert version == 2
    stored = data[HEAD_AT:HEAD_AT + size]
    return V2(count, zlib.decompress(stored[8:]), data[HEAD_AT + size + 4:])


def build(count: int, head: bytes, blob: bytes, declared: int | None = None, stream: bytes | None = None) -> bytes:
    """A version-2 file with every CRC right: ``stream`` replaces the zlib stream of
    ``head``, ``declared`` its declared size."""
    stream = zlib.compress(head, 9) if stream is None else stream
    stored = struct.pack("<Q", len(head) if declared is None else declared) + stream
    header = bytearray(b"\x89PPZ\r\n\x1a\n" + struct.pack("<IIQI", 2, 0, len(stored), count))
    header += struct.pack("<I", zlib.crc32(header))
    return bytes(header) + stored + struct.pack("<I", zlib.crc32(stored)) + blob


def read_varint(b: bytes, p: int) -> tuple[int, int]:
    """The reference reader's varint, refusing past 64 bits (the head may be mutated)."""
    if p < len(b) and len(b[p:p + 10]) == 10 and all(x & 0x80 for x in b[p:p + 10]):
        raise IndexError
    return ref.read_varint(b, p)


def table_fields(head: bytes, count: int) -> tuple[list[Field], list[tuple[int, int, int]]]:
    """Every field of the head (docs/format.md), and per entry (CRC offset, body offset,
    body size), walking as far as the head's bytes allow (it may be mutated)."""
    fields, bodies = [], []
    try:
        msize, p = read_varint(head, 0)
        fields.append(Field(0, p, "manifest size", "varint"))
        p += msize
        body = 0
        for i in range(count):
            start = p
            name_len, p = read_varint(head, p)
            fields.append(Field(start, p - start, f"e{i}.name_len", "varint"))
            p += name_len
            fields += [Field(p, 1, f"e{i}.dtype", "u8"), Field(p + 1, 1, f"e{i}.encoding", "u8"),
                       Field(p + 2, 1, f"e{i}.ndim", "u8")]
            ndim = head[p + 2]
            p += 3
            for k in range(ndim):
                start = p
                _, p = read_varint(head, p)
                fields.append(Field(start, p - start, f"e{i}.shape[{k}]", "varint"))
            start = p
            size, p = read_varint(head, p)
            fields.append(Field(start, p - start, f"e{i}.size", "varint"))
            fields.append(Field(p, 4, f"e{i}.crc", "u32"))
            bodies.append((p, body, size))
            p += 4
            body += size
    except IndexError:
        pass
    return fields, bodies


def fix_table_crcs(head: bytes, count: int, blob: bytes) -> bytes:
    """The head with each entry's CRC32 recomputed where its body lies within ``blob``."""
    b = bytearray(head)
    for crc_at, off, size in table_fields(head, count)[1]:
        if crc_at + 4 <= len(b) and off + size <= len(blob):
            struct.pack_into("<I", b, crc_at, zlib.crc32(blob[off:off + size]))
    return bytes(b)


def set_field(head: bytes, f: Field, value: int) -> bytes:
    raw = varint(value) if f.kind == "varint" else (value % (1 << (8 * f.width))).to_bytes(f.width, "little")
    return head[:f.offset] + raw + head[f.offset + f.width:]


@lru_cache(maxsize=None)
def small_v2() -> bytes:
    return build_file(1, version=2)


def test_the_fuzz_file_has_every_encoding():
    data = small_v2()
    assert struct.unpack_from("<I", data, 8)[0] == 2 and check(data)
    assert [r["encoding"] for r in unpack_bytes(data)[0]["tensors"]] == ["csr_q", "dense_q", "csr_f32", "raw_z",
                                                                         "raw", "raw"]


# ----------------------------------------------------------------------------- layout

def test_layout_head_table_and_bodies():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=gen) * (torch.rand(4, 3, 3, 3, generator=gen) < 0.5) + 0.0
    tensors = {"conv.weight": w, "bn.num_batches_tracked": torch.tensor(5)}
    data = pack_bytes({"k": 1}, tensors)
    version, flags, size, count, crc = struct.unpack_from("<IIQII", data, 8)
    assert (version, flags, count) == (2, 0, 2) and crc == zlib.crc32(data[:28])
    stored = data[HEAD_AT:HEAD_AT + size]
    assert struct.unpack_from("<I", data, HEAD_AT + size)[0] == zlib.crc32(stored)
    head = zlib.decompress(stored[8:])
    assert struct.unpack_from("<Q", stored)[0] == len(head)
    msize, p = read_varint(head, 0)
    assert json.loads(head[p:p + msize]) == {"k": 1}  # no table in the JSON: it is binary, below
    p += msize
    blob, off, rows = data[HEAD_AT + size + 4:], 0, []
    for name, t, dtype in (("conv.weight", w, 0), ("bn.num_batches_tracked", tensors["bn.num_batches_tracked"], 8)):
        name_len, p = read_varint(head, p)
        assert head[p:p + name_len] == name.encode()
        p += name_len
        assert head[p] == dtype and head[p + 2] == t.dim()
        p += 3
        for d in t.shape:
            v, p = read_varint(head, p)
            assert v == d
        body_size, p = read_varint(head, p)
        assert struct.unpack_from("<I", head, p)[0] == zlib.crc32(blob[off:off + body_size])
        p += 4
        off += body_size
        rows.append(body_size)
    assert p == len(head) and off == len(blob)
    # the raw int64 body is its 8 bytes and nothing else: the name and shape are in the head
    assert rows[1] == 8 and blob[-8:] == struct.pack("<q", 5)
    manifest, out = unpack_bytes(data)
    assert manifest["tensors"][0] == {"name": "conv.weight", "dtype": "float32", "shape": [4, 3, 3, 3],
                                      "encoding": "csr_f32"}
    assert torch.equal(out["conv.weight"], w) and inspect_bytes(data)["total"]["version"] == 2


def test_both_versions_decode_the_same_and_version_2_is_smaller():
    for scale in (1, 4):
        (m1, t1), (m2, t2) = unpack_bytes(build_file(scale, version=1)), unpack_bytes(build_file(scale, version=2))
        assert m1 == m2 and list(t1) == list(t2)
        assert all(torch.equal(t1[k].view(torch.uint8) if t1[k].dtype == torch.bool else t1[k], t2[k].view(torch.uint8)
                               if t2[k].dtype == torch.bool else t2[k]) for k in t1)
    manifest = {"graph": {"nodes": [f"layer{i % 7}" * 6 for i in range(300)]}}
    tensors = {f"layer{i}.weight": torch.ones(3) for i in range(50)}
    v1, v2 = pack_bytes(manifest, tensors, version=1), pack_bytes(manifest, tensors)
    assert len(v2) < len(v1) / 4 and unpack_bytes(v1)[0] == unpack_bytes(v2)[0]


def test_a_version_1_file_of_the_old_writer_still_loads():
    """tests/encode/data/v1-tiny.ppz was written by main a0edc25 (make_v1_tiny.py)."""
    data = (DATA / "v1-tiny.ppz").read_bytes()
    expected = json.loads((DATA / "v1-tiny.json").read_text())
    assert struct.unpack_from("<I", data, 8)[0] == 1
    gm, meta = load_ppz(DATA / "v1-tiny.ppz")
    import hashlib

    assert {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in gm.state_dict().items()} == \
        expected["tensors"]
    x = torch.randn(*expected["input_shape"], generator=torch.Generator().manual_seed(expected["input_seed"]))
    with torch.no_grad():
        # the tensors are bit-exact (above); the forward's rounding depends on the CPU's
        # kernels (oneDNN picks them by ISA), so the logits agree to float32 rounding
        torch.testing.assert_close(gm(x), torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-6)
    assert meta["arch"] == "tiny" and inspect_bytes(data)["total"]["version"] == 1


# ----------------------------------------------------------------------------- errors

def _file():
    return pack_bytes({"k": 1}, {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(1)),
                                 "b": torch.ones(3)})


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]


@pytest.mark.parametrize("mutate,match", [
    (lambda v: build(v.count, v.head, v.blob)[:40], "head: head needs"),
    (lambda v: _flip(build(v.count, v.head, v.blob), HEAD_AT + 12), "head: CRC32 mismatch"),
    (lambda v: build(v.count, v.head, v.blob, declared=0), "declares a decompressed size of 0"),
    (lambda v: build(v.count, v.head, v.blob, declared=len(v.head) - 1), "more than its declared"),
    (lambda v: build(v.count, v.head, v.blob, declared=len(v.head) + 1), "decompresses to .* declared"),
    (lambda v: build(v.count, v.head, v.blob, declared=65 << 20), "more than the 64 MiB limit"),
    (lambda v: build(v.count, v.head, v.blob, declared=10 ** 7), "DEFLATE expands at most 1032:1"),
    (lambda v: build(v.count, v.head, v.blob, stream=b"not zlib at all"), "not a valid zlib stream"),
    (lambda v: build(v.count, v.head, v.blob, stream=zlib.compress(v.head) + b"\0"), "after the end of its zlib"),
    (lambda v: build(v.count + 10_000, v.head, v.blob), "table entries cannot fit"),
    (lambda v: build(v.count - 1, v.head, v.blob), "bytes after the last table entry"),
    (lambda v: build(v.count, v.head, v.blob[:-1]), r"extends past the end|section 1 \('b'\): CRC32"),
    (lambda v: build(v.count, v.head, v.blob + b"\0"), "bytes after the last section"),
    (lambda v: build(v.count, v.head, _flip(v.blob, 0)), r"section 0 \('w'\): CRC32 mismatch"),
])
def test_errors_name_the_part(mutate, match):
    data = mutate(split(_file()))
    with pytest.raises(CorruptFileError, match=match):
        unpack_bytes(data)
    with pytest.raises(CorruptFileError):
        inspect_bytes(data)


def test_a_tensors_key_in_a_version_2_manifest_is_refused():
    v = split(_file())
    msize, p = read_varint(v.head, 0)
    text = json.dumps({"k": 1, "tensors": []}, separators=(",", ":")).encode()
    head = varint(len(text)) + text + v.head[p + msize:]
    with pytest.raises(CorruptFileError, match="manifest: a 'tensors' key"):
        unpack_bytes(build(v.count, head, v.blob))


def test_table_entry_errors_name_the_entry():
    v = split(_file())
    fields = {f.label: f for f in table_fields(v.head, v.count)[0]}
    cases = [("e0.name_len", 70_000, "name of 70000 bytes"), ("e0.dtype", 99, r"table entry 0 \('w'\): unknown dtype"),
             ("e1.encoding", 7, r"table entry 1 \('b'\): unknown encoding"), ("e0.ndim", 9, "9 dimensions"),
             ("e0.shape[0]", 1 << 61, "more than 2\\^60"), ("e0.size", 1 << 40, "extends past the end")]
    for label, value, match in cases:
        head = set_field(v.head, fields[label], value)
        with pytest.raises(CorruptFileError, match=match):
            unpack_bytes(build(v.count, head, v.blob))


def test_duplicate_names_are_corrupt():
    data = pack_bytes({}, {"a": torch.ones(1), "b": torch.ones(1)})
    v = split(data)
    head = v.head.replace(b"\x01b", b"\x01a")
    with pytest.raises(CorruptFileError, match="section 1 \\('a'\\): duplicate tensor name"):
        unpack_bytes(build(v.count, head, v.blob))


# ----------------------------------------------------------------------------- bombs

BOMB = """
import sys, zlib
from pyprune.encode.ppz import CorruptFileError, unpack_bytes
from tests.encode.test_ppz_v2 import build

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

declared, expanded = int(sys.argv[1]), int(sys.argv[2])
z, chunk = zlib.compressobj(9), bytes(1 << 20)  # compressed a MiB at a time: no big buffer of our own
stream = b"".join(z.compress(chunk[:min(1 << 20, expanded - i)]) for i in range(0, expanded, 1 << 20)) + z.flush()
data = build(0, b"", b"", declared=declared, stream=stream)
start = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the resident set now
try:
    unpack_bytes(data)
    print("accepted")
except CorruptFileError as exc:
    print(f"{status('VmHWM:') - start} {len(data)} {exc}")
"""


def _bomb(declared: int, expanded: int) -> tuple[int, int, str]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident set")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(BOMB), str(declared), str(expanded)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    grew, size, message = out.stdout.strip().split(" ", 2)
    return int(grew), int(size), message


@pytest.mark.parametrize("declared,expanded,match,bound", [
    # 200 MB of zeros compress to about 200 KB: the stream may declare up to 1032x that,
    # but the reader allocates only what it declares, here 4 MiB, and stops there
    (4 << 20, 200_000_000, "decompresses to more than its declared 4194304 bytes", 4 << 20),
    # an honest declaration past the 64 MiB cap is refused before anything is allocated
    (200_000_000, 200_000_000, "more than the 64 MiB limit", 0),
    # a tiny stream declaring 60 MiB: beyond what its bytes can expand to, refused unallocated
    (60 << 20, 10, "DEFLATE expands at most 1032:1", 0),
])
def test_decompression_bombs_are_refused_within_the_declared_bound(declared, expanded, match, bound):
    grew, size, message = _bomb(declared, expanded)
    assert match in message
    assert grew <= bound + (2 << 20), f"the resident set grew by {grew} bytes for a {size}-byte file"
    if bound:  # the check measures: the declared buffer itself shows up
        assert grew >= bound // 2


# ----------------------------------------------------------------------------- fuzz

def test_every_table_field_at_extreme_values():
    v = split(small_v2())
    fields, _ = table_fields(v.head, v.count)
    n = 0
    for f in fields:
        old = int.from_bytes(v.head[f.offset:f.offset + f.width], "little") if f.kind != "varint" else \
            read_varint(v.head, f.offset)[0]
        width = 8 if f.kind == "varint" else f.width
        for value in extremes(width, old):
            head = set_field(v.head, f, value)
            for candidate in (head, fix_table_crcs(head, v.count, v.blob)):
                check(build(v.count, candidate, v.blob))
                n += 1
    assert n > 500


def test_every_single_bit_flip_of_the_head_past_the_crcs():
    v = split(small_v2())
    accepted = 0
    for i in range(len(v.head)):
        for bit in range(8):
            head = bytearray(v.head)
            head[i] ^= 1 << bit
            accepted += check(build(v.count, fix_table_crcs(bytes(head), v.count, v.blob), v.blob))
    assert 0 < accepted < 8 * len(v.head)  # flips in the manifest's strings leave a valid file


def test_every_truncation_and_every_bit_flip_of_the_file_is_caught():
    data = small_v2()
    assert_every_truncation_is_corrupt(data)
    assert_every_bit_flip_is_corrupt(data)


TARGETS = st.sampled_from(["head", "blob", "stream", "file", "declared", "field"])


def _fuzz(plan) -> None:
    v = split(small_v2())
    head, blob, count = v.head, v.blob, v.count
    declared = stream = None
    raw_mutations = []
    for target, m, value in plan:
        if target == "head":
            head = apply(head, m) if head else head
        elif target == "blob":
            blob = apply(blob, m) if blob else blob
        elif target == "stream":
            stream = zlib.compress(head, 9) if stream is None else stream
            stream = apply(stream, m) if stream else stream
        elif target == "declared":
            declared = value
        elif target == "field":
            fields = table_fields(head, count)[0]
            if fields:
                head = set_field(head, fields[value % len(fields)], value >> 8)
        else:
            raw_mutations.append(m)
    data = build(count, fix_table_crcs(head, count, blob), blob, declared=declared, stream=stream)
    for m in raw_mutations:  # the file as stored, CRCs stale
        data = apply(data, m) if data else data
    check(data)


@settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck), max_examples=1500)
@given(st.lists(st.tuples(TARGETS, _mutation(2000), st.integers(0, 2 ** 64 - 1)), min_size=1, max_size=3))
def test_fuzz_mutations_v2(plan):
    _fuzz(plan)


@pytest.mark.slow
@settings(deadline=None, derandomize=False, database=None, suppress_health_check=list(HealthCheck),
          max_examples=20_000)
@given(st.lists(st.tuples(TARGETS, _mutation(2000), st.integers(0, 2 ** 64 - 1)), min_size=1, max_size=4))
def test_fuzz_mutations_v2_long(plan):
    _fuzz(plan)
