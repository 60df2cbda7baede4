// Decoding one chunk of a .ppz Huffman stream (docs/format.md, "Huffman stream"), written
// once for the CPU (g++) and the GPU (nvcc): plain C++ with no library calls in the decode
// path, every function __host__ __device__ under nvcc.
//
// Users:
// * csrc/cuda/huffman_kernel.cu: one GPU thread per chunk, the Table in shared memory.
// * csrc/cpu/huffman.cpp: the CPU decoder's table construction, its slow path for codes
//   longer than kLutBits, and the chunk status messages; its fast path (multi-symbol
//   lookups, 8-byte refills) is its own. The CPU extension also exposes decode_chunk
//   itself as a test hook (pyprune._C.huffman_decode_portable), so the device logic is
//   checked on machines without a GPU.
//
// The caller has validated the stream (huff::parse_stream): lengths obey Kraft's
// inequality, chunk offsets lie inside the payload. decode_chunk never reads outside
// [payload, payload + payload_bytes) and never writes outside out[0, count), whatever
// the payload bits say.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define PYPRUNE_HD __host__ __device__ __forceinline__
#else
#define PYPRUNE_HD inline
#endif

namespace pyprune {
namespace huff {
namespace chunk {

constexpr int kLutBits = 11;        // codes up to this long decode in one table lookup
constexpr int kMaxCodeLength = 24;  // as huff::kMaxCodeLength (huffman.h), which checks it

// Outcome of decoding one chunk; the order of the non-ok values is irrelevant.
enum Status : int32_t { kOk = 0, kBadCode = 1, kOverrun = 2, kUnderrun = 3 };

// The CorruptError message for a stream (`what` names it) whose lowest failing chunk is
// `chunk`, with a non-ok status. Host only; every decoder reports through this.
inline std::string chunk_error_message(const std::string& what, uint64_t chunk, int32_t status) {
  const char* holds = status == kBadCode    ? "a bit pattern that is no code"
                      : status == kOverrun  ? "a code running past the chunk's end"
                      : status == kUnderrun ? "bits left over after its last symbol"
                                            : "an unknown decoding error";
  return what + ": chunk " + std::to_string(chunk) + " holds " + holds;
}

// The CorruptError message for a stream whose chunks decoded but whose payload padding
// bits are not all zero (checked after the chunks, so a bad chunk is reported first).
inline std::string padding_error_message(const std::string& what) {
  return what + ": nonzero padding after the payload";
}

// Canonical decode tables: a plain struct (no pointers) so it can be copied to the device
// and into shared memory as bytes. `sorted` (symbols by (length, symbol)) is separate: it
// has up to 65536 entries and only codes longer than kLutBits read it.
struct Table {
  uint32_t lut[1u << kLutBits];  // (symbol << 8) | length for a code of <= kLutBits bits; 0 = none
  uint32_t first_code[kMaxCodeLength + 2];   // canonical code of the first symbol of each length
  uint32_t count[kMaxCodeLength + 2];        // symbols of each length
  uint32_t first_index[kMaxCodeLength + 2];  // index in `sorted` of the first symbol of each length
  int32_t max_len;
};

// Fills `t` and sorted[0, number of used symbols) from per-symbol code lengths (0 =
// unused, each <= kMaxCodeLength, Kraft sum <= 1). Host only.
inline void build_table(const uint8_t* lengths, uint32_t alphabet, Table& t, uint16_t* sorted) {
  for (uint32_t i = 0; i < (1u << kLutBits); ++i) t.lut[i] = 0;
  for (int l = 0; l < kMaxCodeLength + 2; ++l) t.first_code[l] = t.count[l] = t.first_index[l] = 0;
  t.max_len = 0;
  for (uint32_t s = 0; s < alphabet; ++s) {
    if (lengths[s]) {
      ++t.count[lengths[s]];
      if (lengths[s] > t.max_len) t.max_len = lengths[s];
    }
  }
  uint32_t code = 0, index = 0;
  for (int len = 1; len <= kMaxCodeLength; ++len) {
    code = (code + t.count[len - 1]) << 1;
    t.first_code[len] = code;
    t.first_index[len] = index;
    index += t.count[len];
  }
  uint32_t next[kMaxCodeLength + 2];  // next free rank within each length
  for (int l = 0; l < kMaxCodeLength + 2; ++l) next[l] = t.first_index[l];
  for (uint32_t s = 0; s < alphabet; ++s) {
    const int l = lengths[s];
    if (!l) continue;
    const uint32_t rank = next[l]++;
    sorted[rank] = static_cast<uint16_t>(s);
    if (l <= kLutBits) {
      // Canonical: the code of the k-th symbol of a length is that length's first code + k.
      const uint32_t c = t.first_code[l] + (rank - t.first_index[l]);
      const uint32_t lo = c << (kLutBits - l), n = 1u << (kLutBits - l);
      for (uint32_t k = 0; k < n; ++k) t.lut[lo + k] = (s << 8) | static_cast<uint32_t>(l);
    }
  }
}

// Decodes the code at the top of `window` (MSB-aligned; at least kMaxCodeLength valid
// bits). Returns its length and sets `sym`, or returns 0 when no code matches.
PYPRUNE_HD uint32_t decode_symbol(const Table& t, const uint16_t* sorted, uint64_t window, uint32_t& sym) {
  const uint32_t e = t.lut[window >> (64 - kLutBits)];
  if (e) {
    sym = e >> 8;
    return e & 0xffu;
  }
  // Longer codes: canonical codes of length l are the l-bit values in
  // [first_code[l], first_code[l] + count[l]).
  for (int l = kLutBits + 1; l <= t.max_len; ++l) {
    const uint32_t v = static_cast<uint32_t>(window >> (64 - l));
    if (v >= t.first_code[l] && v - t.first_code[l] < t.count[l]) {
      sym = sorted[t.first_index[l] + (v - t.first_code[l])];
      return static_cast<uint32_t>(l);
    }
  }
  return 0;
}

// MSB-first bit window over [p, p + nbytes) from any bit; bits past the end read as 0.
// Byte loads only: the payload has no alignment, and on the GPU each thread walks its own
// chunk, so wider loads would not coalesce anyway.
class BitWindow {
 public:
  PYPRUNE_HD BitWindow(const uint8_t* p, uint64_t nbytes, uint64_t bitpos) : p_(p), nb_(nbytes), next_(bitpos >> 3) {
    refill();
    const int skip = static_cast<int>(bitpos & 7);
    buf_ <<= skip;
    n_ -= skip;
  }
  // Afterwards at least 57 bits are valid.
  PYPRUNE_HD void refill() {
    while (n_ <= 56) {
      const uint64_t b = next_ < nb_ ? p_[next_] : 0u;
      ++next_;
      buf_ |= b << (56 - n_);
      n_ += 8;
    }
  }
  PYPRUNE_HD int available() const { return n_; }
  PYPRUNE_HD uint64_t bits() const { return buf_; }
  PYPRUNE_HD void consume(int len) {
    buf_ <<= len;
    n_ -= len;
  }

