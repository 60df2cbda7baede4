// Python bindings of pyprune._C_cuda, compiled by the host compiler. Uses
// c10/cuda headers only: ATen/cuda/CUDAContext.h pulls in cusparse.h, which the
// toolkit here lacks. torch/python.h, not torch/extension.h: see csrc/cpu/bindings.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/python.h>

#include "apply_mask_kernel.h"
#include "sparse_conv_bindings.h"

namespace {

at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.is_cuda(), "apply_mask (CUDA): weight must be a CUDA tensor, got device ", weight.device());
  TORCH_CHECK(mask.is_cuda(), "apply_mask (CUDA): mask must be a CUDA tensor, got device ", mask.device());
  TORCH_CHECK(weight.device() == mask.device(), "apply_mask (CUDA): weight and mask are on different devices: ",
              weight.device(), " vs ", mask.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "apply_mask (CUDA): weight must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.sizes() == mask.sizes(), "apply_mask (CUDA): weight and mask shapes differ: ", weight.sizes(),
              " vs ", mask.sizes());

  // The kernel is launched on the tensors' device and its current stream, as torch ops are.
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  cudaError_t err;
  switch (m.scalar_type()) {
    case at::kBool:
      err = pyprune::cuda::launch_apply_mask(w.const_data_ptr<float>(), m.const_data_ptr<bool>(),
                                             out.mutable_data_ptr<float>(), n, stream);
      break;
    case at::kByte:
      err = pyprune::cuda::launch_apply_mask(w.const_data_ptr<float>(), m.const_data_ptr<uint8_t>(),
                                             out.mutable_data_ptr<float>(), n, stream);
      break;
    case at::kFloat:
      err = pyprune::cuda::launch_apply_mask(w.const_data_ptr<float>(), m.const_data_ptr<float>(),
                                             out.mutable_data_ptr<float>(), n, stream);
      break;
    default:
      TORCH_CHECK(false, "apply_mask (CUDA): mask must be bool, uint8 or float32, got ", m.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "apply_mask (CUDA): kernel launch failed: ", cudaGetErrorString(err),
              " (this build has kernels for sm_80 and sm_90, plus PTX for newer GPUs)");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyprune CUDA kernels";
  m.def("apply_mask", &apply_mask, py::arg("weight"), py::arg("mask"),
        "weight * (mask != 0) as a new contiguous float32 tensor, on the inputs' device and current stream. "
        "weight: float32 CUDA; mask: bool, uint8 or float32 on the same device, same shape.");
  pyprune::cuda::register_sparse_conv(m);
}
