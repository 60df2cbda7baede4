// The batched sparse convolution and its lanes layout (sparse.h): groups of 8 or 16 images
// on the vector lanes.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse.h"
#include "sparse_internal.h"
#include "sparse_row.h"

namespace pyprune {
namespace sparse {
namespace {

using namespace internal;

// dst[x * lanes + l] = src[l * src_stride + x] for x < n, l < count: one image row per lane.
void row_to_lanes(const float* src, int64_t src_stride, int64_t count, int64_t n, int64_t lanes, float* dst,
              bool vector) {
  int64_t x0 = 0, l0 = 0;
  if (vector && count == lanes) {
    for (; x0 + 8 <= n; x0 += 8) {
      for (l0 = 0; l0 < lanes; l0 += 8) {
        transpose8x8_avx2(src + l0 * src_stride + x0, src_stride, dst + x0 * lanes + l0, lanes);
      }
    }
  }
  for (int64_t l = 0; l < count; ++l) {
    for (int64_t x = x0; x < n; ++x) dst[x * lanes + l] = src[l * src_stride + x];
  }
}

// dst[l * dst_stride + p] = src[p * lanes + l] for p < np, l < count: np pixels in the
// lanes layout back to one row per image.
void row_from_lanes(const float* src, int64_t np, int64_t lanes, int64_t count, int64_t dst_stride, float* dst,
                bool vector) {
  int64_t l0 = 0;
  if (vector && np == 8) {
    for (; l0 + 8 <= count; l0 += 8) transpose8x8_avx2(src + l0, lanes, dst + l0 * dst_stride, dst_stride);
  }
  for (int64_t l = l0; l < count; ++l) {
    for (int64_t p = 0; p < np; ++p) dst[l * dst_stride + p] = src[p * lanes + l];
  }
}

// ---- batched convolution: images on the vector lanes ------------------------------------
// Groups of `lanes` images are laid out [channel][padded row][padded column][lane] (the
// "lanes" layout, sparse.h). Weight (ic, kh, kw) then reads, for output pixel (oh, ow), the
// `lanes` floats at
//     ((ic * hp + oh*sh + kh*dh + shift) * wp + ow*sw + kw*dw + shift) * lanes
// : an offset fixed per CSR column plus one fixed per pixel, both multiples of `lanes`,
// so every load is one aligned vector (the direct kernel's runs start anywhere and half
// its loads straddle two cache lines). Each non-zero becomes one broadcast and one
// aligned FMA per pixel of the tile. shift = stored padding - the convolution's padding.
struct LanesLayout {
  int64_t lanes, pad, height, width, hp, wp, channel, group;

  LanesLayout(int64_t channels, int64_t height_, int64_t width_, int64_t pad_, int64_t lanes_)
      : lanes(lanes_), pad(pad_), height(height_), width(width_) {
    hp = height + 2 * pad;
    wp = width + 2 * pad;
    channel = hp * wp * lanes;
    group = channels * channel;
  }

  // Channel c of the NCHW images [first, first + lanes) of x (those past the batch as zeros).
  void fill(const float* x, int64_t batch, int64_t channels, int64_t first, int64_t c, float* dst,
            bool vector) const {
    const int64_t count = std::min(lanes, batch - first), plane = height * width;
    const float* src = x + (first * channels + c) * plane;
    const bool full = count == lanes && vector;  // then the transposes write every float inside the border
    if (!full) {
      std::fill(dst, dst + channel, 0.0f);
    } else {
      std::fill(dst, dst + pad * wp * lanes, 0.0f);
      std::fill(dst + (pad + height) * wp * lanes, dst + channel, 0.0f);
    }
    for (int64_t y = 0; y < height; ++y) {
      float* row = dst + (y + pad) * wp * lanes;
      if (full) {
        std::fill(row, row + pad * lanes, 0.0f);
        std::fill(row + (pad + width) * lanes, row + wp * lanes, 0.0f);
      }
      row_to_lanes(src + y * width, channels * plane, count, width, lanes, row + pad * lanes, vector);
    }
  }

