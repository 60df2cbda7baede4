// Launcher for the CUDA sparse convolution of pyprune._C_cuda (same contract as the CPU
// kernel in csrc/cpu/sparse.h). Plain pointers and cudaStream_t only, so the .cu side
// compiles without torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/sparse_conv_tile.h"

namespace pyprune::cuda {

struct SparseConvArgs {
  const float* x;          // [batch, in_channels, height, width]
  const int32_t* rowptr;   // [out_channels + 1]
  const int32_t* colidx;   // [nnz], column = (ic * kernel_h + kh) * kernel_w + kw
  const float* values;     // [nnz]
  const float* bias;       // [out_channels] or null
  float* out;              // [batch, out_channels, out_h, out_w]
  sparse_tile::Shape shape;
  bool relu;
};

// Queues the convolution on `stream`; returns the launch error, if any.
cudaError_t launch_sparse_conv2d(const SparseConvArgs& a, cudaStream_t stream);

}  // namespace pyprune::cuda
