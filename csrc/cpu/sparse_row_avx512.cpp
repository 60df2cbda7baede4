// The row kernel (sparse_row.h) for AVX-512F: 16 floats per register.
#include <immintrin.h>

#pragma GCC target("avx512f")

#include "sparse_row.h"

namespace pyprune {
namespace sparse {
namespace {

struct Avx512 {
  using Reg = __m512;
  static constexpr int64_t kLanes = 16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
};

}  // namespace

void row_avx512(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
                int64_t len, float* acc) {
  row_tiled<Avx512>(base, col, table, val, nnz, len, acc);
}

void pixels_avx512(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np, int64_t step,
                   int64_t /*lanes: always 16*/, float* acc) {
  pixel_tiles<Avx512, 1>(base, off, val, nnz, np, step, acc);
}

}  // namespace sparse
}  // namespace pyprune
