// Launchers for the CUDA kernels of pyprune._C_cuda. Plain pointers and cudaStream_t
// only, so the .cu side compiles without torch headers (much faster under nvcc).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyprune::cuda {

// out[i] = w[i] * (m[i] != 0) for i < n, queued on `stream`. Returns the launch error,
// if any (cudaGetLastError); errors during execution surface at the next sync.
cudaError_t launch_apply_mask(const float* w, const bool* m, float* out, int64_t n, cudaStream_t stream);
cudaError_t launch_apply_mask(const float* w, const uint8_t* m, float* out, int64_t n, cudaStream_t stream);
cudaError_t launch_apply_mask(const float* w, const float* m, float* out, int64_t n, cudaStream_t stream);

}  // namespace pyprune::cuda
