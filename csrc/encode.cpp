// Host side of SPEC §3: COCO run lengths of dense masks and of the GPU backends' bit masks, the compressed
// RLE string, box crops of bit masks, and the PNG of a mask crop.
//
// PNG: 8-bit grayscale (0 / 255), no interlace, every row with filter type 2 ("Up": the byte minus the
// byte above, so a row equal to the previous one is all zeros and compresses to almost nothing). With
// zlib (the build defines MF_WITH_ZLIB when zlib.h and libz are found) the image data is deflated at
// level 6 with the Z_RLE strategy (fast and small on filtered masks); without it, it is written as
// stored (uncompressed) deflate blocks with our own CRC-32 and Adler-32: a larger file but a valid PNG
// that every decoder reads. The bytes differ from Pillow's (other filters and settings); the decoded
// pixels are equal.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "ops.h"
#include "postprocess.h"
#include "runs.h"

#ifdef MF_WITH_ZLIB
#include <zlib.h>
#endif

namespace mf {

// ------------------------------------------------------------------------------------------------
// COCO compressed RLE (pycocotools' rleToString): each count, minus the count two before it from the
// fourth on, as little-endian 5-bit groups + 48, with 0x20 set on every group but the last; a value ends
// when the remaining bits are pure sign extension of the group's top bit (0x10).
// ------------------------------------------------------------------------------------------------
std::string rle_string(const at::Tensor& counts) {
  TORCH_CHECK(counts.device().is_cpu() && counts.dim() == 1, "rle_string: counts must be a 1-D CPU tensor, got ",
              counts.sizes(), " on ", counts.device());
  const at::Tensor c = counts.to(at::kLong).contiguous();
  const int64_t* v = c.data_ptr<int64_t>();
  const int64_t n = c.size(0);
  std::string out;
  out.reserve(n * 2);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(v[i] >= 0, "rle_string: run lengths must be non-negative, got ", v[i], " at ", i);
    int64_t x = v[i];
    if (i > 2) x -= v[i - 2];
    bool more = true;
    while (more) {
      int64_t group = x & 0x1f;
      x >>= 5;  // arithmetic shift: keeps the sign
      more = (group & 0x10) ? x != -1 : x != 0;
      if (more) group |= 0x20;
      out.push_back((char)(group + 48));
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// COCO run lengths of a dense mask (column-major runs), without transposing it.
// A row-major mask is scanned row by row (contiguous): rows equal to the previous one are skipped with
// one memcmp, and each column keeps the rows where its value flips. The column-major runs then follow
// from those flips. A column-major mask (a transposed view, numpy's Fortran order) is scanned directly.
// ------------------------------------------------------------------------------------------------
std::vector<int64_t> rle_counts_dense(const at::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 2, "rle_encode: mask must be a 2-D CPU tensor, got ",
              mask.sizes(), " on ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "rle_encode: mask must be bool or uint8, got ", mask.scalar_type());
  const int64_t H = mask.size(0), W = mask.size(1), n = H * W;
  if (n == 0) return {0};
  RunCounter runs;
  if (mask.stride(0) == 1 && mask.stride(1) == H) {  // column-major in memory: one contiguous scan
    const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr());
    int64_t i = 0;
    while (i < n) {
      // Skip 8 pixels at a time while they all hold the current value (0 bytes, or 1 bytes of a bool mask).
      const uint64_t same = runs.value ? 0x0101010101010101ull : 0ull;
      uint64_t word;
      while (i + 8 <= n && (std::memcpy(&word, m + i, 8), word == same)) i += 8;
      const int64_t stop = std::min(n, i + 8);
      for (; i < stop; ++i)
        if ((m[i] != 0) != runs.value) {
          runs.flip(i);
          ++i;
          break;
        }
    }
    runs.finish(n);
    return std::move(runs.counts);
  }
  const at::Tensor c = mask.contiguous();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(c.data_ptr());
  std::vector<std::vector<int32_t>> flips(W);  // rows y >= 1 where column x differs from row y - 1
  for (int64_t y = 1; y < H; ++y) {
    const uint8_t* row = m + y * W;
    const uint8_t* prev = row - W;
    if (std::memcmp(row, prev, W) == 0) continue;
    int64_t x = 0;
    for (; x + 8 <= W; x += 8) {
      uint64_t a, b;
      std::memcpy(&a, row + x, 8);
      std::memcpy(&b, prev + x, 8);
      if (a == b) continue;
      for (int64_t i = x; i < x + 8; ++i)
        if ((row[i] != 0) != (prev[i] != 0)) flips[i].push_back((int32_t)y);
    }
    for (; x < W; ++x)
      if ((row[x] != 0) != (prev[x] != 0)) flips[x].push_back((int32_t)y);
  }
  for (int64_t x = 0; x < W; ++x) {
    runs.at(m[x] != 0, x * H);  // the column starts with another value than the last one
    for (int32_t y : flips[x]) runs.flip(x * H + y);
  }
  runs.finish(n);
  return std::move(runs.counts);
}

std::string rle_encode(const at::Tensor& mask) {
  const std::vector<int64_t> counts = rle_counts_dense(mask);
  return rle_string(at::from_blob(const_cast<int64_t*>(counts.data()), {(int64_t)counts.size()}, at::kLong));
}

// ------------------------------------------------------------------------------------------------
// Bit masks of the GPU backends (layout in postprocess.h) -> RLE counts / crops, reading only the bbox.
// ------------------------------------------------------------------------------------------------
namespace {

void check_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kByte && bits.dim() == 3 && bits.is_contiguous(),
              "bit masks must be a contiguous CPU uint8 tensor [K, H, row_bytes], got ", bits.sizes(), " ",
              bits.scalar_type());
  TORCH_CHECK(W >= 1 && bits.size(2) == 4 * mf_bit_words((int32_t)W), "bit masks of width ", W, " need ",
              4 * mf_bit_words((int32_t)W), " bytes per row, got ", bits.size(2));
  TORCH_CHECK(boxes.device().is_cpu() && boxes.scalar_type() == at::kInt && boxes.dim() == 2 &&
                  boxes.size(0) == bits.size(0) && boxes.size(1) == 4,
              "boxes must be a CPU int32 tensor [K, 4], got ", boxes.sizes(), " ", boxes.scalar_type());
}

inline bool bit_at(const uint8_t* mask, int64_t row_bytes, int64_t y, int64_t x) {
  return (mask[y * row_bytes + (x >> 3)] >> (x & 7)) & 1;
}

// Column-major run lengths of one H x W bit mask whose foreground lies in the inclusive box [x1, y1, x2, y2]
// (x2 < 0: empty).
std::vector<int64_t> box_runs(const uint8_t* mask, int64_t row_bytes, int64_t H, int64_t W, const int32_t* box) {
  const int64_t x1 = box[0], y1 = box[1], x2 = box[2], y2 = box[3];
  RunCounter runs;
  if (x2 >= 0) {  // pixels outside the box are 0
    for (int64_t x = x1; x <= x2; ++x) {
      for (int64_t y = y1; y <= y2; ++y) runs.at(bit_at(mask, row_bytes, y, x), x * H + y);
      const int64_t next = x * H + y2 + 1;  // the pixel after this column's part of the box is 0 ...
      const bool next_in_box = y2 == H - 1 && y1 == 0 && x < x2;  // ... unless the next column takes over
      if (!next_in_box && next < H * W) runs.at(false, next);
    }
  }
  runs.finish(H * W);
  return std::move(runs.counts);
}

}  // namespace

