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
// The alternative, im2col then CSR x dense, shares the row kernel (ConvAlgo::kIm2col).
// From 8 images on the batched convolution (sparse_lanes.cpp) is faster; codes are
// unpacked in sparse_codes.cpp. bench/sparse_conv.py compares them all (bench/README.md).
#include "sparse.h"

#include "sparse_internal.h"
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

using namespace internal;

constexpr int64_t kSpan = 128;     // outputs per work item: 8 AVX-512 / 16 AVX2 registers

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

}  // namespace

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
    internal::conv2d_batched(x, w, bias, relu && !residual, g, out, isa, threads);
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
