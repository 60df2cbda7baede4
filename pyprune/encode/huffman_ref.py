"""Pure-Python reference of the ``.ppz`` codec (``docs/format.md``), for testing the C++ one.

Written independently of ``csrc/cpu/huffman.cpp`` and ``csrc/cpu/ppz.cpp`` from the
specification, and deliberately simple rather than fast (bit-at-a-time decoding):

* :func:`code_lengths`: the format's deterministic length-limited Huffman construction,
  here with a binary heap (keys ``(weight, leaf-before-internal, symbol or creation
  order)``) and an explicit tree, where the C++ uses two queues and a parent array. Both
  must give identical lengths for every input.
* :func:`canonical_codes`, :func:`encode_stream`, :func:`decode_stream`: a Huffman
  stream record.
* :func:`read_ppz`: decodes a whole container into numpy arrays, checking CRCs and
  structure. It assumes a well-formed file (it is a reference for valid files, not a
  hardened reader: that is the C++ decoder's job) but raises ``ValueError`` on the
  inconsistencies it meets.
"""

from __future__ import annotations

import heapq
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_CODE_LENGTH = 24
DEFAULT_CHUNK = 4096
MAGIC = b"\x89PPZ\r\n\x1a\n"
ENCODINGS = ("raw", "dense_q", "csr_q", "csr_f32", "raw_z")
# dtype code -> numpy dtype (bfloat16 has no numpy dtype: kept as raw 2-byte words)
NUMPY_DTYPES = {0: "<f4", 1: "<f8", 2: "<f2", 3: "<u2", 4: "u1", 5: "i1", 6: "<i2", 7: "<i4", 8: "<i8", 9: "?",
                10: "<c8", 11: "<c16", 12: "<u2", 13: "<u4", 14: "<u8"}


# --------------------------------------------------------------------------- Huffman

