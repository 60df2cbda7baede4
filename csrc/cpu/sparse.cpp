// Sparse convolution and linear kernels; see sparse.h.
//
// Convolution algorithm: direct sparse convolution on a "wide" output grid.
// The input of each image is copied once, zero-padded and split by stride phase:
// plane (a, b) of channel c holds x_pad[c, i*sh + a, j*sw + b] at [i, j], with a row
// pitch of ws = ceil(padded width / sw). In that layout every weight (ic, kh, kw) reads
// its inputs for all outputs as ONE contiguous run starting at a fixed offset:
//     out_wide[oh*ws + ow] += w * plane_ic_phase[(oh + kh*dh/sh)*ws + ow + kw*dw/sw]
// so a CSR row becomes a list of (offset, value) pairs, and each pair is an axpy over the
// whole output plane with unit stride, whatever the stride or dilation. The columns
// ow >= out_w of the wide grid are computed and dropped (ws - out_w of every ws: 6% on
// 32x32 maps, 20% on 8x8 ones): that waste buys unit-stride, aligned-enough loads.
// Outputs are accumulated in registers, 64 at a time, over all the row's entries before
// being stored once, so each multiply-add costs one load from L1/L2 and no store.
//
// The alternative, im2col then CSR x dense, shares the row kernel (ConvAlgo::kIm2col);
// bench/sparse_conv.py --algo compares the two (bench/README.md).
#include "sparse.h"

#include "sparse_row.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

namespace pyprune {
namespace sparse {
namespace {

constexpr int64_t kMaxOffset = std::numeric_limits<int32_t>::max();
constexpr int64_t kSpan = 128;     // outputs per work item: 8 AVX-512 / 16 AVX2 registers
constexpr int64_t kRowBlock = 8;  // output channels per work item

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

RowKernel row_kernel(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return row_avx512;
    case Isa::kAvx2: return row_avx2;
    default: return row_scalar;
  }
}

float activate(float v, bool relu) { return relu && v < 0.0f ? 0.0f : v; }

// A per-thread buffer kept between calls, 64-byte aligned. A fresh allocation of this size
// is mmap-ed, and touching its new pages cost more than the convolution itself at batch 32
// (measured). Not value-initialised: callers write every float before reading it.
float* workspace(size_t floats) {
  constexpr size_t kAlign = 64 / sizeof(float);
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats + kAlign) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(floats + kAlign);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (kAlign - p / sizeof(float) % kAlign) % kAlign;
}

// dst[i] = act(src[i] + b); two branch-free loops so the compiler vectorises them.
inline void epilogue(const float* src, int64_t n, float b, bool relu, float* dst) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) dst[i] = std::max(src[i] + b, 0.0f);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] + b;
  }
}

// ---- convolution layouts ------------------------------------------------------------
// A layout says how one image's input is laid out for the row kernel: `fill` writes input
// channel c's block (`channel` floats), the run read for weight (ic, kh, kw) starts at
// ic * channel + tap_offset(kh, kw), and the row kernel's output index q maps to
// (q / pitch, q % pitch).

// Direct convolution on the wide grid of stride phases (see the top of this file).
struct PhaseLayout {
  int64_t sh, sw, hs, ws, plane, channel, image, wide, pitch;

  explicit PhaseLayout(const ConvGeometry& g) {
    sh = g.stride_h;
    sw = g.stride_w;
    hs = ceil_div(g.height + 2 * g.pad_h, sh);
    ws = ceil_div(g.width + 2 * g.pad_w, sw);
    plane = hs * ws;
    channel = sh * sw * plane;
    pitch = ws;
    wide = round_up(g.out_h() * ws, kGranule);
    // Reads for dropped outputs run past the last plane by less than a plane plus the wide grid.
    image = g.in_channels * channel + plane + wide;
  }

  int64_t tap_offset(const ConvGeometry& g, int64_t kh, int64_t kw) const {
    const int64_t dy = kh * g.dilation_h, dx = kw * g.dilation_w;
    return ((dy % sh) * sw + dx % sw) * plane + (dy / sh) * ws + dx / sw;
  }

