// The inner kernel shared by the sparse convolution and linear layers (sparse.cpp):
//     acc[q] = sum_j val[j] * base[table[col[j]] + q]      for q in [0, len)
// len is a multiple of kGranule. Each instruction-set variant lives in its own file,
// compiled under `#pragma GCC target`, and is called only after a CPU check.
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

}  // namespace sparse
}  // namespace pyprune
