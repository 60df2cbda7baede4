// Canonical Huffman coding of the .ppz container; see huffman.h and docs/format.md.
#include "huffman.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace pyprune {
namespace huff {
namespace {

constexpr int kLutBits = 11;  // first-level table: codes up to 11 bits decode in one lookup
// Below this many symbols, starting (and, on a busy machine, waiting for) a thread team
// costs more than decoding serially.
constexpr uint64_t kParallelSymbols = 1 << 16;

std::string u(uint64_t v) { return std::to_string(v); }

}  // namespace

std::vector<uint8_t> build_code_lengths(const uint64_t* freqs, size_t alphabet, int max_len) {
  if (max_len < 1 || max_len > kMaxCodeLength) {
    throw std::invalid_argument("huffman: max_len must be in [1, " + u(kMaxCodeLength) + "], got " +
                                std::to_string(max_len));
  }
  std::vector<uint8_t> lengths(alphabet, 0);
  std::vector<uint32_t> used;
  for (size_t s = 0; s < alphabet; ++s) {
    if (freqs[s] != 0) used.push_back(static_cast<uint32_t>(s));
  }
  const size_t m = used.size();
  if (m == 0) return lengths;
  if (m == 1) {  // a lone symbol still needs one bit per occurrence
    lengths[used[0]] = 1;
    return lengths;
  }
  if ((uint64_t{1} << max_len) < m) {
    throw std::invalid_argument("huffman: " + u(m) + " symbols do not fit in codes of at most " +
                                std::to_string(max_len) + " bits");
  }

  // Two-queue Huffman. Leaves sorted by (frequency, symbol) are nodes [0, m); internal
  // nodes [m, 2m-1) in creation order, which is also non-decreasing weight order.
  std::vector<uint32_t> leaves = used;
  std::stable_sort(leaves.begin(), leaves.end(), [&](uint32_t a, uint32_t b) { return freqs[a] < freqs[b]; });
  const size_t total = 2 * m - 1;
  std::vector<uint64_t> weight(total);
  std::vector<uint32_t> parent(total, 0);
  for (size_t i = 0; i < m; ++i) weight[i] = freqs[leaves[i]];
  size_t next_leaf = 0, next_internal = m;
  auto pop_min = [&](size_t made) -> size_t {
    // A leaf wins ties against an internal node.
    if (next_leaf < m && (next_internal >= made || weight[next_leaf] <= weight[next_internal])) return next_leaf++;
    return next_internal++;
  };
  for (size_t made = m; made < total; ++made) {
    const size_t a = pop_min(made);
    const size_t b = pop_min(made);
    if (weight[a] > std::numeric_limits<uint64_t>::max() - weight[b]) {
      throw std::invalid_argument("huffman: total frequency overflows 64 bits");
    }
    weight[made] = weight[a] + weight[b];
    parent[a] = parent[b] = static_cast<uint32_t>(made);
  }

  // Depths: a parent always has a larger index than its children.
  std::vector<uint32_t> depth(total, 0);
  std::vector<uint64_t> bl_count(std::max<size_t>(m, static_cast<size_t>(max_len)) + 1, 0);
  size_t deepest = 0;
  for (size_t i = total - 1; i-- > 0;) depth[i] = depth[parent[i]] + 1;
  for (size_t i = 0; i < m; ++i) {
    ++bl_count[depth[i]];
    deepest = std::max<size_t>(deepest, depth[i]);
  }

  // JPEG Annex K.3 fix-up: move pairs of the deepest leaves up until all fit in max_len
  // bits. Each step keeps the Kraft sum at exactly 1.
  for (size_t i = deepest; i > static_cast<size_t>(max_len); --i) {
    while (bl_count[i] > 0) {
      size_t j = i - 2;
      while (j > 0 && bl_count[j] == 0) --j;
      if (j == 0 || bl_count[i] < 2) throw std::logic_error("huffman: length fix-up failed");
      bl_count[i] -= 2;
      bl_count[i - 1] += 1;
      bl_count[j + 1] += 2;
      bl_count[j] -= 1;
    }
  }

  // Hand the lengths out shortest-first by (frequency descending, symbol ascending).
  std::vector<uint32_t> order = used;
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return freqs[a] > freqs[b]; });
  size_t k = 0;
  for (int len = 1; len <= max_len; ++len) {
    for (uint64_t c = 0; c < bl_count[len]; ++c) lengths[order[k++]] = static_cast<uint8_t>(len);
  }
  if (k != m) throw std::logic_error("huffman: length assignment mismatch");
  return lengths;
}

