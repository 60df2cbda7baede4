// CUDA sparse convolution with CSR weights.
//
// Mapping: one thread block per (tile of kPixels output pixels, output channel, image);
// one thread per output pixel. The block walks its channel's CSR row in chunks staged in
// shared memory, where each entry is decoded once (column -> input-channel offset and
// kernel displacement) instead of once per thread; every thread then gathers its input
// for that entry (coalesced along the output row) and accumulates in a register. Output
// channels with no entries cost only the bias write.
#include "sparse_conv_kernel.h"

namespace pyprune::cuda {
namespace {

constexpr int kPixels = 128;  // threads per block = output pixels per block
constexpr int kChunk = 128;   // CSR entries staged in shared memory at a time

__global__ void sparse_conv2d_kernel(SparseConvArgs a) {
  __shared__ int64_t s_offset[kChunk];  // ic * H * W
  __shared__ int s_dy[kChunk], s_dx[kChunk];
  __shared__ float s_value[kChunk];

  const int64_t oc = blockIdx.y, n = blockIdx.z;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const int64_t plane = a.out_h * a.out_w;
  const bool active = pixel < plane;
  const int64_t oh = active ? pixel / a.out_w : 0, ow = active ? pixel % a.out_w : 0;
  const int64_t y0 = oh * a.stride_h - a.pad_h, x0 = ow * a.stride_w - a.pad_w;
  const float* x = a.x + n * a.in_channels * a.height * a.width;
  const int taps = a.kernel_h * a.kernel_w;

  float acc = 0.0f;
  const int lo = a.rowptr[oc], hi = a.rowptr[oc + 1];
  for (int base = lo; base < hi; base += kChunk) {
    const int count = min(kChunk, hi - base);
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const int col = a.colidx[base + i];
      const int ic = col / taps, t = col % taps;
      s_offset[i] = static_cast<int64_t>(ic) * a.height * a.width;
      s_dy[i] = (t / a.kernel_w) * a.dilation_h;
      s_dx[i] = (t % a.kernel_w) * a.dilation_w;
      s_value[i] = a.values[base + i];
    }
    __syncthreads();
    if (active) {
      for (int i = 0; i < count; ++i) {
        const int64_t y = y0 + s_dy[i], xx = x0 + s_dx[i];
        if (y >= 0 && y < a.height && xx >= 0 && xx < a.width) acc += s_value[i] * x[s_offset[i] + y * a.width + xx];
      }
    }
  }
  if (active) {
    float v = acc + (a.bias ? a.bias[oc] : 0.0f);
    if (a.relu) v = fmaxf(v, 0.0f);
    a.out[(n * a.out_channels + oc) * plane + pixel] = v;
  }
}

}  // namespace

cudaError_t launch_sparse_conv2d(const SparseConvArgs& a, cudaStream_t stream) {
  const int64_t plane = a.out_h * a.out_w;
  if (a.batch == 0 || a.out_channels == 0 || plane == 0) return cudaSuccess;
  if (a.out_channels > 65535 || a.batch > 65535) return cudaErrorInvalidConfiguration;  // grid y/z limits
  const dim3 grid(static_cast<unsigned>((plane + kPixels - 1) / kPixels), static_cast<unsigned>(a.out_channels),
                  static_cast<unsigned>(a.batch));
  sparse_conv2d_kernel<<<grid, kPixels, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace pyprune::cuda
