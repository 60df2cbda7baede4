// Registers the sparse kernels (sparse.h) on pyprune._C; called from bindings.cpp.
#pragma once

#include <torch/python.h>

namespace pyprune {
void register_sparse_kernels(pybind11::module_& m);
}  // namespace pyprune
