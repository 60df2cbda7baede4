// Canonical Huffman coding of the .ppz container; see huffman.h and docs/format.md.
#include "huffman.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>

#include "../common/huffman_chunk.h"

namespace pyprune {
namespace huff {
namespace {

using chunk::kLutBits;
static_assert(chunk::kMaxCodeLength == kMaxCodeLength, "huffman_chunk.h and huffman.h disagree");
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
  s.record_pos = start;
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

// Multi-symbol lookups: an entry decodes every code that lies wholly inside the next
// kLutBits bits (up to kSlots of them), so short codes cost a fraction of a lookup each.
// Entry layout (uint64): bits [0, 8) bits consumed, [8, 16) symbols, [16, 64) the symbols,
// kSymBits each, first symbol lowest. 0 = the first code is longer than kLutBits (or no code).
template <typename OutT>
struct Multi {
  static constexpr int kSymBits = sizeof(OutT) == 1 ? 8 : 16;
  static constexpr int kSlots = 48 / kSymBits;
  // Where the entry's layout is the output's (uint8, uint16), one 8-byte store writes all
  // the symbols (and garbage after them, which the next symbols overwrite).
  static constexpr bool kWordStore = sizeof(OutT) * 8 == kSymBits;
  // Elements from o[i] on that one store writes: the fast loop keeps them inside the
  // chunk, as another thread may be writing the next one.
  static constexpr uint64_t kSlack = kWordStore ? 8 / sizeof(OutT) : kSlots;

  static void store(OutT* o, uint64_t syms) {
    if constexpr (kWordStore) {
      static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the first symbol must land in o[0]");
      std::memcpy(o, &syms, 8);
    } else {
      for (int k = 0; k < kSlots; ++k) o[k] = static_cast<OutT>((syms >> (k * kSymBits)) & ((1u << kSymBits) - 1));
    }
  }
};

// Building the multi-symbol table takes one to kSlots + 1 single lookups for each of its
// 2^kLutBits entries, so a short stream decodes faster one code at a time. Measured on
// the 94 streams of a pruned, quantized ResNet-56 (bench/huffman.py): 2 * 2^kLutBits
// beat 1x and 4x.
constexpr uint64_t kMultiMinSymbols = uint64_t{2} << kLutBits;

template <typename OutT>
struct DecodeTable {
  chunk::Table single;
  std::vector<uint16_t> sorted;
  bool has_multi;
  uint64_t multi[1u << kLutBits];

