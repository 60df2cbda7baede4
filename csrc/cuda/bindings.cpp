// Python bindings of pyprune._C_cuda, compiled by the host compiler. Uses
// c10/cuda headers only: ATen/cuda/CUDAContext.h pulls in cusparse.h, which the
// toolkit here lacks. torch/python.h, not torch/extension.h: see csrc/cpu/bindings.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/python.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "apply_mask_kernel.h"
#include "huffman_kernel.h"
#include "sparse_conv_bindings.h"

namespace {

namespace chunk = pyprune::huff::chunk;

// A corrupt stream, detected while decoding on the device. Python sees
// pyprune._C_cuda.CorruptFileError (a ValueError); pyprune.encode.huffman_cuda re-raises it
// as pyprune.encode.ppz.CorruptFileError.
class CorruptError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

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

// Decodes a stream that pyprune._C.huffman_parse validated (its fields are the arguments).
// The host builds the canonical tables, the device decodes one chunk per thread; the
// per-chunk statuses come back to report the lowest failing chunk as the CPU decoder does.
at::Tensor huffman_decode(const at::Tensor& payload, const at::Tensor& chunk_offsets, const at::Tensor& lengths,
                          uint64_t n_symbols, uint32_t chunk_symbols, bool padding_ok, const std::string& what,
                          const std::string& dtype) {
  TORCH_CHECK(payload.is_cuda() && payload.scalar_type() == at::kByte && payload.dim() == 1 && payload.is_contiguous(),
              "huffman_decode (CUDA): payload must be a contiguous 1-D uint8 CUDA tensor");
  TORCH_CHECK(chunk_offsets.device() == payload.device() && chunk_offsets.scalar_type() == at::kLong &&
                  chunk_offsets.dim() == 1 && chunk_offsets.is_contiguous() && chunk_offsets.numel() >= 1,
              "huffman_decode (CUDA): chunk_offsets must be a contiguous 1-D int64 tensor on the payload's device");
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kByte && lengths.dim() == 1 &&
                  lengths.is_contiguous() && lengths.numel() >= 1 && lengths.numel() <= 65536,
              "huffman_decode (CUDA): lengths must be a contiguous 1-D uint8 CPU tensor of 1..65536 entries");
  TORCH_CHECK(dtype == "int32" || dtype == "uint16", "huffman_decode (CUDA): dtype must be 'int32' or 'uint16'");
  const uint64_t n_chunks = static_cast<uint64_t>(chunk_offsets.numel()) - 1;
  TORCH_CHECK(chunk_symbols >= 1 && n_chunks == (n_symbols + chunk_symbols - 1) / chunk_symbols,
              "huffman_decode (CUDA): ", n_chunks, " chunk offsets do not fit ", n_symbols, " symbols in chunks of ",
              chunk_symbols);

  const c10::cuda::CUDAGuard guard(payload.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto on_device = payload.options();
  const auto out_dtype = dtype == "int32" ? at::kInt : at::kUInt16;
  at::Tensor out = at::empty({static_cast<int64_t>(n_symbols)}, on_device.dtype(out_dtype));
  if (n_symbols == 0) return out;

  // Tables built on the host, then copied as bytes (the Table has no pointers).
  // huffman_parse checked these; build_table relies on them, so check again here.
  const uint8_t* len = lengths.const_data_ptr<uint8_t>();
  uint64_t kraft = 0;  // in units of 2^-24
  for (int64_t s = 0; s < lengths.numel(); ++s) {
    TORCH_CHECK(len[s] <= chunk::kMaxCodeLength, "huffman_decode (CUDA): code length above 24");
    if (len[s]) kraft += uint64_t{1} << (chunk::kMaxCodeLength - len[s]);
  }
  TORCH_CHECK(kraft <= (uint64_t{1} << chunk::kMaxCodeLength),
              "huffman_decode (CUDA): code lengths violate Kraft's inequality");
  at::Tensor table = at::empty({static_cast<int64_t>(sizeof(chunk::Table))}, at::kByte);
  at::Tensor sorted = at::empty({lengths.numel()}, at::kShort);
  chunk::build_table(len, static_cast<uint32_t>(lengths.numel()),
                     *reinterpret_cast<chunk::Table*>(table.mutable_data_ptr()),
                     reinterpret_cast<uint16_t*>(sorted.mutable_data_ptr<int16_t>()));
  const at::Tensor table_d = table.to(payload.device());
  const at::Tensor sorted_d = sorted.to(payload.device());
  at::Tensor status = at::empty({static_cast<int64_t>(n_chunks)}, on_device.dtype(at::kInt));

  const auto* t = reinterpret_cast<const chunk::Table*>(table_d.const_data_ptr());
  const auto* srt = reinterpret_cast<const uint16_t*>(sorted_d.const_data_ptr<int16_t>());
  const auto* offsets = reinterpret_cast<const uint64_t*>(chunk_offsets.const_data_ptr<int64_t>());
  const uint64_t payload_bytes = static_cast<uint64_t>(payload.numel());
  cudaError_t err;
  if (dtype == "int32") {
    err = pyprune::cuda::launch_huffman_decode(t, srt, payload.const_data_ptr<uint8_t>(), payload_bytes, offsets,
                                               n_chunks, n_symbols, chunk_symbols, out.mutable_data_ptr<int32_t>(),
                                               status.mutable_data_ptr<int32_t>(), stream);
  } else {
    err = pyprune::cuda::launch_huffman_decode(t, srt, payload.const_data_ptr<uint8_t>(), payload_bytes, offsets,
                                               n_chunks, n_symbols, chunk_symbols,
                                               reinterpret_cast<uint16_t*>(out.mutable_data_ptr()),
                                               status.mutable_data_ptr<int32_t>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "huffman_decode (CUDA): kernel launch failed: ", cudaGetErrorString(err),
              " (this build has kernels for sm_80 and sm_90, plus PTX for newer GPUs)");

  const at::Tensor st = status.cpu();  // waits for the kernel
  const int32_t* sp = st.const_data_ptr<int32_t>();
  for (uint64_t c = 0; c < n_chunks; ++c) {
    if (sp[c] != chunk::kOk) throw CorruptError(chunk::chunk_error_message(what, c, sp[c]));
  }
  if (!padding_ok) throw CorruptError(chunk::padding_error_message(what));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyprune CUDA kernels";
  m.def("apply_mask", &apply_mask, py::arg("weight"), py::arg("mask"),
        "weight * (mask != 0) as a new contiguous float32 tensor, on the inputs' device and current stream. "
        "weight: float32 CUDA; mask: bool, uint8 or float32 on the same device, same shape.");
  pyprune::cuda::register_sparse_conv(m);

  // Huffman streams of the .ppz container; Python API in pyprune/encode/huffman_cuda.py.
  py::register_exception<CorruptError>(m, "CorruptFileError", PyExc_ValueError);
  m.def("huffman_decode", &huffman_decode, py::arg("payload"), py::arg("chunk_offsets"), py::arg("lengths"),
        py::arg("n_symbols"), py::arg("chunk_symbols"), py::arg("padding_ok"), py::arg("what"),
        py::arg("dtype") = "int32",
        "Decode a stream validated by pyprune._C.huffman_parse (pass its fields; payload and chunk_offsets on "
        "the GPU) into an int32 or uint16 tensor on that GPU, one thread per chunk. Raises CorruptFileError.");
}