std::vector<at::Tensor> rle_counts_from_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W) {
  check_bits(bits, boxes, W);
  const int64_t K = bits.size(0), H = bits.size(1), row_bytes = bits.size(2);
  const at::Tensor boxes_c = boxes.contiguous();
  const int32_t* B = boxes_c.data_ptr<int32_t>();
  const uint8_t* masks = bits.data_ptr<uint8_t>();
  std::vector<std::vector<int64_t>> all(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) all[k] = box_runs(masks + k * H * row_bytes, row_bytes, H, W, B + 4 * k);
  });
  std::vector<at::Tensor> out;
  for (auto& c : all) {
    at::Tensor t = at::empty({(int64_t)c.size()}, at::kLong);
    std::memcpy(t.data_ptr<int64_t>(), c.data(), c.size() * sizeof(int64_t));
    out.push_back(t);
  }
  return out;
}

std::vector<at::Tensor> crops_from_bits(const at::Tensor& bits, const at::Tensor& boxes, int64_t W) {
  check_bits(bits, boxes, W);
  const int64_t K = bits.size(0), H = bits.size(1), row_bytes = bits.size(2);
  const at::Tensor boxes_c = boxes.contiguous();
  const int32_t* B = boxes_c.data_ptr<int32_t>();
  std::vector<at::Tensor> out;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t x1 = B[4 * k], y1 = B[4 * k + 1], x2 = B[4 * k + 2], y2 = B[4 * k + 3];
    if (x2 < 0) {
      out.push_back(at::empty({0, 0}, at::kBool));
      continue;
    }
    at::Tensor crop = at::empty({y2 - y1 + 1, x2 - x1 + 1}, at::kBool);
    bool* c = crop.data_ptr<bool>();
    const uint8_t* mask = bits.data_ptr<uint8_t>() + k * H * row_bytes;
    for (int64_t y = y1; y <= y2; ++y)
      for (int64_t x = x1; x <= x2; ++x) *c++ = bit_at(mask, row_bytes, y, x);
    out.push_back(crop);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// PNG
// ------------------------------------------------------------------------------------------------
namespace {

void put_u32(std::string& s, uint32_t v) {
  const char b[4] = {(char)(v >> 24), (char)(v >> 16), (char)(v >> 8), (char)v};
  s.append(b, 4);
}

#ifdef MF_WITH_ZLIB
uint32_t crc32_of(const unsigned char* data, size_t n, uint32_t crc) { return (uint32_t)crc32(crc, data, (uInt)n); }
#else
const uint32_t* crc_table() {
  static uint32_t table[256];
  static bool ready = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)ready;
  return table;
}

uint32_t crc32_of(const unsigned char* data, size_t n, uint32_t crc) {
  const uint32_t* table = crc_table();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t adler32_of(const unsigned char* data, size_t n) {
  uint32_t a = 1, b = 0;
  for (size_t i = 0; i < n; ++i) {
    a = (a + data[i]) % 65521u;
    b = (b + a) % 65521u;
  }
  return (b << 16) | a;
}
#endif

void put_chunk(std::string& png, const char* type, const std::string& data) {
  put_u32(png, (uint32_t)data.size());
  const size_t start = png.size();
  png.append(type, 4);
  png.append(data);
  const uint32_t crc = crc32_of(reinterpret_cast<const unsigned char*>(png.data() + start), 4 + data.size(), 0);
  put_u32(png, crc);
}

// zlib stream of `raw` (the filtered scanlines).
std::string zlib_stream(const std::vector<unsigned char>& raw) {
#ifdef MF_WITH_ZLIB
  // Z_RLE: after the "Up" filter the data is long runs of zeros; run-length matching is 5x faster than the
  // default strategy here and compresses these masks better.
  z_stream z{};
  int rc = deflateInit2(&z, 6, Z_DEFLATED, 15, 8, Z_RLE);
  TORCH_CHECK(rc == Z_OK, "png_encode: zlib deflateInit2 failed with code ", rc);
  std::string out(deflateBound(&z, (uLong)raw.size()), '\0');
  z.next_in = const_cast<Bytef*>(raw.data());
  z.avail_in = (uInt)raw.size();
  z.next_out = reinterpret_cast<Bytef*>(&out[0]);
  z.avail_out = (uInt)out.size();
  rc = deflate(&z, Z_FINISH);
  const uLong written = z.total_out;
  deflateEnd(&z);
  TORCH_CHECK(rc == Z_STREAM_END, "png_encode: zlib deflate failed with code ", rc);
  out.resize(written);
  return out;
#else
  std::string out = {'\x78', '\x01'};  // deflate, 32K window, no dictionary, "fastest" (header check ok)
  size_t pos = 0;
  do {
    const size_t len = std::min<size_t>(65535, raw.size() - pos);
    const bool last = pos + len == raw.size();
    out.push_back(last ? '\x01' : '\x00');  // BFINAL, BTYPE = 00 (stored)
    out.push_back((char)(len & 0xff));
    out.push_back((char)(len >> 8));
    out.push_back((char)(~len & 0xff));
    out.push_back((char)((~len >> 8) & 0xff));
    out.append(reinterpret_cast<const char*>(raw.data()) + pos, len);
    pos += len;
  } while (pos < raw.size());
  put_u32(out, adler32_of(raw.data(), raw.size()));
  return out;
#endif
}

}  // namespace

bool png_uses_zlib() {
#ifdef MF_WITH_ZLIB
  return true;
#else
  return false;
#endif
}

std::string png_encode(const at::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 2, "png_encode: mask must be a 2-D CPU tensor, got ",
              mask.sizes(), " on ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "png_encode: mask must be bool or uint8, got ", mask.scalar_type());
  const int64_t h = mask.size(0), w = mask.size(1);
  TORCH_CHECK(h >= 1 && w >= 1 && h < (1LL << 31) && w < (1LL << 31), "png_encode: cannot write a ", h, "x", w,
              " mask as PNG");
  const at::Tensor m = mask.contiguous();
  const uint8_t* src = reinterpret_cast<const uint8_t*>(m.data_ptr());
  std::vector<unsigned char> raw((w + 1) * h);
  for (int64_t y = 0; y < h; ++y) {
    unsigned char* row = raw.data() + y * (w + 1);
    const uint8_t* cur = src + y * w;
    row[0] = 2;  // filter "Up"
    if (y == 0) {
      for (int64_t x = 0; x < w; ++x) row[1 + x] = cur[x] ? 255 : 0;
    } else {
      const uint8_t* prev = cur - w;
      for (int64_t x = 0; x < w; ++x) row[1 + x] = (unsigned char)((cur[x] ? 255 : 0) - (prev[x] ? 255 : 0));
    }
  }
  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string ihdr;
  put_u32(ihdr, (uint32_t)w);
  put_u32(ihdr, (uint32_t)h);
  ihdr += std::string("\x08\x00\x00\x00\x00", 5);  // 8-bit, grayscale, deflate, adaptive filters, no interlace
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", zlib_stream(raw));
  put_chunk(png, "IEND", std::string());
  return png;
}

}  // namespace mf
