// Tensor-level entry points of the sparse kernels: argument checks, CSR validation,
// output allocation, and torch's intra-op thread count passed on to OpenMP.
#include "sparse_bindings.h"

#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../common/sparse_conv_tile.h"
#include "sparse.h"

namespace pyprune {
namespace {

namespace sp = pyprune::sparse;
using Pair = std::pair<int64_t, int64_t>;

// Releases the GIL for its lifetime if this thread holds it: the kernels below run from
// Python (GIL held) and inside a program run (already released).
class ReleasedGil {
 public:
  ReleasedGil() {
    if (PyGILState_Check()) release_.emplace();
  }

 private:
  std::optional<pybind11::gil_scoped_release> release_;
};

void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* fn, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", what, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, fn, ": ", what, " must have ", dim, " dimension(s), got shape ", t.sizes());
}

// A checked CSR view. Its arrays are the tensors passed in (which must outlive it) or,
// for codes, this thread's unpacking buffers, valid until its next call here.
struct CheckedCsr {
  sp::Csr w;
};

// Kept between calls: fresh buffers of this size are mmap-ed, and faulting their pages in
// cost several times the unpacking itself on a VGG layer (measured).
struct UnpackBuffers {
  int32_t* rowptr;
  int32_t* colidx;
  float* values;
};

UnpackBuffers unpack_buffers(int64_t rows, int64_t n) {
  thread_local std::vector<int32_t> rowptr, colidx;
  thread_local std::vector<float> values;
  if (rowptr.size() < static_cast<size_t>(rows + 1)) rowptr.resize(static_cast<size_t>(rows + 1));
  if (colidx.size() < static_cast<size_t>(n)) {
    colidx.resize(static_cast<size_t>(n));
    values.resize(static_cast<size_t>(n));
  }
  return {rowptr.data(), colidx.data(), values.data()};
}

// The weights as the bindings take them: rowptr (int32) and either colidx (int32) and
// values (float32), one per entry, or codes (sp::CodesCsr): uint8 entries and the
// codebook (float32 [K + 1], or [rows, K + 1] for one per row; index 0 the value 0),
// whose K + 1 sets code_bits to ceil(log2(K + 1)). Checked against `cols` columns.
// Codes' extra arguments: the gap width and the optional per-row factor.
struct CodesArgs {
  int64_t gap_bits = 0;
  std::optional<at::Tensor> row_scale;
};

CheckedCsr csr_view(const at::Tensor& rowptr, const at::Tensor& colidx, const at::Tensor& values, int64_t cols,
                    const char* fn, const CodesArgs& extra = {}) {
  const std::optional<at::Tensor>& row_scale = extra.row_scale;
  check_tensor(rowptr, at::kInt, 1, fn, "rowptr");
  const bool codes = colidx.scalar_type() == at::kByte;
  check_tensor(colidx, codes ? at::kByte : at::kInt, 1, fn, codes ? "entries" : "colidx");
  check_tensor(values, at::kFloat, codes && values.dim() == 2 ? 2 : 1, fn, codes ? "codebook" : "values");
  TORCH_CHECK(rowptr.is_contiguous() && colidx.is_contiguous() && values.is_contiguous(), fn,
              ": rowptr, colidx and values must be contiguous");
  TORCH_CHECK(rowptr.numel() >= 1, fn, ": rowptr needs rows + 1 >= 1 entries");
  CheckedCsr c;
  sp::Csr& w = c.w;
  w.rows = rowptr.numel() - 1;
  w.cols = cols;
  w.rowptr = rowptr.const_data_ptr<int32_t>();
  int64_t n = colidx.numel();
  try {
    if (codes) {
      n = rowptr.const_data_ptr<int32_t>()[w.rows];
      TORCH_CHECK(n >= 0, fn, ": rowptr ends at a negative count ", n);
      const bool per_row = values.dim() == 2;
      const int64_t k = values.size(-1);
      TORCH_CHECK(k >= 2 && k <= 256, fn, ": a codebook has 2 to 256 values (the first 0), got ", k);
      TORCH_CHECK(!per_row || values.size(0) == w.rows, fn, ": a codebook per row needs ", w.rows, " rows, got ",
                  values.sizes());
      sp::CodesCsr p;
      p.rows = w.rows;
      p.cols = cols;
      p.rowptr = w.rowptr;
      p.entries = colidx.const_data_ptr<uint8_t>();
      p.entry_bytes = colidx.numel();
      p.code_bits = 64 - __builtin_clzll(static_cast<uint64_t>(k - 1));
      p.gap_bits = static_cast<int>(extra.gap_bits);
      TORCH_CHECK(extra.gap_bits >= 1 && extra.gap_bits <= 8, fn, ": codes need gap_bits in [1, 8], got ",
                  extra.gap_bits);
      p.codebook = values.const_data_ptr<float>();
      p.codebook_size = k;
      p.codebook_stride = per_row ? k : 0;
      if (row_scale) {
        check_tensor(*row_scale, at::kFloat, 1, fn, "row_scale");
        TORCH_CHECK(row_scale->is_contiguous() && row_scale->numel() == w.rows, fn, ": row_scale needs ", w.rows,
                    " contiguous entries, got ", row_scale->sizes());
        p.row_scale = row_scale->const_data_ptr<float>();
      }
      const UnpackBuffers buf = unpack_buffers(w.rows, n);
      sp::unpack_codes(p, n, buf.rowptr, buf.colidx, buf.values, at::get_num_threads());
      // unpack_codes checked everything validate() would: rowptr from 0, rising, and
      // every column in [0, cols) (gaps are at least 1 from column -1).
      w.rowptr = buf.rowptr;
      w.colidx = buf.colidx;
      w.values = buf.values;
    } else {
      TORCH_CHECK(!row_scale && extra.gap_bits == 0, fn,
                  ": row_scale and gap_bits go with codes (uint8 entries), not with float values");
      TORCH_CHECK(n == values.numel(), fn, ": colidx has ", n, " entries but values has ", values.numel());
      w.colidx = colidx.const_data_ptr<int32_t>();
      w.values = values.const_data_ptr<float>();
      sp::validate(w, n);
    }
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, fn, ": ", e.what());
  }
  return c;
}

