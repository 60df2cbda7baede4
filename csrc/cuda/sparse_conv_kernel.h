// Launcher for the CUDA sparse convolution of pyprune._C_cuda (same contract as the CPU
// kernel in csrc/cpu/sparse.h). Plain pointers and cudaStream_t only, so the .cu side
// compiles without torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyprune::cuda {

struct SparseConvArgs {
  const float* x;          // [batch, in_channels, height, width]
  const int32_t* rowptr;   // [out_channels + 1]
  const int32_t* colidx;   // [nnz], column = (ic * kernel_h + kh) * kernel_w + kw
  const float* values;     // [nnz]
  const float* bias;       // [out_channels] or null
  float* out;              // [batch, out_channels, out_h, out_w]
  int64_t batch, in_channels, height, width, out_channels, out_h, out_w;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool relu;
};

// Queues the convolution on `stream`; returns the launch error, if any.
cudaError_t launch_sparse_conv2d(const SparseConvArgs& a, cudaStream_t stream);

}  // namespace pyprune::cuda
