// Sparse inference kernels for magnitude-masked layers: convolution and linear with
// weights in CSR (rows = output channels / features, columns = the flattened
// (in_channel, kh, kw) / input feature), fp32 activations, optional bias and fused ReLU.
//
// Plain C++ on raw buffers (no torch headers); sparse_bindings.cpp checks and converts
// tensors. Every kernel has three instruction-set paths selected at run time: AVX-512F
// and AVX2+FMA (each compiled under `#pragma GCC target` in its own file, used when the
// CPU has it) and a portable scalar fallback. All give the same results up to float
// summation order.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pyprune {
namespace sparse {

enum class Isa { kScalar, kAvx2, kAvx512 };
// kDirect: direct sparse convolution on the stride-phase wide grid (sparse.cpp), output
//   pixels on the vector lanes;
// kBatched: direct convolution with groups of 8 or 16 images on the vector lanes;
// kIm2col: im2col, then the CSR x dense product (shares kDirect's row kernel);
// kAuto: kBatched from kBatchedFrom images on, else kDirect.
enum class ConvAlgo { kAuto, kDirect, kBatched, kIm2col };
constexpr int64_t kBatchedFrom = 8;
ConvAlgo parse_algo(const std::string& name);  // "auto" | "direct" | "batched" | "im2col"

// The best path this CPU supports.
Isa best_isa();
// "scalar", "avx2", "avx512"; "auto" -> best_isa(). Throws std::invalid_argument for
// anything else, and for a name this CPU does not support.
Isa parse_isa(const std::string& name);
const char* isa_name(Isa isa);

// A CSR matrix with `rows` rows; colidx entries lie in [0, cols).
struct Csr {
  int64_t rows = 0;
  int64_t cols = 0;
  const int32_t* rowptr = nullptr;  // rows + 1 entries, rowptr[0] = 0, non-decreasing
  const int32_t* colidx = nullptr;  // rowptr[rows] entries
  const float* values = nullptr;
};

// Throws std::invalid_argument naming the first inconsistency (O(rows + nnz)). Inline
// so that the CUDA extension checks CSR tensors with the same code.
inline void validate(const Csr& w, int64_t nnz) {
  if (w.rows < 0 || w.cols < 0) throw std::invalid_argument("CSR: negative shape");
  if (w.rowptr[0] != 0) throw std::invalid_argument("CSR: rowptr[0] must be 0");
  for (int64_t r = 0; r < w.rows; ++r) {
    if (w.rowptr[r + 1] < w.rowptr[r]) {
      throw std::invalid_argument("CSR: rowptr decreases at row " + std::to_string(r));
    }
  }
  if (w.rowptr[w.rows] != nnz) {
    throw std::invalid_argument("CSR: rowptr ends at " + std::to_string(w.rowptr[w.rows]) + " but there are " +
                                std::to_string(nnz) + " entries");
  }
  int32_t lo = 0, hi = 0;  // a vectorisable min/max first; the slow scan only to name the culprit
  for (int64_t j = 0; j < nnz; ++j) {
    lo = lo < w.colidx[j] ? lo : w.colidx[j];
    hi = hi > w.colidx[j] ? hi : w.colidx[j];
  }
  if (lo >= 0 && (nnz == 0 || hi < w.cols)) return;
  for (int64_t j = 0; j < nnz; ++j) {
    if (w.colidx[j] < 0 || w.colidx[j] >= w.cols) {
      throw std::invalid_argument("CSR: column index " + std::to_string(w.colidx[j]) + " at entry " +
                                  std::to_string(j) + " outside [0, " + std::to_string(w.cols) + ")");
    }
  }
}

// A CSR matrix whose values are codebook indices, as deep compression stores it (the .ppz's
// CSR-quantized sections hold the same, Huffman-coded). Entry j is the `code_bits +
// gap_bits` bits at bit j * (code_bits + gap_bits) of the little-endian bit stream
// `entries`: the low `code_bits` index `codebook` (index 0 is the value 0), the high
// `gap_bits` hold gap - 1, where gap is the entry's column minus the previous entry's in its
// row (the first entry's: its column + 1). A gap wider than 2^gap_bits is bridged by
// filler entries of code 0 and the widest gap. `codebook_size` floats, one codebook for all
// rows (codebook_stride 0) or one per row, codebook_stride apart.
struct CodesCsr {
  int64_t rows = 0;
  int64_t cols = 0;
  const int32_t* rowptr = nullptr;  // rows + 1 entries over `entries`, fillers included
  const uint8_t* entries = nullptr;
  int64_t entry_bytes = 0;  // of the stream
  int code_bits = 0;  // 1..8
  int gap_bits = 0;   // 1..8
  const float* codebook = nullptr;
  int64_t codebook_size = 0;
  int64_t codebook_stride = 0;
  // Optional, `rows` floats: row r's values are codebook[code] * row_scale[r], the
  // product BatchNorm folding computes, so one shared codebook serves a folded layer.
  const float* row_scale = nullptr;
};

// The plain CSR of `p`, fillers dropped, into rowptr (rows + 1), colidx and values (room
// for n_entries = p.rowptr[rows] each), on up to `threads` OpenMP threads (chunks of
// rows; the same result for any count). Throws std::invalid_argument for a bad rowptr, a
// stream too short, a code past the codebook or a column past `cols`.
void unpack_codes(const CodesCsr& p, int64_t n_entries, int32_t* rowptr, int32_t* colidx, float* values,
                  int threads = 1);

struct ConvGeometry {
  int64_t batch, in_channels, height, width;  // input NCHW
  int64_t out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t out_h() const { return (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1; }
  int64_t out_w() const { return (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1; }
};

// out[n, oc, oh, ow] = act(bias[oc] + sum_j values[j] * x_padded[n, ic_j, oh*sh + kh_j*dh, ow*sw + kw_j*dw])
// over the entries j of row oc, with column = (ic * kernel_h + kh) * kernel_w + kw.
// x: batch*in_channels*height*width floats; out: batch*out_channels*out_h*out_w floats;
// bias may be null. Parallel over (image, output channel) with `threads` OpenMP threads.
// With `residual` (out's shape) each output is act(conv + bias + residual): a residual
// block's add and the ReLU after it.
void conv2d(const float* x, const Csr& w, const float* bias, bool relu, const ConvGeometry& g, float* out, Isa isa,
            int threads, ConvAlgo algo = ConvAlgo::kAuto, const float* residual = nullptr);

// ---- the lanes layout: the batched convolution's activations kept between layers ----------
// A batch of NCHW images as groups of `lanes` (8 or 16) images, each group
// [channel][height + 2 pad][width + 2 pad][lane], zero on the border and in the lanes past
// the batch; a lanes tensor is [groups, channels, height + 2 pad, width + 2 pad, lanes].
// Consecutive sparse convolutions exchange it directly, so the transposes happen once
// per run of such layers, not per layer. Element-wise operations (ReLU, residual adds)
// keep the border zero.

// The lane count the batched convolution uses for `batch` images on this CPU.
int64_t lanes_for(int64_t batch);
// x: batch*channels*height*width floats; dst: ceil(batch / lanes) groups.
void to_lanes(const float* x, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t lanes,
              int64_t pad, float* dst, Isa isa, int threads);
// The first `batch` images of src back to NCHW.
void from_lanes(const float* src, int64_t batch, int64_t channels, int64_t height, int64_t width, int64_t lanes,
                int64_t pad, float* out, Isa isa, int threads);
// conv2d on lanes tensors: g.batch = groups * lanes, g.height/width the images' size;
// g.pad_h, g.pad_w <= in_pad. out gets the output with a zero border of out_pad; lanes
// past the batch hold act(bias), which from_lanes drops. With `residual` (a lanes tensor of
// out's shape) each output is act(conv + bias + residual): a residual block's add and the
// ReLU after it, without two more passes over the activations.
void conv2d_lanes(const float* x, int64_t in_pad, int64_t lanes, const Csr& w, const float* bias, bool relu,
                  const ConvGeometry& g, int64_t out_pad, float* out, Isa isa, int threads,
                  const float* residual = nullptr);

// out[n, o] = act(bias[o] + sum_j values[j] * x[n, colidx[j]]) over the entries j of row o.
// x: batch*w.cols floats; out: batch*w.rows floats; bias may be null.
void linear(const float* x, int64_t batch, const Csr& w, const float* bias, bool relu, float* out, Isa isa,
            int threads);

}  // namespace sparse
}  // namespace pyprune