std::vector<uint32_t> canonical_codes(const std::vector<uint8_t>& lengths) {
  uint32_t count[kMaxCodeLength + 1] = {0};
  for (uint8_t l : lengths) {
    if (l > kMaxCodeLength) throw std::invalid_argument("huffman: code length above 24");
    if (l) ++count[l];
  }
  uint32_t next[kMaxCodeLength + 2] = {0};
  uint32_t code = 0;
  for (int len = 1; len <= kMaxCodeLength; ++len) {
    code = (code + count[len - 1]) << 1;
    next[len] = code;
  }
  std::vector<uint32_t> codes(lengths.size(), 0);
  for (size_t s = 0; s < lengths.size(); ++s) {
    if (lengths[s]) codes[s] = next[lengths[s]]++;
  }
  return codes;
}

namespace {

// MSB-first bit writer appending to a byte vector.
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
  void put(uint32_t code, int len) {  // len <= 24
    acc_ = (acc_ << len) | code;
    n_ += len;
    bits_ += static_cast<uint64_t>(len);
    while (n_ >= 8) {
      n_ -= 8;
      out_.push_back(static_cast<uint8_t>(acc_ >> n_));
    }
  }
  void flush() {
    if (n_ > 0) out_.push_back(static_cast<uint8_t>(acc_ << (8 - n_)));
    n_ = 0;
    acc_ = 0;
  }
  uint64_t bits() const { return bits_; }

 private:
  std::vector<uint8_t>& out_;
  uint64_t acc_ = 0;
  int n_ = 0;
  uint64_t bits_ = 0;
};

