// Registers pyprune._C.Program (program.cpp); called from bindings.cpp.
#pragma once

#include <torch/python.h>

namespace pyprune {
void register_program(pybind11::module_& m);
}  // namespace pyprune
