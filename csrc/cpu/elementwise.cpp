// Element-wise CPU kernels, parallelised with OpenMP.
#include "ops.h"

#include <omp.h>

#include <cstdint>

namespace pyprune {
namespace {

// Below this many elements, starting the thread team costs more than the loop.
constexpr int64_t kParallelGrain = 1 << 15;

template <typename M>
void apply_mask_loop(const float* w, const M* m, float* out, int64_t n) {
  // Multiply rather than select, so results match weight * (mask != 0) bit for bit,
  // including NaN/inf weights under a zero mask (-> NaN) and signed zeros.
#pragma omp parallel for schedule(static) if (n >= kParallelGrain)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = w[i] * (m[i] != M(0) ? 1.0f : 0.0f);
  }
}

}  // namespace

at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.device().is_cpu(), "apply_mask: weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK(mask.device().is_cpu(), "apply_mask: mask must be a CPU tensor, got device ", mask.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "apply_mask: weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.sizes() == mask.sizes(), "apply_mask: weight and mask shapes differ: ", weight.sizes(), " vs ",
              mask.sizes());

  // The loops index flat memory, so strided/transposed views are copied once here.
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  const int64_t n = w.numel();

  switch (m.scalar_type()) {
    case at::kBool:
      apply_mask_loop(w.const_data_ptr<float>(), m.const_data_ptr<bool>(), out.mutable_data_ptr<float>(), n);
      break;
    case at::kByte:
      apply_mask_loop(w.const_data_ptr<float>(), m.const_data_ptr<uint8_t>(), out.mutable_data_ptr<float>(), n);
      break;
    case at::kFloat:
      apply_mask_loop(w.const_data_ptr<float>(), m.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n);
      break;
    default:
      TORCH_CHECK(false, "apply_mask: mask must be bool, uint8 or float32, got ", m.scalar_type());
  }
  return out;
}

int omp_max_threads() { return omp_get_max_threads(); }

}  // namespace pyprune
