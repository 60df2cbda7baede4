// Python bindings of pyprune._C (CPU kernels). torch/python.h rather than
// torch/extension.h: the latter adds the whole C++ frontend (torch/all.h) and
// nearly doubles this file's compile time.
#include <torch/python.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyprune CPU kernels";
  m.def("apply_mask", &pyprune::apply_mask, py::arg("weight"), py::arg("mask"),
        "weight * (mask != 0) as a new contiguous float32 tensor. weight: float32 CPU; "
        "mask: bool, uint8 or float32 CPU, same shape.");
  m.def("omp_max_threads", &pyprune::omp_max_threads,
        "omp_get_max_threads() of the OpenMP runtime this extension links; 1 if OpenMP is limited.");
}