  // The images [first, first + count) of group buffer `src`, channel c, back to NCHW out.
  void drain(const float* src, int64_t channels, int64_t first, int64_t count, int64_t c, float* out,
             bool vector) const {
    const int64_t plane = height * width;
    for (int64_t y = 0; y < height; ++y) {
      const float* row = src + (y + pad) * wp * lanes + pad * lanes;
      float* dst = out + (first * channels + c) * plane + y * width;
      for (int64_t x0 = 0; x0 < width; x0 += kMaxTilePixels) {
        row_from_lanes(row + x0 * lanes, std::min(kMaxTilePixels, width - x0), lanes, count, channels * plane, dst + x0,
                   vector);
      }
    }
  }
};

PixelKernel pixel_kernel(Isa isa, int64_t lanes) {
  if (isa == Isa::kAvx512 && lanes == 16) return pixels_avx512;
  if (isa == Isa::kAvx512 || isa == Isa::kAvx2) return pixels_avx2;
  return pixels_scalar;
}

void check_lanes(int64_t lanes) {
  if (lanes != 8 && lanes != 16) throw std::invalid_argument("lanes must be 8 or 16, got " + std::to_string(lanes));
}

// The convolution of `groups` groups in layout L; store(gi, o, i, ow0, np, acc) receives the
// accumulated tile (np pixels of output row i from column ow0, pixel-major, no bias yet)
// and may overwrite acc. Work items: (group, output row, block of output channels); the
// block's rows share the row's input window, which stays in cache between them. Every
// item multiplies the same entries, so a static split balances.
template <class Store>
void conv_lanes(const float* images, const LanesLayout& L, const Csr& w, const ConvGeometry& g, int64_t groups,
                Isa isa, int threads, Store&& store) {
  if (g.pad_h > L.pad || g.pad_w > L.pad) throw std::invalid_argument("sparse conv2d: padding exceeds the layout's");
  if (L.group > kMaxOffset) throw std::invalid_argument("sparse conv2d: one image group is too large for 32-bit offsets");
  const int64_t lanes = L.lanes, oh_n = g.out_h(), ow_n = g.out_w(), taps = g.kernel_h * g.kernel_w;
  // Each entry's input offset, resolved once per call rather than per tile.
  std::vector<int32_t> table(static_cast<size_t>(g.in_channels * taps));
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t start = (kh * g.dilation_h * L.wp + kw * g.dilation_w) * lanes;
      for (int64_t c = 0; c < g.in_channels; ++c) {
        table[c * taps + kh * g.kernel_w + kw] = static_cast<int32_t>(c * L.channel + start);
      }
    }
  }
  const int64_t nnz = w.rowptr[w.rows];
  std::vector<int32_t> off(static_cast<size_t>(nnz));
  for (int64_t j = 0; j < nnz; ++j) off[j] = table[w.colidx[j]];
  const PixelKernel kernel = pixel_kernel(isa, lanes);
  const int64_t blocks = ceil_div(g.out_channels, kRowBlock), step = g.stride_w * lanes;
  const int64_t origin = ((L.pad - g.pad_h) * L.wp + L.pad - g.pad_w) * lanes;

#pragma omp parallel for schedule(static) collapse(3) num_threads(std::max(1, threads))
  for (int64_t gi = 0; gi < groups; ++gi) {
    for (int64_t i = 0; i < oh_n; ++i) {
      for (int64_t ob = 0; ob < blocks; ++ob) {
        alignas(64) float acc[kMaxTilePixels * 16];
        const float* row = images + gi * L.group + origin + i * g.stride_h * L.wp * lanes;
        for (int64_t o = ob * kRowBlock; o < std::min(g.out_channels, (ob + 1) * kRowBlock); ++o) {
          const int64_t lo = w.rowptr[o], hi = w.rowptr[o + 1];
          for (int64_t ow0 = 0; ow0 < ow_n; ow0 += kMaxTilePixels) {
            const int64_t np = std::min(kMaxTilePixels, ow_n - ow0);
            kernel(row + ow0 * step, off.data() + lo, w.values + lo, hi - lo, np, step, lanes, acc);
            store(gi, o, i, ow0, np, acc);
          }
        }
      }
    }
  }
}

// f(group, channel) for every pair, in parallel.
template <class F>
void each_group_channel(int64_t groups, int64_t channels, int threads, F&& f) {
#pragma omp parallel for schedule(static) collapse(2) num_threads(std::max(1, threads))
  for (int64_t gi = 0; gi < groups; ++gi) {
    for (int64_t c = 0; c < channels; ++c) f(gi, c);
  }
}

int64_t lanes_for(int64_t batch, Isa isa) { return batch > 8 && isa == Isa::kAvx512 ? 16 : 8; }

// NCHW in, NCHW out: the input packed into the workspace, each tile transposed back as it
// is stored.
void conv2d_batched_impl(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g,
                         float* out, Isa isa, int threads) {
  const int64_t lanes = lanes_for(g.batch, isa), groups = ceil_div(g.batch, lanes);
  const LanesLayout L(g.in_channels, g.height, g.width, std::max(g.pad_h, g.pad_w), lanes);
  const bool vector = isa != Isa::kScalar;  // AVX2 transposes (every AVX-512 CPU has AVX2)
  float* images = workspace(static_cast<size_t>(groups * L.group));
  to_lanes(x, g.batch, g.in_channels, g.height, g.width, lanes, L.pad, images, isa, threads);
  const int64_t out_plane = g.out_h() * g.out_w();
  conv_lanes(images, L, w, g, groups, isa, threads, [&](int64_t gi, int64_t o, int64_t i, int64_t ow0, int64_t np,
                                                         float* acc) {
    epilogue(acc, np * lanes, bias ? bias[o] : 0.0f, relu, acc);
    row_from_lanes(acc, np, lanes, std::min(lanes, g.batch - gi * lanes), g.out_channels * out_plane,
               out + (gi * lanes * g.out_channels + o) * out_plane + i * g.out_w() + ow0, vector);
  });
}

}  // namespace