  void fill(const float* x, const ConvGeometry& g, int64_t c, float* dst) const {
    const float* src = x + c * g.height * g.width;
    // One padded input row, then split into its sw column phases. Reading the row once,
    // contiguously, beat gathering every sw-th float per phase by ~3x at stride 2 (measured).
    thread_local std::vector<float> padded;
    padded.resize(static_cast<size_t>(sw * ws));
    for (int64_t a = 0; a < sh; ++a) {
      for (int64_t i = 0; i < hs; ++i) {
        const int64_t y = i * sh + a - g.pad_h;
        float* row0 = dst + a * sw * plane + i * ws;  // phase (a, b) row i is at row0 + b * plane
        const bool inside = y >= 0 && y < g.height;
        float* p = sw == 1 ? row0 : padded.data();
        std::fill(p, p + (inside ? g.pad_w : sw * ws), 0.0f);
        if (inside) {
          std::memcpy(p + g.pad_w, src + y * g.width, sizeof(float) * static_cast<size_t>(g.width));
          std::fill(p + g.pad_w + g.width, p + sw * ws, 0.0f);
        }
        if (sw == 2) {
          float* row1 = row0 + plane;
          for (int64_t j = 0; j < ws; ++j) {
            row0[j] = p[2 * j];
            row1[j] = p[2 * j + 1];
          }
        } else if (sw > 2) {
          for (int64_t b = 0; b < sw; ++b) {
            for (int64_t j = 0; j < ws; ++j) row0[b * plane + j] = p[j * sw + b];
          }
        }
      }
    }
  }
};

// im2col: one row of out_h*out_w (rounded up) inputs per (ic, kh, kw); a CSR row times
// this matrix is the sparse x dense product. kernel_h*kernel_w times the input's memory.
struct Im2colLayout {
  int64_t taps, channel, image, wide, pitch;

  explicit Im2colLayout(const ConvGeometry& g) {
    taps = g.kernel_h * g.kernel_w;
    pitch = g.out_w();
    wide = round_up(g.out_h() * pitch, kGranule);
    channel = taps * wide;
    image = g.in_channels * channel;
  }

  int64_t tap_offset(const ConvGeometry& g, int64_t kh, int64_t kw) const { return (kh * g.kernel_w + kw) * wide; }

  void fill(const float* x, const ConvGeometry& g, int64_t c, float* dst) const {
    const float* src = x + c * g.height * g.width;
    const int64_t oh = g.out_h(), ow = g.out_w();
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t kh = t / g.kernel_w, kw = t % g.kernel_w;
      float* row = dst + t * wide;
      for (int64_t i = 0; i < oh; ++i) {
        const int64_t y = i * g.stride_h + kh * g.dilation_h - g.pad_h;
        for (int64_t j = 0; j < ow; ++j) {
          const int64_t xx = j * g.stride_w + kw * g.dilation_w - g.pad_w;
          row[i * ow + j] = y >= 0 && y < g.height && xx >= 0 && xx < g.width ? src[y * g.width + xx] : 0.0f;
        }
      }
      std::fill(row + oh * ow, row + wide, 0.0f);
    }
  }
};

void check_geometry(const ConvGeometry& g) {
  if (g.batch < 0 || g.in_channels < 0 || g.height < 0 || g.width < 0 || g.out_channels < 0 || g.kernel_h < 1 ||
      g.kernel_w < 1 || g.stride_h < 1 || g.stride_w < 1 || g.pad_h < 0 || g.pad_w < 0 || g.dilation_h < 1 ||
      g.dilation_w < 1) {
    throw std::invalid_argument("sparse conv2d: sizes must be >= 0, kernel, stride and dilation >= 1, padding >= 0");
  }
  if (g.out_h() < 1 || g.out_w() < 1) {
    throw std::invalid_argument("sparse conv2d: the kernel (with dilation) is larger than the padded input");
  }
}

