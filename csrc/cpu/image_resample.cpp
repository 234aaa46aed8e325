// CLIP's image preprocessing in one pass: resize, center crop, ToTensor and Normalize of one
// 8-bit RGB image, with the output bit for bit equal to torchvision's transforms on a PIL image.
//
// Why it exists: on a CPU run the DataLoader worker shares the cores with the image encoder,
// and PIL's resize of a 500x375 photo costs about twice its JPEG decode (it resamples every
// column of the resized image, 4 bytes per pixel, then ToTensor and Normalize make two more
// passes). This op resamples only the pixels the crop keeps, 3 bytes per pixel, with both passes
// vectorised for AVX2, and writes the normalised float32 planes directly.
//
// Bit-exactness: PIL resamples in two passes, each rounding to 8 bits, so their order matters:
// Pillow up to 12 always ran the horizontal pass first, Pillow 13 runs the vertical one first
// when the height shrinks by more than twice as many pixels as the width. The caller passes
// the order (vertical_first) its Pillow uses. Coefficients are computed in double exactly as
// PIL's Resample.c does (same filter formulas, same evaluation order, normalised to sum 1, then
// to fixed point with 22 fraction bits), sums start at half an output step and are clipped to
// 0..255 after an arithmetic shift. A pass is skipped when its size does not change, as in PIL.
// The coefficient arithmetic is compiled for baseline x86-64, which has no FMA, so no contraction
// can change a double; on other architectures the caller's probe (deltakern/clip/preprocess.py)
// would see any difference and keep torchvision's transform. ToTensor
// divides by 255 in float32 and Normalize subtracts the float32 mean and divides by the float32
// std; the 256-entry table per channel below does the same three float32 operations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "row_reduce.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define DK_RESAMPLE_AVX2 1
#else
#define DK_RESAMPLE_AVX2 0
#endif