namespace internal {

void conv2d_batched(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g, float* out,
                    Isa isa, int threads) {
  conv2d_batched_impl(x, w, bias, relu, g, out, isa, threads);
}

}  // namespace internal

using namespace internal;

// ---- the lanes layout, public ------------------------------------------------------------

int64_t lanes_for(int64_t batch) { return lanes_for(batch, best_isa()); }

void to_lanes(const float* x, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t lanes,
              int64_t pad, float* dst, Isa isa, int threads) {
  check_lanes(lanes);
  const LanesLayout L(channels, height, width, pad, lanes);
  each_group_channel(ceil_div(batch, lanes), channels, threads, [&](int64_t gi, int64_t c) {
    L.fill(x, batch, channels, gi * lanes, c, dst + gi * L.group + c * L.channel, isa != Isa::kScalar);
  });
}

void from_lanes(const float* src, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t lanes,
                int64_t pad, float* out, Isa isa, int threads) {
  check_lanes(lanes);
  const LanesLayout L(channels, height, width, pad, lanes);
  each_group_channel(ceil_div(batch, lanes), channels, threads, [&](int64_t gi, int64_t c) {
    L.drain(src + gi * L.group + c * L.channel, channels, gi * lanes, std::min(lanes, batch - gi * lanes), c, out,
            isa != Isa::kScalar);
  });
}

void conv2d_lanes(const float* x, int64_t in_pad, int64_t lanes, const Csr& w, const float* bias, bool relu,
                  const ConvGeometry& g, int64_t out_pad, float* out, Isa isa, int threads, const float* residual) {
  check_geometry(g);
  check_lanes(lanes);
  if (g.batch % lanes != 0) throw std::invalid_argument("sparse conv2d: a lanes batch is a whole number of groups");
  const int64_t groups = g.batch / lanes;
  const LanesLayout L(g.in_channels, g.height, g.width, in_pad, lanes);
  const LanesLayout O(g.out_channels, g.out_h(), g.out_w(), out_pad, lanes);
  // The border stays zero: the next convolution reads it as its padding.
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
  for (int64_t k = 0; k < groups * g.out_channels; ++k) {
    float* plane = out + k * O.channel;
    std::fill(plane, plane + out_pad * O.wp * lanes, 0.0f);
    std::fill(plane + (out_pad + O.height) * O.wp * lanes, plane + O.channel, 0.0f);
    for (int64_t y = out_pad; y < out_pad + O.height; ++y) {
      std::fill(plane + y * O.wp * lanes, plane + (y * O.wp + out_pad) * lanes, 0.0f);
      std::fill(plane + (y * O.wp + out_pad + O.width) * lanes, plane + (y + 1) * O.wp * lanes, 0.0f);
    }
  }
  if (g.out_channels == 0 || groups == 0) return;
  conv_lanes(x, L, w, g, groups, isa, threads, [&](int64_t gi, int64_t o, int64_t i, int64_t ow0, int64_t np,
                                                    float* acc) {
    const int64_t at = (gi * g.out_channels + o) * O.channel + ((i + out_pad) * O.wp + ow0 + out_pad) * lanes;
    if (residual) {  // a residual block's sum, read while the tile is stored, and its ReLU after it
      const float* res = residual + at;
      for (int64_t k = 0; k < np * lanes; ++k) acc[k] += res[k];
    }
    epilogue(acc, np * lanes, bias ? bias[o] : 0.0f, relu, out + at);
  });
}


void pixels_scalar(const float* base, const int32_t* off, const float* val, int64_t nnz, int64_t np, int64_t step,
                   int64_t lanes, float* acc) {
  std::fill(acc, acc + np * lanes, 0.0f);
  for (int64_t j = 0; j < nnz; ++j) {
    const float w = val[j];
    for (int64_t p = 0; p < np; ++p) {
      const float* in = base + off[j] + p * step;
      for (int64_t l = 0; l < lanes; ++l) acc[p * lanes + l] += w * in[l];
    }
  }
}

}  // namespace sparse
}  // namespace pyprune
