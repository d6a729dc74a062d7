// Few-token products with a packed sparse matrix, read straight from its packed form.
//
// W is (rows, cols) = (d_in, d_out), stored as smartprune's compact format keeps it: a bitmask in
// np.packbits order (the first column of each byte is its highest bit) and the surviving values,
// row-major, in float32, bfloat16, float16 or int8. y = a @ W for a few rows of a (decoding: one
// token per sequence). Decoding is memory-bound, so reading 1 bit + the surviving values' bytes
// instead of 4 bytes per entry is what makes it faster; each 8-entry mask byte is expanded into an
// AVX2 register with one permutation and one AND (256-entry tables of lane sources and lane masks, indexed
// by the byte as stored), the AVX2 counterpart of AVX-512's vexpandps. Threads split the columns (torch's
// own thread pool), so each keeps its slice of y in L1 and no partial sums are merged; one token's
// product adds four rows of W at a time, so y is loaded and stored once per four rows and the four
// positions in the stored values advance independently.
//
// On a CPU with AVX-512 (F) the one-token loops take 16 columns at a time instead: two mask bytes,
// bit-reversed by a 256-byte table into an AVX-512 lane mask, and `vexpandps` spreads 16 stored values
// (widened to float32 first) to their lanes in one instruction. Chosen once at run
// time (`kernel_isa`), so one library serves both kinds of CPU; everything else stays AVX2.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <atomic>
#include <cstring>
#include <type_traits>

namespace {

struct alignas(32) Tables {
  // Indexed by the mask byte as stored (np.packbits order: column 0 is bit 7), so no bit reversal is
  // needed in the loop: lane j of byte b takes stored value number source[b][j] where keep[b][j] is all
  // ones, and is zero where it is 0.
  alignas(32) int32_t source[256][8];
  alignas(32) int32_t keep[256][8];
  Tables() {
    for (int b = 0; b < 256; b++) {
      int k = 0;
      for (int j = 0; j < 8; j++) {
        const bool on = (b >> (7 - j)) & 1;
        source[b][j] = on ? k++ : 0;
        keep[b][j] = on ? -1 : 0;
      }
    }
  }
};
const Tables kTables;

enum Kind { kFloat = 0, kBFloat16 = 1, kHalf = 2, kInt8 = 3 };

template <Kind kind>
inline __m256 load8(const void* v, int64_t p) {
  switch (kind) {
    case kFloat: return _mm256_loadu_ps(static_cast<const float*>(v) + p);
    case kBFloat16: {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v) + p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    case kHalf:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v) + p)));
    default: {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(v) + p));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
  }
}

template <Kind kind>
inline float load1(const void* v, int64_t p) {
  switch (kind) {
    case kFloat: return static_cast<const float*>(v)[p];
    case kBFloat16: {
      uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(v)[p]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case kHalf: return _cvtsh_ss(static_cast<const uint16_t*>(v)[p]);
    default: return static_cast<float>(static_cast<const int8_t*>(v)[p]);
  }
}

// The 8 entries of W a stored mask byte `b` describes, as a register: stored values p.. spread to
// their lanes, zeros elsewhere.
template <Kind kind>
inline __m256 expand(const void* values, int64_t p, int b) {
  const __m256i source = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.source[b]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.keep[b])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load8<kind>(values, p), source), keep);
}

// Where row i's slice [byte0, byte1) of mask bytes starts in the stored values.
inline int64_t slice_start(const uint8_t* row, int64_t p, int64_t byte0) {
  int64_t c0 = 0;  // values before this slice: their mask bits counted 64 at a time
  for (; c0 + 8 <= byte0; c0 += 8) {
    uint64_t word;
    std::memcpy(&word, row + c0, 8);
    p += __builtin_popcountll(word);
  }
  for (; c0 < byte0; c0++) p += __builtin_popcount(row[c0]);
  return p;
}

constexpr int kBlock = 4;  // rows of W added into y together when decoding (y loaded and stored once)

// Columns [byte0 * 8, byte1 * 8) of y (t, cols) = a (t, rows) @ W (the value type a template argument, so
// the inner loop has no branch on it).
template <Kind kind>
void rows_from(int64_t i, const float* a, int64_t t, int64_t rows, const uint8_t* bits, const void* values,
               const int64_t* row_ptr, int64_t cols, int64_t total, int64_t byte0, int64_t byte1, float* y);

