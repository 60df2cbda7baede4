// CUDA kernels of pyprune._C_cuda. Only cuda_runtime.h here: torch headers under nvcc
// more than double the build time.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "apply_mask_kernel.h"

namespace pyprune::cuda {
namespace {

constexpr int kThreads = 256;
// Grid-stride loop: a bounded grid covers any n, and 2^16 blocks fill any current GPU.
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename M>
__global__ void apply_mask_kernel(const float* __restrict__ w, const M* __restrict__ m, float* __restrict__ out,
                                  int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    // Multiply rather than select: bit-identical to weight * (mask != 0) (NaN, inf, -0.0).
    out[i] = w[i] * (m[i] != M(0) ? 1.0f : 0.0f);
  }
}

template <typename M>
cudaError_t launch(const float* w, const M* m, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;  // a 0-block launch is an error
  const int64_t blocks = std::min((n + kThreads - 1) / kThreads, kMaxBlocks);
  apply_mask_kernel<M><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(w, m, out, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_apply_mask(const float* w, const bool* m, float* out, int64_t n, cudaStream_t stream) {
  return launch(w, m, out, n, stream);
}
cudaError_t launch_apply_mask(const float* w, const uint8_t* m, float* out, int64_t n, cudaStream_t stream) {
  return launch(w, m, out, n, stream);
}
cudaError_t launch_apply_mask(const float* w, const float* m, float* out, int64_t n, cudaStream_t stream) {
  return launch(w, m, out, n, stream);
}

}  // namespace pyprune::cuda
