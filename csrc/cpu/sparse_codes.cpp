// Unpacking the codes form of a CSR matrix (sparse.h, CodesCsr).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse.h"

namespace pyprune {
namespace sparse {

void unpack_codes(const CodesCsr& p, int64_t n_entries, int32_t* rowptr, int32_t* colidx, float* values,
                  int threads) {
  if (p.code_bits < 1 || p.code_bits > 8 || p.gap_bits < 1 || p.gap_bits > 8) {
    throw std::invalid_argument("codes CSR: code_bits and gap_bits must be in [1, 8]");
  }
  const int width = p.code_bits + p.gap_bits;
  if (p.entry_bytes * 8 < n_entries * width) {
    throw std::invalid_argument("codes CSR: " + std::to_string(n_entries) + " entries of " + std::to_string(width) +
                                " bits need " + std::to_string((n_entries * width + 7) / 8) + " bytes, got " +
                                std::to_string(p.entry_bytes));
  }
  if (p.rows < 0 || p.cols < 0 || p.rowptr[0] != 0 || p.rowptr[p.rows] != n_entries) {
    throw std::invalid_argument("codes CSR: rowptr must start at 0 and end at the number of entries");
  }
  for (int64_t r = 0; r < p.rows; ++r) {  // all of it before any entry is read
    if (p.rowptr[r + 1] < p.rowptr[r]) throw std::invalid_argument("codes CSR: rowptr decreases at row " + std::to_string(r));
  }
  const uint32_t code_mask = (1u << p.code_bits) - 1, entry_mask = (1u << width) - 1;
  // Entry j starts at bit j * width. Where 8 bytes from its first byte lie inside the
  // stream, one unaligned 64-bit load holds it (width <= 16, shift <= 7); the last few
  // entries are read a byte at a time.
  const int64_t fast_end = p.entry_bytes >= 8 ? (p.entry_bytes - 8) * 8 / width : 0;
  auto entry_at = [&](int64_t j) -> uint32_t {
    const int64_t bit = j * width, byte = bit >> 3;
    uint64_t word = 0;
    if (j < fast_end) {
      std::memcpy(&word, p.entries + byte, sizeof(word));
    } else {
      for (int64_t b = byte, k = 0; b < p.entry_bytes && k < 8; ++b, ++k) word |= uint64_t{p.entries[b]} << (8 * k);
    }
    return static_cast<uint32_t>(word >> (bit & 7)) & entry_mask;
  };
  const uint32_t n_codes = static_cast<uint32_t>(p.codebook_size);
  // Rows [r0, r1) into the output from position `out` on (fillers, code 0, dropped: the
  // kernels would multiply them by zero); rowptr[r + 1] is set for each. The loop stays
  // branch-free: columns only grow within a row, so checking the row's last is enough,
  // and a code past the codebook is only noted. Returns the end position, or -1 - r for
  // the first bad row r.
  auto decode = [&](int64_t r0, int64_t r1, int64_t out) -> int64_t {
    // Locals rather than captures: a store through colidx or values could alias what a
    // captured reference points to, and the compiler reloaded every one of them per
    // entry (half the unpacking time, measured).
    const uint8_t* const stream = p.entries;
    const int32_t* const entry_rows = p.rowptr;
    int32_t* __restrict const col_out = colidx;
    float* __restrict const value_out = values;
    const int64_t w = width, fast = fast_end, stride = p.codebook_stride, cols = p.cols;
    const int code_bits = p.code_bits;
    const uint32_t cmask = code_mask, emask = entry_mask, codes = n_codes;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t lo = entry_rows[r], hi = entry_rows[r + 1];
      const float* book = p.codebook + r * stride;
      const float scale = p.row_scale ? p.row_scale[r] : 1.0f;  // x * 1.0f is x, bit for bit
      int64_t col = -1;
      uint32_t bad_code = 0;
      for (int64_t j = lo; j < hi; ++j) {
        uint32_t e;
        if (j < fast) {
          uint64_t word;
          std::memcpy(&word, stream + ((j * w) >> 3), sizeof(word));
          e = static_cast<uint32_t>(word >> ((j * w) & 7)) & emask;
        } else {
          e = entry_at(j);
        }
        const uint32_t code = e & cmask;
        col += static_cast<int64_t>(e >> code_bits) + 1;
        bad_code |= code >= codes;
        col_out[out] = static_cast<int32_t>(col);
        value_out[out] = book[code < codes ? code : 0] * scale;
        out += code != 0;
      }
      rowptr[r + 1] = static_cast<int32_t>(out);
      if (bad_code || col >= cols) return -1 - r;
    }
    return out;
  };
  // Chunks of whole rows with about equal numbers of entries, one per thread, each
  // written from its first entry's position; the gaps its dropped fillers leave are
  // closed after. Small weights take one chunk: a parallel region costs more.
  constexpr int64_t kParallelFrom = 8192;
  const int nt = n_entries >= kParallelFrom && p.rows > 1 ? std::max(1, threads) : 1;
  std::vector<int64_t> first_row(static_cast<size_t>(nt) + 1, p.rows), end(static_cast<size_t>(nt));
  first_row[0] = 0;
  for (int c = 1; c < nt; ++c) {
    const int64_t target = n_entries * c / nt;
    first_row[c] = std::lower_bound(p.rowptr, p.rowptr + p.rows, target) - p.rowptr;
  }
#pragma omp parallel for schedule(static, 1) num_threads(nt) if (nt > 1)
  for (int c = 0; c < nt; ++c) end[c] = decode(first_row[c], first_row[c + 1], p.rowptr[first_row[c]]);
  rowptr[0] = 0;
  int64_t kept = 0;
  for (int c = 0; c < nt; ++c) {
    if (end[c] < 0) {  // walk the bad row again to name its first bad entry
      const int64_t r = -1 - end[c];
      int64_t col = -1;
      for (int64_t j = p.rowptr[r]; j < p.rowptr[r + 1]; ++j) {
        const uint32_t e = entry_at(j), code = e & code_mask;
        col += static_cast<int64_t>(e >> p.code_bits) + 1;
        if (code >= n_codes || col >= p.cols) {
          throw std::invalid_argument("codes CSR: entry " + std::to_string(j) + " has " +
                                      (code >= n_codes ? "code " + std::to_string(code) + " past the codebook"
                                                       : "column " + std::to_string(col) + " past " +
                                                             std::to_string(p.cols)));
        }
      }
    }
    const int64_t from = p.rowptr[first_row[c]], count = end[c] - from;
    if (from != kept) {
      std::memmove(colidx + kept, colidx + from, sizeof(int32_t) * static_cast<size_t>(count));
      std::memmove(values + kept, values + from, sizeof(float) * static_cast<size_t>(count));
      for (int64_t r = first_row[c]; r < first_row[c + 1]; ++r) rowptr[r + 1] -= static_cast<int32_t>(from - kept);
    }
    kept += count;
  }
}

}  // namespace sparse
}  // namespace pyprune