namespace deltakern {
namespace cpu {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);

// The AVX2 passes run where the float kernels run AVX2 or better, so ATEN_CPU_CAPABILITY=default
// forces the portable code here too (row_reduce.h).
bool use_avx2() { return std::string(kernel_isa()) != "default"; }

double bicubic_filter(double x) {
  const double a = -0.5;  // PIL's (and torchvision's) bicubic constant
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

// One pass's taps for the output positions [first, first + count): per position the first input
// index, the number of taps, and ksize fixed-point coefficients (PIL's precompute_coeffs followed
// by normalize_coeffs_8bpc, for the box (0, in_size)).
struct Taps {
  int ksize = 0;
  std::vector<int32_t> start, count, coeffs;
};

Taps make_taps(int in_size, int out_size, int first, int n, bool bicubic) {
  double (*filter)(double) = bicubic ? bicubic_filter : bilinear_filter;
  const double filter_support = bicubic ? 2.0 : 1.0;
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);  // PIL's box is floats
  double filterscale, scale;
  filterscale = scale = static_cast<double>(in1 - in0) / out_size;
  if (filterscale < 1.0) filterscale = 1.0;
  const double support = filter_support * filterscale;
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.start.resize(n);
  t.count.resize(n);
  t.coeffs.assign(static_cast<size_t>(n) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  const double inv_filterscale = 1.0 / filterscale;
  for (int i = 0; i < n; ++i) {
    const int xx = first + i;
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = filter((x + xmin - center + 0.5) * inv_filterscale);
      k[x] = w;
      ww += w;
    }
    if (ww != 0.0) {
      for (int x = 0; x < xmax; ++x) k[x] /= ww;
    }
    int32_t* fixed = &t.coeffs[static_cast<size_t>(i) * t.ksize];
    for (int x = 0; x < xmax; ++x) {
      fixed[x] = k[x] < 0 ? static_cast<int32_t>(-0.5 + k[x] * (1 << kPrecisionBits))
                          : static_cast<int32_t>(0.5 + k[x] * (1 << kPrecisionBits));
    }
    t.start[i] = xmin;
    t.count[i] = xmax;
  }
  return t;
}

inline uint8_t clip8(int32_t sum) {
  const int32_t v = sum >> kPrecisionBits;  // arithmetic shift, as PIL's lookup index
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One output row of the horizontal pass: out[j] from line[start_j .. start_j + count_j), 3 channels.
inline void horizontal_row(const uint8_t* line, const Taps& t, uint8_t* o) {
  const int n = static_cast<int>(t.start.size());
  for (int j = 0; j < n; ++j) {
    const uint8_t* p = line + static_cast<int64_t>(t.start[j]) * 3;
    const int32_t* k = &t.coeffs[static_cast<size_t>(j) * t.ksize];
    int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
    for (int x = 0; x < t.count[j]; ++x) {
      s0 += p[3 * x + 0] * k[x];
      s1 += p[3 * x + 1] * k[x];
      s2 += p[3 * x + 2] * k[x];
    }
    o[3 * j + 0] = clip8(s0);
    o[3 * j + 1] = clip8(s1);
    o[3 * j + 2] = clip8(s2);
  }
}

#if DK_RESAMPLE_AVX2
// The horizontal taps laid out for 8 output pixels at a time: for tap x and output j, the byte
// offset of input pixel start_j + x (clamped into the row) and its coefficient (0 past count_j, as
// PIL's buffer holds). Integer sums are exact in any order, so the extra zero terms and the order
// change nothing.
struct LaneTaps {
  int padded = 0;  // outputs rounded up to a multiple of 8
  std::vector<int32_t> offsets, coeffs;  // [ksize][padded]
};

LaneTaps lane_taps(const Taps& t, int in_size) {
  LaneTaps l;
  const int n = static_cast<int>(t.start.size());
  l.padded = (n + 7) / 8 * 8;
  l.offsets.assign(static_cast<size_t>(t.ksize) * l.padded, 0);
  l.coeffs.assign(static_cast<size_t>(t.ksize) * l.padded, 0);
  for (int x = 0; x < t.ksize; ++x) {
    for (int j = 0; j < n; ++j) {
      const size_t at = static_cast<size_t>(x) * l.padded + j;
      l.offsets[at] = std::min(t.start[j] + x, in_size - 1) * 3;
      l.coeffs[at] = x < t.count[j] ? t.coeffs[static_cast<size_t>(j) * t.ksize + x] : 0;
    }
  }
  return l;
}

// The horizontal pass for 8 outputs per step: one 32-bit gather per tap fetches the 3 channels of
// 8 input pixels (and one byte past each pixel, which is masked off; the caller keeps the last
// row of a buffer, where that byte may lie outside it, on the scalar path).
__attribute__((target("avx2"))) void horizontal_row_avx2(const uint8_t* line, const Taps& t, const LaneTaps& l,
                                                         uint8_t* o) {
  const int n = static_cast<int>(t.start.size());
  const __m256i byte = _mm256_set1_epi32(0xFF), half = _mm256_set1_epi32(kHalf);
  const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
  alignas(32) int32_t sums[3][8];
  for (int j0 = 0; j0 < n; j0 += 8) {
    __m256i s0 = half, s1 = half, s2 = half;
    for (int x = 0; x < t.ksize; ++x) {
      const size_t at = static_cast<size_t>(x) * l.padded + j0;
      const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&l.offsets[at]));
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&l.coeffs[at]));
      const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(line), off, 1);
      s0 = _mm256_add_epi32(s0, _mm256_mullo_epi32(_mm256_and_si256(v, byte), k));
      s1 = _mm256_add_epi32(s1, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8), byte), k));
      s2 = _mm256_add_epi32(s2, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 16), byte), k));
    }
    // clip8 on 8 lanes: arithmetic shift, then clamp to 0..255.
    const __m256i* sum[3] = {&s0, &s1, &s2};
    for (int c = 0; c < 3; ++c) {
      const __m256i v = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(*sum[c], kPrecisionBits), zero), top);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums[c]), v);
    }
    const int lanes = std::min(8, n - j0);
    for (int i = 0; i < lanes; ++i) {
      o[3 * (j0 + i) + 0] = static_cast<uint8_t>(sums[0][i]);
      o[3 * (j0 + i) + 1] = static_cast<uint8_t>(sums[1][i]);
      o[3 * (j0 + i) + 2] = static_cast<uint8_t>(sums[2][i]);
    }
  }
}
#endif

// Horizontal pass over `rows` rows of packed RGB (`in_size` pixels each) into rows of the taps'
// outputs. `last_row_is_buffer_end`: the last row ends its allocation (no byte may be read past it).
void horizontal_pass(const uint8_t* src, int64_t src_stride, int rows, int in_size, const Taps& t, uint8_t* out,
                     bool last_row_is_buffer_end) {
  const int64_t out_stride = static_cast<int64_t>(t.start.size()) * 3;
#if DK_RESAMPLE_AVX2
  static const bool avx2 = use_avx2();
  if (avx2) {
    const LaneTaps l = lane_taps(t, in_size);
    for (int r = 0; r < rows; ++r) {
      if (r == rows - 1 && last_row_is_buffer_end) {
        horizontal_row(src + r * src_stride, t, out + r * out_stride);
      } else {
        horizontal_row_avx2(src + r * src_stride, t, l, out + r * out_stride);
      }
    }
    return;
  }
#endif
  for (int r = 0; r < rows; ++r) horizontal_row(src + r * src_stride, t, out + r * out_stride);
}

