// Launcher of the chunk-parallel Huffman decoder of pyprune._C_cuda. Plain pointers and
// cudaStream_t only, so the .cu side compiles without torch headers (see apply_mask_kernel.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/huffman_chunk.h"

namespace pyprune::cuda {

// Decodes every chunk of a validated Huffman stream (huff::parse_stream) on the device,
// queued on `stream`; all pointers are device memory. One thread per chunk, the Table in
// shared memory. chunk_offsets: n_chunks + 1 bit offsets into the payload (the last =
// payload bits). Chunk c writes out[c * chunk_symbols, min(n_symbols, (c + 1) *
// chunk_symbols)) and status[c] (a huff::chunk::Status). Returns the launch error, if any.
// OutT is uint16_t or int32_t (instantiated in huffman_kernel.cu).
template <typename OutT>
cudaError_t launch_huffman_decode(const huff::chunk::Table* table, const uint16_t* sorted, const uint8_t* payload,
                                  uint64_t payload_bytes, const uint64_t* chunk_offsets, uint64_t n_chunks,
                                  uint64_t n_symbols, uint32_t chunk_symbols, OutT* out, int32_t* status,
                                  cudaStream_t stream);

}  // namespace pyprune::cuda
