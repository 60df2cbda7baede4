"""The ``.ppz`` container of deep compression: pack and unpack tensors without pickle.

The byte layout is specified in ``docs/format.md``; encoding and decoding run in C++
(``csrc/cpu/ppz.cpp``, ``csrc/cpu/huffman.cpp``), with a pure-Python reference in
:mod:`pyprune.encode.huffman_ref` for tests.

* :func:`pack` writes a manifest (any JSON object) and tensors, as container version 2:
  the manifest and the tensor table zlib-compressed in one head, then the sections
  (``version=1`` writes the old layout, for tests and older readers). Each tensor is stored in whichever encoding is smallest: raw bytes (any dtype,
  kept exactly), CSR over the flattened kernel with Huffman-coded relative column gaps
  and raw float32 values, or, for a tensor with a codebook, the dense code stream or CSR
  with a Huffman-coded index stream. Atomic; refuses to overwrite unless ``force``.
* :func:`unpack` returns ``(manifest, {name: tensor})`` bit for bit as packed (-0.0 and
  NaN payloads included), from a version 1 or 2 file; ``manifest["tensors"]`` is the
  tensor table either way. The file is untrusted input: it never unpickles, and any
  corruption raises :class:`CorruptFileError` naming the section.
* :func:`inspect` reports per tensor how it is stored, stream by stream, with the Shannon
  entropy of each Huffman stream next to its coded size.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from .. import files
from ..files import atomic_write

__all__ = ["DTYPES", "ENCODINGS", "MAGIC", "PARTS", "VERSION", "VERSIONS", "CorruptFileError", "DecodedSizeError",
           "TableRow", "byte_budget", "default_max_bytes", "fp32_bytes", "inspect", "inspect_bytes", "is_ppz",
           "pack", "pack_bytes", "table_bytes", "unpack", "unpack_bytes"]

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"\x89PPZ\r\n\x1a\n"
VERSION = 2  # written by default; version 1 files are still read
VERSIONS = (1, 2)
HEADER_BYTES = 32
ENCODINGS = ("raw", "dense_q", "csr_q", "csr_f32", "raw_z")  # index = the code in the file
DEFAULT_GAP_BITS = (2, 3, 4, 5, 6, 7, 8)
MAX_GAP_BITS = 8
MAX_CODEBOOK = 65535
DEFAULT_CHUNK = 4096

# dtype code in the file -> torch dtype
DTYPES: dict[int, torch.dtype] = {
    0: torch.float32, 1: torch.float64, 2: torch.float16, 3: torch.bfloat16, 4: torch.uint8, 5: torch.int8,
    6: torch.int16, 7: torch.int32, 8: torch.int64, 9: torch.bool, 10: torch.complex64, 11: torch.complex128,
    12: torch.uint16, 13: torch.uint32, 14: torch.uint64,
}
_DTYPE_CODES = {d: c for c, d in DTYPES.items()}


def fp32_bytes(dtype: torch.dtype, numel: int) -> int:
    """A tensor's bytes in an uncompressed float32 model: floating-point elements at 4
    bytes each, others (counters, masks) at their own size. Every compression ratio
    pyprune reports divides a sum of these by a file's bytes."""
    return numel * (4 if dtype.is_floating_point else dtype.itemsize)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


class CorruptFileError(ValueError):
    """A ``.ppz`` file is malformed, truncated or hostile; the message names the section."""


class DecodedSizeError(CorruptFileError):
    """A ``.ppz`` file declares tensors larger than the bound it is read under (a
    decompression bomb, or an honest file that needs a higher bound)."""


def _C() -> Any:
    from pyprune import _native

    return _native.cpu()


def _threads(threads: int | None) -> int:
    return -1 if threads is None else max(1, int(threads))


# --------------------------------------------------------------------------- writing

def _gap_bits(gap_bits: int | Iterable[int] | None) -> list[int]:
    widths = list(DEFAULT_GAP_BITS) if gap_bits is None else [gap_bits] if isinstance(gap_bits, int) else list(gap_bits)
    if not widths or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_GAP_BITS for b in widths):
        raise ValueError(f"gap_bits must be an int in [1, {MAX_GAP_BITS}] or a non-empty sequence of them, "
                         f"got {gap_bits!r}")
    return widths