def code_lengths(freqs: Sequence[int], max_len: int = MAX_CODE_LENGTH) -> list[int]:
    """Code length per symbol (0 for a symbol of frequency 0); see ``docs/format.md``."""
    freqs = [int(f) for f in freqs]
    if not 1 <= max_len <= MAX_CODE_LENGTH:
        raise ValueError(f"max_len must be in [1, {MAX_CODE_LENGTH}]")
    lengths = [0] * len(freqs)
    used = [s for s, f in enumerate(freqs) if f > 0]
    if not used:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    if 2 ** max_len < len(used):
        raise ValueError(f"{len(used)} symbols do not fit in codes of at most {max_len} bits")

    # Heap of (weight, kind, order, node): leaves (kind 0) before internal nodes (kind 1)
    # at equal weight; leaves by symbol, internal nodes by creation.
    heap: list[tuple[int, int, int, object]] = [(freqs[s], 0, s, s) for s in used]
    heapq.heapify(heap)
    created = 0
    while len(heap) > 1:
        w1, _, _, a = heapq.heappop(heap)
        w2, _, _, b = heapq.heappop(heap)
        heapq.heappush(heap, (w1 + w2, 1, created, (a, b)))
        created += 1
    depth: dict[int, int] = {}
    stack = [(heap[0][3], 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, tuple):
            stack.extend((child, d + 1) for child in node)
        else:
            depth[node] = d
    bl_count = [0] * (max(max(depth.values()), max_len) + 1)
    for d in depth.values():
        bl_count[d] += 1

    # JPEG Annex K.3 (Adjust_BITS): lift pairs of the deepest leaves.
    for i in range(len(bl_count) - 1, max_len, -1):
        while bl_count[i] > 0:
            j = i - 2
            while j > 0 and bl_count[j] == 0:
                j -= 1
            assert j > 0 and bl_count[i] >= 2
            bl_count[i] -= 2
            bl_count[i - 1] += 1
            bl_count[j + 1] += 2
            bl_count[j] -= 1

    order = sorted(used, key=lambda s: (-freqs[s], s))
    it = iter(order)
    for length in range(1, max_len + 1):
        for _ in range(bl_count[length]):
            lengths[next(it)] = length
    return lengths


def kraft_sum(lengths: Sequence[int]) -> float:
    return sum(2.0 ** -l for l in lengths if l)


def canonical_codes(lengths: Sequence[int]) -> list[int]:
    """Codes in increasing (length, symbol) order, starting from 0 (DEFLATE's rule)."""
    codes = [0] * len(lengths)
    code = 0
    for length in range(1, MAX_CODE_LENGTH + 1):
        for s, l in enumerate(lengths):
            if l == length:
                codes[s] = code
                code += 1
        code <<= 1
    return codes


def entropy_bits(symbols: Sequence[int] | np.ndarray) -> float:
    """Shannon entropy of the empirical distribution times the count, in bits."""
    counts = np.bincount(np.asarray(symbols, dtype=np.int64)) if len(symbols) else np.zeros(0)
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    return float((counts * np.log2(n / counts)).sum()) if n else 0.0


class _Bits:
    """MSB-first bit string builder."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, value: int, length: int) -> None:
        self.bits.extend((value >> (length - 1 - k)) & 1 for k in range(length))

    def tobytes(self) -> bytes:
        return np.packbits(np.array(self.bits, dtype=np.uint8)).tobytes() if self.bits else b""


def encode_stream(symbols: Sequence[int], alphabet: int, chunk_symbols: int = DEFAULT_CHUNK) -> bytes:
    """One Huffman stream record: u64 n, u32 chunk, u32 #lengths, 5-bit lengths, u32 chunk bit lengths, payload."""
    symbols = [int(s) for s in symbols]
    if any(not 0 <= s < alphabet for s in symbols):
        raise ValueError("symbol outside the alphabet")
    freqs = np.bincount(np.asarray(symbols, dtype=np.int64), minlength=alphabet) if symbols else [0] * alphabet
    lengths = code_lengths(list(freqs))
    codes = canonical_codes(lengths)
    num = max((s + 1 for s, l in enumerate(lengths) if l), default=0)
    table = _Bits()
    for s in range(num):
        table.put(lengths[s], 5)
    n_chunks = -(-len(symbols) // chunk_symbols)
    payload = _Bits()
    chunk_bits = []
    for c in range(n_chunks):
        start = len(payload.bits)
        for s in symbols[c * chunk_symbols:(c + 1) * chunk_symbols]:
            payload.put(codes[s], lengths[s])
        chunk_bits.append(len(payload.bits) - start)
    return (struct.pack("<QII", len(symbols), chunk_symbols, num) + table.tobytes()
            + struct.pack(f"<{n_chunks}I", *chunk_bits) + payload.tobytes())


def decode_stream(buf: bytes, alphabet: int, offset: int = 0) -> tuple[list[int], int]:
    """Decode the stream record at ``offset``; returns (symbols, offset after the record)."""
    n, chunk, num = struct.unpack_from("<QII", buf, offset)
    offset += 16
    if num > alphabet or chunk < 1:
        raise ValueError("bad stream header")
    tbytes = (5 * num + 7) // 8
    tbits = np.unpackbits(np.frombuffer(buf, np.uint8, tbytes, offset)) if tbytes else np.zeros(0, np.uint8)
    offset += tbytes
    lengths = [int("".join(map(str, tbits[5 * s:5 * s + 5])), 2) for s in range(num)] + [0] * (alphabet - num)
    if any(l > MAX_CODE_LENGTH for l in lengths) or kraft_sum(lengths) > 1:
        raise ValueError("bad code lengths")
    n_chunks = -(-n // chunk)
    chunk_bits = struct.unpack_from(f"<{n_chunks}I", buf, offset)
    offset += 4 * n_chunks
    total = sum(chunk_bits)
    pbytes = (total + 7) // 8
    bits = np.unpackbits(np.frombuffer(buf, np.uint8, pbytes, offset)) if pbytes else np.zeros(0, np.uint8)
    if len(bits) < total:
        raise ValueError("truncated payload")
    offset += pbytes
    decode = {(l, c): s for s, (l, c) in enumerate(zip(lengths, canonical_codes(lengths))) if l}
    out: list[int] = []
    pos = 0
    for c in range(n_chunks):
        end = pos + chunk_bits[c]
        for _ in range(min(chunk, n - c * chunk)):
            code = length = 0
            while (length, code) not in decode or length == 0:
                if pos >= end or length >= MAX_CODE_LENGTH:
                    raise ValueError(f"bad code in chunk {c}")
                code = (code << 1) | int(bits[pos])
                pos += 1
                length += 1
            out.append(decode[(length, code)])
        if pos != end:
            raise ValueError(f"chunk {c} does not end at its bit length")
    if bits[total:].any():
        raise ValueError("nonzero padding")
    return out, offset


# --------------------------------------------------------------------------- container

@dataclass
class RefTensor:
    name: str
    dtype: int
    shape: tuple[int, ...]
    encoding: str
    data: np.ndarray  # flat, NUMPY_DTYPES[dtype]
    gap_bits: int = 0
    codebook: np.ndarray | None = None
    gap_symbols: list[int] | None = None
    code_symbols: list[int] | None = None


def _crc_ok(data: bytes, stored: int, what: str) -> None:
    if zlib.crc32(data) != stored:
        raise ValueError(f"{what}: CRC32 mismatch")


def read_ppz(data: bytes) -> tuple[bytes, list[RefTensor]]:
    """Decode a whole ``.ppz`` file, version 1 or 2: (manifest bytes, tensors in file order)."""
    if data[:8] != MAGIC:
        raise ValueError("bad magic")
    version, flags, msize, count, hcrc = struct.unpack_from("<IIQII", data, 8)
    _crc_ok(data[:28], hcrc, "header")
    if version not in (1, 2) or flags != 0:
        raise ValueError("unsupported version or flags")
    if version == 2:
        return _read_v2(data, msize, count)
    manifest = data[32:32 + msize]
    _crc_ok(manifest, struct.unpack_from("<I", data, 32 + msize)[0], "manifest")
    dir_at = 32 + msize + 4
    directory = data[dir_at:dir_at + 24 * count]
    _crc_ok(directory, struct.unpack_from("<I", data, dir_at + 24 * count)[0], "directory")
    expected = dir_at + 24 * count + 4
    tensors = []
    for i in range(count):
        off, size, crc, _ = struct.unpack_from("<QQII", directory, 24 * i)
        if off != expected:
            raise ValueError(f"section {i}: not contiguous")
        section = data[off:off + size]
        _crc_ok(section, crc, f"section {i}")
        tensors.append(_read_section(section))
        expected += size
    if expected != len(data):
        raise ValueError("trailing bytes")
    return manifest, tensors


def read_varint(b: bytes, p: int) -> tuple[int, int]:
    """An unsigned LEB128 varint at ``b[p]``: (value, position after it)."""
    v = shift = 0
    while True:
        byte = b[p]
        p += 1
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return v, p


def _read_v2(data: bytes, head_size: int, count: int) -> tuple[bytes, list[RefTensor]]:
    stored = data[32:32 + head_size]
    _crc_ok(stored, struct.unpack_from("<I", data, 32 + head_size)[0], "head")
    (declared,) = struct.unpack_from("<Q", stored, 0)
    inflater = zlib.decompressobj()
    head = inflater.decompress(stored[8:], declared)
    if len(head) != declared or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise ValueError("head does not decompress to its declared size")
    msize, p = read_varint(head, 0)
    manifest = head[p:p + msize]
    p += msize
    offset = 32 + head_size + 4
    tensors = []
    for i in range(count):
        name_len, p = read_varint(head, p)
        name = head[p:p + name_len].decode("utf-8")
        p += name_len
        dtype, enc, ndim = head[p], head[p + 1], head[p + 2]
        p += 3
        shape = []
        for _ in range(ndim):
            d, p = read_varint(head, p)
            shape.append(d)
        size, p = read_varint(head, p)
        (crc,) = struct.unpack_from("<I", head, p)
        p += 4
        body = data[offset:offset + size]
        _crc_ok(body, crc, f"section {i}")
        tensors.append(_read_body(body, 0, name, dtype, enc, tuple(shape)))
        offset += size
    if p != len(head) or offset != len(data):
        raise ValueError("trailing bytes")
    return manifest, tensors


def _read_section(s: bytes) -> RefTensor:
    """A version 1 section: its header, then its body."""
    (name_len,) = struct.unpack_from("<H", s, 0)
    name = s[2:2 + name_len].decode("utf-8")
    p = 2 + name_len
    dtype, enc, ndim, _ = struct.unpack_from("<BBBB", s, p)
    p += 4
    shape = struct.unpack_from(f"<{ndim}Q", s, p)
    p += 8 * ndim
    return _read_body(s, p, name, dtype, enc, tuple(shape))


def _read_body(s: bytes, p: int, name: str, dtype: int, enc: int, shape: tuple[int, ...]) -> RefTensor:
    ndim = len(shape)
    numel = math.prod(shape)
    rows, cols = (shape[0], math.prod(shape[1:])) if ndim >= 2 else (1, numel)
    npdt = np.dtype(NUMPY_DTYPES[dtype])
    t = RefTensor(name, dtype, tuple(shape), ENCODINGS[enc], np.zeros(0, npdt))
    if enc == 0:
        t.data = np.frombuffer(s, npdt, numel, p).copy()
        p += numel * npdt.itemsize
    elif enc == 4:  # raw_z: byte planes, zlib
        planes = zlib.decompress(s[p:])
        if len(planes) != numel * npdt.itemsize:
            raise ValueError("raw_z size")
        t.data = np.frombuffer(planes, np.uint8).reshape(npdt.itemsize, numel).T.copy().view(npdt).reshape(-1)
        p = len(s)
    else:
        if enc in (2, 3):
            t.gap_bits = s[p]
            p += 4
        if enc in (1, 2):
            (k,) = struct.unpack_from("<I", s, p)
            t.codebook = np.frombuffer(s, "<u4", k, p + 4).copy()
            p += 4 + 4 * k
            values = np.concatenate([np.zeros(1, "<u4"), t.codebook])
        if enc == 1:
            t.code_symbols, p = decode_stream(s, k + 1, p)
            if len(t.code_symbols) != numel:
                raise ValueError("code count")
            t.data = values[np.asarray(t.code_symbols, np.int64)].view("<f4")
        else:
            n_entries, rc_bytes = struct.unpack_from("<QQ", s, p)
            p += 16
            counts = []
            q, end = p, p + rc_bytes
            while q < end:
                v, q = read_varint(s, q)
                counts.append(v)
            p = end
            if len(counts) != rows or sum(counts) != n_entries:
                raise ValueError("row counts")
            t.gap_symbols, p = decode_stream(s, 1 << t.gap_bits, p)
            if enc == 2:
                t.code_symbols, p = decode_stream(s, k + 1, p)
                entry_bits = values[np.asarray(t.code_symbols, np.int64)]
            else:
                entry_bits = np.frombuffer(s, "<u4", n_entries, p)
                p += 4 * n_entries
            out = np.zeros(numel, "<u4")
            e = 0
            for r in range(rows):
                col = -1
                for _ in range(counts[r]):
                    col += t.gap_symbols[e] + 1
                    if col >= cols:
                        raise ValueError("column out of range")
                    out[r * cols + col] = entry_bits[e]
                    e += 1
                if cols - 1 - col > (1 << t.gap_bits) - 1:
                    raise ValueError("row ends with too many zeros")
            t.data = out.view("<f4")
    if p != len(s):
        raise ValueError("section has trailing bytes")
    return t
