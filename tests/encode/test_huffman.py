"""Canonical Huffman of the .ppz container: C++ (pyprune._C) against the Python reference
(pyprune.encode.huffman_ref), optimality, the length limit, the entropy bound, edge cases."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch

from pyprune import _native
from pyprune.encode import huffman_ref as ref
from pyprune.encode.ppz import CorruptFileError

from .huffman_streams import record as _stream

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None


@pytest.fixture(scope="module")
def C():
    return _native.cpu()


def fib_freqs(n: int) -> list[int]:
    f = [1, 1]
    while len(f) < n:
        f.append(f[-1] + f[-2])
    return f[:n]


def huffman_cost(freqs: list[int]) -> int:
    """Sum of f * len of any optimal (unlimited) Huffman code: the sum of all merge weights."""
    heap = [f for f in freqs if f > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        w = heapq.heappop(heap) + heapq.heappop(heap)
        cost += w
        heapq.heappush(heap, w)
    return cost


def freq_cases() -> list[tuple[str, list[int]]]:
    rng = np.random.default_rng(1234)
    cases = [
        ("empty", []), ("all-zero", [0, 0, 0]), ("single", [7]), ("single-among-unused", [0, 0, 9, 0]),
        ("two", [3, 5]), ("two-equal", [4, 4]), ("uniform-8", [10] * 8), ("uniform-100", [1] * 100),
        ("geometric", [2 ** k for k in range(20)]), ("fibonacci-40", fib_freqs(40)),
        ("very-skewed", [10 ** 9, 1, 1, 1, 1]), ("alphabet-65536", [1 + (i * 7919) % 13 for i in range(1 << 16)]),
    ]
    for k in range(30):
        n = int(rng.integers(2, 400))
        kind = k % 3
        if kind == 0:
            f = rng.integers(0, 6, n)
        elif kind == 1:
            f = (rng.pareto(0.8, n) * 5).astype(np.int64)
        else:
            f = rng.integers(0, 2, n) * rng.integers(1, 10 ** 6, n)
        cases.append((f"random-{k}", [int(x) for x in f]))
    return cases


CASES = freq_cases()


@pytest.mark.parametrize("name,freqs", CASES, ids=[c[0] for c in CASES])
def test_lengths_match_reference_and_are_valid(C, name, freqs):
    got = list(C.huffman_code_lengths(freqs))
    assert got == ref.code_lengths(freqs)
    used = sum(1 for f in freqs if f)
    assert all((l == 0) == (f == 0) for l, f in zip(got, freqs))
    assert max(got, default=0) <= 24
    if used >= 2:
        assert ref.kraft_sum(got) == 1.0  # complete code
        if max(ref.code_lengths(freqs)) < 24:
            # optimal: the limit did not bind, so the cost equals any Huffman code's
            assert sum(f * l for f, l in zip(freqs, got)) == huffman_cost(freqs)
    elif used == 1:
        assert sorted(got)[-1] == 1  # a lone symbol gets a 1-bit code


@pytest.mark.parametrize("max_len", [2, 3, 5, 8, 12])
def test_length_limit_fixup_matches_reference(C, max_len):
    rng = np.random.default_rng(max_len)
    for trial in range(40):
        n = int(rng.integers(2, min(2 ** max_len, 300) + 1))
        freqs = [int(x) for x in (rng.pareto(0.5, n) * 3 + 1).astype(np.int64)]
        got = list(C.huffman_code_lengths(freqs, max_len))
        assert got == ref.code_lengths(freqs, max_len)
        assert max(got) <= max_len
        assert ref.kraft_sum(got) == 1.0


def test_fibonacci_frequencies_hit_the_24_bit_limit(C):
    freqs = fib_freqs(45)  # an unlimited Huffman code would be 44 bits deep
    got = list(C.huffman_code_lengths(freqs))
    assert max(got) == 24 and ref.kraft_sum(got) == 1.0
    assert got == ref.code_lengths(freqs)
    # Monotone: a more frequent symbol never gets a longer code.
    assert all(a >= b for a, b in zip(got, got[1:]))


def test_too_many_symbols_for_the_limit(C):
    with pytest.raises(ValueError):
        C.huffman_code_lengths([1] * 5, 2)
    with pytest.raises(ValueError):
        ref.code_lengths([1] * 5, 2)
    with pytest.raises(ValueError):
        C.huffman_code_lengths([1, 1], 25)


def test_canonical_codes_are_prefix_free_and_ordered():
    lengths = ref.code_lengths([5, 9, 12, 13, 16, 45, 0, 1])
    codes = ref.canonical_codes(lengths)
    words = sorted((format(c, f"0{l}b"), s) for s, (c, l) in enumerate(zip(codes, lengths)) if l)
    for (a, _), (b, _) in zip(words, words[1:]):
        assert not b.startswith(a)
    keyed = sorted((l, s) for s, l in enumerate(lengths) if l)
    assert [codes[s] << (24 - l) for l, s in keyed] == sorted(codes[s] << (24 - l) for l, s in keyed)


# ----------------------------------------------------------------------------- streams

def stream_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(99)
    p = np.array([0.9] + [0.1 / 15] * 15)
    return [
        ("empty", np.zeros(0, np.int64), 4),
        ("single-symbol", np.full(1000, 3, np.int64), 4),
        ("alphabet-1", np.zeros(777, np.int64), 1),
        ("two-symbols", rng.integers(0, 2, 5000), 2),
        ("uniform-32", rng.integers(0, 32, 20000), 32),
        ("skewed", rng.choice(16, 20000, p=p), 16),
        ("very-skewed", np.where(rng.random(30000) < 0.999, 0, rng.integers(1, 200, 30000)), 200),
        ("alphabet-65536", rng.integers(0, 1 << 16, 200000), 1 << 16),
        ("geometric", np.minimum(rng.geometric(0.3, 50000) - 1, 63), 64),
    ]


STREAMS = stream_cases()


def stream_payload_bits(data: bytes) -> int:
    """Sum of a stream record's chunk bit lengths (docs/format.md, "Huffman stream")."""
    n, chunk, num = np.frombuffer(data, "<u8", 1)[0], *np.frombuffer(data, "<u4", 2, 8)
    n_chunks = -(-int(n) // int(chunk))
    table_at = 16 + (5 * int(num) + 7) // 8
    return int(np.frombuffer(data, "<u4", n_chunks, table_at).astype(np.int64).sum())


@pytest.mark.parametrize("name,symbols,alphabet", STREAMS, ids=[s[0] for s in STREAMS])
def test_stream_round_trip_and_entropy_bound(C, name, symbols, alphabet):
    data = C.huffman_encode(torch.from_numpy(symbols), alphabet)
    decoded, used = C.huffman_decode(data, alphabet)
    assert used == len(data)
    assert np.array_equal(decoded.numpy(), symbols)
    for threads in (1, 2):
        assert np.array_equal(C.huffman_decode(data, alphabet, threads)[0].numpy(), symbols)
    n = len(symbols)
    payload_bits = stream_payload_bits(data)
    h = ref.entropy_bits(symbols)
    assert h - 1e-6 <= payload_bits <= h + n, (payload_bits, h, n)
    if name == "single-symbol" or name == "alphabet-1":
        assert payload_bits == n  # one bit per symbol


@pytest.mark.parametrize("name,symbols,alphabet", [s for s in STREAMS if len(s[1]) <= 30000],
                         ids=[s[0] for s in STREAMS if len(s[1]) <= 30000])
def test_stream_bytes_match_reference(C, name, symbols, alphabet):
    ours = C.huffman_encode(torch.from_numpy(symbols), alphabet)
    assert ours == ref.encode_stream(symbols.tolist(), alphabet)
    assert ref.decode_stream(ours, alphabet) == (symbols.tolist(), len(ours))


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 4096, 1 << 24])
def test_chunk_sizes(C, chunk):
    rng = np.random.default_rng(chunk)
    symbols = rng.choice(12, 3000, p=np.arange(1, 13) / 78)
    data = C.huffman_encode(torch.from_numpy(symbols), 12, chunk)
    for threads in (1, 2):
        assert np.array_equal(C.huffman_decode(data, 12, threads)[0].numpy(), symbols)
    if chunk >= 7:
        assert data == ref.encode_stream(symbols.tolist(), 12, chunk)


