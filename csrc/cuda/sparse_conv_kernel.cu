// CUDA sparse convolution with CSR weights.
//
// Mapping: one thread block per (tile of kPixels output pixels, output channel, image);
// one thread per output pixel. The block walks its channel's CSR row in chunks staged in
// shared memory, where each entry is decoded once instead of once per thread; every
// thread then gathers its input for that entry (coalesced along the output row) and
// accumulates in a register. Output channels with no entries cost only the bias write.
// The arithmetic lives in csrc/common/sparse_conv_tile.h, which the CPU extension also
// runs (pyprune._C.sparse_conv2d_portable), so it is tested without a GPU.
#include "sparse_conv_kernel.h"

#include "../common/sparse_conv_tile.h"

namespace pyprune::cuda {
namespace {

namespace tile = pyprune::sparse_tile;

__global__ void sparse_conv2d_kernel(SparseConvArgs a) {
  const tile::Shape& s = a.shape;
  __shared__ tile::Entry staged[tile::kChunk];

  const int64_t oc = blockIdx.y, n = blockIdx.z, t = blockIdx.x;
  const tile::Origin o = tile::origin(s, t, threadIdx.x);
  const float* image = a.x + n * s.in_channels * s.height * s.width;

  float acc = 0.0f;
  const int lo = a.rowptr[oc], hi = a.rowptr[oc + 1];
  for (int base = lo; base < hi; base += tile::kChunk) {
    const int count = min(tile::kChunk, hi - base);
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < count; i += blockDim.x) staged[i] = tile::decode_entry(s, a.colidx[base + i], a.values[base + i]);
    __syncthreads();
    if (o.active) acc = tile::accumulate(s, image, o, staged, count, acc);
  }
  if (o.active) a.out[tile::out_index(s, n, oc, t, threadIdx.x)] = tile::finish(acc, a.bias, oc, a.relu);
}

}  // namespace

cudaError_t launch_sparse_conv2d(const SparseConvArgs& a, cudaStream_t stream) {
  const tile::Shape& s = a.shape;
  if (s.batch == 0 || s.out_channels == 0 || s.out_h * s.out_w == 0) return cudaSuccess;
  if (s.out_channels > 65535 || s.batch > 65535) return cudaErrorInvalidConfiguration;  // grid y/z limits
  const dim3 grid(static_cast<unsigned>(tile::tiles_per_plane(s)), static_cast<unsigned>(s.out_channels),
                  static_cast<unsigned>(s.batch));
  sparse_conv2d_kernel<<<grid, tile::kPixels, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace pyprune::cuda