def _prepare(name: object, t: object) -> torch.Tensor:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    try:
        if len(name.encode("utf-8")) > 0xFFFF:
            raise ValueError(f"tensor name {name[:40]!r}... is longer than 65535 UTF-8 bytes")
    except UnicodeEncodeError as exc:
        raise ValueError(f"tensor name {name!r} is not encodable as UTF-8: {exc}") from exc
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"tensor {name!r}: only dense (strided) tensors can be packed, not {t.layout}")
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"tensor {name!r}: dtype {t.dtype} is not supported; supported: "
                         f"{', '.join(_dtype_name(d) for d in _DTYPE_CODES)}")
    if t.dim() > 8:
        raise ValueError(f"tensor {name!r}: {t.dim()} dimensions, at most 8")
    return t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()


def _codebook(name: str, cb: object, t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise ValueError(f"tensor {name!r}: a codebook needs a float32 tensor, not {t.dtype}")
    cb = torch.as_tensor(cb).detach().to("cpu")
    if not cb.is_floating_point() or cb.dim() != 1:
        raise ValueError(f"codebook of {name!r} must be a 1-D floating tensor, got {cb.dtype} of shape "
                         f"{tuple(cb.shape)}")
    if cb.numel() > MAX_CODEBOOK:
        raise ValueError(f"codebook of {name!r} has {cb.numel()} entries, at most {MAX_CODEBOOK}")
    return cb.to(torch.float32).contiguous()


def pack_bytes(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
               codebooks: Mapping[str, torch.Tensor] | None = None, gap_bits: int | Iterable[int] | None = None,
               *, encodings: Mapping[str, str] | None = None, chunk_symbols: int = DEFAULT_CHUNK,
               version: int = VERSION) -> bytes:
    """The bytes :func:`pack` writes; see there."""
    if version not in VERSIONS:
        raise ValueError(f"container version must be one of {VERSIONS}, got {version!r}")
    if not isinstance(manifest, Mapping) or not all(isinstance(k, str) for k in manifest):
        raise ValueError("manifest must be a dict with string keys")
    if "tensors" in manifest:
        raise ValueError("manifest key 'tensors' is reserved: pack writes the tensor table there")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    codebooks = dict(codebooks or {})
    encodings = dict(encodings or {})
    for what, names in (("codebooks", codebooks), ("encodings", encodings)):
        unknown = [k for k in names if k not in tensors]
        if unknown:
            raise ValueError(f"{what} name tensors that are not packed: {unknown[:5]}")
    widths = _gap_bits(gap_bits)
    C = _C()
    sections, table = [], []
    for name, value in tensors.items():
        t = _prepare(name, value)
        cb = _codebook(name, codebooks[name], t) if name in codebooks else None
        forced = encodings.get(name)
        if forced is not None and forced not in ENCODINGS:
            raise ValueError(f"tensor {name!r}: unknown encoding {forced!r}; one of {', '.join(ENCODINGS)}")
        section, enc, _ = C.ppz_encode_section(
            name, _DTYPE_CODES[t.dtype], list(t.shape), t, cb, widths,
            -1 if forced is None else ENCODINGS.index(forced), chunk_symbols)
        sections.append(section)
        table.append({"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "encoding": ENCODINGS[enc]})
    # Version 1 repeats the sections' table in the JSON; version 2 keeps it only in binary.
    stored = {**manifest, "tensors": table} if version == 1 else dict(manifest)
    try:
        text = json.dumps(stored, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest must be plain JSON (no NaN/inf, no objects): {exc}") from exc
    return C.ppz_assemble(text.encode("utf-8"), sections, version)


def pack(path: PathLike, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
         codebooks: Mapping[str, torch.Tensor] | None = None, gap_bits: int | Iterable[int] | None = None,
         force: bool = False, *, encodings: Mapping[str, str] | None = None,
         chunk_symbols: int = DEFAULT_CHUNK) -> Path:
    """Write ``tensors`` and ``manifest`` to a ``.ppz`` file; returns the path.

    Args:
        manifest: a JSON object (e.g. the architecture from ``graph_json``, provenance).
            The key ``"tensors"`` is reserved: the file's manifest gets the tensor table
            ``[{"name", "dtype", "shape", "encoding"}]`` there.
        tensors: name -> tensor, any supported dtype (float32/64/16, bfloat16, the int and
            uint types, bool, complex64/128), any device; stored in this order.
        codebooks: name -> 1-D float codebook for quantized float32 tensors. Every element
            of such a tensor must be 0 or bitwise one of the codebook's float32 values
            (``ValueError`` otherwise); -0.0 is added to the stored codebook if present.
        gap_bits: CSR relative-index width b in [1, 8], or several to try per tensor;
            None tries 2..8. A gap longer than 2^b - 1 zeros costs a filler entry.
        force: overwrite an existing file.
        encodings: name -> one of ``ENCODINGS`` to force an encoding (tests, benchmarks);
            otherwise the smallest is chosen per tensor.
        chunk_symbols: symbols per independently decodable Huffman chunk.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
        ValueError: bad names, dtypes, codebooks or manifest.
    """
    if Path(path).exists() and not force:  # before the work of packing
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    data = pack_bytes(manifest, tensors, codebooks, gap_bits, encodings=encodings, chunk_symbols=chunk_symbols)
    return atomic_write(path, lambda f: f.write(data), force=force)


# --------------------------------------------------------------------------- reading

def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"manifest: not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"manifest: a JSON {type(manifest).__name__}, not an object")
    return manifest


def _name(raw: bytes, index: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptFileError(f"section {index}: tensor name {raw[:80]!r} is not UTF-8") from None


def _with_table(manifest: dict[str, Any], rows: list[dict[str, Any]], layout: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its ``tensors`` table: checked against the sections in version 1,
    which stores both; made from them in version 2, which stores the table once."""
    if layout["version"] == 1:
        if manifest.get("tensors") != rows:
            raise CorruptFileError("manifest: its 'tensors' table does not match the file's sections")
        return manifest
    if "tensors" in manifest:
        raise CorruptFileError("manifest: a 'tensors' key, which version 2 keeps in the head's table")
    return {**manifest, "tensors": rows}


def _read(path: PathLike) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f".ppz file not found: {p}")
    return p.read_bytes()


# Decoded bytes a file may declare without being asked for more: this many times its
# own size, and at least MIN_DECODED_CAP. An honest model decodes to ~10-600x its file
# (a 99%-sparse layer of 2-bit codes is the high end); a file that declares far more
# is a decompression bomb, and is refused before anything is allocated.
DECODED_PER_FILE_BYTE = files.UNPACKED_PER_FILE_BYTE
MIN_DECODED_CAP = files.MIN_UNPACKED_BYTES


def default_max_bytes(file_bytes: int) -> int:
    """The decoded size a file of ``file_bytes`` may declare when no bound is given."""
    return max(MIN_DECODED_CAP, DECODED_PER_FILE_BYTE * int(file_bytes))


def _bound(max_bytes: int | None, data: bytes | bytearray | memoryview) -> int:
    return default_max_bytes(len(data)) if max_bytes is None else int(max_bytes)


@dataclass(frozen=True)
class TableRow:
    """One section as the file's table declares it, before anything is decoded."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def table_bytes(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], list[TableRow], int]:
    """The manifest, the declared tensors and their decoded size, from the file's bytes,
    with the structure validated and nothing decoded."""
    C = _C()
    try:
        raw_manifest, rows, decoded = C.ppz_table(data)
    except C.CorruptFileError as exc:
        raise CorruptFileError(str(exc)) from None
    return (_manifest(raw_manifest), [TableRow(_name(raw, i), DTYPES[code], tuple(shape))
                                      for i, (raw, code, shape) in enumerate(rows)], int(decoded))


def unpack_bytes(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None,
                 threads: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`unpack` on the file's bytes."""
    C = _C()
    try:
        raw_manifest, sections, layout = C.ppz_decode(data, _threads(threads), _bound(max_bytes, data))
    except C.CorruptFileError as exc:
        raise CorruptFileError(str(exc)) from None
    except ValueError as exc:  # the decoded size is over the bound
        raise DecodedSizeError(str(exc).replace("ppz: ", "")) from None
    manifest = _manifest(raw_manifest)
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for i, (raw_name, code, shape, enc, buf) in enumerate(sections):
        name = _name(raw_name, i)
        dtype = DTYPES[code]
        tensors[name] = buf.view(dtype).reshape(shape)
        rows.append({"name": name, "dtype": _dtype_name(dtype), "shape": shape, "encoding": ENCODINGS[enc]})
    return _with_table(manifest, rows, layout), tensors


def unpack(path: PathLike, *, max_bytes: int | None = None,
           threads: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a ``.ppz`` file: ``(manifest, {name: tensor})``, tensors on the CPU in file order.

    The manifest is returned as stored, including the ``"tensors"`` table :func:`pack`
    added. Tensors are bit-identical to what was packed.

    Args:
        max_bytes: refuse (:class:`DecodedSizeError`) a file whose tensors decode to more
            bytes than this, checked before anything is allocated. Default:
            :func:`default_max_bytes` of the file's size.
        threads: decoder threads (default: OpenMP's maximum).

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: anything wrong with the file, naming the section.
    """
    try:
        return unpack_bytes(_read(path), max_bytes=max_bytes, threads=threads)
    except DecodedSizeError as exc:
        raise DecodedSizeError(f"{path}: {exc}") from None


def _stream(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if d is None:
        return None
    n = d["symbols"]
    return {**d, "bits_per_symbol": d["payload_bits"] / n if n else 0.0,
            "entropy_per_symbol": d["entropy_bits"] / n if n else 0.0}


def inspect_bytes(data: bytes | bytearray | memoryview, *, threads: int | None = None,
                  max_bytes: int | None = None) -> dict[str, Any]:
    """:func:`inspect` on the file's bytes."""
    C = _C()
    try:
        raw_manifest, file_bytes, sections, layout = C.ppz_inspect(data, _threads(threads), _bound(max_bytes, data))
    except C.CorruptFileError as exc:
        raise CorruptFileError(str(exc)) from None
    except ValueError as exc:
        raise DecodedSizeError(str(exc).replace("ppz: ", "")) from None
    manifest = _manifest(raw_manifest)
    rows, table = [], []
    for i, s in enumerate(sections):
        name = _name(s["name"], i)
        dtype = DTYPES[s["dtype"]]
        k = s["codebook_size"]
        gaps, codes = _stream(s["gaps"]), _stream(s["codes"])
        rows.append({
            "name": name, "shape": s["shape"], "dtype": _dtype_name(dtype), "encoding": s["encoding"],
            "numel": s["numel"], "nnz": s["nnz"], "density": s["nnz"] / s["numel"] if s["numel"] else 0.0,
            "entries": s["entries"], "fillers": s["fillers"], "gap_bits": s["gap_bits"],
            "codebook_size": k, "code_bits": None if k is None else math.ceil(math.log2(k)) if k > 1 else 0,
            "bytes": s["section_bytes"], "fp32_bytes": fp32_bytes(dtype, s["numel"]),
            "dense_bytes": s["numel"] * s["itemsize"],
            "header_bytes": s["header_bytes"], "codebook_bytes": s["codebook_bytes"],
            "rowcount_bytes": s["rowcount_bytes"], "gap_bytes": gaps["bytes"] if gaps else 0,
            "code_bytes": codes["bytes"] if codes else 0, "values_bytes": s["values_bytes"],
            "raw_bytes": s["raw_bytes"], "deflate_bytes": s["deflate_bytes"], "gaps": gaps, "codes": codes,
        })
        table.append({"name": name, "dtype": _dtype_name(dtype), "shape": s["shape"], "encoding": s["encoding"]})
    manifest = _with_table(manifest, table, layout)
    keys = ("numel", "nnz", "entries", "fillers", "bytes", "fp32_bytes", "dense_bytes", "header_bytes",
            "codebook_bytes", "rowcount_bytes", "gap_bytes", "code_bytes", "values_bytes", "raw_bytes",
            "deflate_bytes")
    total: dict[str, Any] = {k: sum(r[k] for r in rows) for k in keys}
    for stream in ("gaps", "codes"):
        present = [r[stream] for r in rows if r[stream]]
        total[f"{stream}_payload_bits"] = sum(s["payload_bits"] for s in present)
        total[f"{stream}_entropy_bits"] = sum(s["entropy_bits"] for s in present)
    total.update(tensors=len(rows), density=total["nnz"] / total["numel"] if total["numel"] else 0.0,
                 file_bytes=file_bytes, version=layout["version"], manifest_bytes=len(raw_manifest),
                 head_bytes=layout["head_bytes"], table_bytes=layout["table_bytes"],
                 overhead_bytes=file_bytes - total["bytes"],
                 compression=total["fp32_bytes"] / file_bytes if file_bytes else 0.0)
    total["parts"] = byte_budget(rows, total, layout)
    original = (manifest.get("meta") or {}).get("original_fp32_bytes") if isinstance(manifest.get("meta"), dict) \
        else None
    if isinstance(original, int) and not isinstance(original, bool) and original > 0:
        total.update(original_fp32_bytes=original, compression_vs_original=original / file_bytes)
    return {"tensors": rows, "total": total, "manifest": manifest}


# The parts of a file, in the order inspect and report.md list them.
PARTS = ("manifest and table", "code streams", "index streams", "codebooks", "vectors", "raw tensors",
         "container overhead")


def is_vector(row: Mapping[str, Any]) -> bool:
    """A tensor of at most one dimension: BatchNorm vectors, biases, scales, counters."""
    return len(row["shape"]) <= 1


def byte_budget(rows: list[dict[str, Any]], total: Mapping[str, Any], layout: Mapping[str, Any]) -> dict[str, int]:
    """Where a file's bytes are, summing to its size: the manifest and the tensor table
    (version 2: the compressed head; version 1: the JSON, the directory and the section
    headers), Huffman code streams (quantized codes, CSR codebook indices), index
    streams (CSR gaps and row counts), codebooks, small vectors (BatchNorm, biases,
    scales), other tensors stored whole (raw, raw_z, csr_f32 values), and the rest:
    the file header, CRCs and the fixed fields of sections."""
    def stored_whole(r: Mapping[str, Any]) -> int:
        return r["raw_bytes"] + r["deflate_bytes"] + r["values_bytes"]

    if layout["version"] == 1:
        table = layout["manifest_bytes"] + 4 + layout["table_bytes"] + sum(r["header_bytes"] for r in rows)
    else:
        table = layout["head_bytes"]
    parts = {"manifest and table": table,
             "code streams": sum(r["code_bytes"] for r in rows),
             "index streams": sum(r["gap_bytes"] + r["rowcount_bytes"] for r in rows),
             "codebooks": sum(r["codebook_bytes"] for r in rows),
             "vectors": sum(stored_whole(r) for r in rows if is_vector(r)),
             "raw tensors": sum(stored_whole(r) for r in rows if not is_vector(r))}
    parts["container overhead"] = total["file_bytes"] - sum(parts.values())
    return parts


def inspect(path: PathLike, *, threads: int | None = None, max_bytes: int | None = None) -> dict[str, Any]:
    """How each tensor of a ``.ppz`` file is stored (decoding and validating all of it).

    Returns ``{"tensors": [row, ...], "total": {...}, "manifest": {...}}``. A row has
    ``name, shape, dtype, encoding`` (raw / dense_q / csr_q / csr_f32), ``numel, nnz,
    density`` (elements whose bytes are not all zero), ``entries, fillers, gap_bits``
    (CSR), ``codebook_size, code_bits`` (ceil log2 of the codebook size), ``bytes`` (the
    section), ``fp32_bytes`` (numel * 4), ``dense_bytes`` (numel * itemsize), the bytes of
    each part (``header_bytes, codebook_bytes, rowcount_bytes, gap_bytes, code_bytes,
    values_bytes, raw_bytes``) and, per Huffman stream (``gaps``, ``codes``: the dense code
    or CSR index stream), ``symbols, alphabet, used_symbols, max_code_length, chunks,
    payload_bits, entropy_bits, bits_per_symbol, entropy_per_symbol``, byte counts and
    ``offset`` (where the stream record starts in the file, to decode it on its own).
    ``total`` sums them and adds ``file_bytes, manifest_bytes, overhead_bytes`` and
    ``compression`` (fp32 bytes / file bytes).

    Raises:
        CorruptFileError: as :func:`unpack`.
        DecodedSizeError: the tensors decode to more than ``max_bytes`` (as :func:`unpack`).
    """
    try:
        return inspect_bytes(_read(path), threads=threads, max_bytes=max_bytes)
    except DecodedSizeError as exc:
        raise DecodedSizeError(f"{path}: {exc} (--max-decoded-mb raises the bound)") from None


def is_ppz(path: PathLike) -> bool:
    """True if ``path`` starts with a valid ``.ppz`` header (magic and header CRC, any version)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return False
    return (len(head) == HEADER_BYTES and head[:8] == MAGIC
            and zlib.crc32(head[:28]) == struct.unpack_from("<I", head, 28)[0])