void put_le(std::vector<uint8_t>& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

void set_le32(std::vector<uint8_t>& out, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) out[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace

uint64_t encode_stream(const uint16_t* symbols, uint64_t n, uint32_t alphabet, std::vector<uint8_t>& out,
                       uint32_t chunk_symbols) {
  if (alphabet < 1 || alphabet > kMaxAlphabet) {
    throw std::invalid_argument("huffman: alphabet size must be in [1, 65536], got " + u(alphabet));
  }
  if (chunk_symbols < 1 || chunk_symbols > kMaxChunkSymbols) {
    throw std::invalid_argument("huffman: chunk size must be in [1, 2^24], got " + u(chunk_symbols));
  }
  std::vector<uint64_t> hist(alphabet, 0);
  for (uint64_t i = 0; i < n; ++i) {
    if (symbols[i] >= alphabet) {
      throw std::invalid_argument("huffman: symbol " + u(symbols[i]) + " at " + u(i) + " outside the alphabet of " +
                                  u(alphabet));
    }
    ++hist[symbols[i]];
  }
  const std::vector<uint8_t> lengths = build_code_lengths(hist.data(), alphabet);
  const std::vector<uint32_t> codes = canonical_codes(lengths);
  uint32_t num_lengths = alphabet;
  while (num_lengths > 0 && lengths[num_lengths - 1] == 0) --num_lengths;

  put_le(out, n, 8);
  put_le(out, chunk_symbols, 4);
  put_le(out, num_lengths, 4);
  {
    BitWriter w(out);
    for (uint32_t s = 0; s < num_lengths; ++s) w.put(lengths[s], kLengthBits);
    w.flush();
  }
  const uint64_t n_chunks = n == 0 ? 0 : (n - 1) / chunk_symbols + 1;
  const size_t table_at = out.size();
  out.resize(out.size() + 4 * n_chunks, 0);
  BitWriter w(out);
  uint64_t chunk_start = 0;
  for (uint64_t c = 0; c < n_chunks; ++c) {
    const uint64_t lo = c * chunk_symbols, hi = std::min<uint64_t>(n, lo + chunk_symbols);
    for (uint64_t i = lo; i < hi; ++i) w.put(codes[symbols[i]], lengths[symbols[i]]);
    set_le32(out, table_at + 4 * c, static_cast<uint32_t>(w.bits() - chunk_start));
    chunk_start = w.bits();
  }
  w.flush();
  return w.bits();
}

StreamView parse_stream(Reader& r, uint32_t alphabet, const std::string& what) {
  StreamView s;
  s.what = what;
  s.alphabet = alphabet;
  const size_t start = r.pos();
  auto fail = [&](const std::string& msg) { r.fail(what + ": " + msg); };
  if (alphabet < 1 || alphabet > kMaxAlphabet) fail("alphabet size " + u(alphabet) + " outside [1, 65536]");
  s.n_symbols = r.u64("symbol count");
  s.chunk_symbols = r.u32("chunk size");
  const uint32_t num_lengths = r.u32("code-length count");
  if (s.chunk_symbols < 1 || s.chunk_symbols > kMaxChunkSymbols) {
    fail("chunk size " + u(s.chunk_symbols) + " outside [1, 2^24]");
  }
  if (num_lengths > alphabet) fail(u(num_lengths) + " code lengths for an alphabet of " + u(alphabet));

  s.table_bytes = (uint64_t{num_lengths} * kLengthBits + 7) / 8;
  const uint8_t* table = r.bytes(s.table_bytes, "code-length table");
  s.lengths.assign(alphabet, 0);
  uint64_t kraft = 0;  // in units of 2^-24
  int min_len = kMaxCodeLength + 1, max_len = 0;
  for (uint32_t i = 0; i < num_lengths; ++i) {
    const uint64_t bit = uint64_t{i} * kLengthBits;
    uint32_t v = 0;
    for (int b = 0; b < kLengthBits; ++b) {
      const uint64_t at = bit + b;
      v = (v << 1) | ((table[at >> 3] >> (7 - (at & 7))) & 1u);
    }
    if (v > kMaxCodeLength) fail("code length " + u(v) + " of symbol " + u(i) + " exceeds 24");
    s.lengths[i] = static_cast<uint8_t>(v);
    if (v) {
      kraft += uint64_t{1} << (kMaxCodeLength - v);
      min_len = std::min<int>(min_len, static_cast<int>(v));
      max_len = std::max<int>(max_len, static_cast<int>(v));
    }
  }
  if (s.table_bytes > 0) {
    const int pad = static_cast<int>(s.table_bytes * 8 - uint64_t{num_lengths} * kLengthBits);
    if (pad > 0 && (table[s.table_bytes - 1] & ((1u << pad) - 1)) != 0) fail("nonzero padding in code-length table");
  }
  if (kraft > (uint64_t{1} << kMaxCodeLength)) fail("code lengths violate Kraft's inequality (over-subscribed code)");
  if (s.n_symbols > 0 && max_len == 0) fail(u(s.n_symbols) + " symbols but no code lengths");

  const uint64_t n_chunks = s.n_symbols == 0 ? 0 : (s.n_symbols - 1) / s.chunk_symbols + 1;
  if (n_chunks > r.remaining() / 4) {
    fail(u(s.n_symbols) + " symbols in chunks of " + u(s.chunk_symbols) + " need a chunk table of " + u(n_chunks) +
         " entries, more than the " + u(r.remaining()) + " bytes left");
  }
  s.chunk_table_bytes = 4 * n_chunks;
  const uint8_t* ct = r.bytes(s.chunk_table_bytes, "chunk table");
  s.chunk_offsets.resize(n_chunks + 1);
  uint64_t total = 0;
  for (uint64_t c = 0; c < n_chunks; ++c) {
    const uint64_t bits = uint64_t{ct[4 * c]} | (uint64_t{ct[4 * c + 1]} << 8) | (uint64_t{ct[4 * c + 2]} << 16) |
                          (uint64_t{ct[4 * c + 3]} << 24);
    const uint64_t count = std::min<uint64_t>(s.chunk_symbols, s.n_symbols - c * s.chunk_symbols);
    if (bits < count * min_len || bits > count * max_len) {
      fail("chunk " + u(c) + " has " + u(bits) + " bits for " + u(count) + " symbols of " + std::to_string(min_len) +
           ".." + std::to_string(max_len) + " bits");
    }
    s.chunk_offsets[c] = total;
    total += bits;  // < 2^32 per chunk, < 2^62 chunks: no overflow
  }
  s.chunk_offsets[n_chunks] = total;
  s.payload_bits = total;
  s.payload_bytes = (total + 7) / 8;
  s.payload = r.bytes(s.payload_bytes, "payload");
  s.record_bytes = r.pos() - start;
  return s;
}

namespace {

struct DecodeTable {
  uint32_t lut[1u << kLutBits];  // (symbol << 8) | length, 0 = not a code of <= kLutBits bits
  uint32_t first_code[kMaxCodeLength + 2] = {0};
  uint32_t count[kMaxCodeLength + 2] = {0};
  uint32_t first_index[kMaxCodeLength + 2] = {0};
  std::vector<uint16_t> sorted;  // symbols by (length, symbol)
  int max_len = 0;

  explicit DecodeTable(const std::vector<uint8_t>& lengths) {
    std::fill(std::begin(lut), std::end(lut), 0u);
    for (uint8_t l : lengths) {
      if (l) {
        ++count[l];
        max_len = std::max<int>(max_len, l);
      }
    }
    uint32_t code = 0, index = 0;
    for (int len = 1; len <= kMaxCodeLength; ++len) {
      code = (code + count[len - 1]) << 1;
      first_code[len] = code;
      first_index[len] = index;
      index += count[len];
    }
    sorted.resize(index);
    uint32_t fill[kMaxCodeLength + 2];
    std::copy(std::begin(first_index), std::end(first_index), std::begin(fill));
    std::vector<uint32_t> codes = canonical_codes(lengths);
    for (size_t s = 0; s < lengths.size(); ++s) {
      const int l = lengths[s];
      if (!l) continue;
      sorted[fill[l]++] = static_cast<uint16_t>(s);
      if (l <= kLutBits) {
        const uint32_t lo = codes[s] << (kLutBits - l), n = 1u << (kLutBits - l);
        for (uint32_t k = 0; k < n; ++k) lut[lo + k] = (static_cast<uint32_t>(s) << 8) | static_cast<uint32_t>(l);
      }
    }
  }
};

// MSB-first bit reader over [p, p + nbytes), starting at any bit; bits past the end read
// as 0 (never loaded). After refill() at least 56 bits are buffered, MSB-aligned.
class BitReader {
 public:
  BitReader(const uint8_t* p, uint64_t nbytes, uint64_t bitpos) : p_(p), nb_(nbytes), next_(bitpos >> 3) {
    refill();
    const int skip = static_cast<int>(bitpos & 7);
    buf_ <<= skip;
    n_ -= skip;
  }
  void refill() {
    if (next_ + 8 <= nb_) {
      // Load 8 bytes, keep whole bytes only; the extra low bits OR in unchanged next time.
      uint64_t w;
      std::memcpy(&w, p_ + next_, 8);
      buf_ |= __builtin_bswap64(w) >> n_;
      const int take = (63 - n_) >> 3;
      next_ += static_cast<uint64_t>(take);
      n_ += take * 8;
    } else {
      while (n_ <= 56) {
        const uint64_t b = next_ < nb_ ? p_[next_] : 0u;
        ++next_;
        buf_ |= b << (56 - n_);
        n_ += 8;
      }
    }
  }
  int available() const { return n_; }
  uint64_t bits() const { return buf_; }
  void consume(int len) {
    buf_ <<= len;
    n_ -= len;
  }

 private:
  const uint8_t* p_;
  uint64_t nb_;
  uint64_t next_;
  uint64_t buf_ = 0;
  int n_ = 0;
};

enum ChunkError { kOk = 0, kBadCode, kOverrun, kUnderrun };

ChunkError decode_chunk(const DecodeTable& t, const StreamView& s, uint64_t c, uint16_t* out) {
  const uint64_t start = s.chunk_offsets[c];
  const uint64_t chunk_bits = s.chunk_offsets[c + 1] - start;
  const uint64_t lo = c * s.chunk_symbols;
  const uint64_t count = std::min<uint64_t>(s.chunk_symbols, s.n_symbols - lo);
  BitReader r(s.payload, s.payload_bytes, start);
  uint64_t used = 0;
  // Loops run `count` times whatever the bits say; a chunk whose codes run past its end
  // only reads later bits of the payload (or zeros past it) and fails the check below.
  for (uint64_t i = 0; i < count; ++i) {
    if (r.available() < kMaxCodeLength) r.refill();
    const uint64_t w = r.bits();
    const uint32_t e = t.lut[w >> (64 - kLutBits)];
    uint32_t len, sym;
    if (e) {
      len = e & 0xffu;
      sym = e >> 8;
    } else {
      len = 0;
      sym = 0;
      for (int l = kLutBits + 1; l <= t.max_len; ++l) {
        const uint32_t v = static_cast<uint32_t>(w >> (64 - l));
        if (v >= t.first_code[l] && v - t.first_code[l] < t.count[l]) {
          len = static_cast<uint32_t>(l);
          sym = t.sorted[t.first_index[l] + (v - t.first_code[l])];
          break;
        }
      }
      if (!len) return kBadCode;
    }
    r.consume(static_cast<int>(len));
    used += len;
    out[lo + i] = static_cast<uint16_t>(sym);
  }
  return used == chunk_bits ? kOk : used > chunk_bits ? kOverrun : kUnderrun;
}

}  // namespace

void decode_stream(const StreamView& s, uint16_t* out, int threads) {
  if (s.n_symbols == 0) return;
  const DecodeTable table(s.lengths);
  const int64_t n_chunks = static_cast<int64_t>(s.chunk_offsets.size()) - 1;
  int64_t bad_chunk = -1;
  ChunkError bad = kOk;
  const int nt = std::max(1, threads);
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt) if (nt > 1 && s.n_symbols >= kParallelSymbols)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const ChunkError e = decode_chunk(table, s, static_cast<uint64_t>(c), out);
    if (e != kOk) {
#pragma omp critical(pyprune_huff_error)
      if (bad_chunk < 0 || c < bad_chunk) {
        bad_chunk = c;
        bad = e;
      }
    }
  }
  if (bad != kOk) {
    const char* why = bad == kBadCode  ? "a bit pattern that is no code"
                      : bad == kOverrun ? "a code running past the chunk's end"
                                        : "bits left over after its last symbol";
    throw CorruptError(s.what + ": chunk " + u(static_cast<uint64_t>(bad_chunk)) + " holds " + why);
  }
  const int pad = static_cast<int>(s.payload_bytes * 8 - s.payload_bits);
  if (pad > 0 && (s.payload[s.payload_bytes - 1] & ((1u << pad) - 1)) != 0) {
    throw CorruptError(s.what + ": nonzero padding after the payload");
  }
}

double entropy_bits(const uint64_t* hist, size_t alphabet) {
  uint64_t n = 0;
  for (size_t i = 0; i < alphabet; ++i) n += hist[i];
  if (n == 0) return 0.0;
  double h = 0.0;
  const double dn = static_cast<double>(n);
  for (size_t i = 0; i < alphabet; ++i) {
    if (hist[i]) h += static_cast<double>(hist[i]) * std::log2(dn / static_cast<double>(hist[i]));
  }
  return h;
}

}  // namespace huff
}  // namespace pyprune