template <Kind kind>
void columns(const float* a, int64_t t, int64_t rows, const uint8_t* bits, const void* values,
             const int64_t* row_ptr, int64_t cols, int64_t total, int64_t byte0, int64_t byte1, float* y) {
  const int64_t bytes = cols / 8, span = byte1 - byte0;
  int64_t i = 0;
  if (t == 1) {
    // Decoding one sequence, the tight loop: kBlock rows at a time, each with its own position in the
    // stored values (independent chains), y's slice read and written once per block of rows. A block
    // whose values could run past the end (the matrix's last rows) takes the general loop below.
    float* __restrict out = y + byte0 * 8;
    for (; i + kBlock <= rows; i += kBlock) {
      const uint8_t* m0 = bits + i * bytes;
      const uint8_t* m1 = m0 + bytes;
      const uint8_t* m2 = m1 + bytes;
      const uint8_t* m3 = m2 + bytes;
      int64_t p0 = slice_start(m0, row_ptr[i], byte0), p1 = slice_start(m1, row_ptr[i + 1], byte0);
      int64_t p2 = slice_start(m2, row_ptr[i + 2], byte0), p3 = slice_start(m3, row_ptr[i + 3], byte0);
      if (p3 + 8 * span > total) break;
      const __m256 c0 = _mm256_set1_ps(a[i]), c1 = _mm256_set1_ps(a[i + 1]);
      const __m256 c2 = _mm256_set1_ps(a[i + 2]), c3 = _mm256_set1_ps(a[i + 3]);
      m0 += byte0, m1 += byte0, m2 += byte0, m3 += byte0;
      for (int64_t c = 0; c < span; c++) {
        const int b0 = m0[c], b1 = m1[c], b2 = m2[c], b3 = m3[c];
        __m256 acc = _mm256_loadu_ps(out + c * 8);
        acc = _mm256_fmadd_ps(c0, expand<kind>(values, p0, b0), acc);
        acc = _mm256_fmadd_ps(c1, expand<kind>(values, p1, b1), acc);
        acc = _mm256_fmadd_ps(c2, expand<kind>(values, p2, b2), acc);
        acc = _mm256_fmadd_ps(c3, expand<kind>(values, p3, b3), acc);
        _mm256_storeu_ps(out + c * 8, acc);
        p0 += __builtin_popcount(b0), p1 += __builtin_popcount(b1);
        p2 += __builtin_popcount(b2), p3 += __builtin_popcount(b3);
      }
    }
  }
  rows_from<kind>(i, a, t, rows, bits, values, row_ptr, cols, total, byte0, byte1, y);
}

// Rows [i, rows) one at a time, any t <= 8 (the matrix's last rows, or a few tokens at once).
template <Kind kind>
void rows_from(int64_t i, const float* a, int64_t t, int64_t rows, const uint8_t* bits, const void* values,
               const int64_t* row_ptr, int64_t cols, int64_t total, int64_t byte0, int64_t byte1, float* y) {
  const int64_t bytes = cols / 8;
  __m256 coef[8];
  for (; i < rows; i++) {
    const uint8_t* row = bits + i * bytes;
    int64_t p = slice_start(row, row_ptr[i], byte0);
    for (int64_t s = 0; s < t; s++) coef[s] = _mm256_set1_ps(a[s * rows + i]);
    for (int64_t c = byte0; c < byte1; c++) {
      const int b = row[c];
      if (!b) continue;
      __m256 e;
      if (p + 8 <= total) {
        e = expand<kind>(values, p, b);
      } else {  // the matrix's last values: never read past them
        alignas(32) float tmp[8] = {0};
        int64_t q = p;
        for (int j = 0; j < 8; j++)
          if ((b >> (7 - j)) & 1) tmp[j] = load1<kind>(values, q++);
        e = _mm256_load_ps(tmp);
      }
      for (int64_t s = 0; s < t; s++) {
        float* out = y + s * cols + c * 8;
        _mm256_storeu_ps(out, _mm256_fmadd_ps(coef[s], e, _mm256_loadu_ps(out)));
      }
      p += __builtin_popcount(b);
    }
  }
}

