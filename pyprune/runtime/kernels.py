"""Sparse kernels for inference: the CSR weight format and thin wrappers over the
native kernels of ``pyprune._C``.

A weight of shape ``(OC, *rest)`` is stored as a CSR matrix with one row per output
channel and ``prod(rest)`` columns: for a convolution the column of weight
``[oc, ic, kh, kw]`` is ``(ic * KH + kh) * KW + kw``, the row-major flattening. Only
non-zero values are stored (a ``-0.0`` counts as zero and comes back as ``+0.0``).

The wrappers call ``pyprune._C.sparse_conv2d`` / ``sparse_linear`` when the built
extension has them, else :func:`reference_conv2d` / :func:`reference_linear`, which
rebuild the dense weight and call ``F.conv2d`` / ``F.linear``. The references stay
as the independent expectation the native kernels are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from .. import _native

Pair = tuple[int, int]


@dataclass(frozen=True)
class CSR:
    """A weight ``(OC, *rest)`` as CSR: ``rowptr`` int32 ``[OC+1]``, ``colidx`` int32
    ``[nnz]`` (ascending within a row), ``values`` float32 ``[nnz]``; ``shape`` is the
    dense weight's shape, so ``kernel_size`` is ``shape[2:]`` for a convolution."""

    rowptr: torch.Tensor
    colidx: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    FIELDS = ("rowptr", "colidx", "values")  # what kernel_args() returns

    def __post_init__(self) -> None:
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        if self.rowptr.dtype != torch.int32 or self.colidx.dtype != torch.int32:
            raise ValueError("CSR rowptr and colidx must be int32")
        if self.values.dtype != torch.float32:
            raise ValueError(f"CSR values must be float32, got {self.values.dtype}")
        if self.rowptr.shape != (rows + 1,) or self.colidx.shape != self.values.shape or self.values.dim() != 1:
            raise ValueError(f"inconsistent CSR for shape {self.shape}: rowptr {tuple(self.rowptr.shape)}, "
                             f"colidx {tuple(self.colidx.shape)}, values {tuple(self.values.shape)}")
        if int(self.rowptr[-1]) != self.values.numel() or (self.colidx.numel() and int(self.colidx.max()) >= cols):
            raise ValueError(f"CSR indices out of range for shape {self.shape}")

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "CSR":
        """Exact CSR of a float32 weight of at least 2 dimensions (``to_dense`` gives it
        back bit for bit, but for the sign of zeros)."""
        if weight.dim() < 2:
            raise ValueError(f"CSR needs a weight with at least 2 dimensions, got shape {tuple(weight.shape)}")
        if weight.dtype != torch.float32:
            raise ValueError(f"CSR stores float32 weights, got {weight.dtype}")
        matrix = weight.detach().cpu().reshape(weight.shape[0], -1)
        if matrix.numel() >= 2**31:
            raise ValueError(f"weight of {matrix.numel()} elements does not fit int32 CSR indices")
        nonzero = matrix != 0
        rowptr = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(nonzero.sum(1), 0, out=rowptr[1:])
        # nonzero() lists indices in row-major order, which is the CSR order.
        colidx = nonzero.nonzero()[:, 1]
        return cls(rowptr.to(torch.int32), colidx.to(torch.int32).contiguous(),
                   matrix[nonzero].contiguous(), tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        rows = self.shape[0]
        counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
        row_of = torch.repeat_interleave(torch.arange(rows), counts)
        matrix = torch.zeros(rows, math.prod(self.shape[1:]), dtype=torch.float32)
        matrix[row_of, self.colidx.long()] = self.values
        return matrix.reshape(self.shape)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(math.prod(self.shape), 1)

    @property
    def nbytes(self) -> int:
        """Bytes held: row pointers, column indices and values."""
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.colidx, self.values))

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rowptr, self.colidx, self.values

    def kernel_kwargs(self) -> dict[str, Any]:
        return {}


