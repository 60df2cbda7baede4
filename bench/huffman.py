"""Huffman decoding throughput on the streams of a real .ppz file.

Without ``--ppz`` the file is built first: the shared pretrained ResNet-56, passes
mask(sparsity=0.8) and quant(bits=5) without fine-tuning, packed by the .ppz writer.
Workloads, all from that file:

* its largest index stream and its largest gap stream, decoded as stored;
* all its Huffman streams, decoded one call each as stored (per-call setup included);
* all index symbols, and all gap symbols, concatenated into one stream each by the
  writer (real symbol statistics, long enough for the decoder to use threads: it
  decodes streams under 65536 symbols on one thread).

Decoders: pyprune's C++ decoder (pyprune._C.huffman_decode) with uint8, uint16 and
int32 output on 1 and 2 threads; the per-chunk code the CUDA decoder runs, compiled
for the CPU (huffman_decode_portable); the CUDA decoder when a GPU is present
(host-to-device copy and sync included); zlib.decompress of the same symbols as uint8
bytes (zlib level 6); and a NumPy decoder (bench/_huffman_numpy.py) on a subset.

Throughput is decoded symbols per second; MB/s counts 1 byte per symbol (the symbols
as uint8), so MB/s = Msym/s: the unit of the >= 300 MB/s single-thread target. Each
number is the median of ``--repeats`` timings in this process, each timing as many
calls as take >= 20 ms. OpenMP threads are passed to each call; torch uses 1 thread.

    python bench/huffman.py [--ppz FILE] [--repeats 7] [--numpy-symbols 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _huffman_numpy  # noqa: E402

from pyprune import _native  # noqa: E402
from pyprune.encode import huffman_ref as ref  # noqa: E402
from pyprune.encode.ppz import inspect_bytes  # noqa: E402

PIPELINE = "mask(sparsity=0.8),quant(bits=5)"


@dataclass
class Stream:
    name: str
    record: bytes
    alphabet: int
    symbols: np.ndarray  # uint8 or uint16, from the C++ decoder (checked against the others)
    entropy_bits: float  # Shannon entropy of its symbols (per stream, summed, for "all streams")


def build_ppz() -> bytes:
    from pyprune.api import load_model
    from pyprune.encode import ppz_bytes
    from pyprune.opt import OptConfig, optimize

    m = load_model(arch="resnet56", pretrained=True)
    r = optimize(m.module, m.mean, m.std, m.input_shape, OptConfig(pipeline=PIPELINE, eval_split=None))
    return ppz_bytes(r.graph_module, codebooks=r.codebooks())


def seconds_per_call(fn: Callable[[], object], repeats: int, min_seconds: float = 0.02) -> tuple[float, float]:
    """Medians over ``repeats`` timings of (wall seconds, process CPU seconds) per call."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - start) / calls)
        cpus.append((time.process_time() - cpu) / calls)
    return statistics.median(walls), statistics.median(cpus)


def file_streams(C, data: bytes) -> list[tuple[str, bytes, int, float]]:
    """(name, record, alphabet, entropy bits) of every Huffman stream in the file."""
    out = []
    for t in inspect_bytes(data)["tensors"]:
        for kind in ("gaps", "codes"):
            s = t[kind]
            if s:
                out.append((f"{t['name']} {'gap' if kind == 'gaps' else 'index'}",
                            data[s["offset"]:s["offset"] + s["bytes"]], s["alphabet"], s["entropy_bits"]))
    return out


