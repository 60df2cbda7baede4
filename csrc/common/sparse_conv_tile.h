// The per-block and per-thread arithmetic of the CUDA sparse convolution, written once
// for the GPU (nvcc) and the CPU (g++): plain C++, every function __host__ __device__
// under nvcc.
//
// Mapping (csrc/cuda/sparse_conv_kernel.cu): one thread block per (tile of kPixels
// output pixels, output channel, image), one thread per output pixel. The block walks
// its channel's CSR row in chunks of kChunk entries; each entry is decoded once per
// block (decode_entry: column -> input-plane offset and kernel displacement) into
// shared memory, then every thread accumulates the chunk for its pixel (accumulate).
//
// Users:
// * csrc/cuda/sparse_conv_kernel.cu: the kernel, with the staged entries in shared memory.
// * csrc/cpu/sparse_bindings.cpp: run_on_host walks the same grid, block by block and
//   thread by thread, with the same chunks, exposed as pyprune._C.sparse_conv2d_portable,
//   so that the device logic is checked against F.conv2d on machines without a GPU.
//
// The caller has validated the CSR (sparse::validate): rowptr is non-decreasing from 0,
// every column lies in [0, in_channels * kernel_h * kernel_w).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYPRUNE_TILE_HD __host__ __device__ __forceinline__
#else
#define PYPRUNE_TILE_HD inline
#endif

namespace pyprune {
namespace sparse_tile {

constexpr int kPixels = 128;  // threads per block = output pixels per block
constexpr int kChunk = 128;   // CSR entries staged at a time

struct Shape {
  int64_t batch, in_channels, height, width, out_channels, out_h, out_w;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// One CSR entry as every thread of the block uses it.
struct Entry {
  int64_t offset;  // ic * height * width: the input plane
  int dy, dx;      // kernel displacement, dilation applied
  float value;
};

// Where one thread's output pixel reads from: the top-left input position of its
// receptive field (may be negative: padding), and whether the pixel exists (the last
// tile of a plane has idle threads).
struct Origin {
  bool active;
  int64_t y0, x0;
};

// The Shape of a geometry with sparse::ConvGeometry's fields (int64 each), for the
// host side of both callers; kernel, stride, padding and dilation become int, the
// device arithmetic's type.
template <class Geometry>
inline Shape shape_of(const Geometry& g) {
  const auto i32 = [](int64_t v) { return static_cast<int>(v); };
  return Shape{g.batch,           g.in_channels,   g.height,          g.width,           g.out_channels,
               g.out_h(),         g.out_w(),       i32(g.kernel_h),   i32(g.kernel_w),   i32(g.stride_h),
               i32(g.stride_w),   i32(g.pad_h),    i32(g.pad_w),      i32(g.dilation_h), i32(g.dilation_w)};
}

PYPRUNE_TILE_HD int64_t tiles_per_plane(const Shape& s) { return (s.out_h * s.out_w + kPixels - 1) / kPixels; }

PYPRUNE_TILE_HD Entry decode_entry(const Shape& s, int32_t column, float value) {
  const int taps = s.kernel_h * s.kernel_w;
  const int ic = column / taps, t = column % taps;
  return Entry{static_cast<int64_t>(ic) * s.height * s.width, (t / s.kernel_w) * s.dilation_h,
               (t % s.kernel_w) * s.dilation_w, value};
}

PYPRUNE_TILE_HD Origin origin(const Shape& s, int64_t tile, int thread) {
  const int64_t pixel = tile * kPixels + thread;
  const bool active = pixel < s.out_h * s.out_w;
  const int64_t oh = active ? pixel / s.out_w : 0, ow = active ? pixel % s.out_w : 0;
  return Origin{active, oh * s.stride_h - s.pad_h, ow * s.stride_w - s.pad_w};
}

// acc plus the chunk's entries at one pixel of `image` (that image's [in_channels, H, W]);
// taps that fall in the padding read nothing.
PYPRUNE_TILE_HD float accumulate(const Shape& s, const float* image, const Origin& o, const Entry* entries, int count,
                                 float acc) {
  for (int i = 0; i < count; ++i) {
    const int64_t y = o.y0 + entries[i].dy, x = o.x0 + entries[i].dx;
    if (y >= 0 && y < s.height && x >= 0 && x < s.width) acc += entries[i].value * image[entries[i].offset + y * s.width + x];
  }
  return acc;
}

PYPRUNE_TILE_HD float finish(float acc, const float* bias, int64_t oc, bool relu) {
  const float v = acc + (bias ? bias[oc] : 0.0f);
  return relu ? (v > 0.0f ? v : 0.0f) : v;
}

// Index of (image n, channel oc, pixel) in the NCHW output.
PYPRUNE_TILE_HD int64_t out_index(const Shape& s, int64_t n, int64_t oc, int64_t tile, int thread) {
  return (n * s.out_channels + oc) * (s.out_h * s.out_w) + tile * kPixels + thread;
}

// The whole kernel's grid, run on the host in the GPU's order of work within a block:
// the same chunks, the same entry order per pixel, so the same float sums. Host only.
inline void run_on_host(const Shape& s, const float* x, const int32_t* rowptr, const int32_t* colidx,
                        const float* values, const float* bias, bool relu, float* out) {
  Entry staged[kChunk];  // the block's shared memory
  float acc[kPixels];    // one register per thread
  const int64_t tiles = tiles_per_plane(s);
  for (int64_t n = 0; n < s.batch; ++n) {
    const float* image = x + n * s.in_channels * s.height * s.width;
    for (int64_t oc = 0; oc < s.out_channels; ++oc) {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        for (int t = 0; t < kPixels; ++t) acc[t] = 0.0f;
        for (int base = rowptr[oc]; base < rowptr[oc + 1]; base += kChunk) {
          const int count = rowptr[oc + 1] - base < kChunk ? rowptr[oc + 1] - base : kChunk;
          for (int i = 0; i < count; ++i) staged[i] = decode_entry(s, colidx[base + i], values[base + i]);
          for (int t = 0; t < kPixels; ++t) {
            const Origin o = origin(s, tile, t);
            if (o.active) acc[t] = accumulate(s, image, o, staged, count, acc[t]);
          }
        }
        for (int t = 0; t < kPixels; ++t) {
          if (origin(s, tile, t).active) out[out_index(s, n, oc, tile, t)] = finish(acc[t], bias, oc, relu);
        }
      }
    }
  }
}

}  // namespace sparse_tile
}  // namespace pyprune
