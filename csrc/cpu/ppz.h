// The .ppz compressed container of deep compression (byte layout: docs/format.md).
//
// Plain C++ on raw buffers (no torch headers; bindings.cpp converts), so the codec can be
// built and fuzzed on its own, e.g. under AddressSanitizer.
//
// Writing: encode_section() turns one tensor into a section, choosing the smallest of
// raw / dense-Huffman / CSR-Huffman / CSR-raw (and the best gap width) unless an encoding
// is forced; assemble_file() joins the header, the opaque manifest and the sections.
//
// Reading: parse_file() validates everything that can be checked without decoding
// payloads (magic, version, CRC32s, the directory, every section header and stream
// header, CSR row counts) and computes each tensor's decoded size BEFORE anything large
// is allocated; every size is bounded by what the file could encode. decode_section()
// then fills a caller-provided buffer; it throws CorruptError on any inconsistency and
// never reads or writes out of bounds. The input is treated as hostile throughout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "huffman.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the .ppz codec assumes a little-endian host");

namespace pyprune {
namespace ppz {

constexpr uint8_t kMagic[8] = {0x89, 'P', 'P', 'Z', '\r', '\n', 0x1a, '\n'};
constexpr uint32_t kVersion = 2;     // what the writer writes by default
constexpr uint32_t kMinVersion = 1;  // the oldest a reader reads
constexpr size_t kHeaderBytes = 32;
constexpr size_t kDirEntryBytes = 24;  // version 1
// Version 2's head (the manifest and the tensor table, zlib-compressed) declares its
// decompressed size, which a reader checks against what the stored bytes could hold
// (DEFLATE expands at most 1032:1) and this cap before it allocates anything.
constexpr uint64_t kMaxDeflateRatio = 1032;
constexpr uint64_t kMaxHeadBytes = uint64_t{64} << 20;  // ResNet-56's manifest and table: 86 KB
constexpr int kMaxNdim = 8;
constexpr int kMaxGapBits = 8;
constexpr uint32_t kMaxCodebook = huff::kMaxAlphabet - 1;  // index symbol 0 is "zero"

// kRawZ: the elements' bytes split into planes (every element's byte 0, then every
// byte 1, ...) and zlib-compressed: lossless, and a trained float32 tensor's
// sign-and-exponent plane compresses to about 40%, so raw weights cost about 13% less.
enum Encoding : uint8_t { kRaw = 0, kDenseQ = 1, kCsrQ = 2, kCsrF32 = 3, kRawZ = 4 };
constexpr int kNumEncodings = 5;
const char* encoding_name(int encoding);  // "raw", "dense_q", "csr_q", "csr_f32", "raw_z"; "?" otherwise

// Element dtypes (codes stored in the file). Only the width matters to the codec; the
// Python side maps codes to torch dtypes.
enum Dtype : uint8_t {
  kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kUInt8 = 4, kInt8 = 5, kInt16 = 6, kInt32 = 7,
  kInt64 = 8, kBool = 9, kComplex64 = 10, kComplex128 = 11, kUInt16 = 12, kUInt32 = 13, kUInt64 = 14,
};
constexpr int kNumDtypes = 15;
int dtype_itemsize(int dtype);  // 0 for an unknown code

// CRC-32 (IEEE 802.3, as zlib.crc32), continuing from `crc`.
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

// ---------------------------------------------------------------------------- writing

struct TensorInput {
  std::string name;
  int dtype = kFloat32;
  std::vector<uint64_t> shape;
  const uint8_t* data = nullptr;  // contiguous, little-endian, numel * itemsize bytes
  uint64_t nbytes = 0;
  bool quantized = false;         // every element is +-0 or bitwise one of `codebook`
  std::vector<float> codebook;
  int encoding = -1;              // force one Encoding; -1 = smallest
};

struct EncodeOptions {
  std::vector<int> gap_bits = {2, 3, 4, 5, 6, 7, 8};  // CSR gap widths to try, each in [1, 8]
  uint32_t chunk_symbols = huff::kDefaultChunkSymbols;
};

struct EncodedSection {
  std::vector<uint8_t> bytes;
  int encoding = kRaw;
  int gap_bits = 0;  // 0 unless CSR
};

// Throws std::invalid_argument on bad input (sizes, dtype, a value outside the codebook).
EncodedSection encode_section(const TensorInput& t, const EncodeOptions& opt);

// The whole file from the manifest (opaque bytes) and sections as encode_section()
// makes them. Version 1: header, manifest, directory, sections. Version 2: header, the
// head (manifest and tensor table, zlib-compressed; each section's name, dtype,
// encoding and shape move there from the section), the section bodies.
std::vector<uint8_t> assemble_file(const uint8_t* manifest, size_t manifest_size,
                                   const std::vector<const std::vector<uint8_t>*>& sections,
                                   uint32_t version = kVersion);

// ---------------------------------------------------------------------------- reading

struct Section {
  uint32_t index = 0;
  std::string what;  // "section 3 ('conv1.weight')", for messages
  std::string name;  // raw bytes (UTF-8 checked by the Python side)
  int dtype = 0;
  int encoding = 0;
  std::vector<uint64_t> shape;
  uint64_t numel = 0, itemsize = 0, out_bytes = 0;
  uint64_t offset = 0, size = 0;  // in the file
  uint64_t header_bytes = 0;      // name, dtype, encoding, shape (version 1; in the head in version 2)
  const uint8_t* raw = nullptr;   // kRaw
  uint32_t codebook_size = 0;     // quantized
  const uint8_t* codebook = nullptr;
  int gap_bits = 0;               // CSR
  uint64_t rows = 0, cols = 0, n_entries = 0, rowcount_bytes = 0;
  std::vector<uint64_t> row_counts;
  huff::StreamView gaps;          // CSR gap stream
  huff::StreamView codes;         // dense code stream or CSR index stream
  const uint8_t* values = nullptr;  // kCsrF32: n_entries float32
  const uint8_t* zlib = nullptr;    // kRawZ: the zlib stream of the byte planes
  uint64_t zlib_size = 0;
};

struct FileView {
  uint32_t version = 0;
  const uint8_t* manifest = nullptr;  // into the file (version 1) or into `head` (version 2)
  uint64_t manifest_size = 0;
  std::vector<uint8_t> head;     // version 2: the decompressed head
  uint64_t head_stored = 0;      // version 2: bytes the head takes in the file (with its size field)
  uint64_t table_bytes = 0;      // bytes of the tensor table: the directory (v1), its part of the head (v2)
  std::vector<Section> sections;
  uint64_t decoded_bytes = 0;  // sum of out_bytes
  uint64_t file_bytes = 0;

