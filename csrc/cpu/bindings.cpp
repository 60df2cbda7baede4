// Python bindings of pyprune._C (CPU kernels). torch/python.h rather than
// torch/extension.h: the latter adds the whole C++ frontend (torch/all.h) and
// nearly doubles this file's compile time.
#include <torch/python.h>

#include <omp.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "huffman.h"
#include "ops.h"
#include "ppz.h"
#include "program.h"
#include "sparse_bindings.h"

namespace {

namespace huff = pyprune::huff;
namespace ppz = pyprune::ppz;

// A read-only, C-contiguous view of any bytes-like object (bytes, bytearray, memoryview,
// mmap); the export stays valid (and a bytearray cannot resize) while this lives.
class ByteView {
 public:
  explicit ByteView(const py::object& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~ByteView() { PyBuffer_Release(&view_); }
  ByteView(const ByteView&) = delete;
  ByteView& operator=(const ByteView&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

py::bytes to_bytes(const std::vector<uint8_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

void check_cpu_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

std::vector<uint16_t> to_symbols(const at::Tensor& symbols, uint32_t alphabet) {
  check_cpu_contiguous(symbols, "symbols");
  const at::Tensor s = symbols.to(at::kLong).reshape({-1});
  const int64_t* p = s.const_data_ptr<int64_t>();
  std::vector<uint16_t> out(static_cast<size_t>(s.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (p[i] < 0 || p[i] >= static_cast<int64_t>(alphabet)) {
      throw std::invalid_argument("huffman: symbol " + std::to_string(p[i]) + " at " + std::to_string(i) +
                                  " outside [0, " + std::to_string(alphabet) + ")");
    }
    out[i] = static_cast<uint16_t>(p[i]);
  }
  return out;
}

std::vector<uint8_t> huffman_code_lengths(const std::vector<uint64_t>& freqs, int max_len) {
  uint64_t total = 0;
  for (uint64_t f : freqs) {
    if (__builtin_add_overflow(total, f, &total)) throw std::invalid_argument("huffman: frequencies sum past 2^64");
  }
  return huff::build_code_lengths(freqs.data(), freqs.size(), max_len);
}

py::bytes huffman_encode(const at::Tensor& symbols, uint32_t alphabet, uint32_t chunk_symbols) {
  const std::vector<uint16_t> s = to_symbols(symbols, alphabet);
  std::vector<uint8_t> out;
  {
    py::gil_scoped_release nogil;
    huff::encode_stream(s.data(), s.size(), alphabet, out, chunk_symbols);
  }
  return to_bytes(out);
}

// Symbols decode straight into the returned tensor: no staging buffer, no widening copy.
py::tuple huffman_decode(const py::object& data, uint32_t alphabet, int threads, const std::string& dtype) {
  ByteView buf(data);
  pyprune::Reader r(buf.data(), buf.size(), "stream");
  const huff::StreamView s = huff::parse_stream(r, alphabet, "huffman stream");
  const int64_t n = static_cast<int64_t>(s.n_symbols);
  const int nt = resolve_threads(threads);
  at::Tensor out;
  if (dtype == "int32") {
    out = at::empty({n}, at::kInt);
    py::gil_scoped_release nogil;
    huff::decode_stream(s, out.mutable_data_ptr<int32_t>(), nt);
  } else if (dtype == "uint16") {
    out = at::empty({n}, at::kUInt16);
    py::gil_scoped_release nogil;
    huff::decode_stream(s, out.mutable_data_ptr<uint16_t>(), nt);
  } else if (dtype == "uint8") {
    out = at::empty({n}, at::kByte);
    py::gil_scoped_release nogil;
    huff::decode_stream(s, out.mutable_data_ptr<uint8_t>(), nt);
  } else {
    throw std::invalid_argument("huffman_decode: dtype must be 'int32', 'uint16' or 'uint8', not '" + dtype + "'");
  }
  return py::make_tuple(out, static_cast<uint64_t>(r.pos()));
}

py::tuple huffman_decode_portable(const py::object& data, uint32_t alphabet) {
  ByteView buf(data);
  pyprune::Reader r(buf.data(), buf.size(), "stream");
  const huff::StreamView s = huff::parse_stream(r, alphabet, "huffman stream");
  at::Tensor out = at::empty({static_cast<int64_t>(s.n_symbols)}, at::kUInt16);
  {
    py::gil_scoped_release nogil;
    huff::decode_stream_portable(s, out.mutable_data_ptr<uint16_t>());
  }
  return py::make_tuple(out, static_cast<uint64_t>(r.pos()));
}

// The validated parts of a stream record, for decoders outside this module (the CUDA one).
py::dict huffman_parse(const py::object& data, uint32_t alphabet) {
  ByteView buf(data);
  pyprune::Reader r(buf.data(), buf.size(), "stream");
  const huff::StreamView s = huff::parse_stream(r, alphabet, "huffman stream");
  at::Tensor lengths = at::empty({static_cast<int64_t>(s.lengths.size())}, at::kByte);
  std::memcpy(lengths.mutable_data_ptr<uint8_t>(), s.lengths.data(), s.lengths.size());
  at::Tensor offsets = at::empty({static_cast<int64_t>(s.chunk_offsets.size())}, at::kLong);
  std::memcpy(offsets.mutable_data_ptr<int64_t>(), s.chunk_offsets.data(), 8 * s.chunk_offsets.size());
  at::Tensor payload = at::empty({static_cast<int64_t>(s.payload_bytes)}, at::kByte);
  if (s.payload_bytes) std::memcpy(payload.mutable_data_ptr<uint8_t>(), s.payload, s.payload_bytes);
  py::dict d;
  d["n_symbols"] = s.n_symbols;
  d["chunk_symbols"] = s.chunk_symbols;
  d["lengths"] = lengths;
  d["chunk_offsets"] = offsets;
  d["payload"] = payload;
  d["padding_ok"] = huff::padding_is_zero(s);
  d["record_bytes"] = s.record_bytes;
  d["what"] = s.what;
  return d;
}

py::tuple ppz_encode_section(const std::string& name, int dtype, const std::vector<uint64_t>& shape,
                             const at::Tensor& data, const std::optional<at::Tensor>& codebook,
                             const std::vector<int>& gap_bits, int encoding, uint32_t chunk_symbols) {
  check_cpu_contiguous(data, "data");
  ppz::TensorInput t;
  t.name = name;
  t.dtype = dtype;
  t.shape = shape;
  t.data = static_cast<const uint8_t*>(data.const_data_ptr());
  t.nbytes = data.nbytes();
  t.encoding = encoding;
  if (ppz::dtype_itemsize(dtype) != static_cast<int>(data.element_size())) {
    throw std::invalid_argument("ppz: dtype code " + std::to_string(dtype) + " does not match the tensor's " +
                                std::to_string(data.element_size()) + "-byte elements");
  }
  if (codebook) {
    check_cpu_contiguous(*codebook, "codebook");
    TORCH_CHECK(codebook->scalar_type() == at::kFloat && codebook->dim() == 1, "codebook must be 1-D float32");
    t.quantized = true;
    const float* cb = codebook->const_data_ptr<float>();
    t.codebook.assign(cb, cb + codebook->numel());
  }
  ppz::EncodeOptions opt;
  opt.gap_bits = gap_bits;
  opt.chunk_symbols = chunk_symbols;
  ppz::EncodedSection s;
  {
    py::gil_scoped_release nogil;
    s = ppz::encode_section(t, opt);
  }
  return py::make_tuple(to_bytes(s.bytes), s.encoding, s.gap_bits);
}

py::bytes ppz_assemble(const py::object& manifest, const py::list& sections, uint32_t version) {
  ByteView m(manifest);
  std::vector<std::vector<uint8_t>> owned;
  owned.reserve(sections.size());
  for (const py::handle& h : sections) {
    ByteView b(py::reinterpret_borrow<py::object>(h));
    owned.emplace_back(b.data(), b.data() + b.size());
  }
  std::vector<const std::vector<uint8_t>*> ptrs;
  for (const auto& o : owned) ptrs.push_back(&o);
  std::vector<uint8_t> out;
  {
    py::gil_scoped_release nogil;
    out = ppz::assemble_file(m.data(), m.size(), ptrs, version);
  }
  return to_bytes(out);
}

py::list shape_list(const std::vector<uint64_t>& shape) {
  py::list l;
  for (uint64_t d : shape) l.append(d);
  return l;
}

// Where the file keeps what is not a section: its version, the manifest, the table.
py::dict layout_dict(const ppz::FileView& v) {
  py::dict d;
  d["version"] = v.version;
  d["manifest_bytes"] = v.manifest_size;  // the manifest's JSON (decompressed in version 2)
  d["head_bytes"] = v.head_stored;        // version 2: the compressed head, its size field and CRC32
  d["table_bytes"] = v.table_bytes;       // the directory (v1) or the head's table (v2, decompressed)
  return d;
}

// The table alone (parse, no decoding, nothing allocated for tensors): what a loader
// checks against the model's graph and a memory bound before it decodes anything.
py::tuple ppz_table(const py::object& data) {
  ByteView buf(data);
  ppz::FileView v;
  {
    py::gil_scoped_release nogil;
    v = ppz::parse_file(buf.data(), buf.size());
  }
  py::list rows;
  for (const auto& s : v.sections) rows.append(py::make_tuple(py::bytes(s.name), s.dtype, shape_list(s.shape)));
  return py::make_tuple(py::bytes(reinterpret_cast<const char*>(v.manifest), v.manifest_size), rows,
                        v.decoded_bytes);
}

void check_decoded_bytes(const ppz::FileView& v, int64_t max_bytes) {
  if (max_bytes >= 0 && v.decoded_bytes > static_cast<uint64_t>(max_bytes)) {
    throw std::invalid_argument("ppz: the tensors decode to " + std::to_string(v.decoded_bytes) +
                                " bytes, more than max_bytes=" + std::to_string(max_bytes));
  }
}

py::tuple ppz_decode(const py::object& data, int threads, int64_t max_bytes) {
  ByteView buf(data);
  ppz::FileView v;
  {
    py::gil_scoped_release nogil;
    v = ppz::parse_file(buf.data(), buf.size());
  }
  check_decoded_bytes(v, max_bytes);
  std::vector<at::Tensor> outs;
  outs.reserve(v.sections.size());
  for (const auto& s : v.sections) outs.push_back(at::empty({static_cast<int64_t>(s.out_bytes)}, at::kByte));
  {
    py::gil_scoped_release nogil;
    const int nt = resolve_threads(threads);
    for (size_t i = 0; i < v.sections.size(); ++i) ppz::decode_section(v.sections[i], outs[i].mutable_data_ptr<uint8_t>(), nt);
  }
  py::list tensors;
  for (size_t i = 0; i < v.sections.size(); ++i) {
    const auto& s = v.sections[i];
    tensors.append(py::make_tuple(py::bytes(s.name), s.dtype, shape_list(s.shape), s.encoding, outs[i]));
  }
  return py::make_tuple(py::bytes(reinterpret_cast<const char*>(v.manifest), v.manifest_size), tensors,
                        layout_dict(v));
}

py::dict stream_dict(const ppz::StreamStats& st) {
  py::dict d;
  d["symbols"] = st.symbols;
  d["alphabet"] = st.alphabet;
  d["used_symbols"] = st.used_symbols;
  d["max_code_length"] = st.max_code_length;
  d["chunks"] = st.chunks;
  d["table_bytes"] = st.table_bytes;
  d["chunk_table_bytes"] = st.chunk_table_bytes;
  d["payload_bytes"] = st.payload_bytes;
  d["payload_bits"] = st.payload_bits;
  d["bytes"] = st.record_bytes;
  d["offset"] = st.record_offset;
  d["entropy_bits"] = st.entropy_bits;
  return d;
}

py::tuple ppz_inspect(const py::object& data, int threads, int64_t max_bytes) {
  ByteView buf(data);
  ppz::FileView v;
  std::vector<ppz::SectionStats> stats;
  {
    py::gil_scoped_release nogil;
    v = ppz::parse_file(buf.data(), buf.size());
  }
  check_decoded_bytes(v, max_bytes);
  {
    py::gil_scoped_release nogil;
    const int nt = resolve_threads(threads);
    for (const auto& s : v.sections) stats.push_back(ppz::inspect_section(s, nt));
  }
  py::list out;
  for (size_t i = 0; i < v.sections.size(); ++i) {
    const auto& s = v.sections[i];
    const auto& st = stats[i];
    py::dict d;
    d["name"] = py::bytes(s.name);
    d["dtype"] = s.dtype;
    d["shape"] = shape_list(s.shape);
    d["encoding"] = ppz::encoding_name(s.encoding);
    d["numel"] = s.numel;
    d["itemsize"] = s.itemsize;
    d["nnz"] = st.nnz;
    d["entries"] = st.entries;
    d["fillers"] = st.fillers;
    d["gap_bits"] = s.gap_bits;
    d["codebook_size"] = s.codebook ? py::object(py::int_(s.codebook_size)) : py::object(py::none());
    d["section_bytes"] = s.size;
    d["header_bytes"] = s.header_bytes;
    d["codebook_bytes"] = st.codebook_bytes;
    d["rowcount_bytes"] = st.rowcount_bytes;
    d["values_bytes"] = st.values_bytes;
    d["raw_bytes"] = st.raw_bytes;
    d["deflate_bytes"] = st.deflate_bytes;
    d["gaps"] = st.gaps.present ? py::object(stream_dict(st.gaps)) : py::none();
    d["codes"] = st.codes.present ? py::object(stream_dict(st.codes)) : py::none();
    out.append(d);
  }
  return py::make_tuple(py::bytes(reinterpret_cast<const char*>(v.manifest), v.manifest_size), v.file_bytes, out,
                        layout_dict(v));
}

uint32_t ppz_crc32(const py::object& data, uint32_t crc) {
  ByteView b(data);
  return ppz::crc32(b.data(), b.size(), crc);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyprune CPU kernels";
  m.def("apply_mask", &pyprune::apply_mask, py::arg("weight"), py::arg("mask"),
        "weight * (mask != 0) as a new contiguous float32 tensor. weight: float32 CPU; "
        "mask: bool, uint8 or float32 CPU, same shape.");
  m.def("omp_max_threads", &pyprune::omp_max_threads,
        "omp_get_max_threads() of the OpenMP runtime this extension links; 1 if OpenMP is limited.");

  // The .ppz container (docs/format.md); Python API in pyprune/encode/ppz.py.
  py::register_exception<pyprune::CorruptError>(m, "CorruptFileError", PyExc_ValueError);
  m.attr("PPZ_VERSION") = ppz::kVersion;
  m.attr("PPZ_MAGIC") = py::bytes(reinterpret_cast<const char*>(ppz::kMagic), sizeof ppz::kMagic);
  m.attr("HUFFMAN_MAX_CODE_LENGTH") = huff::kMaxCodeLength;
  m.attr("HUFFMAN_DEFAULT_CHUNK") = huff::kDefaultChunkSymbols;
  m.def("huffman_code_lengths", &huffman_code_lengths, py::arg("freqs"), py::arg("max_len") = huff::kMaxCodeLength,
        "Deterministic length-limited canonical Huffman code lengths (0 = unused symbol).");
  m.def("huffman_encode", &huffman_encode, py::arg("symbols"), py::arg("alphabet"),
        py::arg("chunk_symbols") = huff::kDefaultChunkSymbols, "One .ppz Huffman stream record as bytes.");
  m.def("huffman_decode", &huffman_decode, py::arg("data"), py::arg("alphabet"), py::arg("threads") = -1,
        py::arg("dtype") = "int32",
        "Decode one stream record at the start of data: (symbols, record bytes). dtype: 'int32', 'uint16' "
        "or 'uint8' (alphabet <= 256). Raises CorruptFileError.");
  m.def("huffman_decode_portable", &huffman_decode_portable, py::arg("data"), py::arg("alphabet"),
        "Test hook: huffman_decode(dtype='uint16', threads=1) by the per-chunk code of the CUDA decoder.");
  m.def("huffman_parse", &huffman_parse, py::arg("data"), py::arg("alphabet"),
        "Validate one stream record: {n_symbols, chunk_symbols, lengths (uint8), chunk_offsets (int64 bit "
        "offsets, n_chunks + 1), payload (uint8 copy), padding_ok, record_bytes, what}. Raises CorruptFileError.");
  m.def("ppz_encode_section", &ppz_encode_section, py::arg("name"), py::arg("dtype"), py::arg("shape"),
        py::arg("data"), py::arg("codebook"), py::arg("gap_bits"), py::arg("encoding") = -1,
        py::arg("chunk_symbols") = huff::kDefaultChunkSymbols,
        "Encode one tensor as a .ppz section: (bytes, encoding code, gap bits).");
  m.attr("PPZ_MIN_VERSION") = ppz::kMinVersion;
  m.def("ppz_assemble", &ppz_assemble, py::arg("manifest"), py::arg("sections"),
        py::arg("version") = ppz::kVersion,
        "Join the manifest (bytes) and the sections into a .ppz file (bytes) of the given version (1 or 2).");
  m.def("ppz_decode", &ppz_decode, py::arg("data"), py::arg("threads") = -1, py::arg("max_bytes") = -1,
        "Decode a .ppz file: (manifest bytes, [(name bytes, dtype code, shape, encoding code, uint8 tensor)], "
        "layout dict: version, manifest_bytes, head_bytes, table_bytes).");
  m.def("ppz_inspect", &ppz_inspect, py::arg("data"), py::arg("threads") = -1, py::arg("max_bytes") = -1,
        "Validate and measure a .ppz file: (manifest bytes, file bytes, [per-section dict], layout dict).");
  m.def("ppz_table", &ppz_table, py::arg("data"),
        "Parse a .ppz file without decoding: (manifest bytes, [(name bytes, dtype code, shape)], decoded bytes).");
  pyprune::register_sparse_kernels(m);
  pyprune::register_program(m);
  m.def("ppz_crc32", &ppz_crc32, py::arg("data"), py::arg("crc") = 0, "CRC-32 as zlib.crc32.");
}