const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t rows, const char* fn) {
  if (!bias) return nullptr;
  check_tensor(*bias, at::kFloat, 1, fn, "bias");
  TORCH_CHECK(bias->is_contiguous() && bias->numel() == rows, fn, ": bias must be contiguous with ", rows,
              " entries, got ", bias->sizes());
  return bias->const_data_ptr<float>();
}

template <class F>
auto parsed(F&& parse, const std::string& name, const char* fn) {
  try {
    return parse(name);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, fn, ": ", e.what());
  }
}

// The residual a convolution adds before its ReLU: out's shape, made contiguous
// (undefined when there is none).
at::Tensor checked_residual(const std::optional<at::Tensor>& residual, const at::Tensor& out, const char* fn) {
  if (!residual) return {};
  check_tensor(*residual, at::kFloat, out.dim(), fn, "residual");
  TORCH_CHECK(residual->sizes() == out.sizes(), fn, ": residual must have the output's shape ", out.sizes(), ", got ",
              residual->sizes());
  return residual->contiguous();
}

// A convolution's arguments checked once for every kernel that takes them: the input
// made contiguous (kept alive here), its geometry, the CSR view and the bias.
struct CheckedConv {
  at::Tensor x;
  sp::ConvGeometry g;
  CheckedCsr csr;
  const sp::Csr& w() const { return csr.w; }
  const float* bias;
};

// The checks on an NCHW input of sizes `nchw` (x is left undefined).
CheckedConv checked_conv_of(at::IntArrayRef nchw, const at::Tensor& rowptr, const at::Tensor& colidx,
                            const at::Tensor& values, Pair kernel_size, const std::optional<at::Tensor>& bias,
                            Pair stride, Pair padding, Pair dilation, const char* fn,
                            const CodesArgs& codes = {}) {
  CheckedConv c;
  c.g = sp::ConvGeometry{nchw[0],           nchw[1],            nchw[2],      nchw[3],       rowptr.numel() - 1,
                         kernel_size.first, kernel_size.second, stride.first, stride.second, padding.first,
                         padding.second,    dilation.first,     dilation.second};
  const sp::ConvGeometry& g = c.g;
  TORCH_CHECK(g.kernel_h >= 1 && g.kernel_w >= 1 && g.stride_h >= 1 && g.stride_w >= 1 && g.dilation_h >= 1 &&
                  g.dilation_w >= 1 && g.pad_h >= 0 && g.pad_w >= 0,
              fn, ": kernel_size, stride and dilation must be >= 1 and padding >= 0");
  c.csr = csr_view(rowptr, colidx, values, g.in_channels * g.kernel_h * g.kernel_w, fn, codes);
  c.bias = bias_ptr(bias, c.w().rows, fn);
  TORCH_CHECK(g.out_h() >= 1 && g.out_w() >= 1, fn, ": the kernel ", kernel_size, " with dilation ", dilation,
              " is larger than the padded input ", nchw);
  return c;
}

