"""Fuzzing the .ppz decoder on version-1 files (test_ppz_fuzz_v2.py does version 2): mutations of valid files must give CorruptFileError (naming
where) or, when the mutated file is still well-formed, exactly what the pure-Python
reference decoder reads from it. Never a crash, a hang or another exception.

Mutations come in two flavours: as they are (the CRC32s catch them) and with every CRC
recomputed afterwards, which drives them past the checksums into the structural
validation. Deterministic sweeps (every truncation, every single-bit flip, every integer
field set to extreme values) plus hypothesis-generated combinations. Run under
AddressSanitizer as described in docs/format.md, "Fuzzing under AddressSanitizer".
"""

from __future__ import annotations

import re
import struct
import zlib
from functools import lru_cache

import pytest
import torch

from pyprune.encode import huffman_ref as ref
from pyprune.encode.ppz import CorruptFileError, inspect_bytes, pack_bytes, unpack_bytes

hypothesis = pytest.importorskip("hypothesis", reason="the decoder fuzz tests need hypothesis (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WHERE = re.compile(r"^(header|head|manifest|directory|section \d+)\b")


def _quantized(shape, density, k, gen):
    cb = torch.randn(k, generator=gen)
    keep = torch.rand(shape, generator=gen) < density
    return torch.where(keep, cb[torch.randint(0, k, shape, generator=gen)], torch.zeros(())), cb


def build_file(scale: int = 1, version: int = 1) -> bytes:
    """Every encoding, fillers, several Huffman chunks per stream, raw non-float dtypes."""
    gen = torch.Generator().manual_seed(7)
    q, qcb = _quantized((6 * scale, 4, 3, 3), 0.3, 5, gen)
    d, dcb = _quantized((4 * scale, 10), 0.9, 3, gen)
    s = torch.randn(5 * scale, 20, generator=gen) * (torch.rand(5 * scale, 20, generator=gen) < 0.2) + 0.0
    tensors = {"q": q, "d": d, "s": s, "bias": torch.randn(5, generator=gen), "n": torch.tensor(3),
               "mask": torch.tensor([True, False, True])}
    return pack_bytes({"arch": "tiny", "provenance": ["fuzz"]}, tensors, {"q": qcb, "d": dcb}, gap_bits=2,
                      encodings={"q": "csr_q", "d": "dense_q", "s": "csr_f32", "bias": "raw_z"}, chunk_symbols=8,
                      version=version)


@lru_cache(maxsize=None)
def small_file() -> bytes:
    return build_file(1)


@lru_cache(maxsize=None)
def small_file_fields() -> list[tuple[int, int, str]]:
    return integer_fields(small_file())


def fix_crcs(data: bytes) -> bytes:
    """Recompute every CRC32 the (possibly mutated) structure still lets us locate."""
    b = bytearray(data)
    if len(b) < 32:
        return data
    struct.pack_into("<I", b, 28, zlib.crc32(b[:28]))
    msize, count = struct.unpack_from("<QI", b, 16)
    if 32 + msize + 4 > len(b):
        return bytes(b)
    struct.pack_into("<I", b, 32 + msize, zlib.crc32(b[32:32 + msize]))
    dir_at = 32 + msize + 4
    if dir_at + 24 * count + 4 > len(b):
        return bytes(b)
    for i in range(count):
        off, size = struct.unpack_from("<QQ", b, dir_at + 24 * i)
        if off + size <= len(b):
            struct.pack_into("<I", b, dir_at + 24 * i + 16, zlib.crc32(b[off:off + size]))
    struct.pack_into("<I", b, dir_at + 24 * count, zlib.crc32(b[dir_at:dir_at + 24 * count]))
    return bytes(b)


def integer_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, label) of every integer field of a valid file (docs/format.md)."""
    out = [(8, 4, "version"), (12, 4, "flags"), (16, 8, "manifest size"), (24, 4, "tensor count")]
    msize, count = struct.unpack_from("<QI", data, 16)
    dir_at = 32 + msize + 4
    for i in range(count):
        out += [(dir_at + 24 * i, 8, f"dir[{i}].offset"), (dir_at + 24 * i + 8, 8, f"dir[{i}].size"),
                (dir_at + 24 * i + 20, 4, f"dir[{i}].reserved")]
    for i in range(count):
        off, _ = struct.unpack_from("<QQ", data, dir_at + 24 * i)
        (name_len,) = struct.unpack_from("<H", data, off)
        p = off + 2 + name_len
        out += [(off, 2, f"s{i}.name_len"), (p, 1, f"s{i}.dtype"), (p + 1, 1, f"s{i}.encoding"),
                (p + 2, 1, f"s{i}.ndim"), (p + 3, 1, f"s{i}.reserved")]
        ndim, enc = data[p + 2], data[p + 1]
        p += 4
        out += [(p + 8 * k, 8, f"s{i}.shape[{k}]") for k in range(ndim)]
        p += 8 * ndim
        if enc in (2, 3):
            out += [(p, 1, f"s{i}.gap_bits"), (p + 1, 1, f"s{i}.reserved2")]
            p += 4
        if enc in (1, 2):
            (k,) = struct.unpack_from("<I", data, p)
            out.append((p, 4, f"s{i}.codebook_size"))
            p += 4 + 4 * k
        streams = []
        if enc in (2, 3):
            _, rc = struct.unpack_from("<QQ", data, p)
            out += [(p, 8, f"s{i}.n_entries"), (p + 8, 8, f"s{i}.rowcount_bytes")]
            out += [(p + 16 + k, 1, f"s{i}.rowcount_byte[{k}]") for k in range(rc)]
            p += 16 + rc
            streams.append("gaps")
        if enc in (1, 2):
            streams.append("codes")
        for name in streams:
            n, chunk, num = struct.unpack_from("<QII", data, p)
            out += [(p, 8, f"s{i}.{name}.n"), (p + 8, 4, f"s{i}.{name}.chunk"), (p + 12, 4, f"s{i}.{name}.num_lengths")]
            p += 16 + (5 * num + 7) // 8
            n_chunks = -(-n // chunk)
            out += [(p + 4 * c, 4, f"s{i}.{name}.chunk_bits[{c}]") for c in range(n_chunks)]
            p += 4 * n_chunks + (sum(struct.unpack_from(f"<{n_chunks}I", data, p)) + 7) // 8
    return out


def extremes(width: int, old: int) -> list[int]:
    top = (1 << (8 * width)) - 1
    vals = {0, 1, 2, 7, 25, top, top - 1, top >> 1, (top >> 1) + 1, old + 1, old - 1, old * 2, old * 8 + 7}
    if width >= 4:
        vals |= {1 << 16, (1 << 24) + 1, 1 << 31, (1 << 32) - 1}
    return sorted(v for v in vals if 0 <= v <= top and v != old)


def check(data: bytes) -> bool:
    """Decode `data`: CorruptFileError naming where, or a result equal to the reference's."""
    try:
        manifest, tensors = unpack_bytes(data, threads=2)
    except CorruptFileError as exc:
        assert WHERE.match(str(exc)), str(exc)
        with pytest.raises(CorruptFileError):
            inspect_bytes(data, threads=1)
        return False
    _, refs = ref.read_ppz(data)  # still well-formed: the reference must read the same
    assert [r.name for r in refs] == list(tensors)
    for r in refs:
        t = tensors[r.name]
        assert list(t.shape) == list(r.shape)
        assert t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == r.data.tobytes()
    report = inspect_bytes(data, threads=1)
    assert [row["name"] for row in report["tensors"]] == list(tensors)
    return True