// Columns [c8_0 * 8, c8_1 * 8) of y (t, cols) = a (t, rows) @ W for a W with every entry stored (no mask:
// a dense matrix in narrower values, e.g. the dense model in int8): the same loops without the expansion.
template <Kind kind>
void dense_rows_from(int64_t i, const float* a, int64_t t, int64_t rows, const void* values, int64_t cols,
                     int64_t c8_0, int64_t c8_1, float* y);

template <Kind kind>
void dense_columns(const float* a, int64_t t, int64_t rows, const void* values, int64_t cols, int64_t c8_0,
                   int64_t c8_1, float* y) {
  int64_t i = 0;
  if (t == 1) {
    for (; i + kBlock <= rows; i += kBlock) {
      const __m256 c0 = _mm256_set1_ps(a[i]), c1 = _mm256_set1_ps(a[i + 1]);
      const __m256 c2 = _mm256_set1_ps(a[i + 2]), c3 = _mm256_set1_ps(a[i + 3]);
      const int64_t r0 = i * cols, r1 = r0 + cols, r2 = r1 + cols, r3 = r2 + cols;
      for (int64_t c = c8_0 * 8; c < c8_1 * 8; c += 8) {
        __m256 acc = _mm256_loadu_ps(y + c);
        acc = _mm256_fmadd_ps(c0, load8<kind>(values, r0 + c), acc);
        acc = _mm256_fmadd_ps(c1, load8<kind>(values, r1 + c), acc);
        acc = _mm256_fmadd_ps(c2, load8<kind>(values, r2 + c), acc);
        acc = _mm256_fmadd_ps(c3, load8<kind>(values, r3 + c), acc);
        _mm256_storeu_ps(y + c, acc);
      }
    }
  }
  dense_rows_from<kind>(i, a, t, rows, values, cols, c8_0, c8_1, y);
}

template <Kind kind>
void dense_rows_from(int64_t i, const float* a, int64_t t, int64_t rows, const void* values, int64_t cols,
                     int64_t c8_0, int64_t c8_1, float* y) {
  __m256 coef[8];
  for (; i < rows; i++) {
    for (int64_t s = 0; s < t; s++) coef[s] = _mm256_set1_ps(a[s * rows + i]);
    for (int64_t c = c8_0 * 8; c < c8_1 * 8; c += 8) {
      const __m256 e = load8<kind>(values, i * cols + c);
      for (int64_t s = 0; s < t; s++) {
        float* out = y + s * cols + c;
        _mm256_storeu_ps(out, _mm256_fmadd_ps(coef[s], e, _mm256_loadu_ps(out)));
      }
    }
  }
}

// ---- AVX-512: the one-token loops, 16 columns (two mask bytes) per step --------------------------------
#define AVX512 __attribute__((target("avx512f,fma,popcnt")))  // AVX-512 F is all these loops use

struct Reversed {
  // byte -> the same byte with its bits in the opposite order: np.packbits puts column 0 in bit 7, an
  // AVX-512 lane mask puts lane 0 in bit 0
  uint8_t of[256];
  Reversed() {
    for (int b = 0; b < 256; b++) {
      int r = 0;
      for (int j = 0; j < 8; j++) r |= ((b >> j) & 1) << (7 - j);
      of[b] = static_cast<uint8_t>(r);
    }
  }
};
const Reversed kReversed;

// 16 stored values from position p as float32 (16 entries of a row stored whole).
template <Kind kind>
AVX512 inline __m512 load16(const void* v, int64_t p) {
  switch (kind) {
    case kFloat: return _mm512_loadu_ps(static_cast<const float*>(v) + p);
    case kBFloat16: {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case kHalf:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + p)));
    default:
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(v) + p))));
  }
}

// 16 stored values from position p, spread to the lanes set in k (zeros elsewhere), as float32: widened
// to float32 first, then one `vexpandps` whatever the stored width (the 16- and 8-bit expansions were no
// faster on the CPU this was measured on). Reads 16 values whatever k holds: the caller makes sure they exist.
template <Kind kind>
AVX512 inline __m512 expand16(const void* v, int64_t p, __mmask16 k) {
  return _mm512_maskz_expand_ps(k, load16<kind>(v, p));
}

AVX512 inline __mmask16 lanes(const uint8_t* m) {
  return static_cast<__mmask16>(kReversed.of[m[0]] | (kReversed.of[m[1]] << 8));
}

