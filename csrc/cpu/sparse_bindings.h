// The sparse kernels (sparse.h) as tensor functions: registered on pyprune._C by
// bindings.cpp, and called directly by the program executor (program.cpp).
#pragma once

#include <torch/python.h>

#include <optional>
#include <string>
#include <utility>

namespace pyprune {

void register_sparse_kernels(pybind11::module_& m);

// pyprune._C.sparse_conv2d and sparse_linear; see their docstrings (sparse_bindings.cpp).
// Every argument is checked on every call.
at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                         const at::Tensor& values, std::pair<int64_t, int64_t> kernel_size,
                         const std::optional<at::Tensor>& bias, std::pair<int64_t, int64_t> stride,
                         std::pair<int64_t, int64_t> padding, std::pair<int64_t, int64_t> dilation, bool relu,
                         const std::string& isa, const std::string& algo, int64_t gap_bits,
                         const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& residual);
at::Tensor sparse_linear(const at::Tensor& input, const at::Tensor& rowptr, const at::Tensor& colidx,
                         const at::Tensor& values, const std::optional<at::Tensor>& bias, bool relu,
                         const std::string& isa, int64_t gap_bits, const std::optional<at::Tensor>& row_scale);

}  // namespace pyprune