def concatenated(C, name: str, parts: list[tuple[str, bytes, int, float]]) -> Stream:
    alphabet = max(p[2] for p in parts)
    symbols = torch.cat([C.huffman_decode(p[1], p[2], 1, "uint16")[0].to(torch.int64) for p in parts])
    record = C.huffman_encode(symbols, alphabet)
    return Stream(name, record, alphabet, symbols.numpy(), ref.entropy_bits(symbols.numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ppz", type=Path, help="a .ppz file (default: build ResNet-56 mask+quant)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--numpy-symbols", type=int, default=20000,
                    help="the NumPy decoder decodes only the first chunks holding this many symbols")
    args = ap.parse_args()
    torch.set_num_threads(1)
    C = _native.cpu()
    import pyprune

    print(f"pyprune from {Path(pyprune.__file__).parent}; torch {torch.__version__}, 1 torch thread; "
          "decoder threads passed to each call (OpenMP num_threads)")

    if args.ppz:
        data, source = args.ppz.read_bytes(), str(args.ppz)
    else:
        start = time.perf_counter()
        data, source = build_ppz(), f"ResNet-56 pretrained, {PIPELINE}, no fine-tuning"
        print(f"built the .ppz in {time.perf_counter() - start:.1f} s")
    parts = file_streams(C, data)
    index = [p for p in parts if p[0].endswith("index")]
    gaps = [p for p in parts if p[0].endswith("gap")]
    print(f"file: {source}, {len(data):,} bytes, {len(parts)} Huffman streams\n")

    def stored(p: tuple[str, bytes, int, float]) -> Stream:
        return Stream(f"largest {p[0]} stream", p[1], p[2], C.huffman_decode(p[1], p[2], 1, "uint16")[0].numpy(),
                      p[3])

    def stream_symbols(p) -> int:
        return C.huffman_parse(p[1], p[2])["n_symbols"]

    singles = [stored(max(group, key=stream_symbols)) for group in (index, gaps) if group]
    concat = [concatenated(C, "all index symbols, one stream", index)] if index else []
    concat += [concatenated(C, "all gap symbols, one stream", gaps)] if gaps else []

    # Stream statistics
    print("| stream | symbols | alphabet | encoded bytes | payload bits/symbol | entropy bits/symbol | "
          "zlib bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    all_n = sum(stream_symbols(p) for p in parts)
    all_bytes = sum(len(p[1]) for p in parts)
    all_payload = sum(C.huffman_parse(p[1], p[2])["chunk_offsets"][-1].item() for p in parts)
    all_h = sum(p[3] for p in parts)
    all_u8 = np.concatenate([C.huffman_decode(p[1], p[2], 1, "uint16")[0].numpy() for p in parts])
    for s in singles + concat:
        n = len(s.symbols)
        payload = C.huffman_parse(s.record, s.alphabet)["chunk_offsets"][-1].item()
        z = len(zlib.compress(s.symbols.astype(np.uint8).tobytes())) if s.alphabet <= 256 else "-"
        print(f"| {s.name} | {n:,} | {s.alphabet} | {len(s.record):,} | {payload / n:.3f} | "
              f"{s.entropy_bits / n:.3f} | {z:,} |")
    print(f"| all {len(parts)} streams as stored | {all_n:,} | 2..256 | {all_bytes:,} | {all_payload / all_n:.3f} | "
          f"{all_h / all_n:.3f} (each stream's own) | {len(zlib.compress(all_u8.astype(np.uint8).tobytes())):,} |")
    print("\nencoded bytes: whole stream records (header, code lengths, chunk table, payload); zlib: the "
          "symbols as uint8 bytes, zlib.compress level 6.\n")

    # Throughput
    G = _native.cuda() if torch.cuda.is_available() else None
    rows: list[tuple[str, str, str, int, float, float]] = []  # stream, decoder, threads, symbols, wall, CPU s

    def timed(stream: str, decoder: str, threads: str, n: int, fn: Callable[[], object]) -> None:
        rows.append((stream, decoder, threads, n, *seconds_per_call(fn, args.repeats)))

    for s in singles + concat:
        n, rec, a = len(s.symbols), s.record, s.alphabet
        for threads in (1, 2):
            for dtype in ("uint8", "uint16", "int32"):
                if dtype == "uint8" and a > 256:
                    continue
                out = C.huffman_decode(rec, a, threads, dtype)[0]
                assert np.array_equal(out.numpy(), s.symbols), (s.name, dtype)
                timed(s.name, f"C++ {dtype} out", str(threads), n,
                      lambda rec=rec, a=a, t=threads, d=dtype: C.huffman_decode(rec, a, t, d))
        assert np.array_equal(C.huffman_decode_portable(rec, a)[0].numpy(), s.symbols)
        timed(s.name, "C++ portable per-chunk code (the CUDA kernel's), uint16", "1", n,
              lambda rec=rec, a=a: C.huffman_decode_portable(rec, a))
        if G is not None:
            from pyprune.encode.huffman_cuda import decode_stream_cuda

            assert np.array_equal(decode_stream_cuda(rec, a).cpu().numpy(), s.symbols)
            timed(s.name, "CUDA int32 out (incl. H2D copy, sync)", "GPU", n,
                  lambda rec=rec, a=a: decode_stream_cuda(rec, a))
        if a <= 256:
            packed = zlib.compress(s.symbols.astype(np.uint8).tobytes())
            assert zlib.decompress(packed) == s.symbols.astype(np.uint8).tobytes()
            timed(s.name, "zlib.decompress (uint8 symbols)", "1", n, lambda packed=packed: zlib.decompress(packed))
        parsed = C.huffman_parse(rec, a)
        sub = _huffman_numpy.decode(parsed, args.numpy_symbols)
        assert np.array_equal(sub, s.symbols[:len(sub)])
        rows.append((s.name, f"NumPy decoder (first {len(sub):,} symbols)", "1", len(sub),
                     *np.median([_once(lambda: _huffman_numpy.decode(parsed, args.numpy_symbols))
                                 for _ in range(3)], axis=0)))

    for threads in (1, 2):
        for dtype in ("uint8", "uint16"):
            timed(f"all {len(parts)} streams as stored, one call each", f"C++ {dtype} out", str(threads), all_n,
                  lambda t=threads, d=dtype: [C.huffman_decode(p[1], p[2], t, d) for p in parts])

    print("| stream | decoder | threads | Msym/s | MB/s (1 B/symbol) | MB/s written | Msym per CPU-second |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    width = {"uint8": 1, "uint16": 2, "int32": 4}
    for stream, decoder, threads, n, wall, cpu in rows:
        rate = n / wall / 1e6
        w = next((v for k, v in width.items() if k in decoder), 1)
        print(f"| {stream} | {decoder} | {threads} | {rate:,.0f} | {rate:,.0f} | {rate * w:,.0f} | "
              f"{n / cpu / 1e6 if cpu > 0 else float('nan'):,.0f} |")
    print("\nMB/s (1 B/symbol) = Msym/s: the unit of the target. MB/s written: bytes of the output dtype "
          "(uint8 1, uint16 2, int32 4 per symbol). Msym per CPU-second: symbols over the process's CPU time "
          "(all threads), which other jobs on the machine disturb less than the wall clock. The decoder uses "
          "threads only for streams of >= 65536 symbols: the other 2-thread rows decode on one.")
    if G is None:
        why = "no CUDA device" if not torch.cuda.is_available() else "pyprune._C_cuda is not built"
        print(f"\nCUDA: skipped ({why}).")


def _once(fn: Callable[[], object]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


if __name__ == "__main__":
    main()