// `rows` rows of `bytes` bytes each, from a strided image into a packed block.
inline void copy_block(const uint8_t* src, int64_t src_stride, int rows, int bytes, uint8_t* out) {
  for (int r = 0; r < rows; ++r) std::copy_n(src + r * src_stride, bytes, out + static_cast<int64_t>(r) * bytes);
}

// Vertical pass for one output row: the fixed-point sum over the row's taps of `width` bytes,
// each tap a whole row (contiguous, so the loop vectorises).
inline void vertical_row(const uint8_t* src, int64_t src_stride, int first, int count, const int32_t* k, int width,
                         int32_t* acc, uint8_t* out) {
  for (int e = 0; e < width; ++e) acc[e] = kHalf;
  for (int y = 0; y < count; ++y) {
    const uint8_t* row = src + static_cast<int64_t>(first + y) * src_stride;
    const int32_t ky = k[y];
    for (int e = 0; e < width; ++e) acc[e] += row[e] * ky;
  }
  for (int e = 0; e < width; ++e) out[e] = clip8(acc[e]);
}

void vertical_rows_default(const uint8_t* src, int64_t stride, const Taps& t, int width, uint8_t* out) {
  std::vector<int32_t> acc(width);
  for (size_t i = 0; i < t.start.size(); ++i)
    vertical_row(src, stride, t.start[i], t.count[i], &t.coeffs[i * t.ksize], width, acc.data(), out + i * width);
}

#if DK_RESAMPLE_AVX2
__attribute__((target("avx2"), flatten)) void vertical_rows_avx2(const uint8_t* src, int64_t stride, const Taps& t,
                                                                 int width, uint8_t* out) {
  std::vector<int32_t> acc(width);
  for (size_t i = 0; i < t.start.size(); ++i)
    vertical_row(src, stride, t.start[i], t.count[i], &t.coeffs[i * t.ksize], width, acc.data(), out + i * width);
}
#endif

void vertical_rows(const uint8_t* src, int64_t stride, const Taps& t, int width, uint8_t* out) {
#if DK_RESAMPLE_AVX2
  static const bool avx2 = use_avx2();
  if (avx2) return vertical_rows_avx2(src, stride, t, width, out);
#endif
  vertical_rows_default(src, stride, t, width, out);
}

