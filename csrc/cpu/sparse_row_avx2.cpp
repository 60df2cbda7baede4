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

}  // namespace sparse
}  // namespace pyprune