# ----------------------------------------------------------------------------- sweeps

def test_valid_file_decodes():
    data = small_file()
    assert check(data)
    encodings = [row["encoding"] for row in unpack_bytes(data)[0]["tensors"]]
    assert encodings == ["csr_q", "dense_q", "csr_f32", "raw_z", "raw", "raw"]
    fields = {label for _, _, label in integer_fields(data)}
    assert "s0.gaps.chunk_bits[1]" in fields and "s1.codes.chunk_bits[2]" in fields  # several chunks


def assert_every_truncation_is_corrupt(data: bytes) -> None:
    for n in range(len(data)):
        with pytest.raises(CorruptFileError):
            unpack_bytes(data[:n])


def assert_every_bit_flip_is_corrupt(data: bytes) -> None:
    b = bytearray(data)
    for i in range(len(b)):
        for bit in range(8):
            b[i] ^= 1 << bit
            with pytest.raises(CorruptFileError):
                unpack_bytes(bytes(b), threads=1)
            b[i] ^= 1 << bit


def test_every_truncation_is_corrupt():
    assert_every_truncation_is_corrupt(small_file())


def test_every_single_bit_flip_is_caught_by_a_crc():
    assert_every_bit_flip_is_corrupt(small_file())


def test_every_single_bit_flip_past_the_crcs():
    data = small_file()
    b = bytearray(data)
    accepted = 0
    for i in range(len(b)):
        for bit in range(8):
            b[i] ^= 1 << bit
            accepted += check(fix_crcs(bytes(b)))
            b[i] ^= 1 << bit
    # flips in raw values, codebooks or manifest strings leave a valid (different) file
    assert 0 < accepted < 8 * len(data)