template <class Layout>
void conv2d_with(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g, float* out,
                 Isa isa, int threads, const float* residual) {
  const Layout L(g);
  if (L.image > kMaxOffset) throw std::invalid_argument("sparse conv2d: one image is too large for 32-bit offsets");
  const int64_t oh = g.out_h(), ow = g.out_w();
  // Where each CSR column's run starts: built per column, not per entry, without divisions.
  const int64_t taps = g.kernel_h * g.kernel_w;
  std::vector<int32_t> table(static_cast<size_t>(g.in_channels * taps));
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t t = kh * g.kernel_w + kw, start = L.tap_offset(g, kh, kw);
      for (int64_t c = 0; c < g.in_channels; ++c) table[c * taps + t] = static_cast<int32_t>(c * L.channel + start);
    }
  }
  const RowKernel row = row_kernel(isa);

  float* images = workspace(static_cast<size_t>(g.batch * L.image));
  const int64_t in_image = g.in_channels * g.height * g.width;
  const int64_t filled = g.in_channels * L.channel;
  const int nt = std::max(1, threads);

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static) collapse(2)
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t c = 0; c < g.in_channels; ++c) L.fill(x + n * in_image, g, c, images + n * L.image + c * L.channel);
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.batch; ++n) {  // slack after the channels: read for dropped outputs only
      std::fill(images + n * L.image + filled, images + (n + 1) * L.image, 0.0f);
    }
    // Work items: (image, span of kSpan outputs, block of kRowBlock output channels). The
    // rows of a block reuse the same input window (about channels x (kSpan + taps rows)
    // floats), which stays in L1; whole-plane rows streamed each image from L2 and ran
    // ~2x slower at batch 32 (measured). Rows differ in length (global magnitude
    // pruning), so items are handed out dynamically.
    const int64_t spans = ceil_div(L.wide, kSpan), blocks = ceil_div(g.out_channels, kRowBlock);
    float acc[kSpan];