 protected:  // huffman.cpp's BitReader refills the same state with wider loads
  const uint8_t* p_;
  uint64_t nb_;
  uint64_t next_;
  uint64_t buf_ = 0;
  int n_ = 0;
};

// Decodes `count` symbols one code at a time from `r` (BitWindow or any reader with the
// same members) into out[0, count), adding the bits taken to `used`. Returns false at the
// first bit pattern that is no code. Runs `count` times whatever the bits say: codes that
// run past a chunk's end only read later bits (or zeros past the payload), which the
// caller's chunk_status then reports.
template <typename Reader, typename OutT>
PYPRUNE_HD bool decode_symbols(const Table& t, const uint16_t* sorted, Reader& r, uint64_t count, OutT* out,
                               uint64_t& used) {
  for (uint64_t i = 0; i < count; ++i) {
    if (r.available() < kMaxCodeLength) r.refill();
    uint32_t sym = 0;
    const uint32_t len = decode_symbol(t, sorted, r.bits(), sym);
    if (!len) return false;
    r.consume(static_cast<int>(len));
    used += len;
    out[i] = static_cast<OutT>(sym);
  }
  return true;
}

// A chunk whose symbols all decoded took `used` bits; it must take exactly its own.
PYPRUNE_HD int32_t chunk_status(uint64_t used, uint64_t chunk_bits) {
  return used == chunk_bits ? kOk : used > chunk_bits ? kOverrun : kUnderrun;
}

// Decodes the `count` symbols of the chunk at bits [start_bit, start_bit + chunk_bits) of
// the payload into out[0, count).
template <typename OutT>
PYPRUNE_HD int32_t decode_chunk(const Table& t, const uint16_t* sorted, const uint8_t* payload, uint64_t payload_bytes,
                                uint64_t start_bit, uint64_t chunk_bits, uint64_t count, OutT* out) {
  BitWindow r(payload, payload_bytes, start_bit);
  uint64_t used = 0;
  if (!decode_symbols(t, sorted, r, count, out, used)) return kBadCode;
  return chunk_status(used, chunk_bits);
}

}  // namespace chunk
}  // namespace huff
}  // namespace pyprune