CheckedConv checked_conv(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                         const at::Tensor& values, Pair kernel_size, const std::optional<at::Tensor>& bias,
                         Pair stride, Pair padding, Pair dilation, const char* fn, const CodesArgs& codes = {}) {
  check_tensor(input, at::kFloat, 4, fn, "input");
  CheckedConv c = checked_conv_of(input.sizes(), rowptr, colidx, values, kernel_size, bias, stride, padding, dilation,
                                  fn, codes);
  c.x = input.contiguous();
  return c;
}

// The CUDA kernel's arithmetic (csrc/common/sparse_conv_tile.h) run on the host, grid
// and chunks as on the device: a test hook, slow by design.
at::Tensor sparse_conv2d_portable(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                                  const at::Tensor& values, Pair kernel_size, const std::optional<at::Tensor>& bias,
                                  Pair stride, Pair padding, Pair dilation, bool relu) {
  const CheckedConv c =
      checked_conv(input, rowptr, colidx, values, kernel_size, bias, stride, padding, dilation, "sparse_conv2d_portable");
  const sp::ConvGeometry& g = c.g;
  for (const int64_t v : {g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dilation_h, g.dilation_w})
    TORCH_CHECK(v <= INT32_MAX, "sparse_conv2d_portable: kernel_size, stride, padding and dilation must fit in int32");
  const sparse_tile::Shape s = sparse_tile::shape_of(g);
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h(), g.out_w()}, c.x.options());
  {
    pybind11::gil_scoped_release nogil;
    sparse_tile::run_on_host(s, c.x.const_data_ptr<float>(), c.w().rowptr, c.w().colidx, c.w().values, c.bias, relu,
                             out.mutable_data_ptr<float>());
  }
  return out;
}

// ---- the lanes layout (sparse.h) --------------------------------------------------------

at::Tensor to_lanes(const at::Tensor& input, int64_t lanes, int64_t pad) {
  constexpr const char* fn = "to_lanes";
  check_tensor(input, at::kFloat, 4, fn, "input");
  TORCH_CHECK(lanes == 8 || lanes == 16, fn, ": lanes must be 8 or 16, got ", lanes);
  TORCH_CHECK(pad >= 0, fn, ": pad must be >= 0, got ", pad);
  const at::Tensor x = input.contiguous();
  const int64_t groups = (x.size(0) + lanes - 1) / lanes;
  at::Tensor out = at::empty({groups, x.size(1), x.size(2) + 2 * pad, x.size(3) + 2 * pad, lanes}, x.options());
  {
    pybind11::gil_scoped_release nogil;
    sp::to_lanes(x.const_data_ptr<float>(), x.size(0), x.size(1), x.size(2), x.size(3), lanes, pad,
                 out.mutable_data_ptr<float>(), sp::best_isa(), at::get_num_threads());
  }
  return out;
}

// Checks a lanes tensor [groups, C, H + 2 pad, W + 2 pad, lanes] and returns it contiguous.
at::Tensor checked_lanes(const at::Tensor& input, int64_t pad, const char* fn) {
  check_tensor(input, at::kFloat, 5, fn, "input");
  TORCH_CHECK(input.size(4) == 8 || input.size(4) == 16, fn, ": the last dimension (lanes) must be 8 or 16, got ",
              input.sizes());
  TORCH_CHECK(pad >= 0 && input.size(2) > 2 * pad && input.size(3) > 2 * pad, fn, ": pad ", pad,
              " leaves no image inside a lanes tensor of shape ", input.sizes());
  return input.contiguous();
}

at::Tensor from_lanes(const at::Tensor& input, int64_t batch, int64_t pad) {
  constexpr const char* fn = "from_lanes";
  const at::Tensor x = checked_lanes(input, pad, fn);
  const int64_t lanes = x.size(4), height = x.size(2) - 2 * pad, width = x.size(3) - 2 * pad;
  TORCH_CHECK(batch >= 0 && batch <= x.size(0) * lanes && batch > (x.size(0) - 1) * lanes, fn, ": batch ", batch,
              " does not fill the ", x.size(0), " groups of ", lanes, " lanes");
  at::Tensor out = at::empty({batch, x.size(1), height, width}, x.options());
  {
    pybind11::gil_scoped_release nogil;
    sp::from_lanes(x.const_data_ptr<float>(), batch, x.size(1), height, width, lanes, pad,
                   out.mutable_data_ptr<float>(), sp::best_isa(), at::get_num_threads());
  }
  return out;
}

