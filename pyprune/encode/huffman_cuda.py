"""Decoding a ``.ppz`` Huffman stream record (``docs/format.md``) on a CUDA GPU.

The record is parsed and validated on the host by the same C++ as the CPU decoder
(``pyprune._C.huffman_parse``); the payload and chunk offsets go to the GPU, where
``pyprune._C_cuda`` decodes one chunk per thread with the canonical lookup table in
shared memory (``csrc/cuda/huffman_kernel.cu``, per-chunk code in
``csrc/common/huffman_chunk.h``). The symbols and the errors are those of
``pyprune._C.huffman_decode``.
"""

from __future__ import annotations

import torch

from .ppz import CorruptFileError

__all__ = ["decode_stream_cuda"]

_DTYPES = {torch.int32: "int32", torch.uint16: "uint16"}


def decode_stream_cuda(data: bytes | bytearray | memoryview, alphabet: int, *,
                       device: torch.device | str | int | None = None,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Decode the Huffman stream record at the start of ``data`` on a GPU.

    Args:
        data: the record's bytes (trailing bytes after it are ignored), as for
            ``pyprune._C.huffman_decode``.
        alphabet: the stream's alphabet size (the section defines it; it is not stored).
        device: the CUDA device (default: the current one).
        dtype: ``torch.int32`` or ``torch.uint16``.

    Returns:
        A 1-D tensor of the ``n`` symbols on ``device``, equal to the CPU decoder's.

    Raises:
        CorruptFileError: the record is malformed (same messages as the CPU decoder).
        ImportError: ``pyprune._C_cuda`` is not built.
        RuntimeError: no usable CUDA device.
        ValueError: ``dtype`` is not supported.
    """
    from pyprune import _native

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.int32 or torch.uint16, not {dtype}")
    C, G = _native.cpu(), _native.cuda(required=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device must be a CUDA device, not {dev}")
    try:
        p = C.huffman_parse(data, alphabet)
        return G.huffman_decode(p["payload"].to(dev), p["chunk_offsets"].to(dev), p["lengths"], p["n_symbols"],
                                p["chunk_symbols"], p["padding_ok"], p["what"], _DTYPES[dtype])
    except (C.CorruptFileError, G.CorruptFileError) as exc:
        raise CorruptFileError(str(exc)) from None
