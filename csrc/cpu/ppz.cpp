// The .ppz container: encode and hostile-input-safe decode. See ppz.h and docs/format.md.
#include "ppz.h"

#include <omp.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <unordered_set>
#include <utility>

namespace pyprune {
namespace ppz {
namespace {

constexpr uint64_t kMaxNumel = uint64_t{1} << 60;  // so numel * itemsize never overflows
// Below this many elements a parallel region costs more than it saves.
constexpr uint64_t kParallelGrain = 1 << 15;

std::string u(uint64_t v) { return std::to_string(v); }

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// A name for messages: printable ASCII kept, anything else as \xNN, at most 80 bytes.
std::string printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < 80; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > 80) out += "...";
  return out;
}

uint32_t le32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
uint64_t le64(const uint8_t* p) { return uint64_t{le32(p)} | (uint64_t{le32(p + 4)} << 32); }

void put_le(std::vector<uint8_t>& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<uint8_t>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<uint8_t>(v));
}

struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
    }
  }
};

// rows = shape[0] and cols = the rest flattened (ndim >= 2); one row otherwise.
bool geometry(const std::vector<uint64_t>& shape, uint64_t& numel, uint64_t& rows, uint64_t& cols) {
  const size_t nd = shape.size();
  rows = nd >= 2 ? shape[0] : 1;
  cols = 1;
  for (size_t i = nd >= 2 ? 1 : 0; i < nd; ++i) {
    if (__builtin_mul_overflow(cols, shape[i], &cols) || cols > kMaxNumel) return false;
  }
  if (__builtin_mul_overflow(rows, cols, &numel) || numel > kMaxNumel) return false;
  return true;
}

uint32_t f32_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Inflates the zlib stream in[0, n) into exactly out[0, size): "" when it fits exactly
// and nothing follows it, else what is wrong. Writes nothing past out + size.
std::string inflate_exact(const uint8_t* in, uint64_t n, uint8_t* out, uint64_t size) {
  if (n > UINT32_MAX || size > UINT32_MAX) return "too large for one zlib call";
  z_stream zs{};
  if (inflateInit(&zs) != Z_OK) throw std::runtime_error("ppz: zlib failed to initialise");
  zs.next_in = const_cast<Bytef*>(in);
  zs.avail_in = static_cast<uInt>(n);
  uint8_t dummy = 0;  // zlib wants a valid pointer even for 0 bytes
  zs.next_out = size ? out : &dummy;
  zs.avail_out = static_cast<uInt>(size);
  const int ret = inflate(&zs, Z_FINISH);
  const uint64_t produced = zs.total_out, left = zs.avail_in;
  const std::string why = zs.msg ? zs.msg : "truncated";
  inflateEnd(&zs);
  if (ret == Z_BUF_ERROR && produced == size) return "decompresses to more than its declared " + u(size) + " bytes";
  if (ret != Z_STREAM_END) return "not a valid zlib stream (" + why + ")";
  if (produced != size) return "decompresses to " + u(produced) + " bytes, declared " + u(size);
  if (left) return u(left) + " bytes after the end of its zlib stream";
  return "";
}

}  // namespace

const char* encoding_name(int encoding) {
  switch (encoding) {
    case kRaw: return "raw";
    case kDenseQ: return "dense_q";
    case kCsrQ: return "csr_q";
    case kCsrF32: return "csr_f32";
    case kRawZ: return "raw_z";
    default: return "?";
  }
}

int dtype_itemsize(int dtype) {
  static const int sizes[kNumDtypes] = {4, 8, 2, 2, 1, 1, 2, 4, 8, 1, 8, 16, 2, 4, 8};
  return dtype >= 0 && dtype < kNumDtypes ? sizes[dtype] : 0;
}

uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc) {
  static const CrcTables tables;
  const auto& t = tables.t;
  uint32_t c = ~crc;
  while (n >= 8) {
    const uint32_t one = c ^ le32(p), two = le32(p + 4);
    c = t[7][one & 0xff] ^ t[6][(one >> 8) & 0xff] ^ t[5][(one >> 16) & 0xff] ^ t[4][one >> 24] ^
        t[3][two & 0xff] ^ t[2][(two >> 8) & 0xff] ^ t[1][(two >> 16) & 0xff] ^ t[0][two >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return ~c;
}

// ============================================================================ writing
namespace {

// Flat indices of the nonzero elements, and where each row's run of them starts.
struct Nonzeros {
  std::vector<uint64_t> pos;
  std::vector<uint64_t> row_start;  // rows + 1
};

// CSR entries for gap width b: relative column gaps (a filler where a gap exceeds 2^b - 1,
// and after the last entry of a row while more than 2^b - 1 zeros remain), the flat index
// of each entry's element (-1 for a filler) and the varint row counts.
struct Csr {
  std::vector<uint16_t> gaps;
  std::vector<int64_t> element;
  std::vector<uint8_t> row_counts;
};

Csr build_csr(const Nonzeros& nz, uint64_t rows, uint64_t cols, int b) {
  Csr c;
  const int64_t m = (int64_t{1} << b) - 1;
  c.gaps.reserve(nz.pos.size());
  c.element.reserve(nz.pos.size());
  for (uint64_t r = 0; r < rows; ++r) {
    const uint64_t base = r * cols;
    int64_t prev = -1;
    uint64_t count = 0;
    auto filler = [&] {
      c.gaps.push_back(static_cast<uint16_t>(m));
      c.element.push_back(-1);
      prev += m + 1;
      ++count;
    };
    for (uint64_t k = nz.row_start[r]; k < nz.row_start[r + 1]; ++k) {
      const int64_t col = static_cast<int64_t>(nz.pos[k] - base);
      while (col - prev - 1 > m) filler();
      c.gaps.push_back(static_cast<uint16_t>(col - prev - 1));
      c.element.push_back(static_cast<int64_t>(nz.pos[k]));
      prev = col;
      ++count;
    }
    while (static_cast<int64_t>(cols) - 1 - prev > m) filler();
    put_varint(c.row_counts, count);
  }
  return c;
}

void put_codebook(std::vector<uint8_t>& out, const std::vector<float>& cb) {
  put_le(out, cb.size(), 4);
  for (float f : cb) put_le(out, f32_bits(f), 4);
}

}  // namespace

EncodedSection encode_section(const TensorInput& t, const EncodeOptions& opt) {
  auto bad = [&](const std::string& msg) -> void {
    throw std::invalid_argument("tensor '" + printable(t.name) + "': " + msg);
  };
  if (t.name.size() > 0xffff) bad("name longer than 65535 bytes");
  const int isz = dtype_itemsize(t.dtype);
  if (!isz) bad("unknown dtype code " + std::to_string(t.dtype));
  if (t.shape.size() > static_cast<size_t>(kMaxNdim)) bad("more than 8 dimensions");
  uint64_t numel = 0, rows = 0, cols = 0;
  if (!geometry(t.shape, numel, rows, cols)) bad("too many elements");
  if (numel * static_cast<uint64_t>(isz) != t.nbytes) {
    bad(u(t.nbytes) + " data bytes for " + u(numel) + " elements of " + std::to_string(isz) + " bytes");
  }
  for (int b : opt.gap_bits) {
    if (b < 1 || b > kMaxGapBits) bad("gap bits must be in [1, 8], got " + std::to_string(b));
  }
  if (t.encoding < -1 || t.encoding >= kNumEncodings) bad("unknown encoding " + std::to_string(t.encoding));
  if (t.quantized && t.dtype != kFloat32) bad("a codebook needs a float32 tensor");
  if ((t.encoding == kDenseQ || t.encoding == kCsrQ) && !t.quantized) {
    bad(std::string("encoding ") + encoding_name(t.encoding) + " needs a codebook");
  }
  if (t.encoding == kCsrF32 && t.dtype != kFloat32) bad("encoding csr_f32 needs a float32 tensor");
  if (t.encoding == kCsrF32 && t.quantized) bad("encoding csr_f32 is for tensors without a codebook");
  if ((t.encoding == kCsrQ || t.encoding == kCsrF32) && opt.gap_bits.empty()) bad("no gap width to try");
  auto want = [&](int e) { return t.encoding < 0 || t.encoding == e; };

  // Candidates: the smallest body wins; ties go to the earlier one (raw, dense, CSR by b).
  uint64_t best_size = want(kRaw) ? t.nbytes : UINT64_MAX;
  int best_encoding = want(kRaw) ? kRaw : -1;
  int best_b = 0;
  std::vector<uint8_t> best_body;
  auto consider = [&](std::vector<uint8_t>&& body, int encoding, int b) {
    if (best_encoding < 0 || body.size() < best_size) {
      best_size = body.size();
      best_encoding = encoding;
      best_b = b;
      best_body = std::move(body);
    }
  };

  const bool f32 = t.dtype == kFloat32;
  auto bits_at = [&](uint64_t i) { return le32(t.data + 4 * i); };
  std::vector<float> codebook;
  std::vector<uint16_t> symbols;  // quantized: 0 for +0.0, else codebook index + 1
  if (t.quantized) {
    codebook = t.codebook;
    if (codebook.size() > kMaxCodebook) bad("codebook has more than 65535 entries");
    std::vector<std::pair<uint32_t, uint32_t>> lookup;  // (bits, index) sorted; first index per bits
    for (size_t i = 0; i < codebook.size(); ++i) lookup.emplace_back(f32_bits(codebook[i]), static_cast<uint32_t>(i));
    std::sort(lookup.begin(), lookup.end());
    lookup.erase(std::unique(lookup.begin(), lookup.end(),
                             [](const auto& a, const auto& b) { return a.first == b.first; }),
                 lookup.end());
    symbols.resize(numel);
    uint64_t n_bad = 0, first_bad = 0;
    int neg_zero = -1;
    for (uint64_t i = 0; i < numel; ++i) {
      const uint32_t bits = bits_at(i);
      if (bits == 0) {
        symbols[i] = 0;
        continue;
      }
      auto it = std::lower_bound(lookup.begin(), lookup.end(), std::make_pair(bits, uint32_t{0}));
      if (it != lookup.end() && it->first == bits) {
        symbols[i] = static_cast<uint16_t>(it->second + 1);
      } else if (bits == 0x80000000u) {  // -0.0 equals 0 but must round-trip: store it as a code
        if (neg_zero < 0) {
          if (codebook.size() >= kMaxCodebook) bad("codebook has no room for -0.0 (65535 entries)");
          codebook.push_back(-0.0f);
          neg_zero = static_cast<int>(codebook.size());
        }
        symbols[i] = static_cast<uint16_t>(neg_zero);
      } else if (n_bad++ == 0) {
        first_bad = i;
      }
    }
    if (n_bad) {
      float v;
      const uint32_t b = bits_at(first_bad);
      std::memcpy(&v, &b, 4);
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.9g (bits %s)", static_cast<double>(v), hex32(b).c_str());
      bad(u(n_bad) + " elements are neither 0 nor a codebook value, the first at flat index " + u(first_bad) +
          ": " + buf);
    }
  }
  const uint32_t alphabet = static_cast<uint32_t>(codebook.size()) + 1;

  if (t.quantized && want(kDenseQ)) {
    std::vector<uint8_t> body;
    put_codebook(body, codebook);
    huff::encode_stream(symbols.data(), numel, alphabet, body, opt.chunk_symbols);
    consider(std::move(body), kDenseQ, 0);
  }
  const bool csr = (t.quantized && want(kCsrQ)) || (f32 && !t.quantized && want(kCsrF32));
  if (csr) {
    Nonzeros nz;
    nz.row_start.assign(rows + 1, 0);
    for (uint64_t r = 0; r < rows; ++r) {
      for (uint64_t i = r * cols, end = i + cols; i < end; ++i) {
        if (t.quantized ? symbols[i] != 0 : bits_at(i) != 0) nz.pos.push_back(i);
      }
      nz.row_start[r + 1] = nz.pos.size();
    }
    for (int b : opt.gap_bits) {
      const Csr c = build_csr(nz, rows, cols, b);
      const uint64_t n = c.gaps.size();
      std::vector<uint8_t> body;
      put_le(body, static_cast<uint64_t>(b), 4);  // b, then 3 reserved zero bytes
      if (t.quantized) put_codebook(body, codebook);
      put_le(body, n, 8);
      put_le(body, c.row_counts.size(), 8);
      body.insert(body.end(), c.row_counts.begin(), c.row_counts.end());
      huff::encode_stream(c.gaps.data(), n, 1u << b, body, opt.chunk_symbols);
      if (t.quantized) {
        std::vector<uint16_t> idx(n);
        for (uint64_t e = 0; e < n; ++e) idx[e] = c.element[e] < 0 ? 0 : symbols[c.element[e]];
        huff::encode_stream(idx.data(), n, alphabet, body, opt.chunk_symbols);
        consider(std::move(body), kCsrQ, b);
      } else {
        body.reserve(body.size() + 4 * n);
        for (uint64_t e = 0; e < n; ++e) put_le(body, c.element[e] < 0 ? 0 : bits_at(c.element[e]), 4);
        consider(std::move(body), kCsrF32, b);
      }
    }
  }
  // raw_z last, and only for a tensor nothing above stored in under 3/4 of its bytes
  // (float weights neither pruned nor quantized): it cannot do better than that on
  // float data, and zlib over every tensor of every candidate of a search is slow.
  // Level 1: about 1% larger than level 9 on float weights, seven times faster.
  const bool forced_z = t.encoding == kRawZ;
  if (want(kRawZ) && t.nbytes > 0 && t.nbytes <= UINT32_MAX && (forced_z || best_size > t.nbytes / 4 * 3)) {
    std::vector<uint8_t> planes(t.nbytes);
    for (uint64_t i = 0; i < numel; ++i) {
      for (int b = 0; b < isz; ++b) planes[b * numel + i] = t.data[i * isz + b];
    }
    uLongf zsize = compressBound(planes.size());
    std::vector<uint8_t> body(zsize);
    if (compress2(body.data(), &zsize, planes.data(), planes.size(), Z_BEST_SPEED) != Z_OK) {
      bad("zlib failed to compress");
    }
    body.resize(zsize);
    consider(std::move(body), kRawZ, 0);
  }
  if (best_encoding < 0) bad("no encoding applies");

  EncodedSection out;
  out.encoding = best_encoding;
  out.gap_bits = best_b;
  std::vector<uint8_t>& s = out.bytes;
  put_le(s, t.name.size(), 2);
  s.insert(s.end(), t.name.begin(), t.name.end());
  s.push_back(static_cast<uint8_t>(t.dtype));
  s.push_back(static_cast<uint8_t>(best_encoding));
  s.push_back(static_cast<uint8_t>(t.shape.size()));
  s.push_back(0);
  for (uint64_t d : t.shape) put_le(s, d, 8);
  if (best_encoding == kRaw) {
    s.insert(s.end(), t.data, t.data + t.nbytes);
  } else {
    s.insert(s.end(), best_body.begin(), best_body.end());
  }
  return out;
}

namespace {

// A section as encode_section() made it (version 1's layout), split into its header
// fields and its body: version 2 stores the first in the head and only the body after it.
struct SplitSection {
  const uint8_t* name = nullptr;
  uint64_t name_len = 0;
  uint8_t dtype = 0, encoding = 0;
  std::vector<uint64_t> shape;
  const uint8_t* body = nullptr;
  uint64_t body_size = 0;
};

SplitSection split_section(const std::vector<uint8_t>& sec) {
  Reader r(sec.data(), sec.size(), "section to assemble");
  SplitSection out;
  out.name_len = r.u16("name length");
  out.name = r.bytes(out.name_len, "name");
  out.dtype = r.u8("dtype");
  out.encoding = r.u8("encoding");
  const int ndim = r.u8("ndim");
  r.u8("reserved byte");
  if (ndim > kMaxNdim) r.fail("more than 8 dimensions");
  for (int i = 0; i < ndim; ++i) out.shape.push_back(r.u64("shape"));
  out.body = sec.data() + r.pos();
  out.body_size = r.remaining();
  return out;
}

void put_header(std::vector<uint8_t>& out, uint32_t version, uint64_t manifest_or_head_size, uint64_t count) {
  for (uint8_t b : kMagic) out.push_back(b);  // (vector::insert here trips a GCC 12 false warning)
  put_le(out, version, 4);
  put_le(out, 0, 4);  // flags
  put_le(out, manifest_or_head_size, 8);
  put_le(out, count, 4);
  put_le(out, crc32(out.data(), out.size()), 4);
}

std::vector<uint8_t> assemble_v1(const uint8_t* manifest, size_t manifest_size,
                                 const std::vector<const std::vector<uint8_t>*>& sections) {
  uint64_t total = kHeaderBytes + manifest_size + 4 + kDirEntryBytes * sections.size() + 4;
  for (const auto* s : sections) total += s->size();
  std::vector<uint8_t> out;
  out.reserve(total);
  put_header(out, 1, manifest_size, sections.size());
  out.insert(out.end(), manifest, manifest + manifest_size);
  put_le(out, crc32(manifest, manifest_size), 4);
  const size_t dir_at = out.size();
  uint64_t offset = dir_at + kDirEntryBytes * sections.size() + 4;
  for (const auto* s : sections) {
    put_le(out, offset, 8);
    put_le(out, s->size(), 8);
    put_le(out, crc32(s->data(), s->size()), 4);
    put_le(out, 0, 4);
    offset += s->size();
  }
  put_le(out, crc32(out.data() + dir_at, out.size() - dir_at), 4);
  for (const auto* s : sections) out.insert(out.end(), s->begin(), s->end());
  return out;
}

std::vector<uint8_t> assemble_v2(const uint8_t* manifest, size_t manifest_size,
                                 const std::vector<const std::vector<uint8_t>*>& sections) {
  std::vector<SplitSection> split;
  split.reserve(sections.size());
  std::vector<uint8_t> head;  // decompressed: manifest, then one table entry per section
  put_varint(head, manifest_size);
  head.insert(head.end(), manifest, manifest + manifest_size);
  uint64_t bodies = 0;
  for (const auto* sec : sections) {
    split.push_back(split_section(*sec));
    const SplitSection& t = split.back();
    put_varint(head, t.name_len);
    head.insert(head.end(), t.name, t.name + t.name_len);
    head.push_back(t.dtype);
    head.push_back(t.encoding);
    head.push_back(static_cast<uint8_t>(t.shape.size()));
    for (uint64_t d : t.shape) put_varint(head, d);
    put_varint(head, t.body_size);
    put_le(head, crc32(t.body, t.body_size), 4);
    bodies += t.body_size;
  }
  if (head.size() > kMaxHeadBytes) throw std::invalid_argument("ppz: manifest and tensor table exceed 64 MiB");
  uLongf zsize = compressBound(head.size());
  std::vector<uint8_t> z(zsize);
  if (compress2(z.data(), &zsize, head.data(), head.size(), Z_BEST_COMPRESSION) != Z_OK) {
    throw std::runtime_error("ppz: zlib failed to compress the head");
  }
  z.resize(zsize);
  std::vector<uint8_t> out;
  out.reserve(kHeaderBytes + 8 + z.size() + 4 + bodies);
  put_header(out, 2, 8 + z.size(), sections.size());
  const size_t head_at = out.size();
  put_le(out, head.size(), 8);
  out.insert(out.end(), z.begin(), z.end());
  put_le(out, crc32(out.data() + head_at, out.size() - head_at), 4);
  for (const auto& t : split) out.insert(out.end(), t.body, t.body + t.body_size);
  return out;
}

}  // namespace

std::vector<uint8_t> assemble_file(const uint8_t* manifest, size_t manifest_size,
                                   const std::vector<const std::vector<uint8_t>*>& sections, uint32_t version) {
  if (sections.size() > UINT32_MAX) throw std::invalid_argument("ppz: too many tensors");
  if (version == 1) return assemble_v1(manifest, manifest_size, sections);
  if (version == 2) return assemble_v2(manifest, manifest_size, sections);
  throw std::invalid_argument("ppz: cannot write version " + u(version) + " (1 or 2)");
}

// ============================================================================ reading
namespace {

uint64_t read_varint(Reader& r, const char* field) {
  uint64_t v = 0;
  for (int k = 0;; ++k) {
    const uint8_t byte = r.u8(field);
    if (k == 9 && byte > 1) r.fail(std::string(field) + ": varint exceeds 64 bits");
    v |= uint64_t{byte & 0x7fu} << (7 * k);
    if (!(byte & 0x80)) return v;
  }
}

// The name, then dtype, encoding and ndim: shared by version 1's section header and
// version 2's table entry (which differ in how lengths and dimensions are written).
void read_name(Reader& r, Section& s, uint64_t name_len) {
  const uint8_t* name = r.bytes(name_len, "name");
  s.name.assign(reinterpret_cast<const char*>(name), name_len);
  s.what = "section " + u(s.index) + " ('" + printable(s.name) + "')";
}

int read_kind(Reader& r, Section& s) {
  s.dtype = r.u8("dtype");
  s.encoding = r.u8("encoding");
  const int ndim = r.u8("ndim");
  s.itemsize = dtype_itemsize(s.dtype);
  if (!s.itemsize) r.fail("unknown dtype code " + u(s.dtype));
  if (s.encoding >= kNumEncodings) r.fail("unknown encoding " + u(s.encoding));
  if (ndim > kMaxNdim) r.fail(u(ndim) + " dimensions (at most 8)");
  return ndim;
}

void set_geometry(Reader& r, Section& s) {
  if (!geometry(s.shape, s.numel, s.rows, s.cols)) r.fail("shape has more than 2^60 elements");
  s.out_bytes = s.numel * s.itemsize;
}

void parse_body(Reader& r, Section& s);

// Version 1: the section holds its header, then its body.
void parse_section(const uint8_t* p, uint64_t n, Section& s) {
  Reader r(p, n, s.what);
  read_name(r, s, r.u16("name length"));
  r.set_what(s.what);
  const int ndim = read_kind(r, s);
  if (r.u8("reserved byte") != 0) r.fail("nonzero reserved byte");
  s.shape.resize(ndim);
  for (int i = 0; i < ndim; ++i) s.shape[i] = r.u64("shape");
  set_geometry(r, s);
  s.header_bytes = r.pos();
  parse_body(r, s);
}

// Version 2: one entry of the head's table; returns the body's stored CRC32.
uint32_t parse_entry(Reader& t, Section& s) {
  t.set_what("head: table entry " + u(s.index));
  const uint64_t name_len = read_varint(t, "name length");
  if (name_len > 0xffff) t.fail("name of " + u(name_len) + " bytes (at most 65535)");
  read_name(t, s, name_len);
  t.set_what("head: table entry " + u(s.index) + " ('" + printable(s.name) + "')");
  const int ndim = read_kind(t, s);
  s.shape.resize(ndim);
  for (int i = 0; i < ndim; ++i) s.shape[i] = read_varint(t, "shape");
  set_geometry(t, s);
  s.size = read_varint(t, "section size");
  return t.u32("section CRC32");
}

void parse_body(Reader& r, Section& s) {
  if (s.encoding != kRaw && s.encoding != kRawZ && s.dtype != kFloat32) {
    r.fail(std::string("encoding ") + encoding_name(s.encoding) + " with a non-float32 dtype");
  }
  auto read_codebook = [&] {
    s.codebook_size = r.u32("codebook size");
    if (s.codebook_size > kMaxCodebook) r.fail("codebook of " + u(s.codebook_size) + " entries (at most 65535)");
    s.codebook = r.bytes(uint64_t{s.codebook_size} * 4, "codebook");
  };
  switch (s.encoding) {
    case kRaw:
      if (r.remaining() != s.out_bytes) {
        r.fail(u(r.remaining()) + " data bytes for " + u(s.numel) + " elements of " + u(s.itemsize) + " bytes");
      }
      s.raw = r.bytes(s.out_bytes, "data");
      break;
    case kRawZ:
      // A declared size past DEFLATE's 1032:1 is a lie: refused before anything is allocated.
      if (s.out_bytes / kMaxDeflateRatio > r.remaining()) {
        r.fail(u(r.remaining()) + " zlib bytes cannot decompress to " + u(s.out_bytes) + " bytes");
      }
      s.zlib_size = r.remaining();
      s.zlib = r.bytes(s.zlib_size, "zlib stream");
      break;
    case kDenseQ:
      read_codebook();
      s.codes = huff::parse_stream(r, s.codebook_size + 1, s.what + ": code stream");
      if (s.codes.n_symbols != s.numel) {
        r.fail("code stream has " + u(s.codes.n_symbols) + " symbols for " + u(s.numel) + " elements");
      }
      break;
    case kCsrQ:
    case kCsrF32: {
      s.gap_bits = r.u8("gap bits");
      const uint8_t* reserved = r.bytes(3, "reserved bytes");
      if (reserved[0] || reserved[1] || reserved[2]) r.fail("nonzero reserved bytes");
      if (s.gap_bits < 1 || s.gap_bits > kMaxGapBits) r.fail("gap bits " + u(s.gap_bits) + " outside [1, 8]");
      if (s.encoding == kCsrQ) read_codebook();
      s.n_entries = r.u64("entry count");
      s.rowcount_bytes = r.u64("row-count size");
      const uint8_t* rc = r.bytes(s.rowcount_bytes, "row counts");
      // Every row costs at least one byte, so `rows` is bounded by the file before allocating.
      if (s.rows > s.rowcount_bytes) r.fail(u(s.rows) + " rows but " + u(s.rowcount_bytes) + " row-count bytes");
      s.row_counts.resize(s.rows);
      Reader rr(rc, s.rowcount_bytes, s.what + ": row counts");
      uint64_t sum = 0;
      for (uint64_t row = 0; row < s.rows; ++row) {
        uint64_t v = 0;
        for (int k = 0;; ++k) {
          const uint8_t byte = rr.u8("varint");
          if (k == 9 && byte > 1) rr.fail("row " + u(row) + ": varint exceeds 64 bits");
          v |= uint64_t{byte & 0x7fu} << (7 * k);
          if (!(byte & 0x80)) break;
          if (k == 9) rr.fail("row " + u(row) + ": varint longer than 10 bytes");
        }
        // Each entry moves at most 2^b columns and a row ends with fewer than 2^b zeros
        // after its last entry, so a row of c entries spans fewer than (c + 1) * 2^b columns.
        if (v > s.cols) rr.fail("row " + u(row) + " has " + u(v) + " entries for " + u(s.cols) + " columns");
        if (static_cast<unsigned __int128>(s.cols) > (static_cast<unsigned __int128>(v) + 1) << s.gap_bits) {
          rr.fail("row " + u(row) + ": " + u(v) + " entries with " + u(s.gap_bits) + "-bit gaps cannot span " +
                  u(s.cols) + " columns");
        }
        s.row_counts[row] = v;
        sum += v;  // each <= cols <= 2^60, rows <= file size: no overflow
      }
      if (rr.remaining()) rr.fail(u(rr.remaining()) + " bytes after the last row count");
      if (sum != s.n_entries) r.fail("row counts sum to " + u(sum) + ", entry count is " + u(s.n_entries));
      s.gaps = huff::parse_stream(r, 1u << s.gap_bits, s.what + ": gap stream");
      if (s.gaps.n_symbols != s.n_entries) {
        r.fail("gap stream has " + u(s.gaps.n_symbols) + " symbols for " + u(s.n_entries) + " entries");
      }
      if (s.encoding == kCsrQ) {
        s.codes = huff::parse_stream(r, s.codebook_size + 1, s.what + ": index stream");
        if (s.codes.n_symbols != s.n_entries) {
          r.fail("index stream has " + u(s.codes.n_symbols) + " symbols for " + u(s.n_entries) + " entries");
        }
      } else {
        if (s.n_entries > r.remaining() / 4) r.fail(u(s.n_entries) + " values do not fit in the section");
        s.values = r.bytes(s.n_entries * 4, "values");
      }
      break;
    }
  }
  if (r.remaining()) r.fail(u(r.remaining()) + " unexpected bytes at the end of the section");
}

}  // namespace

namespace {

void check_crc(Reader& r, const uint8_t* p, uint64_t n, const char* field) {
  const uint32_t st = r.u32(field), co = crc32(p, n);
  if (st != co) r.fail("CRC32 mismatch (stored " + hex32(st) + ", computed " + hex32(co) + ")");
}

void check_section_crc(const Section& s, const uint8_t* p, uint32_t stored) {
  const uint32_t co = crc32(p, s.size);
  if (co != stored) throw CorruptError(s.what + ": CRC32 mismatch (stored " + hex32(stored) + ", computed " + hex32(co) + ")");
}

void add_section(FileView& v, std::unordered_set<std::string>& names, const Section& s) {
  if (!names.insert(s.name).second) throw CorruptError(s.what + ": duplicate tensor name");
  v.decoded_bytes += s.out_bytes;
}

void parse_v1(FileView& v, const uint8_t* data, size_t size, uint32_t count) {
  Reader r(data, size, "manifest");
  r.bytes(kHeaderBytes, "header");
  v.manifest = r.bytes(v.manifest_size, "manifest");
  check_crc(r, v.manifest, v.manifest_size, "manifest CRC32");
  r.set_what("directory");
  const uint8_t* dir = r.bytes(uint64_t{count} * kDirEntryBytes, "directory");
  check_crc(r, dir, uint64_t{count} * kDirEntryBytes, "directory CRC32");
  v.table_bytes = uint64_t{count} * kDirEntryBytes + 4;
  uint64_t expected = r.pos();
  v.sections.resize(count);  // count * 24 bytes were present in the file
  std::unordered_set<std::string> names;
  for (uint32_t i = 0; i < count; ++i) {
    Section& s = v.sections[i];
    s.index = i;
    s.what = "section " + u(i);
    const uint8_t* e = dir + uint64_t{i} * kDirEntryBytes;
    s.offset = le64(e);
    s.size = le64(e + 8);
    const uint32_t crc = le32(e + 16);
    if (le32(e + 20) != 0) r.fail("entry " + u(i) + " has a nonzero reserved field");
    if (s.offset != expected) {
      r.fail("section " + u(i) + " starts at " + u(s.offset) + ", expected " + u(expected) +
             " (sections are contiguous)");
    }
    if (s.size > size - s.offset) {
      r.fail("section " + u(i) + " (" + u(s.size) + " bytes at " + u(s.offset) + ") extends past the end of the " +
             u(size) + "-byte file");
    }
    expected += s.size;
    const uint8_t* p = data + s.offset;
    if (crc32(p, s.size) != crc) {
      Section named = s;  // the name as stored, for orientation
      if (s.size >= 2) {
        const uint64_t name_len = uint64_t{p[0]} | (uint64_t{p[1]} << 8);
        if (name_len <= s.size - 2) {
          named.what += " ('" + printable(std::string(reinterpret_cast<const char*>(p + 2), name_len)) + "'?)";
        }
      }
      check_section_crc(named, p, crc);
    }
    parse_section(p, s.size, s);
    add_section(v, names, s);
  }
  if (expected != size) r.fail(u(size - expected) + " bytes after the last section");
}

// Inflates the head into v.head, allocating no more than its declared size, which must
// be within what `stored` compressed bytes can hold.
void inflate_head(FileView& v, Reader& r, const uint8_t* stored, uint64_t n) {
  const uint64_t declared = le64(stored);
  const uint64_t z_bytes = n - 8;
  if (declared == 0) r.fail("declares a decompressed size of 0 bytes");
  if (declared > kMaxHeadBytes) r.fail("declares " + u(declared) + " decompressed bytes, more than the 64 MiB limit");
  if (declared > z_bytes * kMaxDeflateRatio) {
    r.fail("declares " + u(declared) + " decompressed bytes, more than " + u(z_bytes) +
           " compressed bytes can hold (DEFLATE expands at most 1032:1)");
  }
  v.head.resize(declared);
  const std::string error = inflate_exact(stored + 8, z_bytes, v.head.data(), declared);
  if (!error.empty()) r.fail(error);
}

void parse_v2(FileView& v, const uint8_t* data, size_t size, uint32_t count) {
  Reader r(data, size, "head");
  r.bytes(kHeaderBytes, "header");
  const uint64_t n = v.manifest_size;  // the header's size field is the head's, in version 2
  if (n < 8 + 2) r.fail(u(n) + " bytes, too few for its size field and a zlib stream");
  if (n > kMaxHeadBytes) r.fail(u(n) + " bytes, more than the 64 MiB limit");
  const uint8_t* stored = r.bytes(n, "head");
  check_crc(r, stored, n, "head CRC32");
  v.head_stored = n + 4;
  inflate_head(v, r, stored, n);

  Reader t(v.head.data(), v.head.size(), "head");
  v.manifest_size = read_varint(t, "manifest size");
  v.manifest = t.bytes(v.manifest_size, "manifest");
  // An entry takes at least 9 bytes (name length, dtype, encoding, ndim, size, CRC32),
  // so the count is bounded by the head before anything is allocated for it.
  if (count > t.remaining() / 9) t.fail(u(count) + " table entries cannot fit in " + u(t.remaining()) + " bytes");
  v.table_bytes = t.remaining();
  uint64_t offset = r.pos();
  v.sections.resize(count);
  std::unordered_set<std::string> names;
  for (uint32_t i = 0; i < count; ++i) {
    Section& s = v.sections[i];
    s.index = i;
    s.what = "section " + u(i);
    const uint32_t crc = parse_entry(t, s);
    s.offset = offset;
    if (s.size > size - offset) {
      t.fail("section of " + u(s.size) + " bytes at " + u(offset) + " extends past the end of the " + u(size) +
             "-byte file");
    }
    offset += s.size;
    check_section_crc(s, data + s.offset, crc);
    Reader body(data + s.offset, s.size, s.what);
    parse_body(body, s);
    add_section(v, names, s);
  }
  if (t.remaining()) t.fail(u(t.remaining()) + " bytes after the last table entry");
  if (offset != size) r.fail(u(size - offset) + " bytes after the last section");
}

}  // namespace

FileView parse_file(const uint8_t* data, size_t size) {
  FileView v;
  v.file_bytes = size;
  Reader h(data, size, "header");
  if (size < sizeof kMagic || std::memcmp(data, kMagic, sizeof kMagic) != 0) {
    h.fail("not a .ppz file (bad magic number)");
  }
  if (size < kHeaderBytes) h.fail("file is " + u(size) + " bytes, shorter than the 32-byte header");
  const uint32_t stored = le32(data + 28), computed = crc32(data, 28);
  if (stored != computed) h.fail("CRC32 mismatch (stored " + hex32(stored) + ", computed " + hex32(computed) + ")");
  h.bytes(8, "magic");
  v.version = h.u32("version");
  if (v.version < kMinVersion || v.version > kVersion) {
    h.fail("unsupported version " + u(v.version) + " (this reader reads versions 1 and 2)");
  }
  const uint32_t flags = h.u32("flags");
  if (flags != 0) h.fail("unknown flags " + hex32(flags));
  v.manifest_size = h.u64(v.version == 1 ? "manifest size" : "head size");
  const uint32_t count = h.u32("tensor count");
  if (v.version == 1) {
    parse_v1(v, data, size, count);
  } else {
    parse_v2(v, data, size, count);
  }
  return v;
}

namespace {

struct Histograms {
  std::vector<uint64_t> gaps, codes;
};

void histogram(const std::vector<uint16_t>& sym, uint32_t alphabet, std::vector<uint64_t>& h) {
  h.assign(alphabet, 0);
  for (uint16_t x : sym) ++h[x];  // symbols < alphabet: the code lengths cover no more
}

void decode_impl(const Section& s, uint8_t* out, int threads, Histograms* hist) {
  const int nt = std::max(1, threads);
  const bool par = nt > 1 && s.numel >= kParallelGrain;
  switch (s.encoding) {
    case kRaw: {
      if (s.out_bytes) std::memcpy(out, s.raw, s.out_bytes);
      if (s.dtype == kBool) {
        for (uint64_t i = 0; i < s.out_bytes; ++i) {
          if (out[i] > 1) throw CorruptError(s.what + ": bool element " + u(i) + " is neither 0 nor 1");
        }
      }
      return;
    }
    case kRawZ: {
      std::vector<uint8_t> planes(s.out_bytes);
      const std::string error = inflate_exact(s.zlib, s.zlib_size, planes.data(), s.out_bytes);
      if (!error.empty()) throw CorruptError(s.what + ": zlib stream " + error);
      const uint64_t n = s.numel, k = s.itemsize;
      for (uint64_t i = 0; i < n; ++i) {
        for (uint64_t b = 0; b < k; ++b) out[i * k + b] = planes[b * n + i];
      }
      if (s.dtype == kBool) {
        for (uint64_t i = 0; i < s.out_bytes; ++i) {
          if (out[i] > 1) throw CorruptError(s.what + ": bool element " + u(i) + " is neither 0 nor 1");
        }
      }
      return;
    }
    case kDenseQ: {
      std::vector<uint16_t> sym(s.numel);
      huff::decode_stream(s.codes, sym.data(), nt);
      std::vector<uint32_t> value(s.codebook_size + 1, 0);
      for (uint32_t k = 0; k < s.codebook_size; ++k) value[k + 1] = le32(s.codebook + 4 * k);
      const int64_t n = static_cast<int64_t>(s.numel);
#pragma omp parallel for schedule(static) num_threads(nt) if (par)
      for (int64_t i = 0; i < n; ++i) std::memcpy(out + 4 * i, &value[sym[i]], 4);
      if (hist) histogram(sym, s.codebook_size + 1, hist->codes);
      return;
    }
    case kCsrQ:
    case kCsrF32: {
      std::vector<uint16_t> gaps(s.n_entries), idx;
      huff::decode_stream(s.gaps, gaps.data(), nt);
      std::vector<uint32_t> value;
      if (s.encoding == kCsrQ) {
        idx.resize(s.n_entries);
        huff::decode_stream(s.codes, idx.data(), nt);
        value.assign(s.codebook_size + 1, 0);
        for (uint32_t k = 0; k < s.codebook_size; ++k) value[k + 1] = le32(s.codebook + 4 * k);
      }
      std::vector<uint64_t> start(s.rows + 1, 0);
      for (uint64_t row = 0; row < s.rows; ++row) start[row + 1] = start[row] + s.row_counts[row];
      const int64_t rows = static_cast<int64_t>(s.rows);
      const int64_t cols = static_cast<int64_t>(s.cols);
      const int64_t max_trailing = (int64_t{1} << s.gap_bits) - 1;
      int64_t bad_row = -1;
      bool overflow = false;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt) if (par)
      for (int64_t row = 0; row < rows; ++row) {
        uint8_t* dst = out + 4 * static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
        std::memset(dst, 0, 4 * static_cast<uint64_t>(cols));
        int64_t col = -1;
        bool ok = true;
        for (uint64_t e = start[row]; e < start[row + 1]; ++e) {
          col += int64_t{gaps[e]} + 1;
          if (col >= cols) {
            ok = false;
            break;
          }
          if (s.encoding == kCsrQ) {
            std::memcpy(dst + 4 * col, &value[idx[e]], 4);
          } else {
            std::memcpy(dst + 4 * col, s.values + 4 * e, 4);
          }
        }
        if (ok && cols - 1 - col > max_trailing) ok = false;
        if (!ok) {
#pragma omp critical(pyprune_ppz_error)
          if (bad_row < 0 || row < bad_row) {
            bad_row = row;
            overflow = col >= cols;
          }
        }
      }
      if (bad_row >= 0) {
        throw CorruptError(s.what + ": row " + u(static_cast<uint64_t>(bad_row)) +
                           (overflow ? "'s entries run past its " + u(s.cols) + " columns"
                                     : " ends with more than 2^b - 1 zeros after its last entry"));
      }
      if (hist) {
        histogram(gaps, 1u << s.gap_bits, hist->gaps);
        if (s.encoding == kCsrQ) histogram(idx, s.codebook_size + 1, hist->codes);
      }
      return;
    }
    default:
      throw CorruptError(s.what + ": unknown encoding");
  }
}

StreamStats stream_stats(const Section& s, const huff::StreamView& v, const std::vector<uint64_t>& hist) {
  StreamStats st;
  st.present = true;
  st.record_offset = s.offset + v.record_pos;  // the section's reader starts at the section
  st.symbols = v.n_symbols;
  st.alphabet = v.alphabet;
  for (uint64_t c : hist) st.used_symbols += c != 0;
  for (uint8_t l : v.lengths) st.max_code_length = std::max<uint64_t>(st.max_code_length, l);
  st.chunks = v.chunk_offsets.empty() ? 0 : v.chunk_offsets.size() - 1;
  st.table_bytes = v.table_bytes;
  st.chunk_table_bytes = v.chunk_table_bytes;
  st.payload_bytes = v.payload_bytes;
  st.payload_bits = v.payload_bits;
  st.record_bytes = v.record_bytes;
  st.entropy_bits = huff::entropy_bits(hist.data(), hist.size());
  return st;
}

}  // namespace

void decode_section(const Section& s, uint8_t* out, int threads) { decode_impl(s, out, threads, nullptr); }

SectionStats inspect_section(const Section& s, int threads) {
  std::vector<uint8_t> buf(s.out_bytes);
  Histograms h;
  decode_impl(s, buf.data(), threads, &h);
  SectionStats st;
  for (uint64_t i = 0; i < s.numel; ++i) {
    const uint8_t* e = buf.data() + i * s.itemsize;
    bool nz = false;
    for (uint64_t k = 0; k < s.itemsize; ++k) nz |= e[k] != 0;
    st.nnz += nz;
  }
  st.codebook_bytes = s.codebook ? 4 + 4 * uint64_t{s.codebook_size} : 0;
  if (s.encoding == kRaw) st.raw_bytes = s.out_bytes;
  if (s.encoding == kRawZ) st.deflate_bytes = s.zlib_size;
  if (s.encoding == kDenseQ) st.codes = stream_stats(s, s.codes, h.codes);
  if (s.encoding == kCsrQ || s.encoding == kCsrF32) {
    st.entries = s.n_entries;
    st.rowcount_bytes = s.rowcount_bytes;
    st.gaps = stream_stats(s, s.gaps, h.gaps);
    if (s.encoding == kCsrQ) {
      st.codes = stream_stats(s, s.codes, h.codes);
      st.fillers = h.codes.empty() ? 0 : h.codes[0];
    } else {
      st.values_bytes = 4 * s.n_entries;
      for (uint64_t e = 0; e < s.n_entries; ++e) st.fillers += le32(s.values + 4 * e) == 0;
    }
  }
  return st;
}

}  // namespace ppz
}  // namespace pyprune
