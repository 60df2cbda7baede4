// Helpers the sparse kernels' files share (sparse.cpp, sparse_lanes.cpp); not part of the
// kernels' interface (sparse.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "sparse.h"
#include "sparse_row.h"

namespace pyprune {
namespace sparse {
namespace internal {

constexpr int64_t kMaxOffset = std::numeric_limits<int32_t>::max();
constexpr int64_t kRowBlock = 8;  // output channels per work item

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline RowKernel row_kernel(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return row_avx512;
    case Isa::kAvx2: return row_avx2;
    default: return row_scalar;
  }
}

inline float activate(float v, bool relu) { return relu && v < 0.0f ? 0.0f : v; }

// A per-thread buffer kept between calls, 64-byte aligned. A fresh allocation of this size
// is mmap-ed, and touching its new pages cost more than the convolution itself at batch 32
// (measured). Not value-initialised: callers write every float before reading it.
inline float* workspace(size_t floats) {
  constexpr size_t kAlign = 64 / sizeof(float);
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats + kAlign) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(floats + kAlign);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (kAlign - p / sizeof(float) % kAlign) % kAlign;
}

// dst[i] = act(src[i] + b); two branch-free loops so the compiler vectorises them.
inline void epilogue(const float* src, int64_t n, float b, bool relu, float* dst) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) dst[i] = std::max(src[i] + b, 0.0f);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] + b;
  }
}

inline void check_geometry(const ConvGeometry& g) {
  if (g.batch < 0 || g.in_channels < 0 || g.height < 0 || g.width < 0 || g.out_channels < 0 || g.kernel_h < 1 ||
      g.kernel_w < 1 || g.stride_h < 1 || g.stride_w < 1 || g.pad_h < 0 || g.pad_w < 0 || g.dilation_h < 1 ||
      g.dilation_w < 1) {
    throw std::invalid_argument("sparse conv2d: sizes must be >= 0, kernel, stride and dilation >= 1, padding >= 0");
  }
  if (g.out_h() < 1 || g.out_w() < 1) {
    throw std::invalid_argument("sparse conv2d: the kernel (with dilation) is larger than the padded input");
  }
}

// The batched convolution on NCHW input and output (sparse_lanes.cpp), for conv2d's
// algo kBatched.
void conv2d_batched(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g, float* out,
                    Isa isa, int threads);

}  // namespace internal
}  // namespace sparse
}  // namespace pyprune
