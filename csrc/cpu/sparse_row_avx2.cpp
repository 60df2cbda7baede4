// The row kernel (sparse_row.h) for AVX2 + FMA: 8 floats per register.
#include <immintrin.h>

#pragma GCC target("avx2,fma")

#include "sparse_row.h"

namespace pyprune {
namespace sparse {
namespace {

struct Avx2 {
  using Reg = __m256;
  static constexpr int64_t kLanes = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
};

}  // namespace

void row_avx2(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
              int64_t len, float* acc) {
  row_tiled<Avx2>(base, col, table, val, nnz, len, acc);
}

void pixels_avx2(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np, int64_t step,
                 int64_t lanes, float* acc) {
  if (lanes == 16) {
    pixel_tiles<Avx2, 2>(base, off, val, nnz, np, step, acc);
  } else {
    pixel_tiles<Avx2, 1>(base, off, val, nnz, np, step, acc);
  }
}

void transpose8x8_avx2(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: each 128-bit half holds one column's 4 rows
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // and the two halves of rows 0-3 and 4-7 joined
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

}  // namespace sparse
}  // namespace pyprune