at::Tensor sparse_conv2d_lanes(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                               const at::Tensor& values, Pair kernel_size, const std::optional<at::Tensor>& bias,
                               Pair stride, Pair padding, Pair dilation, bool relu, const std::string& isa,
                               int64_t in_pad, int64_t out_pad, int64_t gap_bits,
                               const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& residual) {
  constexpr const char* fn = "sparse_conv2d_lanes";
  const at::Tensor x = checked_lanes(input, in_pad, fn);
  TORCH_CHECK(padding.first <= in_pad && padding.second <= in_pad, fn, ": padding ", padding,
              " exceeds the layout's padding ", in_pad);
  TORCH_CHECK(out_pad >= 0, fn, ": out_pad must be >= 0, got ", out_pad);
  const int64_t lanes = x.size(4);
  // Checked as the NCHW convolution of the groups' images.
  const std::vector<int64_t> nchw{x.size(0) * lanes, x.size(1), x.size(2) - 2 * in_pad, x.size(3) - 2 * in_pad};
  const CheckedConv c =
      checked_conv_of(nchw, rowptr, colidx, values, kernel_size, bias, stride, padding, dilation, fn, {gap_bits, row_scale});
  const sp::Isa i = parsed(sp::parse_isa, isa, fn);
  at::Tensor out = at::empty({x.size(0), c.g.out_channels, c.g.out_h() + 2 * out_pad, c.g.out_w() + 2 * out_pad, lanes},
                             x.options());
  const at::Tensor res = checked_residual(residual, out, fn);
  {
    pybind11::gil_scoped_release nogil;
    sp::conv2d_lanes(x.const_data_ptr<float>(), in_pad, lanes, c.w(), c.bias, relu, c.g, out_pad,
                     out.mutable_data_ptr<float>(), i, at::get_num_threads(),
                     res.defined() ? res.const_data_ptr<float>() : nullptr);
  }
  return out;
}

}  // namespace

at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                         const at::Tensor& values, Pair kernel_size, const std::optional<at::Tensor>& bias,
                         Pair stride, Pair padding, Pair dilation, bool relu, const std::string& isa,
                         const std::string& algo, int64_t gap_bits, const std::optional<at::Tensor>& row_scale,
                         const std::optional<at::Tensor>& residual) {
  constexpr const char* fn = "sparse_conv2d";
  const CheckedConv c =
      checked_conv(input, rowptr, colidx, values, kernel_size, bias, stride, padding, dilation, fn, {gap_bits, row_scale});
  const sp::Isa i = parsed(sp::parse_isa, isa, fn);
  const sp::ConvAlgo a = parsed(sp::parse_algo, algo, fn);
  at::Tensor out = at::empty({c.g.batch, c.g.out_channels, c.g.out_h(), c.g.out_w()}, c.x.options());
  const at::Tensor res = checked_residual(residual, out, fn);
  const int threads = at::get_num_threads();
  {
    const ReleasedGil nogil;
    sp::conv2d(c.x.const_data_ptr<float>(), c.w(), c.bias, relu, c.g, out.mutable_data_ptr<float>(), i, threads, a,
               res.defined() ? res.const_data_ptr<float>() : nullptr);
  }
  return out;
}

at::Tensor sparse_linear(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                         const at::Tensor& values, const std::optional<at::Tensor>& bias, bool relu,
                         const std::string& isa, int64_t gap_bits, const std::optional<at::Tensor>& row_scale) {
  constexpr const char* fn = "sparse_linear";
  check_tensor(input, at::kFloat, 2, fn, "input");
  const at::Tensor x = input.contiguous();
  const CheckedCsr checked = csr_view(rowptr, colidx, values, x.size(1), fn, {gap_bits, row_scale});
  const sp::Csr& w = checked.w;
  const float* b = bias_ptr(bias, w.rows, fn);
  const sp::Isa i = parsed(sp::parse_isa, isa, fn);
  at::Tensor out = at::empty({x.size(0), w.rows}, x.options());
  const int threads = at::get_num_threads();
  {
    const ReleasedGil nogil;
    sp::linear(x.const_data_ptr<float>(), x.size(0), w, b, relu, out.mutable_data_ptr<float>(), i, threads);
  }
  return out;
}

