// Canonical Huffman coding for the .ppz container (docs/format.md, "Huffman stream").
//
// Plain C++ on raw buffers (no torch headers), so the codec can be built and fuzzed on its
// own, e.g. under AddressSanitizer.
//
// * build_code_lengths: deterministic length-limited Huffman code lengths. A two-queue
//   Huffman build (leaves sorted by (frequency, symbol); on equal weights a leaf is taken
//   before an internal node, internal nodes in creation order), the JPEG (Annex K.3)
//   fix-up of the length counts when the longest code exceeds the limit, then lengths
//   handed out shortest-first to symbols sorted by (frequency descending, symbol). The
//   Python reference (pyprune/encode/huffman_ref.py) implements the same algorithm
//   independently and must give identical lengths.
// * encode_stream / parse_stream / decode_stream: the stream record (symbol count, chunk
//   size, 5-bit code lengths, per-chunk bit lengths, MSB-first payload). Chunks decode
//   independently (OpenMP over chunks); every count, length and offset is validated
//   against the buffer before anything is allocated or read. The per-chunk decoding
//   shared with the CUDA decoder lives in csrc/common/huffman_chunk.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyprune {

// A malformed or hostile .ppz file; the message names the section. Python sees
// pyprune.encode.ppz.CorruptFileError (a ValueError).
class CorruptError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bounds-checked little-endian cursor over an untrusted buffer. Every read checks the
// remaining length first and throws CorruptError naming `what` when it is short.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, std::string what) : data_(data), size_(size), what_(std::move(what)) {}

  size_t pos() const { return pos_; }
  size_t size() const { return size_; }
  size_t remaining() const { return size_ - pos_; }
  const std::string& what() const { return what_; }
  const uint8_t* data() const { return data_; }
  void set_what(std::string what) { what_ = std::move(what); }

  [[noreturn]] void fail(const std::string& msg) const { throw CorruptError(what_ + ": " + msg); }

  // Pointer to the next n bytes, which are skipped.
  const uint8_t* bytes(uint64_t n, const char* field) {
    if (n > remaining()) {
      fail(std::string(field) + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
           " but only " + std::to_string(remaining()) + " remain");
    }
    const uint8_t* p = data_ + pos_;
    pos_ += static_cast<size_t>(n);
    return p;
  }
  uint8_t u8(const char* field) { return *bytes(1, field); }
  uint16_t u16(const char* field) { return static_cast<uint16_t>(le(bytes(2, field), 2)); }
  uint32_t u32(const char* field) { return static_cast<uint32_t>(le(bytes(4, field), 4)); }
  uint64_t u64(const char* field) { return le(bytes(8, field), 8); }

 private:
  static uint64_t le(const uint8_t* p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string what_;
};

namespace huff {

constexpr int kMaxCodeLength = 24;           // longest code the format allows
constexpr uint32_t kMaxAlphabet = 1u << 16;  // symbols are uint16
constexpr uint32_t kDefaultChunkSymbols = 4096;
constexpr uint32_t kMaxChunkSymbols = 1u << 24;
constexpr int kLengthBits = 5;  // each code length is stored in 5 bits

// Code lengths (0 = unused symbol) for the given frequencies, longest <= max_len.
// One used symbol gets length 1. Throws std::invalid_argument if max_len is outside
// [1, 24] or too short for the number of used symbols.
std::vector<uint8_t> build_code_lengths(const uint64_t* freqs, size_t alphabet, int max_len = kMaxCodeLength);

// Canonical codes (right-aligned in the low `length` bits): codes increase with
// (length, symbol). Lengths must satisfy Kraft's inequality.
std::vector<uint32_t> canonical_codes(const std::vector<uint8_t>& lengths);

// Appends one stream record (docs/format.md) for symbols[0, n), each < alphabet.
// Returns the payload size in bits. Throws std::invalid_argument on a symbol >= alphabet.
uint64_t encode_stream(const uint16_t* symbols, uint64_t n, uint32_t alphabet, std::vector<uint8_t>& out,
                       uint32_t chunk_symbols = kDefaultChunkSymbols);

// A parsed, validated stream record; points into the caller's buffer.
struct StreamView {
  uint64_t n_symbols = 0;
  uint32_t chunk_symbols = 0;
  uint32_t alphabet = 0;                 // what the caller expects; lengths.size() == alphabet
  std::vector<uint8_t> lengths;          // per symbol, 0 = unused
  std::vector<uint64_t> chunk_offsets;   // bit offset of each chunk, plus the total at the end
  const uint8_t* payload = nullptr;
  uint64_t payload_bytes = 0;
  uint64_t payload_bits = 0;
  uint64_t record_pos = 0;               // where the record starts, as the reader's position
  uint64_t record_bytes = 0;             // the whole record: header, tables, payload
  uint64_t table_bytes = 0;              // code-length table
  uint64_t chunk_table_bytes = 0;
  std::string what;                      // for error messages
};

// Reads one stream record at the reader's position and validates it: code lengths
// (each <= 24, Kraft sum <= 1, at least one code when n > 0), chunk bit lengths (each
// between n_chunk * shortest and n_chunk * longest code), sizes against the buffer.
StreamView parse_stream(Reader& r, uint32_t alphabet, const std::string& what);

// Decodes all symbols of a parsed stream into out[0, n_symbols). Each chunk must decode
// to exactly its bit length; padding bits must be zero. threads <= 1 decodes serially.
// Throws CorruptError naming the stream and chunk. Table-driven: one lookup decodes every
// code that fits in the next 11 bits (up to 3 symbols, 6 for uint8 output); longer codes
// take a canonical search. The uint8 form needs s.alphabet <= 256 (else
// std::invalid_argument); all forms give the same symbols and the same errors.
void decode_stream(const StreamView& s, uint16_t* out, int threads);
void decode_stream(const StreamView& s, uint8_t* out, int threads);
void decode_stream(const StreamView& s, int32_t* out, int threads);

// decode_stream's contract, decoded serially one code at a time by the per-chunk code the
// CUDA decoder runs (csrc/common/huffman_chunk.h): a test hook for that code on the CPU.
void decode_stream_portable(const StreamView& s, uint16_t* out);

// Whether the bits after the payload's last one, up to the byte boundary, are all zero.
bool padding_is_zero(const StreamView& s);

// Shannon entropy in bits of a symbol histogram: sum over c of -c * log2(c / n).
double entropy_bits(const uint64_t* hist, size_t alphabet);

}  // namespace huff
}  // namespace pyprune