def test_encode_rejects_symbols_outside_the_alphabet(C):
    with pytest.raises(ValueError):
        C.huffman_encode(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError):
        C.huffman_encode(torch.tensor([-1]), 4)
    with pytest.raises(ValueError):
        C.huffman_encode(torch.tensor([0]), 1 << 17)


@pytest.mark.parametrize("bad,match", [
    (_stream(2, 4096, [1, 1, 1], [2], b"\x00"), "Kraft"),                   # over-subscribed
    (_stream(2, 4096, [25, 1], [2], b"\x00"), "exceeds 24"),                # too long
    (_stream(2, 4096, [0, 0], [2], b"\x00"), "no code lengths"),            # nothing to decode with
    (_stream(2, 4096, [1, 1], [3], b"\x00"), "chunk 0 has 3 bits"),         # chunk longer than possible
    (_stream(2, 4096, [1, 2], [3], b"\x00"), "padding|left over|no code"),  # incomplete code
    (_stream(2, 4096, [1, 1], [2], b""), "payload"),                        # truncated
    (_stream(2, 4096, [1, 1], [2], b"\x01"), "padding"),                    # nonzero padding bits
    (_stream(2, 0, [1, 1], [], b""), "chunk size"),
    (_stream(2 ** 63, 1, [1, 1], [], b""), "chunk table"),                 # inflated count
    (_stream(2, 4096, [1] * 5, [2], b"\x00"), "code lengths for an alphabet"),
])
def test_decode_rejects_malformed_streams(C, bad, match):
    with pytest.raises(C.CorruptFileError, match=match):
        C.huffman_decode(bad, 4)
    assert issubclass(C.CorruptFileError, ValueError)
    assert issubclass(CorruptFileError, ValueError)


if given is not None:
    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.integers(0, 40), max_size=600), st.sampled_from([1, 3, 64, 4096]))
    def test_property_cpp_equals_reference(symbols, chunk):
        C = _native.cpu()
        alphabet = 41
        freqs = np.bincount(np.asarray(symbols, np.int64), minlength=alphabet).tolist()
        assert list(C.huffman_code_lengths(freqs)) == ref.code_lengths(freqs)
        data = C.huffman_encode(torch.tensor(symbols, dtype=torch.int64), alphabet, chunk)
        assert data == ref.encode_stream(symbols, alphabet, chunk)
        assert C.huffman_decode(data, alphabet)[0].tolist() == symbols


def test_entropy_helper_matches_numpy():
    sym = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([2, 1, 3]) / 6
    assert math.isclose(ref.entropy_bits(sym), -6 * float((p * np.log2(p)).sum()))
