"""The CPU Huffman decoders against each other and the Python reference: the multi-symbol
fast path with int32, uint16 and uint8 output, and the portable per-chunk code the CUDA
decoder runs (pyprune._C.huffman_decode_portable). Same symbols, same errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from pyprune import _native
from pyprune.encode import huffman_ref as ref
from pyprune.encode.ppz import inspect_bytes, pack_bytes

from .huffman_streams import EVERY_LENGTH, encode_with_lengths, model_streams, mutants, sample, spread, stream_cases

C = _native.cpu()

# name -> decode(record, alphabet, threads) -> tensor
DECODERS = {
    "int32": lambda d, a, t: C.huffman_decode(d, a, t)[0],
    "uint16": lambda d, a, t: C.huffman_decode(d, a, t, "uint16")[0],
    "uint8": lambda d, a, t: C.huffman_decode(d, a, t, "uint8")[0],
    "portable": lambda d, a, t: C.huffman_decode_portable(d, a)[0],
}
OUT_DTYPES = {"int32": torch.int32, "uint16": torch.uint16, "uint8": torch.uint8, "portable": torch.uint16}


def decoders_for(alphabet: int) -> list[str]:
    return [k for k in DECODERS if k != "uint8" or alphabet <= 256]


def outcome(decoder: str, data: bytes, alphabet: int, threads: int = 1) -> tuple[str, object]:
    try:
        return "ok", DECODERS[decoder](data, alphabet, threads).to(torch.int64).tolist()
    except C.CorruptFileError as exc:
        return "corrupt", str(exc)


CASES = stream_cases()


@pytest.mark.parametrize("name,data,alphabet,symbols", CASES, ids=[c[0] for c in CASES])
def test_every_decoder_returns_the_symbols(name, data, alphabet, symbols):
    for decoder in decoders_for(alphabet):
        for threads in (1, 2):
            out = DECODERS[decoder](data, alphabet, threads)
            assert out.dtype == OUT_DTYPES[decoder]
            assert np.array_equal(out.to(torch.int64).numpy(), symbols), (decoder, threads)
    assert C.huffman_decode(data, alphabet, 1, "uint16")[1] == len(data)


@pytest.mark.parametrize("name,data,alphabet,symbols", [c for c in CASES if "every-length" in c[0]],
                         ids=[c[0] for c in CASES if "every-length" in c[0]])
def test_every_length_streams_match_the_reference(name, data, alphabet, symbols):
    parsed = C.huffman_parse(data, alphabet)["lengths"].tolist()
    used = sorted(l for l in parsed if l)
    assert used == sorted(EVERY_LENGTH)
    assert any(parsed[s] > 11 for s in symbols)  # codes past the 11-bit table occur
    assert ref.decode_stream(data, alphabet) == (symbols.tolist(), len(data))


# Streams shorter than this decode one code at a time (kMultiMinSymbols in huffman.cpp).
SHORT, LONG = 400, 4500


@pytest.mark.parametrize("n", [SHORT, LONG])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 8, 9, 13, 4096])
@pytest.mark.parametrize("alphabet", [25, 600])
def test_chunk_sizes_around_the_store_width(chunk, alphabet, n):
    # The fast loop stops 3..8 symbols before a chunk's end (the width of its stores) and
    # finishes one code at a time: chunk sizes around those widths hit every split.
    rng = np.random.default_rng(chunk * alphabet + n)
    lengths = spread(EVERY_LENGTH, alphabet)
    symbols = sample(lengths, n, rng, "mostly-short")
    data = encode_with_lengths(symbols.tolist(), lengths, chunk)
    assert ref.decode_stream(data, alphabet)[0] == symbols.tolist()
    for decoder in decoders_for(alphabet):
        assert outcome(decoder, data, alphabet) == ("ok", symbols.tolist()), decoder


def _streams_to_corrupt(n: int) -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(5)
    out = []
    for alphabet in (25, 600):
        lengths = spread(EVERY_LENGTH, alphabet)
        out.append((f"every-length-{alphabet}", encode_with_lengths(sample(lengths, n, rng, "mostly-short").tolist(),
                                                                   lengths, 37), alphabet))
    s = rng.choice(16, n, p=np.array([0.6] + [0.4 / 15] * 15))
    out.append(("skewed-16", C.huffman_encode(torch.from_numpy(s), 16, 64), 16))
    return out


def _check_corruptions(data: bytes, alphabet: int, count: int, against_reference: bool) -> None:
    rng = np.random.default_rng(len(data))
    corrupt = 0
    for bad in mutants(data, rng, count):
        first = outcome("int32", bad, alphabet)
        for decoder in decoders_for(alphabet):
            assert outcome(decoder, bad, alphabet) == first, decoder
            assert outcome(decoder, bad, alphabet, 2) == first, decoder
        if first[0] == "corrupt":
            corrupt += 1
            assert "stream" in first[1]  # names the record ("stream: ...") or the stream
        if first[0] == "ok" or against_reference:
            try:
                expected = ("ok", ref.decode_stream(bad, alphabet)[0])
            except (ValueError, IndexError, struct.error):
                expected = None
            if first[0] == "ok":
                assert expected == first  # accepted: exactly what the reference reads
            else:
                # Rejected by the reference too, except for what it does not check.
                assert expected is None or "padding in code-length table" in first[1], first[1]
    assert corrupt > count // 2


SHORT_STREAMS, LONG_STREAMS = _streams_to_corrupt(SHORT), _streams_to_corrupt(LONG)


@pytest.mark.parametrize("name,data,alphabet", SHORT_STREAMS, ids=[s[0] for s in SHORT_STREAMS])
def test_corruptions_give_the_same_outcome_everywhere(name, data, alphabet):
    _check_corruptions(data, alphabet, 300, against_reference=True)


@pytest.mark.parametrize("name,data,alphabet", LONG_STREAMS, ids=[s[0] for s in LONG_STREAMS])
def test_corruptions_of_long_streams_give_the_same_outcome_everywhere(name, data, alphabet):
    # The multi-symbol path against the one-code-at-a-time ones (the reference is slow
    # here: it checks only what the decoders accept).
    _check_corruptions(data, alphabet, 150, against_reference=False)


def test_output_dtype_errors():
    data = C.huffman_encode(torch.tensor([0, 300, 5]), 301)
    with pytest.raises(ValueError, match="at most 256"):
        C.huffman_decode(data, 301, 1, "uint8")
    with pytest.raises(ValueError, match="dtype must be"):
        C.huffman_decode(data, 301, 1, "int64")
    assert C.huffman_decode(data, 301, 1, "uint16")[0].tolist() == [0, 300, 5]


def test_inspect_offsets_locate_each_stream():
    gen = torch.Generator().manual_seed(3)
    cb = torch.randn(7, generator=gen)
    w = torch.where(torch.rand(64, 90, generator=gen) < 0.3, cb[torch.randint(0, 7, (64, 90), generator=gen)],
                    torch.zeros(()))
    data = pack_bytes({}, {"w": w, "d": cb[torch.randint(0, 7, (50,), generator=gen)]}, {"w": cb, "d": cb},
                      encodings={"w": "csr_q", "d": "dense_q"}, chunk_symbols=128)
    _, tensors = ref.read_ppz(data)
    rows = {r["name"]: r for r in inspect_bytes(data)["tensors"]}
    checked = 0
    for t in tensors:
        for kind, symbols in (("gaps", t.gap_symbols), ("codes", t.code_symbols)):
            s = rows[t.name][kind]
            if s is None:
                continue
            out, used = C.huffman_decode(data[s["offset"]:], s["alphabet"])
            assert used == s["bytes"]
            assert out.tolist() == symbols
            checked += 1
    assert checked == 3


@pytest.mark.shared
def test_real_model_streams(models_dir):
    streams = model_streams(models_dir)
    assert len(streams) > 10
    for name, record, alphabet in streams:
        symbols = ref.decode_stream(record, alphabet)[0]
        for decoder in decoders_for(alphabet):
            assert outcome(decoder, record, alphabet) == ("ok", symbols), (name, decoder)