  FileView() = default;
  FileView(FileView&&) = default;  // moving keeps `manifest` valid; a copy would not
  FileView& operator=(FileView&&) = default;
  FileView(const FileView&) = delete;
  FileView& operator=(const FileView&) = delete;
};

// Validates the file structure (see above); the view points into `data`.
FileView parse_file(const uint8_t* data, size_t size);

// Decodes one parsed section into out[0, s.out_bytes). threads <= 1: serial.
void decode_section(const Section& s, uint8_t* out, int threads);

struct StreamStats {
  bool present = false;
  uint64_t symbols = 0, alphabet = 0, used_symbols = 0, max_code_length = 0, chunks = 0;
  uint64_t table_bytes = 0, chunk_table_bytes = 0, payload_bytes = 0, payload_bits = 0, record_bytes = 0;
  uint64_t record_offset = 0;  // where the stream record starts in the file (to decode it alone)
  double entropy_bits = 0.0;  // Shannon entropy of the decoded symbols, in bits (all of them)
};

struct SectionStats {
  uint64_t nnz = 0;      // elements whose bytes are not all zero (so -0.0 counts)
  uint64_t entries = 0;  // CSR entries, fillers included
  uint64_t fillers = 0;  // CSR entries whose value is +0.0
  uint64_t codebook_bytes = 0, rowcount_bytes = 0, values_bytes = 0, raw_bytes = 0, deflate_bytes = 0;
  StreamStats gaps, codes;
};

// Decodes the section (validating it) and measures its streams.
SectionStats inspect_section(const Section& s, int threads);

}  // namespace ppz
}  // namespace pyprune
