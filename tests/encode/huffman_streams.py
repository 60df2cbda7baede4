"""Huffman stream records built from given code lengths, for the decoder tests.

The writer (huffman_encode) picks the lengths from the symbol frequencies; these helpers
take any lengths, so tests can cover codes of every length 1..24 on any symbol mix.
Everything here follows docs/format.md, "Huffman stream", with pyprune.encode.huffman_ref
for the canonical codes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from pyprune.encode import huffman_ref as ref

# One code of each length 1..23 and two of 24: a complete code (Kraft sum exactly 1).
EVERY_LENGTH = list(range(1, 24)) + [24, 24]


def _pack_bits(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def record(n: int, chunk: int, lengths: Sequence[int], chunk_bits: Sequence[int], payload: bytes) -> bytes:
    """A stream record from its raw fields (which need not be consistent)."""
    table = _pack_bits("".join(format(l, "05b") for l in lengths))
    head = struct.pack("<QII", n, chunk, len(lengths))
    return head + table + struct.pack(f"<{len(chunk_bits)}I", *chunk_bits) + payload


def encode_with_lengths(symbols: Sequence[int], lengths: Sequence[int], chunk: int) -> bytes:
    """A valid record coding ``symbols`` with the canonical code of ``lengths``."""
    codes = ref.canonical_codes(lengths)
    words = [format(codes[s], f"0{lengths[s]}b") for s in symbols]
    chunks = ["".join(words[i:i + chunk]) for i in range(0, len(words), chunk)]
    num = max((s + 1 for s, l in enumerate(lengths) if l), default=0)
    return record(len(symbols), chunk, list(lengths[:num]), [len(c) for c in chunks], _pack_bits("".join(chunks)))


def spread(lengths: Sequence[int], alphabet: int) -> list[int]:
    """``lengths`` placed on symbols spread evenly over ``alphabet`` (the rest unused)."""
    out = [0] * alphabet
    step = alphabet // len(lengths)
    for k, l in enumerate(lengths):
        out[k * step] = l
    return out


def sample(lengths: Sequence[int], n: int, rng: np.random.Generator, skew: str) -> np.ndarray:
    """``n`` used symbols of ``lengths``: "uniform" over them, or "mostly-short" (p
    proportional to 2^(-length/2): runs of short codes with a long one every ~50 symbols)."""
    used = np.array([s for s, l in enumerate(lengths) if l])
    if skew == "uniform":
        return rng.choice(used, n)
    p = np.array([2.0 ** (-lengths[s] / 2) for s in used])
    return rng.choice(used, n, p=p / p.sum())


def mutants(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """``count`` corruptions of a record: 1-3 flipped bits anywhere, or a truncation."""
    out = []
    for _ in range(count):
        if rng.random() < 0.1:
            out.append(data[:int(rng.integers(0, len(data)))])
            continue
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            bit = int(rng.integers(0, 8 * len(b)))
            b[bit >> 3] ^= 0x80 >> (bit & 7)
        out.append(bytes(b))
    return out


def stream_cases() -> list[tuple[str, bytes, int, np.ndarray]]:
    """(name, record, alphabet, symbols): writer-made streams over several alphabets and
    skews, and streams with codes of every length 1..24. All have >= 4096 symbols, so
    the C++ decoder takes its multi-symbol path (shorter streams go one code at a time)."""
    rng = np.random.default_rng(2024)
    from pyprune import _native
    import torch

    C = _native.cpu()
    written = [
        ("two-symbols", 2, rng.integers(0, 2, 9000)),
        ("skewed-16", 16, rng.choice(16, 20000, p=np.array([0.9] + [0.1 / 15] * 15))),
        ("very-skewed-200", 200, np.where(rng.random(30000) < 0.999, 0, rng.integers(1, 200, 30000))),
        ("uniform-256", 256, rng.integers(0, 256, 20000)),
        ("uniform-3000", 3000, rng.integers(0, 3000, 20000)),  # 11- and 12-bit codes
        ("alphabet-65536", 1 << 16, rng.integers(0, 1 << 16, 70000)),
        ("geometric-64", 64, np.minimum(rng.geometric(0.3, 70000) - 1, 63)),  # > 2^16: threads engage
    ]
    cases = [(name, C.huffman_encode(torch.from_numpy(s), a), a, s) for name, a, s in written]
    for alphabet in (25, 600):  # every code length, on symbols below and above 256
        lengths = spread(EVERY_LENGTH, alphabet)
        for skew in ("uniform", "mostly-short"):
            s = sample(lengths, 6000, rng, skew)
            data = encode_with_lengths(s.tolist(), lengths, 700)
            cases.append((f"every-length-{alphabet}-{skew}", data, alphabet, s))
    return cases


def model_streams(models_dir) -> list[tuple[str, bytes, int]]:
    """(name, record, alphabet) of every Huffman stream of the shared ResNet-20 checkpoint
    after mask(sparsity=0.8) and quant(bits=5), packed as .ppz: real symbol statistics."""
    from pyprune.api import load_model
    from pyprune.encode import ppz_bytes
    from pyprune.encode.ppz import inspect_bytes
    from pyprune.opt import OptConfig, optimize

    import torch

    m = load_model(arch="resnet20", weights=str(models_dir / "resnet20-12fca82f.th"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~10x faster than 2 threads on a busy 2-core machine
    try:
        r = optimize(m.module, m.mean, m.std, m.input_shape,
                     OptConfig(pipeline="mask(sparsity=0.8),quant(bits=5)", eval_split=None))
    finally:
        torch.set_num_threads(threads)
    data = ppz_bytes(r.graph_module, codebooks=r.codebooks())
    return [(f"{t['name']}:{kind}", data[s["offset"]:s["offset"] + s["bytes"]], s["alphabet"])
            for t in inspect_bytes(data)["tensors"] for kind in ("gaps", "codes") if (s := t[kind])]