#pragma omp for schedule(guided) collapse(3)
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t t = 0; t < spans; ++t) {
        for (int64_t ob = 0; ob < blocks; ++ob) {
          const int64_t q0 = t * kSpan, len = std::min(kSpan, L.wide - q0);
          const float* base = images + n * L.image + q0;
          for (int64_t o = ob * kRowBlock; o < std::min(g.out_channels, (ob + 1) * kRowBlock); ++o) {
            const int64_t lo = w.rowptr[o], hi = w.rowptr[o + 1];
            row(base, w.colidx + lo, table.data(), w.values + lo, hi - lo, len, acc);
            // Wide-grid outputs [q0, q0 + len) back to (oh, ow), dropping ow >= out_w.
            float* dst = out + (n * g.out_channels + o) * oh * ow;
            const float b = bias ? bias[o] : 0.0f;
            for (int64_t i = q0 / L.pitch; i < oh && i * L.pitch < q0 + len; ++i) {
              const int64_t from = std::max(q0, i * L.pitch), to = std::min(q0 + len, i * L.pitch + ow);
              if (to <= from) continue;
              float* run = acc + (from - q0);
              const int64_t at = i * ow + (from - i * L.pitch);
              if (residual) {  // a residual block's add, before its ReLU
                const float* res = residual + (n * g.out_channels + o) * oh * ow + at;
                for (int64_t k = 0; k < to - from; ++k) run[k] += res[k];
              }
              epilogue(run, to - from, b, relu, dst + at);
            }
          }
        }
      }
    }
  }
}

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
void conv2d_batched(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g, float* out,
                    Isa isa, int threads) {
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


// Portable C++ (the compiler may still use the SSE2 that every x86-64 has).
void row_scalar(const float* base, const int32_t* col, const int32_t* table, const float* val, int64_t nnz,
                int64_t len, float* acc) {
  constexpr int64_t kTile = 64;
  for (int64_t q = 0; q < len; q += kTile) {
    const int64_t n = std::min(kTile, len - q);
    float t[kTile] = {0.0f};
    for (int64_t j = 0; j < nnz; ++j) {
      const float* p = base + table[col[j]] + q;
      const float w = val[j];
      for (int64_t i = 0; i < n; ++i) t[i] += w * p[i];
    }
    std::memcpy(acc + q, t, sizeof(float) * static_cast<size_t>(n));
  }
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

void unpack_codes(const CodesCsr& p, int64_t n_entries, int32_t* rowptr, int32_t* colidx, float* values) {
  if (p.code_bits < 1 || p.code_bits > 8 || p.gap_bits < 1 || p.gap_bits > 8) {
    throw std::invalid_argument("codes CSR: code_bits and gap_bits must be in [1, 8]");
  }
  const int width = p.code_bits + p.gap_bits;
  if (p.entry_bytes * 8 < n_entries * width) {
    throw std::invalid_argument("codes CSR: " + std::to_string(n_entries) + " entries of " + std::to_string(width) +
                                " bits need " + std::to_string((n_entries * width + 7) / 8) + " bytes, got " +
                                std::to_string(p.entry_bytes));
  }
  if (p.rows < 0 || p.cols < 0 || p.rowptr[0] != 0 || p.rowptr[p.rows] != n_entries) {
    throw std::invalid_argument("codes CSR: rowptr must start at 0 and end at the number of entries");
  }
  for (int64_t r = 0; r < p.rows; ++r) {  // all of it before any entry is read
    if (p.rowptr[r + 1] < p.rowptr[r]) throw std::invalid_argument("codes CSR: rowptr decreases at row " + std::to_string(r));
  }
  const uint32_t code_mask = (1u << p.code_bits) - 1, entry_mask = (1u << width) - 1;
  // Entry j starts at bit j * width. Where 8 bytes from its first byte lie inside the
  // stream, one unaligned 64-bit load holds it (width <= 16, shift <= 7); the last few
  // entries are read a byte at a time.
  const int64_t fast_end = p.entry_bytes >= 8 ? (p.entry_bytes - 8) * 8 / width : 0;
  auto entry_at = [&](int64_t j) -> uint32_t {
    const int64_t bit = j * width, byte = bit >> 3;
    uint64_t word = 0;
    if (j < fast_end) {
      std::memcpy(&word, p.entries + byte, sizeof(word));
    } else {
      for (int64_t b = byte, k = 0; b < p.entry_bytes && k < 8; ++b, ++k) word |= uint64_t{p.entries[b]} << (8 * k);
    }
    return static_cast<uint32_t>(word >> (bit & 7)) & entry_mask;
  };
  // The loop stays branch-free: columns only grow within a row, so checking the row's last
  // is enough, and a code past the codebook is only noted; a bad row is then walked again
  // to name its first bad entry.
  const uint32_t n_codes = static_cast<uint32_t>(p.codebook_size);
  int64_t out = 0;  // fillers (code 0) are dropped: the kernels would multiply them by zero
  rowptr[0] = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t lo = p.rowptr[r], hi = p.rowptr[r + 1];
    const float* book = p.codebook + r * p.codebook_stride;
    const float scale = p.row_scale ? p.row_scale[r] : 1.0f;  // x * 1.0f is x, bit for bit
    int64_t col = -1;
    uint32_t bad_code = 0;
    for (int64_t j = lo; j < hi; ++j) {
      const uint32_t e = entry_at(j), code = e & code_mask;
      col += static_cast<int64_t>(e >> p.code_bits) + 1;
      bad_code |= code >= n_codes;
      colidx[out] = static_cast<int32_t>(col);
      values[out] = book[code < n_codes ? code : 0] * scale;
      out += code != 0;
    }
    rowptr[r + 1] = static_cast<int32_t>(out);
    if (!bad_code && col < p.cols) continue;
    col = -1;
    for (int64_t j = lo; j < hi; ++j) {
      const uint32_t e = entry_at(j), code = e & code_mask;
      col += static_cast<int64_t>(e >> p.code_bits) + 1;
      if (code >= n_codes || col >= p.cols) {
        throw std::invalid_argument("codes CSR: entry " + std::to_string(j) + " has " +
                                    (code >= n_codes ? "code " + std::to_string(code) + " past the codebook"
                                                     : "column " + std::to_string(col) + " past " +
                                                           std::to_string(p.cols)));
      }
    }
  }
}

Isa best_isa() {
  static const Isa best = __builtin_cpu_supports("avx512f")                               ? Isa::kAvx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                            : Isa::kScalar;
  return best;
}

bool supported(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return __builtin_cpu_supports("avx512f");
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (name != isa_name(isa)) continue;
    if (!supported(isa)) throw std::invalid_argument("isa '" + name + "': this CPU does not support it");
    return isa;
  }
  throw std::invalid_argument("isa must be 'auto', 'avx512', 'avx2' or 'scalar', got '" + name + "'");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

ConvAlgo parse_algo(const std::string& name) {
  if (name == "direct") return ConvAlgo::kDirect;
  if (name == "im2col") return ConvAlgo::kIm2col;
  if (name == "batched") return ConvAlgo::kBatched;
  if (name == "auto") return ConvAlgo::kAuto;
  throw std::invalid_argument("algo must be 'auto', 'direct', 'batched' or 'im2col', got '" + name + "'");
}


void conv2d(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g, float* out, Isa isa,
            int threads, ConvAlgo algo, const float* residual) {
  check_geometry(g);
  if (g.batch == 0 || g.out_channels == 0) return;
  if (algo == ConvAlgo::kAuto) algo = g.batch >= kBatchedFrom ? ConvAlgo::kBatched : ConvAlgo::kDirect;
  if (algo == ConvAlgo::kBatched) {
    // Its tiles leave through transposes; the residual goes on in one pass after them.
    conv2d_batched(x, w, bias, relu && !residual, g, out, isa, threads);
    if (residual) {
      const int64_t n = g.batch * g.out_channels * g.out_h() * g.out_w();
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads))
      for (int64_t k = 0; k < n; ++k) out[k] = activate(out[k] + residual[k], relu);
    }
  } else if (algo == ConvAlgo::kIm2col) {
    conv2d_with<Im2colLayout>(x, w, bias, relu, g, out, isa, threads, residual);
  } else {
    conv2d_with<PhaseLayout>(x, w, bias, relu, g, out, isa, threads, residual);
  }
}