def test_every_integer_field_at_extreme_values():
    data = small_file()
    n = 0
    for off, width, label in integer_fields(data):
        old = int.from_bytes(data[off:off + width], "little")
        for v in extremes(width, old):
            mutated = data[:off] + v.to_bytes(width, "little") + data[off + width:]
            for candidate in (mutated, fix_crcs(mutated)):
                check(candidate)
                n += 1
    assert n > 1000


def test_hostile_sizes_fail_before_allocating():
    """Inflated counts must be refused from the sizes alone (no huge allocation)."""
    data = small_file()
    for off, width, label in integer_fields(data):
        if label.endswith(("shape[0]", ".n", "n_entries", "manifest size", "tensor count", "codebook_size")):
            mutated = fix_crcs(data[:off] + ((1 << (8 * width)) - 1 >> 2).to_bytes(width, "little")
                               + data[off + width:])
            with pytest.raises(CorruptFileError):
                unpack_bytes(mutated)


def test_tiny_last_sections():
    """A 0..5-byte last section, with its stale CRC (the error message peeks at the name
    length) and with CRCs fixed (the section parser)."""
    data = pack_bytes({}, {"a": torch.ones(200), "b": torch.ones(1)}, version=1)  # > 512 bytes: malloc'ed (ASan redzones)
    msize, count = struct.unpack_from("<QI", data, 16)
    dir_at = 32 + msize + 4
    off, _ = struct.unpack_from("<QQ", data, dir_at + 24 * (count - 1))
    for n in range(6):
        b = bytearray(data[:off + n])
        struct.pack_into("<Q", b, dir_at + 24 * (count - 1) + 8, n)
        struct.pack_into("<I", b, dir_at + 24 * count, zlib.crc32(b[dir_at:dir_at + 24 * count]))
        for candidate in (bytes(b), fix_crcs(bytes(b))):
            with pytest.raises(CorruptFileError, match=f"section {count - 1}"):
                unpack_bytes(candidate)


def keep_sections(data: bytes, keep: int, last_size: int) -> bytes:
    """The file with only its first `keep` sections, the last cut to `last_size` bytes,
    directory and CRCs rewritten to match: whatever the parser reads of that section is at
    the very end of the buffer, where an over-read would leave it (ASan's redzone)."""
    msize, count = struct.unpack_from("<QI", data, 16)
    dir_at = 32 + msize + 4
    b = bytearray(data[:dir_at])
    struct.pack_into("<I", b, 24, keep)
    offset = dir_at + 24 * keep + 4
    directory, sections = b"", b""
    for i in range(keep):
        off, size = struct.unpack_from("<QQ", data, dir_at + 24 * i)
        section = data[off:off + (last_size if i == keep - 1 else size)]
        directory += struct.pack("<QQII", offset, len(section), 0, 0)
        offset += len(section)
        sections += section
    return fix_crcs(bytes(b + directory + b"\0\0\0\0" + sections))