  DecodeTable(const std::vector<uint8_t>& lengths, bool want_multi)
      : sorted(lengths.size()), has_multi(want_multi) {
    chunk::build_table(lengths.data(), static_cast<uint32_t>(lengths.size()), single, sorted.data());
    if (!has_multi) return;
    constexpr uint32_t mask = (1u << kLutBits) - 1;
    for (uint32_t idx = 0; idx <= mask; ++idx) {
      uint64_t syms = 0;
      uint32_t bits = 0;
      int k = 0;
      for (; k < Multi<OutT>::kSlots; ++k) {
        // The single table at the remaining bits padded with zeros: its code is real only
        // if it ends within the kLutBits - bits bits that are actually there.
        const uint32_t e = single.lut[(idx << bits) & mask];
        if (!e || bits + (e & 0xffu) > kLutBits) break;
        syms |= uint64_t{e >> 8} << (k * Multi<OutT>::kSymBits);
        bits += e & 0xffu;
      }
      multi[idx] = k ? (syms << 16) | (uint64_t(k) << 8) | bits : 0;
    }
  }
};

// chunk::BitWindow (which the GPU uses) with 8-byte loads where the payload allows them:
// the same bits, faster. After refill() at least 56 bits are buffered, MSB-aligned.
class BitReader : public chunk::BitWindow {
 public:
  using chunk::BitWindow::BitWindow;
  void refill() {
    if (next_ + 8 > nb_) return chunk::BitWindow::refill();  // bytes only near the end
    // Load 8 bytes, keep whole bytes only; the extra low bits OR in unchanged next time.
    uint64_t w;
    std::memcpy(&w, p_ + next_, 8);
    buf_ |= __builtin_bswap64(w) >> n_;
    const int take = (63 - n_) >> 3;
    next_ += static_cast<uint64_t>(take);
    n_ += take * 8;
  }
};

uint64_t chunk_count(const StreamView& s, uint64_t c) {
  return std::min<uint64_t>(s.chunk_symbols, s.n_symbols - c * s.chunk_symbols);
}

// Decodes chunk c into out[c * chunk_symbols, ...): the same symbols, and the same status,
// as chunk::decode_chunk, because a multi-symbol entry holds exactly the codes the single
// lookups would decode in turn.
template <typename OutT>
int32_t decode_chunk_fast(const DecodeTable<OutT>& t, const StreamView& s, uint64_t c, OutT* out) {
  using M = Multi<OutT>;
  const uint64_t start = s.chunk_offsets[c];
  const uint64_t chunk_bits = s.chunk_offsets[c + 1] - start;
  const uint64_t count = chunk_count(s, c);
  OutT* o = out + c * s.chunk_symbols;
  BitReader r(s.payload, s.payload_bytes, start);
  uint64_t used = 0, i = 0;
  while (t.has_multi && i + M::kSlack <= count) {
    // The longest code needs 24 bits; a refill leaves >= 56, two or more lookups' worth.
    if (r.available() < kMaxCodeLength) r.refill();
    const uint64_t w = r.bits();
    const uint64_t e = t.multi[w >> (64 - kLutBits)];
    if (e) {
      M::store(o + i, e >> 16);
      const int bits = static_cast<int>(e & 0xffu);
      i += (e >> 8) & 0xffu;
      r.consume(bits);
      used += static_cast<uint64_t>(bits);
    } else {
      uint32_t sym = 0;
      const uint32_t len = chunk::decode_symbol(t.single, t.sorted.data(), w, sym);
      if (!len) return chunk::kBadCode;
      o[i++] = static_cast<OutT>(sym);
      r.consume(static_cast<int>(len));
      used += len;
    }
  }
  if (!chunk::decode_symbols(t.single, t.sorted.data(), r, count - i, o + i, used)) return chunk::kBadCode;
  return chunk::chunk_status(used, chunk_bits);
}

// Runs decode(c) -> chunk::Status over all chunks (OpenMP when threads > 1 and the stream
// is long enough), then throws CorruptError for the lowest failing chunk, else for nonzero
// padding. Every decoder reports errors through here, so the messages are the same.
template <typename F>
void for_each_chunk(const StreamView& s, int threads, F&& decode) {
  const int64_t n_chunks = static_cast<int64_t>(s.chunk_offsets.size()) - 1;
  int64_t bad_chunk = -1;
  int32_t bad = chunk::kOk;
  const int nt = std::max(1, threads);
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt) if (nt > 1 && s.n_symbols >= kParallelSymbols)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int32_t e = decode(static_cast<uint64_t>(c));
    if (e != chunk::kOk) {
#pragma omp critical(pyprune_huff_error)
      if (bad_chunk < 0 || c < bad_chunk) {
        bad_chunk = c;
        bad = e;
      }
    }
  }
  if (bad != chunk::kOk) throw CorruptError(chunk::chunk_error_message(s.what, static_cast<uint64_t>(bad_chunk), bad));
  if (!padding_is_zero(s)) throw CorruptError(chunk::padding_error_message(s.what));
}

template <typename OutT>
void decode_fast(const StreamView& s, OutT* out, int threads) {
  if (s.n_symbols == 0) return;
  // ~24 KB: on the heap, as OpenMP threads may have small stacks (they only read it).
  const auto table = std::make_unique<const DecodeTable<OutT>>(s.lengths, s.n_symbols >= kMultiMinSymbols);
  for_each_chunk(s, threads, [&](uint64_t c) { return decode_chunk_fast(*table, s, c, out); });
}

}  // namespace

bool padding_is_zero(const StreamView& s) {
  const int pad = static_cast<int>(s.payload_bytes * 8 - s.payload_bits);
  return pad == 0 || (s.payload[s.payload_bytes - 1] & ((1u << pad) - 1)) == 0;
}

void decode_stream(const StreamView& s, uint16_t* out, int threads) { decode_fast(s, out, threads); }

void decode_stream(const StreamView& s, int32_t* out, int threads) { decode_fast(s, out, threads); }

void decode_stream(const StreamView& s, uint8_t* out, int threads) {
  if (s.alphabet > 256) {
    throw std::invalid_argument("huffman: uint8 output needs an alphabet of at most 256 symbols, not " +
                                u(s.alphabet));
  }
  decode_fast(s, out, threads);
}

void decode_stream_portable(const StreamView& s, uint16_t* out) {
  if (s.n_symbols == 0) return;
  auto table = std::make_unique<chunk::Table>();
  std::vector<uint16_t> sorted(s.lengths.size());
  chunk::build_table(s.lengths.data(), static_cast<uint32_t>(s.lengths.size()), *table, sorted.data());
  for_each_chunk(s, 1, [&](uint64_t c) {
    return chunk::decode_chunk(*table, sorted.data(), s.payload, s.payload_bytes, s.chunk_offsets[c],
                               s.chunk_offsets[c + 1] - s.chunk_offsets[c], chunk_count(s, c),
                               out + c * s.chunk_symbols);
  });
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