// `columns` for one token on AVX-512: kBlock rows at a time, 16 columns per step; an odd last mask byte
// of the slice takes the 8-lane form. Rows it does not reach go to the AVX2 loop.
template <Kind kind>
AVX512 void columns512(const float* a, int64_t t, int64_t rows, const uint8_t* bits, const void* values,
                       const int64_t* row_ptr, int64_t cols, int64_t total, int64_t byte0, int64_t byte1,
                       float* y) {
  const int64_t bytes = cols / 8, span = byte1 - byte0, pairs = span / 2;
  int64_t i = 0;
  float* __restrict out = y + byte0 * 8;
  for (; t == 1 && i + kBlock <= rows; i += kBlock) {
    const uint8_t* m0 = bits + i * bytes;
    const uint8_t* m1 = m0 + bytes;
    const uint8_t* m2 = m1 + bytes;
    const uint8_t* m3 = m2 + bytes;
    int64_t p0 = slice_start(m0, row_ptr[i], byte0), p1 = slice_start(m1, row_ptr[i + 1], byte0);
    int64_t p2 = slice_start(m2, row_ptr[i + 2], byte0), p3 = slice_start(m3, row_ptr[i + 3], byte0);
    if (p3 + 8 * span + 16 > total) break;  // 16: the odd byte's step reads 16 values too
    const __m512 c0 = _mm512_set1_ps(a[i]), c1 = _mm512_set1_ps(a[i + 1]);
    const __m512 c2 = _mm512_set1_ps(a[i + 2]), c3 = _mm512_set1_ps(a[i + 3]);
    m0 += byte0, m1 += byte0, m2 += byte0, m3 += byte0;
    for (int64_t c = 0; c < pairs; c++) {
      const __mmask16 k0 = lanes(m0 + 2 * c), k1 = lanes(m1 + 2 * c), k2 = lanes(m2 + 2 * c), k3 = lanes(m3 + 2 * c);
      __m512 acc = _mm512_loadu_ps(out + c * 16);
      acc = _mm512_fmadd_ps(c0, expand16<kind>(values, p0, k0), acc);
      acc = _mm512_fmadd_ps(c1, expand16<kind>(values, p1, k1), acc);
      acc = _mm512_fmadd_ps(c2, expand16<kind>(values, p2, k2), acc);
      acc = _mm512_fmadd_ps(c3, expand16<kind>(values, p3, k3), acc);
      _mm512_storeu_ps(out + c * 16, acc);
      p0 += __builtin_popcount(k0), p1 += __builtin_popcount(k1);
      p2 += __builtin_popcount(k2), p3 += __builtin_popcount(k3);
    }
    if (span % 2) {  // the slice's last byte: its 8 lanes only
      const int64_t c = span - 1;
      const __mmask16 k0 = kReversed.of[m0[c]], k1 = kReversed.of[m1[c]];
      const __mmask16 k2 = kReversed.of[m2[c]], k3 = kReversed.of[m3[c]];
      __m512 acc = _mm512_maskz_loadu_ps(0xff, out + c * 8);
      acc = _mm512_fmadd_ps(c0, expand16<kind>(values, p0, k0), acc);
      acc = _mm512_fmadd_ps(c1, expand16<kind>(values, p1, k1), acc);
      acc = _mm512_fmadd_ps(c2, expand16<kind>(values, p2, k2), acc);
      acc = _mm512_fmadd_ps(c3, expand16<kind>(values, p3, k3), acc);
      _mm512_mask_storeu_ps(out + c * 8, 0xff, acc);
    }
  }
  rows_from<kind>(i, a, t, rows, bits, values, row_ptr, cols, total, byte0, byte1, y);
}