def test_every_truncation_of_a_last_section():
    data = small_file()
    msize, count = struct.unpack_from("<QI", data, 16)
    cases = 0
    for keep in range(1, count + 1):
        size = struct.unpack_from("<Q", data, 32 + msize + 4 + 24 * (keep - 1) + 8)[0]
        for n in range(size + 1):
            accepted = check(keep_sections(data, keep, n))
            assert accepted == (keep == count and n == size)  # else: cut, or the manifest's table disagrees
            cases += 1
    assert cases > 500


# ----------------------------------------------------------------------------- hypothesis

def _mutation(n: int | None = None):
    """Mutations of a file of ``n`` bytes (the small fuzz file by default)."""
    n = len(small_file()) if n is None else n
    pos = st.integers(0, n - 1)
    return st.one_of(
        st.tuples(st.just("flip"), st.lists(st.tuples(pos, st.integers(0, 7)), min_size=1, max_size=8)),
        st.tuples(st.just("bytes"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("field"), st.integers(0, 10_000), st.integers(0, 2 ** 64 - 1)),
    )


def apply(data: bytes, mutation) -> bytes:
    kind = mutation[0]
    b = bytearray(data)
    if kind == "flip":
        for i, bit in mutation[1]:
            b[i % len(b)] ^= 1 << bit
    elif kind == "bytes":
        i, blob = mutation[1], mutation[2]
        b[i:i + len(blob)] = blob
    elif kind == "truncate":
        del b[mutation[1]:]
    elif kind == "append":
        b += mutation[1]
    elif kind == "delete":
        del b[mutation[1]:mutation[1] + mutation[2]]
    elif kind == "insert":
        b[mutation[1]:mutation[1]] = mutation[2]
    elif kind == "field":  # offsets of the valid file: after other mutations they may hit anything
        fields = small_file_fields()
        off, width, _ = fields[mutation[1] % len(fields)]
        b[off:off + width] = (mutation[2] % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(b)


def _fuzz(start, mutations, crc: bool) -> None:
    data = small_file()
    if start is not None:  # cut to a prefix of the sections, consistently (see keep_sections)
        count = struct.unpack_from("<I", data, 24)[0]
        keep = start[0] % count + 1
        msize = struct.unpack_from("<Q", data, 16)[0]
        size = struct.unpack_from("<Q", data, 32 + msize + 4 + 24 * (keep - 1) + 8)[0]
        data = keep_sections(data, keep, start[1] % (size + 1))
    for m in mutations:
        data = apply(data, m) if len(data) else data
    check(fix_crcs(data) if crc else data)


STARTS = st.one_of(st.none(), st.tuples(st.integers(0, 100), st.integers(0, 10_000)))


@settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
          max_examples=2000)
@given(STARTS, st.lists(_mutation(), min_size=0, max_size=3), st.booleans())
def test_fuzz_mutations(start, mutations, crc):
    _fuzz(start, mutations, crc)


@pytest.mark.slow
@settings(deadline=None, derandomize=False, database=None, suppress_health_check=list(HealthCheck),
          max_examples=20_000)
@given(STARTS, st.lists(_mutation(), min_size=0, max_size=4), st.booleans())
def test_fuzz_mutations_long(start, mutations, crc):
    _fuzz(start, mutations, crc)


@pytest.mark.slow
def test_bigger_file_field_sweep():
    data = build_file(scale=16)
    assert check(data)
    for off, width, label in integer_fields(data):
        old = int.from_bytes(data[off:off + width], "little")
        for v in extremes(width, old):
            check(fix_crcs(data[:off] + v.to_bytes(width, "little") + data[off + width:]))
