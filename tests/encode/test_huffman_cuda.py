"""The CUDA Huffman decoder (pyprune.encode.huffman_cuda) against the CPU one: random
streams of several alphabets and skews, codes of every length, a real model's streams,
corrupt streams. GPU tests skip without a CUDA device; the argument checks run anywhere
the extension is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyprune import _native
from tests.conftest import needs_gpu
from pyprune.encode.huffman_cuda import decode_stream_cuda
from pyprune.encode.ppz import CorruptFileError

from .huffman_streams import EVERY_LENGTH, encode_with_lengths, model_streams, mutants, sample, spread, stream_cases

C = _native.cpu()


@pytest.fixture(scope="module")
def G(C_cuda):
    return C_cuda


def cpu_outcome(data: bytes, alphabet: int) -> tuple[str, object]:
    try:
        return "ok", C.huffman_decode(data, alphabet, 1)[0].tolist()
    except C.CorruptFileError as exc:
        return "corrupt", str(exc)


def cuda_outcome(data: bytes, alphabet: int, dtype: torch.dtype = torch.int32) -> tuple[str, object]:
    try:
        out = decode_stream_cuda(data, alphabet, dtype=dtype)
    except CorruptFileError as exc:
        return "corrupt", str(exc)
    assert out.is_cuda and out.dtype == dtype
    return "ok", out.cpu().to(torch.int64).tolist()


def test_extension_rejects_cpu_tensors(G):
    p = C.huffman_parse(C.huffman_encode(torch.tensor([1, 2, 3]), 4), 4)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        G.huffman_decode(p["payload"], p["chunk_offsets"], p["lengths"], p["n_symbols"], p["chunk_symbols"],
                         p["padding_ok"], p["what"])


def test_unsupported_dtype_is_rejected_before_any_device_work():
    with pytest.raises(ValueError, match="torch.int32 or torch.uint16"):
        decode_stream_cuda(b"", 4, dtype=torch.int64)


CASES = stream_cases()


@pytest.mark.parametrize("name,data,alphabet,symbols", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint16], ids=str)
@pytest.mark.usefixtures("G")
@pytest.mark.gpu
@needs_gpu
def test_matches_cpu_on_random_streams(name, data, alphabet, symbols, dtype):
    out = decode_stream_cuda(data, alphabet, dtype=dtype)
    assert out.is_cuda and out.dtype == dtype
    assert np.array_equal(out.cpu().to(torch.int64).numpy(), symbols)
    assert torch.equal(out.cpu().to(torch.int32), C.huffman_decode(data, alphabet, 1)[0])


@pytest.mark.parametrize("chunk", [1, 3, 8, 64, 4096])
@pytest.mark.usefixtures("G")
@pytest.mark.gpu
@needs_gpu
def test_every_code_length_and_chunk_size(chunk):
    rng = np.random.default_rng(chunk)
    for alphabet in (25, 600):
        lengths = spread(EVERY_LENGTH, alphabet)
        symbols = sample(lengths, 2000, rng, "mostly-short").tolist()
        data = encode_with_lengths(symbols, lengths, chunk)
        assert cuda_outcome(data, alphabet) == ("ok", symbols)


@pytest.mark.usefixtures("G")
@pytest.mark.gpu
@needs_gpu
def test_corrupt_streams_give_the_cpu_errors():
    rng = np.random.default_rng(11)
    lengths = spread(EVERY_LENGTH, 25)
    data = encode_with_lengths(sample(lengths, 400, rng, "mostly-short").tolist(), lengths, 50)
    rejected = 0
    for bad in mutants(data, rng, 200):
        expected = cpu_outcome(bad, 25)
        assert cuda_outcome(bad, 25) == expected
        rejected += expected[0] == "corrupt"
    assert rejected > 100


@pytest.mark.usefixtures("G")
@pytest.mark.gpu
@pytest.mark.shared
@needs_gpu
def test_matches_cpu_on_a_real_model(models_dir):
    streams = model_streams(models_dir)
    assert len(streams) > 10
    for name, record, alphabet in streams:
        expected = cpu_outcome(record, alphabet)
        assert expected[0] == "ok"
        assert cuda_outcome(record, alphabet) == expected, name