// `dense_columns` for one token on AVX-512: 16 columns per step, an odd last group of 8 masked.
template <Kind kind>
AVX512 void dense_columns512(const float* a, int64_t t, int64_t rows, const void* values, int64_t cols,
                             int64_t c8_0, int64_t c8_1, float* y) {
  int64_t i = 0;
  const int64_t end = c8_1 * 8;
  for (; t == 1 && i + kBlock <= rows; i += kBlock) {
    const __m512 c0 = _mm512_set1_ps(a[i]), c1 = _mm512_set1_ps(a[i + 1]);
    const __m512 c2 = _mm512_set1_ps(a[i + 2]), c3 = _mm512_set1_ps(a[i + 3]);
    const int64_t r0 = i * cols, r1 = r0 + cols, r2 = r1 + cols, r3 = r2 + cols;
    int64_t c = c8_0 * 8;
    for (; c + 16 <= end; c += 16) {
      __m512 acc = _mm512_loadu_ps(y + c);
      acc = _mm512_fmadd_ps(c0, load16<kind>(values, r0 + c), acc);
      acc = _mm512_fmadd_ps(c1, load16<kind>(values, r1 + c), acc);
      acc = _mm512_fmadd_ps(c2, load16<kind>(values, r2 + c), acc);
      acc = _mm512_fmadd_ps(c3, load16<kind>(values, r3 + c), acc);
      _mm512_storeu_ps(y + c, acc);
    }
    if (c < end) {  // 8 columns left: the AVX2 form (never reads past the row's end)
      __m256 acc = _mm256_loadu_ps(y + c);
      acc = _mm256_fmadd_ps(_mm512_castps512_ps256(c0), load8<kind>(values, r0 + c), acc);
      acc = _mm256_fmadd_ps(_mm512_castps512_ps256(c1), load8<kind>(values, r1 + c), acc);
      acc = _mm256_fmadd_ps(_mm512_castps512_ps256(c2), load8<kind>(values, r2 + c), acc);
      acc = _mm256_fmadd_ps(_mm512_castps512_ps256(c3), load8<kind>(values, r3 + c), acc);
      _mm256_storeu_ps(y + c, acc);
    }
  }
  dense_rows_from<kind>(i, a, t, rows, values, cols, c8_0, c8_1, y);
}

// Which loops the products take: 2 = AVX-512 (where the CPU has AVX-512 F), 1 = AVX2.
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
std::atomic<int> g_isa{has_avx512() ? 2 : 1};

// want 0: report; 1 or 2: use AVX2 / AVX-512 from now on (2 only where the CPU has it). Returns the choice.
int64_t kernel_isa(int64_t want) {
  TORCH_CHECK(want >= 0 && want <= 2, "kernel_isa: want is 0 (report), 1 (AVX2) or 2 (AVX-512)");
  if (want == 2) TORCH_CHECK(has_avx512(), "kernel_isa: this CPU lacks AVX-512 F");
  if (want) g_isa = static_cast<int>(want);
  return g_isa;
}

Kind kind_of(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kFloat: return kFloat;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kHalf;
    case at::kChar: return kInt8;
    default: TORCH_CHECK(false, "packed_product: values of dtype ", values.scalar_type(), " are not supported");
  }
}

// Calls f with the value type as a compile-time constant (std::integral_constant), so every loop is
// instantiated per type and its inner loop has no branch on it: one switch instead of one per call site.
template <typename F>
void with_kind(Kind kind, F&& f) {
  switch (kind) {
    case kFloat: f(std::integral_constant<Kind, kFloat>{}); break;
    case kBFloat16: f(std::integral_constant<Kind, kBFloat16>{}); break;
    case kHalf: f(std::integral_constant<Kind, kHalf>{}); break;
    default: f(std::integral_constant<Kind, kInt8>{});
  }
}

// a (t, rows) float32, t <= 8; bits uint8; values (stored,); row_ptr int64 (rows + 1,); -> (t, cols) float32
at::Tensor packed_product(const at::Tensor& a, const at::Tensor& bits, const at::Tensor& values,
                          const at::Tensor& row_ptr, int64_t cols) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat && a.is_contiguous() && a.size(0) <= 8,
              "packed_product: a must be a contiguous float32 (t, rows) matrix with t <= 8");
  TORCH_CHECK(cols % 8 == 0, "packed_product: cols must be a multiple of 8");
  TORCH_CHECK(bits.scalar_type() == at::kByte && row_ptr.scalar_type() == at::kLong && values.is_contiguous() &&
                  bits.is_contiguous() && row_ptr.is_contiguous() && row_ptr.numel() == a.size(1) + 1 &&
                  bits.numel() * 8 >= a.size(1) * cols,
              "packed_product: bits (uint8), row_ptr (int64, rows + 1) and values must match the shape");
  const int64_t t = a.size(0), rows = a.size(1), bytes = cols / 8;
  at::Tensor y = at::zeros({t, cols}, a.options());
  const float* ap = a.data_ptr<float>();
  const uint8_t* bp = bits.data_ptr<uint8_t>();
  const void* vp = values.data_ptr();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const Kind kind = kind_of(values);
  const int64_t total = values.numel();
  float* yp = y.data_ptr<float>();
  // slices of at least 32 bytes of mask (256 columns): finer ones spend more on skipping than working
  const bool wide = g_isa == 2 && t == 1;
  at::parallel_for(0, bytes, 32, [&](int64_t b0, int64_t b1) {
    with_kind(kind, [&](auto k) {
      constexpr Kind K = decltype(k)::value;
      if (wide) columns512<K>(ap, t, rows, bp, vp, rp, cols, total, b0, b1, yp);
      else columns<K>(ap, t, rows, bp, vp, rp, cols, total, b0, b1, yp);
    });
  });
  return y;
}

