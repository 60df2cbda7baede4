// Chunk-parallel Huffman decoding for pyprune._C_cuda. Only cuda_runtime.h and the
// portable per-chunk decoder here: torch headers under nvcc more than double the build time.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "huffman_kernel.h"

namespace pyprune::cuda {
namespace {

namespace chunk = huff::chunk;

// Chunks are few (4096 symbols each), so small blocks spread them over more SMs; each
// block pays one 8 KB table load into shared memory.
constexpr int kThreads = 64;
constexpr uint64_t kMaxBlocks = 1 << 16;  // grid-stride beyond this

static_assert(sizeof(chunk::Table) % 4 == 0, "the table is copied as 32-bit words");

template <typename OutT>
__global__ void huffman_decode_kernel(const chunk::Table* __restrict__ table, const uint16_t* __restrict__ sorted,
                                      const uint8_t* __restrict__ payload, uint64_t payload_bytes,
                                      const uint64_t* __restrict__ chunk_offsets, uint64_t n_chunks, uint64_t n_symbols,
                                      uint32_t chunk_symbols, OutT* __restrict__ out, int32_t* __restrict__ status) {
  __shared__ chunk::Table t;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(table);
  uint32_t* dst = reinterpret_cast<uint32_t*>(&t);
  for (uint32_t i = threadIdx.x; i < sizeof(chunk::Table) / 4; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
  const uint64_t stride = static_cast<uint64_t>(blockDim.x) * gridDim.x;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_chunks; c += stride) {
    const uint64_t lo = c * chunk_symbols;
    const uint64_t count = n_symbols - lo < chunk_symbols ? n_symbols - lo : chunk_symbols;
    status[c] = chunk::decode_chunk(t, sorted, payload, payload_bytes, chunk_offsets[c],
                                    chunk_offsets[c + 1] - chunk_offsets[c], count, out + lo);
  }
}

}  // namespace

template <typename OutT>
cudaError_t launch_huffman_decode(const chunk::Table* table, const uint16_t* sorted, const uint8_t* payload,
                                  uint64_t payload_bytes, const uint64_t* chunk_offsets, uint64_t n_chunks,
                                  uint64_t n_symbols, uint32_t chunk_symbols, OutT* out, int32_t* status,
                                  cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;  // a 0-block launch is an error
  const uint64_t blocks = std::min<uint64_t>((n_chunks + kThreads - 1) / kThreads, kMaxBlocks);
  huffman_decode_kernel<OutT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      table, sorted, payload, payload_bytes, chunk_offsets, n_chunks, n_symbols, chunk_symbols, out, status);
  return cudaGetLastError();
}

template cudaError_t launch_huffman_decode<uint16_t>(const chunk::Table*, const uint16_t*, const uint8_t*, uint64_t,
                                                     const uint64_t*, uint64_t, uint64_t, uint32_t, uint16_t*,
                                                     int32_t*, cudaStream_t);
template cudaError_t launch_huffman_decode<int32_t>(const chunk::Table*, const uint16_t*, const uint8_t*, uint64_t,
                                                    const uint64_t*, uint64_t, uint64_t, uint32_t, int32_t*, int32_t*,
                                                    cudaStream_t);

}  // namespace pyprune::cuda