void register_sparse_kernels(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sparse_conv2d", &sparse_conv2d, py::arg("input"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"),
        py::arg("kernel_size"), py::arg("bias") = py::none(), py::arg("stride") = Pair{1, 1},
        py::arg("padding") = Pair{0, 0}, py::arg("dilation") = Pair{1, 1}, py::arg("relu") = false,
        py::arg("isa") = "auto", py::arg("algo") = "auto", py::arg("gap_bits") = 0, py::arg("row_scale") = py::none(),
        py::arg("residual") = py::none(),
        "2-D convolution (groups = 1) of float32 NCHW input with CSR weights: rows = output channels, "
        "column = (in_channel * kh_size + kh) * kw_size + kw; int32 rowptr/colidx, float32 values, or codes: "
        "a uint8 bit stream of entries in place of colidx, the codebook in place of values, their gap_bits, "
        "optionally times row_scale "
        "(csrc/cpu/sparse.h, CodesCsr). Optional bias, residual (added before the ReLU) and fused ReLU. isa: auto | avx512 | avx2 | scalar; algo: auto (batched from 8 images on, "
        "else direct) | direct (output pixels on the vector lanes) | batched (images on the lanes) | im2col.");
  m.def("sparse_conv2d_portable", &sparse_conv2d_portable, py::arg("input"), py::arg("rowptr"), py::arg("colidx"),
        py::arg("values"), py::arg("kernel_size"), py::arg("bias") = py::none(), py::arg("stride") = Pair{1, 1},
        py::arg("padding") = Pair{0, 0}, py::arg("dilation") = Pair{1, 1}, py::arg("relu") = false,
        "sparse_conv2d computed by the CUDA kernel's own per-block and per-thread code "
        "(csrc/common/sparse_conv_tile.h), run on the host block by block: a test hook for that code.");
  m.def("to_lanes", &to_lanes, py::arg("input"), py::arg("lanes"), py::arg("pad"),
        "NCHW float32 input as a lanes tensor [ceil(N / lanes), C, H + 2 pad, W + 2 pad, lanes]: groups of lanes "
        "(8 or 16) images on the last dimension, zero on the border and past the batch (csrc/cpu/sparse.h).");
  m.def("from_lanes", &from_lanes, py::arg("input"), py::arg("batch"), py::arg("pad"),
        "The first `batch` images of a lanes tensor with border `pad`, back to NCHW.");
  m.def("sparse_conv2d_lanes", &sparse_conv2d_lanes, py::arg("input"), py::arg("rowptr"), py::arg("colidx"),
        py::arg("values"), py::arg("kernel_size"), py::arg("bias") = py::none(), py::arg("stride") = Pair{1, 1},
        py::arg("padding") = Pair{0, 0}, py::arg("dilation") = Pair{1, 1}, py::arg("relu") = false,
        py::arg("isa") = "auto", py::arg("in_pad") = 1, py::arg("out_pad") = 1, py::arg("gap_bits") = 0,
        py::arg("row_scale") = py::none(), py::arg("residual") = py::none(),
        "sparse_conv2d from a lanes tensor with border in_pad (>= padding) to one with border out_pad; lanes past "
        "the batch come out as act(bias). With residual (a lanes tensor of the output's shape): act(conv + bias + "
        "residual), a residual block's add and ReLU fused.");
  m.attr("sparse_batched_from") = sp::kBatchedFrom;
  m.def(
      "sparse_lanes", [](int64_t batch) { return sp::lanes_for(batch); }, py::arg("batch"),
      "The lane count (8 or 16) the batched sparse convolution uses for `batch` images on this CPU.");
  m.def("sparse_linear", &sparse_linear, py::arg("input"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"),
        py::arg("bias") = py::none(), py::arg("relu") = false, py::arg("isa") = "auto",
        py::arg("gap_bits") = 0, py::arg("row_scale") = py::none(), "input [N, in] times the transposed CSR weight [out, in], plus bias, optional ReLU.");
  m.def(
      "kernel_isa", [] { return std::string(sp::isa_name(sp::best_isa())); },
      "The instruction set isa='auto' selects on this CPU: 'avx512', 'avx2' or 'scalar'.");
}

}  // namespace pyprune