void linear(const float* x, int64_t batch, const Csr& w, const float* bias, bool relu, float* out, Isa isa,
            int threads) {
  if (batch < 0) throw std::invalid_argument("sparse linear: negative batch");
  if (batch == 0 || w.rows == 0) return;
  // The batch goes on the vector lanes: x is transposed to [in_features][batch rounded up],
  // and entry j of a row reads the contiguous run at colidx[j] * pitch.
  const int64_t pitch = round_up(batch, kGranule);
  if (w.cols * pitch > kMaxOffset) throw std::invalid_argument("sparse linear: input too large for 32-bit offsets");
  const int64_t nnz = w.rowptr[w.rows];
  std::vector<int32_t> table(static_cast<size_t>(w.cols));
  for (int64_t i = 0; i < w.cols; ++i) table[i] = static_cast<int32_t>(i * pitch);
  const RowKernel row = row_kernel(isa);
  std::vector<float> xt(static_cast<size_t>((w.cols + 1) * pitch), 0.0f);
  const int nt = std::max(1, threads);
  const bool parallel = nt > 1 && nnz * pitch >= (1 << 15);

#pragma omp parallel num_threads(nt) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < w.cols; ++i) {
      for (int64_t n = 0; n < batch; ++n) xt[i * pitch + n] = x[n * w.cols + i];
    }
    std::vector<float> acc(static_cast<size_t>(pitch));
#pragma omp for schedule(dynamic, 4)
    for (int64_t o = 0; o < w.rows; ++o) {
      const int64_t lo = w.rowptr[o], hi = w.rowptr[o + 1];
      row(xt.data(), w.colidx + lo, table.data(), w.values + lo, hi - lo, pitch, acc.data());
      const float b = bias ? bias[o] : 0.0f;
      for (int64_t n = 0; n < batch; ++n) out[n * w.rows + o] = activate(acc[n] + b, relu);
    }
  }
}

}  // namespace sparse
}  // namespace pyprune
