// Tensor-level entry point of the CUDA sparse convolution: the same arguments and checks
// as pyprune._C.sparse_conv2d, on CUDA tensors.
#include "sparse_conv_bindings.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <utility>

#include "../cpu/sparse.h"
#include "sparse_conv_kernel.h"

namespace pyprune::cuda {
namespace {

using Pair = std::pair<int64_t, int64_t>;

void check_cuda(const at::Tensor& t, at::ScalarType dtype, const at::Device& device, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "sparse_conv2d (CUDA): ", what, " must be on ", device, ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "sparse_conv2d (CUDA): ", what, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "sparse_conv2d (CUDA): ", what, " must be contiguous");
}

at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                         const at::Tensor& values, Pair kernel_size, const std::optional<at::Tensor>& bias,
                         Pair stride, Pair padding, Pair dilation, bool relu, bool validate) {
  TORCH_CHECK(input.is_cuda() && input.dim() == 4 && input.scalar_type() == at::kFloat,
              "sparse_conv2d (CUDA): input must be a 4-D float32 CUDA tensor, got ", input.sizes(), " ",
              input.scalar_type(), " on ", input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  check_cuda(rowptr, at::kInt, x.device(), "rowptr");
  check_cuda(colidx, at::kInt, x.device(), "colidx");
  check_cuda(values, at::kFloat, x.device(), "values");
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1 && colidx.numel() == values.numel(),
              "sparse_conv2d (CUDA): rowptr needs rows + 1 entries and colidx as many entries as values");
  if (bias) {
    check_cuda(*bias, at::kFloat, x.device(), "bias");
    TORCH_CHECK(bias->numel() == rowptr.numel() - 1, "sparse_conv2d (CUDA): bias needs one entry per output channel");
  }
  TORCH_CHECK(kernel_size.first >= 1 && kernel_size.second >= 1 && stride.first >= 1 && stride.second >= 1 &&
                  dilation.first >= 1 && dilation.second >= 1 && padding.first >= 0 && padding.second >= 0,
              "sparse_conv2d (CUDA): kernel_size, stride and dilation must be >= 1 and padding >= 0");
  pyprune::sparse::ConvGeometry g{x.size(0),         x.size(1),          x.size(2),     x.size(3),
                                  rowptr.numel() - 1, kernel_size.first, kernel_size.second,
                                  stride.first,      stride.second,      padding.first, padding.second,
                                  dilation.first,    dilation.second};
  TORCH_CHECK(g.out_h() >= 1 && g.out_w() >= 1, "sparse_conv2d (CUDA): the kernel is larger than the padded input");
  if (validate) {  // a device-to-host copy: the runtime validates once at load and then passes false
    const at::Tensor rp = rowptr.cpu(), ci = colidx.cpu();
    pyprune::sparse::Csr w;
    w.rows = g.out_channels;
    w.cols = g.in_channels * g.kernel_h * g.kernel_w;
    w.rowptr = rp.const_data_ptr<int32_t>();
    w.colidx = ci.const_data_ptr<int32_t>();
    try {
      pyprune::sparse::validate(w, ci.numel());
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, "sparse_conv2d (CUDA): ", e.what());
    }
  }
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h(), g.out_w()}, x.options());
  SparseConvArgs a{x.const_data_ptr<float>(), rowptr.const_data_ptr<int32_t>(), colidx.const_data_ptr<int32_t>(),
                   values.const_data_ptr<float>(), bias ? bias->const_data_ptr<float>() : nullptr,
                   out.mutable_data_ptr<float>(), pyprune::sparse_tile::shape_of(g), relu};
  const cudaError_t err = launch_sparse_conv2d(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sparse_conv2d (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

void register_sparse_conv(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sparse_conv2d", &sparse_conv2d, py::arg("input"), py::arg("rowptr"), py::arg("colidx"), py::arg("values"),
        py::arg("kernel_size"), py::arg("bias") = py::none(), py::arg("stride") = Pair{1, 1},
        py::arg("padding") = Pair{0, 0}, py::arg("dilation") = Pair{1, 1}, py::arg("relu") = false,
        py::arg("validate") = true,
        "pyprune._C.sparse_conv2d on CUDA tensors (groups = 1, CSR weights, optional bias and fused ReLU). "
        "validate copies rowptr/colidx to the host to check them.");
}

}  // namespace pyprune::cuda
