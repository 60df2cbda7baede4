// Registers the CUDA sparse convolution on pyprune._C_cuda; called from bindings.cpp.
#pragma once

#include <torch/python.h>

namespace pyprune::cuda {
void register_sparse_conv(pybind11::module_& m);
}  // namespace pyprune::cuda