// a (t, rows) float32, t <= 8; values (rows * cols,) row-major -> (t, cols) float32
at::Tensor dense_product(const at::Tensor& a, const at::Tensor& values, int64_t cols) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat && a.is_contiguous() && a.size(0) <= 8,
              "dense_product: a must be a contiguous float32 (t, rows) matrix with t <= 8");
  TORCH_CHECK(cols % 8 == 0, "dense_product: cols must be a multiple of 8");
  TORCH_CHECK(values.is_contiguous() && values.numel() == a.size(1) * cols,
              "dense_product: values must hold rows * cols entries");
  const int64_t t = a.size(0), rows = a.size(1);
  at::Tensor y = at::zeros({t, cols}, a.options());
  const float* ap = a.data_ptr<float>();
  const void* vp = values.data_ptr();
  const Kind kind = kind_of(values);
  float* yp = y.data_ptr<float>();
  const bool wide = g_isa == 2 && t == 1;
  at::parallel_for(0, cols / 8, 32, [&](int64_t c0, int64_t c1) {
    with_kind(kind, [&](auto k) {
      constexpr Kind K = decltype(k)::value;
      if (wide) dense_columns512<K>(ap, t, rows, vp, cols, c0, c1, yp);
      else dense_columns<K>(ap, t, rows, vp, cols, c0, c1, yp);
    });
  });
  return y;
}

// ---- Output heads: y (t, rows) = a (t, cols) @ W^T, W (rows, cols) stored row by row -------------------
// A tied output head is the embedding table (vocab, hidden): each logit is the dot product of one stored
// row with the hidden state, so a row's values are read once and contiguously for all t tokens. `bits`
// null: every entry stored (a dense table in narrower values).

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// Row r's logits for every token, 8 columns a step (AVX2).
template <Kind kind>
void head_row(int64_t r, const float* a, int64_t t, const uint8_t* bits, const void* values, int64_t p,
              int64_t cols, int64_t total, int64_t rows, float* y) {
  __m256 acc[8];
  for (int64_t s = 0; s < t; s++) acc[s] = _mm256_setzero_ps();
  const uint8_t* m = bits ? bits + r * (cols / 8) : nullptr;
  for (int64_t c = 0; c < cols / 8; c++) {
    __m256 e;
    if (m == nullptr) {
      e = load8<kind>(values, p);
      p += 8;
    } else {
      const int b = m[c];
      if (!b) continue;
      if (p + 8 <= total) {
        e = expand<kind>(values, p, b);
      } else {  // the table's last values: never read past them
        alignas(32) float tmp[8] = {0};
        int64_t q = p;
        for (int j = 0; j < 8; j++)
          if ((b >> (7 - j)) & 1) tmp[j] = load1<kind>(values, q++);
        e = _mm256_load_ps(tmp);
      }
      p += __builtin_popcount(b);
    }
    for (int64_t s = 0; s < t; s++) acc[s] = _mm256_fmadd_ps(_mm256_loadu_ps(a + s * cols + c * 8), e, acc[s]);
  }
  for (int64_t s = 0; s < t; s++) y[s * rows + r] = hsum(acc[s]);
}

