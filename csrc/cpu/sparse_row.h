// The inner kernels of the sparse convolution and linear layers (sparse.cpp).
// Row kernel, shared by the direct and im2col convolutions and the linear layer:
//     acc[q] = sum_j val[j] * base[table[col[j]] + q]      for q in [0, len)
// len is a multiple of kGranule.
// Pixel kernel, for the batched convolution (images on the vector lanes):
//     acc[p * lanes + l] = sum_j val[j] * base[off[j] + p * step + l]   for p < np, l < lanes
// lanes is 8 or 16; base, off[j] and step are multiples of lanes, so with a 64-byte aligned
// buffer every load is aligned and touches one cache line.
// Each instruction-set variant lives in its own file, compiled under `#pragma GCC target`,
// and is called only after a CPU check.
#pragma once

#include <cstdint>

namespace pyprune {
namespace sparse {

constexpr int64_t kGranule = 16;  // floats; len is rounded up to this (one AVX-512 register)

using RowKernel = void (*)(const float* base, const int32_t* col, const int32_t* table, const float* val,
                           int64_t nnz, int64_t len, float* acc);

void row_scalar(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
                int64_t len, float* acc);
void row_avx2(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
              int64_t len, float* acc);
void row_avx512(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
                int64_t len, float* acc);

constexpr int64_t kMaxTilePixels = 8;  // np <= this

// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < 8: the batched convolution's layout
// changes (images <-> lanes). Eight rows in registers, 24 shuffles, eight stores; the
// scalar transpose reads or writes one float per instruction with a stride.
void transpose8x8_avx2(const float* src, int64_t ld_src, float* dst, int64_t ld_dst);

using PixelKernel = void (*)(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np,
                             int64_t step, int64_t lanes, float* acc);

void pixels_scalar(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np, int64_t step,
                   int64_t lanes, float* acc);
// Both lane counts; 16 lanes take two registers per pixel.
void pixels_avx2(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np, int64_t step,
                 int64_t lanes, float* acc);
// 16 lanes only (8 lanes run on pixels_avx2, which every AVX-512 CPU can run).
void pixels_avx512(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np, int64_t step,
                   int64_t lanes, float* acc);

// The register-tiled body, for a vector type described by V (see sparse_row_avx2.cpp).
// A tile keeps NV vectors of outputs in registers across all the row's entries, so each
// multiply-add costs one load and no store. U interleaved accumulator sets keep at least
// 8 independent FMA chains in flight when a tile is narrow (FMA latency ~4 cycles, 2 ports).
template <class V, int NV>
inline void row_tile(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
                     float* acc) {
  constexpr int U = NV >= 8 ? 1 : NV >= 4 ? 2 : NV >= 2 ? 4 : 8;
  typename V::Reg a[U][NV];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NV; ++r) a[u][r] = V::zero();
  int64_t j = 0;
  for (; j + U <= nnz; j += U) {
    for (int u = 0; u < U; ++u) {
      const float* p = base + table[col[j + u]];
      const typename V::Reg w = V::broadcast(val + j + u);
      for (int r = 0; r < NV; ++r) a[u][r] = V::fma(w, V::load(p + r * V::kLanes), a[u][r]);
    }
  }
  for (; j < nnz; ++j) {
    const float* p = base + table[col[j]];
    const typename V::Reg w = V::broadcast(val + j);
    for (int r = 0; r < NV; ++r) a[0][r] = V::fma(w, V::load(p + r * V::kLanes), a[0][r]);
  }
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < NV; ++r) a[0][r] = V::add(a[0][r], a[u][r]);
  for (int r = 0; r < NV; ++r) V::store(acc + r * V::kLanes, a[0][r]);
}

template <class V>
inline void row_tiled(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
                      int64_t len, float* acc) {
  constexpr int64_t kTile = 8 * V::kLanes;
  int64_t q = 0;
  for (; q + kTile <= len; q += kTile) row_tile<V, 8>(base + q, col, table, val, nnz, acc + q);
  switch ((len - q) / V::kLanes) {  // the remainder as one narrower tile
    case 7: row_tile<V, 7>(base + q, col, table, val, nnz, acc + q); break;
    case 6: row_tile<V, 6>(base + q, col, table, val, nnz, acc + q); break;
    case 5: row_tile<V, 5>(base + q, col, table, val, nnz, acc + q); break;
    case 4: row_tile<V, 4>(base + q, col, table, val, nnz, acc + q); break;
    case 3: row_tile<V, 3>(base + q, col, table, val, nnz, acc + q); break;
    case 2: row_tile<V, 2>(base + q, col, table, val, nnz, acc + q); break;
    case 1: row_tile<V, 1>(base + q, col, table, val, nnz, acc + q); break;
    default: break;
  }
}

// NP pixels of RP registers each, all kept in registers across the row's entries: per
// entry one broadcast and NP * RP aligned loads, each feeding one FMA, with NP * RP
// independent accumulation chains (8 keep both FMA ports busy at latency 4).
template <class V, int RP, int NP>
inline void pixel_tile(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t step,
                       float* acc) {
  typename V::Reg a[NP][RP];
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < RP; ++r) a[p][r] = V::zero();
  for (int64_t j = 0; j < nnz; ++j) {
    const float* in = base + off[j];
    const typename V::Reg w = V::broadcast(val + j);
    for (int p = 0; p < NP; ++p)
      for (int r = 0; r < RP; ++r) a[p][r] = V::fma(w, V::load(in + p * step + r * V::kLanes), a[p][r]);
  }
  for (int p = 0; p < NP; ++p)
    for (int r = 0; r < RP; ++r) V::store(acc + (p * RP + r) * V::kLanes, a[p][r]);
}

// A tile of np < NP + 1 pixels, NP chosen at compile time.
template <class V, int RP, int NP>
inline void pixel_rest(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np,
                       int64_t step, float* acc) {
  if constexpr (NP >= 1) {
    if (np == NP) {
      pixel_tile<V, RP, NP>(base, off, val, nnz, step, acc);
    } else {
      pixel_rest<V, RP, NP - 1>(base, off, val, nnz, np, step, acc);
    }
  }
}

// np pixels (1..kMaxTilePixels) as tiles of at most 8 / RP pixels.
template <class V, int RP>
inline void pixel_tiles(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np,
                        int64_t step, float* acc) {
  constexpr int kMax = 8 / RP;
  for (; np >= kMax; np -= kMax, base += kMax * step, acc += kMax * RP * V::kLanes) {
    pixel_tile<V, RP, kMax>(base, off, val, nnz, step, acc);
  }
  pixel_rest<V, RP, kMax - 1>(base, off, val, nnz, np, step, acc);
}

}  // namespace sparse
}  // namespace pyprune
