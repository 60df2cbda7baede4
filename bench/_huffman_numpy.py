"""A NumPy Huffman stream decoder, the baseline of bench/huffman.py.

Table-driven and vectorised where the work allows it: per chunk, the code starting at
every bit position is decoded at once (24-bit windows, an 11-bit lookup table, then a
vectorised canonical search for the longer codes). Only the walk from one code to the
next is sequential, a Python loop over plain lists. The record is parsed and validated by
``pyprune._C.huffman_parse``; codes come from the Python reference
(``pyprune.encode.huffman_ref.canonical_codes``). Valid streams only: it does not check
what the C++ decoder checks.
"""

from __future__ import annotations

import numpy as np

from pyprune.encode import huffman_ref as ref

LUT_BITS = 11
WINDOW = 24  # the longest code


def _tables(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, np.ndarray]]]:
    """11-bit table (symbol, length; length 0 = longer code) and, per longer length,
    (length, first code, count, symbols in code order)."""
    codes = np.asarray(ref.canonical_codes(lengths.tolist()), np.int64)
    lut_sym = np.zeros(1 << LUT_BITS, np.int64)
    lut_len = np.zeros(1 << LUT_BITS, np.int64)
    long_codes = []
    for length in range(1, WINDOW + 1):
        syms = np.flatnonzero(lengths == length)
        if not len(syms):
            continue
        if length <= LUT_BITS:
            span = 1 << (LUT_BITS - length)
            starts = codes[syms] << (LUT_BITS - length)
            idx = (starts[:, None] + np.arange(span)).ravel()
            lut_sym[idx] = np.repeat(syms, span)
            lut_len[idx] = length
        else:
            long_codes.append((length, int(codes[syms[0]]), len(syms), syms))  # consecutive codes
    return lut_sym, lut_len, long_codes


def decode(parsed: dict, limit: int | None = None) -> np.ndarray:
    """The symbols of a stream parsed by ``pyprune._C.huffman_parse`` (its first ``limit``
    symbols, whole chunks, when given)."""
    n, chunk = parsed["n_symbols"], parsed["chunk_symbols"]
    if limit is not None:
        n = min(n, -(-limit // chunk) * chunk)
    lut_sym, lut_len, long_codes = _tables(parsed["lengths"].numpy())
    bits = np.unpackbits(parsed["payload"].numpy())
    offsets = parsed["chunk_offsets"].numpy()
    out = np.empty(n, np.int64)
    for c in range(-(-n // chunk)):
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        b = np.concatenate([bits[lo:hi], np.zeros(WINDOW, np.uint8)]).astype(np.int64)
        m = hi - lo
        window = np.zeros(m, np.int64)  # the 24 bits starting at every position
        for k in range(WINDOW):
            window = (window << 1) | b[k:k + m]
        head = window >> (WINDOW - LUT_BITS)
        sym, length = lut_sym[head], lut_len[head]
        for ln, first, count, syms in long_codes:
            v = window >> (WINDOW - ln)
            hit = (length == 0) & (v >= first) & (v < first + count)
            sym[hit] = syms[v[hit] - first]
            length[hit] = ln
        # The sequential part: each code starts where the previous ended.
        sym_at, len_at = sym.tolist(), length.tolist()
        count_c = min(chunk, n - c * chunk)
        dst = [0] * count_c
        pos = 0
        for i in range(count_c):
            dst[i] = sym_at[pos]
            pos += len_at[pos]
        if pos != m:
            raise ValueError(f"chunk {c} does not end at its bit length")
        out[c * chunk:c * chunk + count_c] = dst
    return out