// image: [H, W, 3] uint8 (made contiguous when it is not). Resized to
// (height, width) with PIL's filter (vertical pass first when vertical_first), cropped to
// [top, top + crop_height) x [left, left + crop_width), returned as float32
// [3, crop_height, crop_width] ((v / 255 - mean) / std per channel).
at::Tensor resample_crop_normalize_cpu(const at::Tensor& image, int64_t height, int64_t width, int64_t top,
                                       int64_t left, int64_t crop_height, int64_t crop_width,
                                       c10::string_view filter, bool vertical_first, at::ArrayRef<double> mean,
                                       at::ArrayRef<double> std) {
  TORCH_CHECK(image.dim() == 3 && image.size(2) == 3 && image.scalar_type() == at::kByte,
              "resample_crop_normalize: image must be a uint8 [H, W, 3] tensor, got ", image.scalar_type(), " ",
              image.sizes());
  TORCH_CHECK(image.size(0) >= 1 && image.size(1) >= 1, "resample_crop_normalize: image is empty: ", image.sizes());
  TORCH_CHECK(filter == "bicubic" || filter == "bilinear",
              "resample_crop_normalize: filter must be 'bicubic' or 'bilinear', got '", std::string(filter), "'");
  TORCH_CHECK(height >= 1 && width >= 1 && height < (1 << 24) && width < (1 << 24),
              "resample_crop_normalize: the resized size must be positive, got ", height, "x", width);
  TORCH_CHECK(crop_height >= 1 && crop_width >= 1 && top >= 0 && left >= 0 && top + crop_height <= height &&
                  left + crop_width <= width,
              "resample_crop_normalize: the crop [", top, ", ", top + crop_height, ") x [", left, ", ",
              left + crop_width, ") must lie inside the resized ", height, "x", width, " image");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "resample_crop_normalize: mean and std must have 3 values");
  for (int c = 0; c < 3; ++c)
    TORCH_CHECK(static_cast<float>(std[c]) != 0.0f, "resample_crop_normalize: std must not be 0");
  const at::Tensor img = image.contiguous();
  const int in_h = static_cast<int>(img.size(0)), in_w = static_cast<int>(img.size(1));
  TORCH_CHECK(static_cast<int64_t>(in_h) == img.size(0) && static_cast<int64_t>(in_w) == img.size(1) &&
                  in_h < (1 << 24) && in_w < (1 << 24),
              "resample_crop_normalize: image too large: ", img.sizes());
  const int64_t in_stride = img.stride(0);
  const uint8_t* src = img.data_ptr<uint8_t>();
  const bool bicubic = filter == "bicubic";
  const int ch = static_cast<int>(crop_height), cw = static_cast<int>(crop_width);

  // The input rows and columns the crop's output pixels read (a pass that keeps its size reads
  // exactly the cropped ones). Taps start at absolute input positions here.
  const bool resample_rows = height != in_h, resample_cols = width != in_w;
  Taps vt, ht;
  int row0 = static_cast<int>(top), row1 = static_cast<int>(top + crop_height);
  int col0 = static_cast<int>(left), col1 = static_cast<int>(left + crop_width);
  if (resample_rows) {
    vt = make_taps(in_h, static_cast<int>(height), static_cast<int>(top), ch, bicubic);
    row0 = vt.start.front();
    row1 = vt.start.back() + vt.count.back();
  }
  if (resample_cols) {
    ht = make_taps(in_w, static_cast<int>(width), static_cast<int>(left), cw, bicubic);
    col0 = ht.start.front();
    col1 = ht.start.back() + ht.count.back();
  }

  // Two passes, each rounding to 8 bits, in the order PIL runs them (the caller says which).
  std::vector<uint8_t> mid, resized(static_cast<size_t>(ch) * cw * 3);
  if (!vertical_first) {
    const int rows = row1 - row0;
    mid.resize(static_cast<size_t>(rows) * cw * 3);
    if (resample_cols) {
      horizontal_pass(src + row0 * in_stride, in_stride, rows, in_w, ht, mid.data(), row1 == in_h);
    } else {
      copy_block(src + row0 * in_stride + col0 * 3, in_stride, rows, cw * 3, mid.data());
    }
    if (resample_rows) {
      for (int& s : vt.start) s -= row0;
      vertical_rows(mid.data(), static_cast<int64_t>(cw) * 3, vt, cw * 3, resized.data());
    } else {
      resized.swap(mid);
    }
  } else {
    const int cols = col1 - col0;
    mid.resize(static_cast<size_t>(ch) * cols * 3);
    if (resample_rows) {
      vertical_rows(src + col0 * 3, in_stride, vt, cols * 3, mid.data());
    } else {
      copy_block(src + row0 * in_stride + col0 * 3, in_stride, ch, cols * 3, mid.data());
    }
    if (resample_cols) {
      for (int& s : ht.start) s -= col0;
      horizontal_pass(mid.data(), static_cast<int64_t>(cols) * 3, ch, cols, ht, resized.data(), true);
    } else {
      resized.swap(mid);
    }
  }
  const uint8_t* pixels = resized.data();  // ch x cw x 3

  // ToTensor + Normalize through a table: the same float32 operations for each of 256 values.
  std::array<std::array<float, 256>, 3> table;
  for (int c = 0; c < 3; ++c) {
    const float m = static_cast<float>(mean[c]), s = static_cast<float>(std[c]);
    for (int v = 0; v < 256; ++v) {
      const volatile float scaled = static_cast<float>(v) / 255.0f;  // keep the three roundings apart
      table[c][v] = (scaled - m) / s;
    }
  }
  at::Tensor out = at::empty({3, crop_height, crop_width}, image.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t plane = crop_height * crop_width;
  for (int64_t p = 0; p < plane; ++p) {
    o[p] = table[0][pixels[3 * p + 0]];
    o[plane + p] = table[1][pixels[3 * p + 1]];
    o[2 * plane + p] = table[2][pixels[3 * p + 2]];
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace deltakern

TORCH_LIBRARY_IMPL(deltakern, CPU, m) {
  m.impl("resample_crop_normalize", &deltakern::cpu::resample_crop_normalize_cpu);
}
