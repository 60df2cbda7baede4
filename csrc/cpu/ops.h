// CPU kernels of pyprune._C; bindings.cpp exposes them to Python.
#pragma once

#include <ATen/ATen.h>

namespace pyprune {

// weight * (mask != 0), element-wise, as a new contiguous float32 tensor.
// weight: float32 CPU; mask: bool, uint8 or float32 CPU, same shape.
at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask);

// OpenMP's thread budget for a parallel region; 1 means OpenMP is absent or limited.
int omp_max_threads();

}  // namespace pyprune