// The same, 16 columns a step (AVX-512); a row whose 16-value reads could pass the end takes the AVX2 form.
template <Kind kind>
AVX512 void head_row512(int64_t r, const float* a, int64_t t, const uint8_t* bits, const void* values,
                        int64_t p, int64_t cols, int64_t total, int64_t rows, float* y) {
  if (p + cols + 16 > total) return head_row<kind>(r, a, t, bits, values, p, cols, total, rows, y);
  __m512 acc[8];
  for (int64_t s = 0; s < t; s++) acc[s] = _mm512_setzero_ps();
  const int64_t bytes = cols / 8;
  const uint8_t* m = bits ? bits + r * bytes : nullptr;
  int64_t c = 0;
  for (; c + 2 <= bytes; c += 2) {
    __m512 e;
    if (m == nullptr) {
      e = load16<kind>(values, p);
      p += 16;
    } else {
      const __mmask16 k = lanes(m + c);
      if (!k) continue;
      e = expand16<kind>(values, p, k);
      p += __builtin_popcount(k);
    }
    for (int64_t s = 0; s < t; s++) acc[s] = _mm512_fmadd_ps(_mm512_loadu_ps(a + s * cols + c * 8), e, acc[s]);
  }
  if (c < bytes) {  // an odd last byte: its 8 columns
    const __mmask16 k = m == nullptr ? 0xff : kReversed.of[m[c]];
    const __m512 e = m == nullptr ? _mm512_maskz_mov_ps(k, load16<kind>(values, p)) : expand16<kind>(values, p, k);
    for (int64_t s = 0; s < t; s++)
      acc[s] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(0xff, a + s * cols + c * 8), e, acc[s]);
  }
  for (int64_t s = 0; s < t; s++) y[s * rows + r] = _mm512_reduce_add_ps(acc[s]);
}

// a (t, cols) float32, t <= 8; bits uint8 (empty: every entry stored); values; row_ptr int64 (rows + 1,)
// -> (t, rows) float32
at::Tensor rows_product(const at::Tensor& a, const at::Tensor& bits, const at::Tensor& values,
                        const at::Tensor& row_ptr, int64_t cols) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat && a.is_contiguous() && a.size(0) <= 8 &&
                  a.size(1) == cols,
              "rows_product: a must be a contiguous float32 (t, cols) matrix with t <= 8");
  TORCH_CHECK(cols % 8 == 0, "rows_product: cols must be a multiple of 8");
  const int64_t rows = row_ptr.numel() - 1;
  const bool masked = bits.numel() > 0;
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.is_contiguous() && rows >= 0 && values.is_contiguous() &&
                  (!masked || (bits.scalar_type() == at::kByte && bits.is_contiguous() &&
                               bits.numel() * 8 >= rows * cols)) &&
                  (masked || values.numel() == rows * cols),
              "rows_product: bits (uint8 or empty), row_ptr (int64, rows + 1) and values must match the shape");
  const int64_t t = a.size(0);
  at::Tensor y = at::empty({t, rows}, a.options());
  const float* ap = a.data_ptr<float>();
  const uint8_t* bp = masked ? bits.data_ptr<uint8_t>() : nullptr;
  const void* vp = values.data_ptr();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const Kind kind = kind_of(values);
  const int64_t total = values.numel();
  float* yp = y.data_ptr<float>();
  const bool wide = g_isa == 2;
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    with_kind(kind, [&](auto k) {
      constexpr Kind K = decltype(k)::value;
      for (int64_t r = r0; r < r1; r++) {
        if (wide) head_row512<K>(r, ap, t, bp, vp, rp[r], cols, total, rows, yp);
        else head_row<K>(r, ap, t, bp, vp, rp[r], cols, total, rows, yp);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(smartprune, m) {
  m.def("packed_product(Tensor a, Tensor bits, Tensor values, Tensor row_ptr, int cols) -> Tensor");
  m.def("dense_product(Tensor a, Tensor values, int cols) -> Tensor");
  m.def("rows_product(Tensor a, Tensor bits, Tensor values, Tensor row_ptr, int cols) -> Tensor");
  m.def("kernel_isa(int want) -> int");
}

TORCH_LIBRARY_IMPL(smartprune, CPU, m) {
  m.impl("packed_product", packed_product);
  m.impl("dense_product", dense_product);
  m.impl("rows_product", rows_product);
}

// no tensor argument to dispatch on: registered for every backend
TORCH_LIBRARY_IMPL(smartprune, CatchAll, m) { m.impl("kernel_isa", kernel_isa); }