def _pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` (non-negative, below 2**width) as a little-endian bit stream of
    ``width`` bits each, in uint8."""
    bits = ((values[:, None] >> torch.arange(width)) & 1).flatten()
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)])
    return (bits.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def _unpack_bits(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    bits = ((stream.long()[:, None] >> torch.arange(8)) & 1).flatten()[:count * width]
    return (bits.view(count, width) << torch.arange(width)).sum(1)


@dataclass(frozen=True)
class CodesCSR:
    """A quantized weight as deep compression stores it: each entry ``code_bits +
    gap_bits`` bits of the little-endian bit stream ``entries`` (uint8), the low
    ``code_bits`` an index into the codebook (float32, index 0 the value 0), the high
    ``gap_bits`` the gap to the previous entry's column minus one (the first entry's column
    counts from -1); gaps wider than 2**gap_bits are bridged by filler entries of code 0.
    ``rowptr`` int32 ``[OC+1]`` counts entries, fillers included. ``codebook`` is ``[K+1]``
    for all rows, or ``[OC, K+1]`` when rows have their own values; ``row_scale`` ``[OC]``,
    if present, multiplies row r's values (a BatchNorm folded in: see :meth:`from_folded`).
    ``gap_bits`` is chosen per weight to make the stream smallest, as the .ppz does. The
    native kernels unpack it per call, so this, not fp32 CSR, is what stays in memory:
    about ``code_bits + gap_bits`` bits per non-zero where fp32 CSR takes 64
    (``csrc/cpu/sparse.h``, CodesCsr)."""

    rowptr: torch.Tensor
    entries: torch.Tensor
    codebook: torch.Tensor
    gap_bits: int
    shape: tuple[int, ...]
    row_scale: torch.Tensor | None = None  # [OC]: row r's values are codebook[code] * row_scale[r]

    MAX_CODE_BITS = 8
    FIELDS = ("rowptr", "entries", "codebook")  # what kernel_args() returns

    @property
    def code_bits(self) -> int:
        return max(1, (self.codebook.shape[-1] - 1).bit_length())

    @property
    def n_entries(self) -> int:
        return int(self.rowptr[-1])

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "CodesCSR | None":
        """The codes form of a float32 weight whose rows have at most 255 distinct
        non-zero values each (a codebook-quantized one, BatchNorm folded in or not), or
        None when a row has more or the codes would not take fewer bytes than fp32 CSR."""
        csr = CSR.from_dense(weight)
        rows = csr.shape[0]
        counts = (csr.rowptr[1:] - csr.rowptr[:-1]).long()
        union = torch.unique(csr.values)
        if union.numel() + 1 <= 2 ** cls.MAX_CODE_BITS:  # one codebook for all rows
            codebook = torch.cat([union.new_zeros(1), union])
            codes = torch.searchsorted(union, csr.values) + 1
        else:  # one per row, when each row has few values
            books = [torch.unique(v) for v in torch.split(csr.values, counts.tolist())]
            k = max(b.numel() for b in books)
            if k + 1 > 2 ** cls.MAX_CODE_BITS:
                return None
            codebook = csr.values.new_zeros(rows, k + 1)
            for r, b in enumerate(books):
                codebook[r, 1:b.numel() + 1] = b
            codes = torch.cat([torch.searchsorted(b, v) + 1
                               for b, v in zip(books, torch.split(csr.values, counts.tolist()))])
        if codebook.shape[-1] < 2:  # an all-zero weight still gets a two-value codebook
            codebook = torch.cat([codebook, codebook.new_zeros(*codebook.shape[:-1], 1)], -1)
        code_bits = max(1, (codebook.shape[-1] - 1).bit_length())
        row_of = torch.repeat_interleave(torch.arange(rows), counts)
        cols = csr.colidx.long()
        previous = torch.full_like(cols, -1)
        if cols.numel():
            same_row = row_of[1:] == row_of[:-1]
            previous[1:] = torch.where(same_row, cols[:-1], previous[1:])
        gaps = cols - previous

        def stream_bits(gap_bits: int) -> int:
            return (cols.numel() + int(((gaps - 1) >> gap_bits).sum())) * (code_bits + gap_bits)

        gap_bits = min(range(1, 9), key=stream_bits)
        widest = 1 << gap_bits  # the largest gap one entry spans
        fillers = (gaps - 1) // widest  # each filler spans the widest gap, the entry the rest
        last_gap = gaps - fillers * widest
        # Entry i becomes fillers[i] filler entries followed by its own.
        sizes = fillers + 1
        starts = torch.cumsum(sizes, 0) - sizes
        values = torch.full((int(sizes.sum()),), (widest - 1) << code_bits, dtype=torch.long)
        values[starts + fillers] = ((last_gap - 1) << code_bits) | codes
        per_row = torch.zeros(rows, dtype=torch.long).index_add_(0, row_of, sizes)
        rowptr = torch.zeros(rows + 1, dtype=torch.int32)
        rowptr[1:] = torch.cumsum(per_row, 0).to(torch.int32)
        codes_csr = cls(rowptr, _pack_bits(values, code_bits + gap_bits), codebook.contiguous(), gap_bits,
                        tuple(weight.shape))
        # Per-row codebooks of rows with many values can outweigh what they save.
        return codes_csr if codes_csr.nbytes < csr.nbytes else None

    @classmethod
    def from_folded(cls, quantized: torch.Tensor, folded: torch.Tensor) -> "CodesCSR | None":
        """The codes of ``folded``, a layer's weight with BatchNorm folded in, as the codes
        of ``quantized`` (the same weight before folding) and a per-row factor, where
        ``quantized[r] * factor[r]`` gives ``folded[r]`` bit for bit (the product folding
        computes); else :meth:`from_dense` of ``folded``."""
        if quantized.shape != folded.shape or quantized.dtype != torch.float32:
            return cls.from_dense(folded)
        rows_q, rows_f = quantized.reshape(quantized.shape[0], -1), folded.reshape(folded.shape[0], -1)
        nonzero = rows_q != 0
        if not torch.equal(nonzero, rows_f != 0):
            return cls.from_dense(folded)
        first = nonzero.float().argmax(1)  # a non-zero column of each row (0 in an empty row)
        take = torch.arange(rows_q.shape[0])
        ratio = rows_f[take, first] / torch.where(nonzero.any(1), rows_q[take, first], 1.0)
        # The quotient is within an ulp of the factor folding used; take, per row, the
        # neighbour that reproduces the row exactly.
        factor, found = ratio.clone(), torch.zeros_like(ratio, dtype=torch.bool)
        for candidate in (ratio, torch.nextafter(ratio, ratio + 1), torch.nextafter(ratio, ratio - 1)):
            exact = (rows_q * candidate[:, None] + 0.0 == rows_f).all(1) & ~found
            factor[exact], found = candidate[exact], found | exact
        if not found.all():
            return cls.from_dense(folded)
        codes = cls.from_dense(quantized)
        if codes is None or codes.codebook.dim() != 1:
            return cls.from_dense(folded)
        return cls(codes.rowptr, codes.entries, codes.codebook, codes.gap_bits, codes.shape, factor.contiguous())

    def unpacked(self) -> CSR:
        """The plain CSR of the same weight (fillers dropped), computed in torch: the
        reference the native unpacking is tested against."""
        bits = self.code_bits
        e = _unpack_bits(self.entries, bits + self.gap_bits, self.n_entries)
        rows = self.shape[0]
        row_of = torch.repeat_interleave(torch.arange(rows), (self.rowptr[1:] - self.rowptr[:-1]).long())
        step = (e >> bits) + 1
        # the column is the running sum of steps within each row, from -1
        total = torch.cumsum(step, 0)
        row_start = torch.zeros(rows + 1, dtype=torch.long)
        row_start[1:] = torch.cumsum(torch.zeros(rows, dtype=torch.long).index_add_(0, row_of, step), 0)
        cols = total - row_start[row_of] - 1
        codes = e & ((1 << bits) - 1)
        keep = codes != 0
        counts = torch.zeros(rows, dtype=torch.long).index_add_(0, row_of[keep], torch.ones_like(codes[keep]))
        rowptr = torch.zeros(rows + 1, dtype=torch.int32)
        rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
        book = self.codebook if self.codebook.dim() == 2 else self.codebook.expand(rows, -1)
        values = book[row_of[keep], codes[keep]]
        if self.row_scale is not None:
            values = values * self.row_scale[row_of[keep]]
        return CSR(rowptr, cols[keep].to(torch.int32), values.contiguous(), self.shape)

    def to_dense(self) -> torch.Tensor:
        return self.unpacked().to_dense()

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def nbytes(self) -> int:
        """Bytes held: row pointers, entries, codebook and row factors."""
        held = (self.rowptr, self.entries, self.codebook) + (() if self.row_scale is None else (self.row_scale,))
        return sum(t.numel() * t.element_size() for t in held)

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rowptr, entries, codebook)``: what the native kernels take in place of
        ``(rowptr, colidx, values)``."""
        return self.rowptr, self.entries, self.codebook

    def kernel_kwargs(self) -> dict[str, Any]:
        return {"gap_bits": self.gap_bits, "row_scale": self.row_scale}


def native_module() -> ModuleType | None:
    """``pyprune._C`` if it has both sparse kernels, else None (the reference is used)."""
    try:
        module = _native.cpu()
    except ImportError:
        return None
    return module if hasattr(module, "sparse_conv2d") and hasattr(module, "sparse_linear") else None


def backend() -> str:
    """``"native"`` or ``"reference"``: which implementation the wrappers call."""
    return "native" if native_module() is not None else "reference"


def _finish(out: torch.Tensor, relu: bool) -> torch.Tensor:
    return out.relu_() if relu else out


def reference_conv2d(x: torch.Tensor, csr: CSR | CodesCSR, bias: torch.Tensor | None, stride: Pair, padding: Pair,
                     dilation: Pair, relu: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The native kernel's contract, in plain torch: rebuild the weight, convolve."""
    out = F.conv2d(x, csr.to_dense(), bias, stride, padding, dilation)
    return _finish(out if residual is None else out + residual, relu)


def reference_linear(x: torch.Tensor, csr: CSR | CodesCSR, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    return _finish(F.linear(x, csr.to_dense(), bias), relu)


def _check_input(x: torch.Tensor, dims: int, what: str) -> torch.Tensor:
    if x.dim() != dims or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{what} takes a float32 CPU tensor of {dims} dimensions, "
                         f"got {x.dtype} {x.device.type} of shape {tuple(x.shape)}")
    return x.contiguous()


def sparse_conv2d(x: torch.Tensor, csr: CSR | CodesCSR, bias: torch.Tensor | None, stride: Pair, padding: Pair,
                  dilation: Pair, relu: bool, isa: str = "auto", residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, csr.to_dense(), bias, stride, padding, dilation)`` (groups 1), plus
    ``residual`` if given, then ReLU if ``relu``. ``x`` is ``[N, C, H, W]`` float32 on the
    CPU; ``isa`` picks the native kernel's instruction set (ignored by the reference)."""
    x = _check_input(x, 4, "sparse_conv2d")
    if len(csr.shape) != 4:
        raise ValueError(f"sparse_conv2d needs a 4-D weight's CSR, got shape {csr.shape}")
    native = native_module()
    if native is None:
        return reference_conv2d(x, csr, bias, stride, padding, dilation, relu, residual)
    kh, kw = csr.kernel_size
    return native.sparse_conv2d(x, *csr.kernel_args(), (kh, kw), bias, tuple(stride), tuple(padding),
                                tuple(dilation), relu, isa, residual=residual, **csr.kernel_kwargs())


def sparse_linear(x: torch.Tensor, csr: CSR | CodesCSR, bias: torch.Tensor | None, relu: bool,
                  isa: str = "auto") -> torch.Tensor:
    """``linear(x, csr.to_dense(), bias)``, then ReLU if ``relu``; ``x`` is ``[N, IN]``."""
    x = _check_input(x, 2, "sparse_linear")
    if len(csr.shape) != 2:
        raise ValueError(f"sparse_linear needs a 2-D weight's CSR, got shape {csr.shape}")
    native = native_module()
    if native is None:
        return reference_linear(x, csr, bias, relu)
    return native.sparse_linear(x, *csr.kernel_args(), bias, relu, isa, **csr.kernel_kwargs())
