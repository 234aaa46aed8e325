// Per-row kernels (see row_reduce.h for why they look the way they do).
#include "row_reduce.h"
#include "simd_avx2.h"

#include <ATen/Version.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>
#include <string>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>
#define DK_X86_VARIANTS 1
#define DK_TARGET(isa) __attribute__((target(isa), flatten))
#else
#define DK_X86_VARIANTS 0
#endif

namespace deltakern {
namespace cpu {
namespace {

// Adds one logit to a running log-sum-exp, rescaling the sum when the maximum grows.
template <typename T>
inline void lse_add(T& max, double& sum, T x) {
  if (x > max) {
    sum = sum * std::exp(static_cast<double>(max - x)) + 1.0;
    max = x;
  } else {
    sum += std::exp(static_cast<double>(x - max));
  }
}

// The sorted top-c list of a row. Candidates arrive in increasing column order, so a new
// value is placed after every equal one: ties keep the lower class index first.
template <typename T>
struct TopList {
  T* values;
  int64_t* indices;
  int64_t capacity;
  int64_t filled = 0;

  bool full() const { return filled == capacity; }
  bool accepts(T x) const { return filled < capacity || x > values[capacity - 1]; }

  // Inserts (x, j); returns true and the evicted value in `evicted` when the list was full.
  bool insert(T x, int64_t j, T& evicted) {
    const bool was_full = full();
    int64_t pos = was_full ? capacity - 1 : filled;
    if (was_full) evicted = values[capacity - 1];
    while (pos > 0 && values[pos - 1] < x) {
      values[pos] = values[pos - 1];
      indices[pos] = indices[pos - 1];
      --pos;
    }
    values[pos] = x;
    indices[pos] = j;
    if (!was_full) ++filled;
    return was_full;
  }
};

template <typename T>
inline void take_scalar(TopList<T>& top, T& max, double& sum, T x, int64_t j) {
  if (top.accepts(x)) {
    // Initialised although insert() writes it whenever it returns true: GCC cannot see that
    // through the inlined loop and warns (-Wmaybe-uninitialized).
    T evicted = -std::numeric_limits<T>::infinity();
    if (top.insert(x, j, evicted)) lse_add(max, sum, evicted);
  } else {
    lse_add(max, sum, x);
  }
}

template <typename T>
inline T finish(T max, double sum) {
  return sum > 0.0 ? static_cast<T>(static_cast<double>(max) + std::log(sum))
                   : -std::numeric_limits<T>::infinity();
}

// The block operations of one instruction set, on the n <= 64 logits of a block. A row's last
// block may be short and takes the same vector code: at K = 1000 its 40 logits, summed with
// scalar double exponentials, made the epilogue 15% slower (1.22 against 1.06 ns per logit).
// The operations:
//  - run: the sum of exp(v - shift) over the v < threshold (v - shift <= 0 there), adding to
//    `equal` how many v equal the threshold;
//  - above: a bit mask of the v > value (bit t for element t), so that a block holding new
//    top-c candidates is walked candidate by candidate instead of element by element (a scalar
//    compare and an unpredictable branch per element cost a quarter of the epilogue);
//  - sum_all: run for a block whose every v is below the threshold (no compares, no tie count),
//    which is every block but the few that hold the top-c list.
// sum_all through run with an infinite threshold, for the variants without a dedicated one.
template <typename Ops>
inline float sum_all_by_run(const float* block, int64_t n, float shift) {
  int64_t unused = 0;
  return Ops::run(block, n, std::numeric_limits<float>::infinity(), shift, unused);
}

// The generic operations also finish the last n % width elements of a block for the vector
// variants below (the same exponential, the same tie count).
struct GenericBlockSum {
  static constexpr int64_t kBlock = 64;
  static float run(const float* block, int64_t n, float threshold, float shift, int64_t& equal) {
    float sum = 0.0f;
    int64_t same = 0;
#pragma omp simd reduction(+ : sum, same)
    for (int64_t t = 0; t < n; ++t) {
      const bool outside = block[t] < threshold;
      const float e = exp_nonpositive(outside ? block[t] - shift : 0.0f);
      sum += outside ? e : 0.0f;
      same += block[t] == threshold;
    }
    equal += same;
    return sum;
  }
  static uint64_t above(const float* block, int64_t n, float value) {
    uint64_t mask = 0;
    for (int64_t t = 0; t < n; ++t) mask |= static_cast<uint64_t>(block[t] > value) << t;
    return mask;
  }
  static float sum_all(const float* block, int64_t n, float shift) { return sum_all_by_run<GenericBlockSum>(block, n, shift); }
};

#if DK_X86_VARIANTS
// The same with AVX2+FMA intrinsics: GCC leaves the loop above scalar for AVX2 (it vectorises
// it only with AVX-512 masks), which made the exponentials the epilogue's whole cost.
struct Avx2BlockSum {
  static constexpr int64_t kBlock = 64;
  __attribute__((target("avx2,fma"))) static float run(const float* block, int64_t n, float threshold,
                                                       float shift, int64_t& equal) {
    const __m256 thr = _mm256_set1_ps(threshold), sh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int same = 0;
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
      const __m256 v = _mm256_loadu_ps(block + t);
      const __m256 outside = _mm256_cmp_ps(v, thr, _CMP_LT_OQ);
      same += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v, thr, _CMP_EQ_OQ)));
      const __m256 e = exp_nonpositive_avx2(_mm256_and_ps(outside, _mm256_sub_ps(v, sh)));
      acc = _mm256_add_ps(acc, _mm256_and_ps(outside, e));
    }
    equal += same;
    return sum_lanes_avx2(acc) + (t < n ? GenericBlockSum::run(block + t, n - t, threshold, shift, equal) : 0.0f);
  }
  __attribute__((target("avx2,fma"))) static float sum_all(const float* block, int64_t n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) acc = _mm256_add_ps(acc, exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(block + t), sh)));
    return sum_lanes_avx2(acc) + (t < n ? GenericBlockSum::sum_all(block + t, n - t, shift) : 0.0f);
  }
  __attribute__((target("avx2,fma"))) static uint64_t above(const float* block, int64_t n, float value) {
    const __m256 limit = _mm256_set1_ps(value);
    uint64_t mask = 0;
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
      const __m256 v = _mm256_loadu_ps(block + t);
      mask |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, limit, _CMP_GT_OQ))) << t;
    }
    return t < n ? mask | (GenericBlockSum::above(block + t, n - t, value) << t) : mask;
  }
};

// The same with SSE2 (every x86-64 CPU), for the portable variant.
struct Sse2BlockSum {
  static constexpr int64_t kBlock = 64;
  static __m128 exp_nonpositive4(__m128 x) {
    x = _mm_max_ps(x, _mm_set1_ps(-87.3365f));
    const __m128 magic = _mm_set1_ps(12582912.0f);
    const __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)), magic), magic);
    __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0.693359375f)));
    r = _mm_add_ps(r, _mm_mul_ps(n, _mm_set1_ps(2.12194440e-4f)));
    __m128 p = _mm_set1_ps(1.9875691500e-4f);
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
    const __m128 y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(p, _mm_mul_ps(r, r)), r), _mm_set1_ps(1.0f));
    const __m128i bits = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)), 23);
    return _mm_mul_ps(y, _mm_castsi128_ps(bits));
  }
  static float run(const float* block, int64_t n, float threshold, float shift, int64_t& equal) {
    const __m128 thr = _mm_set1_ps(threshold), sh = _mm_set1_ps(shift);
    __m128 acc = _mm_setzero_ps();
    int same = 0;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const __m128 v = _mm_loadu_ps(block + t);
      const __m128 outside = _mm_cmplt_ps(v, thr);
      same += __builtin_popcount(_mm_movemask_ps(_mm_cmpeq_ps(v, thr)));
      const __m128 e = exp_nonpositive4(_mm_and_ps(outside, _mm_sub_ps(v, sh)));
      acc = _mm_add_ps(acc, _mm_and_ps(outside, e));
    }
    equal += same;
    const __m128 pair = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1))) +
           (t < n ? GenericBlockSum::run(block + t, n - t, threshold, shift, equal) : 0.0f);
  }
  static float sum_all(const float* block, int64_t n, float shift) { return sum_all_by_run<Sse2BlockSum>(block, n, shift); }
  static uint64_t above(const float* block, int64_t n, float value) {
    const __m128 limit = _mm_set1_ps(value);
    uint64_t mask = 0;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      const __m128 v = _mm_loadu_ps(block + t);
      mask |= static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpgt_ps(v, limit))) << t;
    }
    return t < n ? mask | (GenericBlockSum::above(block + t, n - t, value) << t) : mask;
  }
};
using PortableBlockSum = Sse2BlockSum;
#else
using PortableBlockSum = GenericBlockSum;
#endif

// Scales block[0..n) in place (v = (v * col[t]) * scale, col may be null) and returns the
// block's largest logit; `probe` gains v * 0 per element, which is 0 for every finite v and NaN
// for NaN and ±inf, so one vectorised sum tells whether a whole row is finite.
inline float scale_block(float* block, int64_t n, float scale, const float* col, float& probe) {
  float max = -std::numeric_limits<float>::infinity();
  float p = 0.0f;
  if (col == nullptr) {
#pragma omp simd reduction(max : max) reduction(+ : p)
    for (int64_t t = 0; t < n; ++t) {
      const float v = block[t] * scale;
      block[t] = v;
      max = v > max ? v : max;
      p += v * 0.0f;
    }
  } else {
#pragma omp simd reduction(max : max) reduction(+ : p)
    for (int64_t t = 0; t < n; ++t) {
      const float v = (block[t] * col[t]) * scale;
      block[t] = v;
      max = v > max ? v : max;
      p += v * 0.0f;
    }
  }
  probe += p;
  return max;
}

// Two vectorised passes over a row of raw dot products that sits in L1:
//  1. scale each block into logits (in place) and take its maximum. The list's c-th value is at
//     least t0, the c-th largest block maximum (the c blocks holding the largest maxima hold c
//     logits >= t0), so only the logits >= t0 can enter the list: they are found block by block
//     with one vector compare, in blocks whose maximum reaches t0, and offered in column order.
//     That is about c candidates per row instead of every new running maximum, each an
//     unpredictable branch and a list insertion (at c = 5 these took a fifth of the epilogue);
//  2. with t the list's c-th value: the sum of exp(v - t) over the v < t, and how many logits
//     equal t (those beyond the list's own copies of t are outside it: equal values rank by
//     lower index, and each adds exp(0) = 1).
// Shifting by t instead of the largest outside logit saves the pass that finds it: the terms
// are still <= 1 and each is within ~2 ulp. Only when the sum falls below 2^-60 (every outside
// logit more than ~41 below t) could clamped terms (exp(-87.3) each, row_reduce.h) matter, and
// then the outside maximum is found and the sum redone with it as the shift, as before.
// Nothing is ever subtracted from a sum, so confident rows keep every digit (row_reduce.h).
template <typename Ops>
inline bool scale_reduce_row_f32_body(float* row, int64_t K, float scale, const float* col, int64_t c,
                                      float* top_values, int64_t* top_indices, float* lse_outside) {
  constexpr int64_t kBlock = Ops::kBlock;
  constexpr int64_t kStackBlocks = 256;  // rows up to K = 16384 keep their block maxima on the stack
  constexpr int64_t kSmallC = 16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  float stack[2 * kStackBlocks];  // the block maxima, then a copy that selection reorders
  std::vector<float> heap(blocks > kStackBlocks ? 2 * blocks : 0);
  float* maxima = blocks > kStackBlocks ? heap.data() : stack;
  float probe = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j = b * kBlock;
    maxima[b] = scale_block(row + j, std::min(kBlock, K - j), scale, col == nullptr ? nullptr : col + j, probe);
  }
  if (!(probe == 0.0f)) return false;

  // t0 (-inf when there are fewer blocks than c: every logit is a candidate).
  float t0 = kNegInf;
  if (c <= kSmallC) {
    // The c largest maxima by insertion into a short sorted list: a handful of moves per row,
    // where a selection algorithm's partitioning branches mispredict on every call.
    float largest[kSmallC];
    int64_t unused_blocks[kSmallC];
    float unused = kNegInf;
    TopList<float> best{largest, unused_blocks, c};
    for (int64_t b = 0; b < blocks; ++b) {
      if (best.accepts(maxima[b])) best.insert(maxima[b], b, unused);
    }
    if (best.full()) t0 = largest[c - 1];
  } else if (c <= blocks) {
    float* order = std::copy(maxima, maxima + blocks, maxima + blocks) - blocks;
    std::nth_element(order, order + (c - 1), order + blocks, std::greater<float>());
    t0 = order[c - 1];
  }
  const float below_t0 = std::nextafter(t0, kNegInf);  // v > below_t0 <=> v >= t0
  TopList<float> top{top_values, top_indices, c};
  float evicted = kNegInf;
  for (int64_t b = 0; b < blocks; ++b) {
    if (maxima[b] < t0) continue;
    const int64_t j = b * kBlock;
    const float* block = row + j;
    for (uint64_t mask = Ops::above(block, std::min(kBlock, K - j), below_t0); mask != 0; mask &= mask - 1) {
      const int64_t t = __builtin_ctzll(mask);
      if (top.accepts(block[t])) top.insert(block[t], j + t, evicted);
    }
  }
  if (K == c) {
    *lse_outside = kNegInf;
    return true;
  }

  const float threshold = top.values[c - 1];
  int64_t in_list = 0;  // copies of the threshold inside the list
  for (int64_t i = 0; i < c; ++i) in_list += top.values[i] == threshold;
  int64_t equal = 0;
  double sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k = b * kBlock, n = std::min(kBlock, K - k);
    sum += maxima[b] < threshold ? Ops::sum_all(row + k, n, threshold) : Ops::run(row + k, n, threshold, threshold, equal);
  }
  const int64_t equal_outside = equal - in_list;
  if (equal_outside > 0 || sum >= 0x1p-60) {
    *lse_outside = finish(threshold, sum + static_cast<double>(equal_outside));
    return true;
  }

  // Every outside logit lies far below t: shift by the largest of them instead.
  float outside_max = kNegInf;
#pragma omp simd reduction(max : outside_max)
  for (int64_t i = 0; i < K; ++i) {
    const float v = row[i] < threshold ? row[i] : kNegInf;
    outside_max = v > outside_max ? v : outside_max;
  }
  int64_t unused = 0;
  sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k = b * kBlock, n = std::min(kBlock, K - k);
    sum += maxima[b] < threshold ? Ops::sum_all(row + k, n, outside_max) : Ops::run(row + k, n, threshold, outside_max, unused);
  }
  *lse_outside = finish(outside_max, sum);
  return true;
}

// A whole row scaled in place (the negative-label groups' epilogue): scale_block over the row.
inline bool scale_row_f32_body(float* row, int64_t K, float scale, const float* col_scale) {
  float probe = 0.0f;
  scale_block(row, K, scale, col_scale, probe);
  return probe == 0.0f;
}

// Log-sum-exp of a whole row (a negative-label group): one vector max, then the blocked sum of
// exp(v - max) with the same exponential as the outside sum (every v is below +inf, so the
// block sum takes every element). The largest element adds exp(0) = 1, so the sum is >= 1.
template <typename BlockSum>
inline float lse_row_f32_body(const float* row, int64_t n) {
  constexpr int64_t kBlock = BlockSum::kBlock;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) max = row[j] > max ? row[j] : max;
  double sum = 0.0;
  for (int64_t j = 0; j < n; j += kBlock) sum += BlockSum::sum_all(row + j, std::min(kBlock, n - j), max);
  return finish(max, sum);
}

inline double sum_squares_f32_body(const float* row, int64_t D) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) {
    const double v = row[d];
    sum += v * v;
  }
  return sum;
}

enum class Isa { kDefault, kAvx2, kAvx512 };

// The best variant both the CPU and ATen's capability setting allow, decided once.
Isa select_isa() {
#if DK_X86_VARIANTS
  const std::string aten = at::get_cpu_capability();
  __builtin_cpu_init();
  if (aten == "AVX512" && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa chosen = select_isa();
  return chosen;
}

#if DK_X86_VARIANTS
DK_TARGET("avx512f,avx2,fma")
bool scale_reduce_row_f32_avx512(float* row, int64_t K, float scale, const float* col, int64_t c, float* tv,
                                 int64_t* ti, float* lse) {
  return scale_reduce_row_f32_body<GenericBlockSum>(row, K, scale, col, c, tv, ti, lse);
}
DK_TARGET("avx2,fma")
bool scale_reduce_row_f32_avx2(float* row, int64_t K, float scale, const float* col, int64_t c, float* tv,
                               int64_t* ti, float* lse) {
  return scale_reduce_row_f32_body<Avx2BlockSum>(row, K, scale, col, c, tv, ti, lse);
}
DK_TARGET("avx512f,avx2,fma")
bool scale_row_f32_avx512(float* row, int64_t K, float scale, const float* col_scale) {
  return scale_row_f32_body(row, K, scale, col_scale);
}
DK_TARGET("avx2,fma")
bool scale_row_f32_avx2(float* row, int64_t K, float scale, const float* col_scale) {
  return scale_row_f32_body(row, K, scale, col_scale);
}
DK_TARGET("avx512f,avx2,fma")
float lse_row_f32_avx512(const float* row, int64_t n) { return lse_row_f32_body<GenericBlockSum>(row, n); }
DK_TARGET("avx2,fma")
float lse_row_f32_avx2(const float* row, int64_t n) { return lse_row_f32_body<Avx2BlockSum>(row, n); }
DK_TARGET("avx512f,avx2,fma")
double sum_squares_f32_avx512(const float* row, int64_t D) { return sum_squares_f32_body(row, D); }
DK_TARGET("avx2,fma")
double sum_squares_f32_avx2(const float* row, int64_t D) { return sum_squares_f32_body(row, D); }
#endif

}  // namespace

bool scale_reduce_row_f32(float* row, int64_t K, float scale, const float* col_scale, int64_t c,
                          float* top_values, int64_t* top_indices, float* lse_outside) {
#if DK_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512:
      return scale_reduce_row_f32_avx512(row, K, scale, col_scale, c, top_values, top_indices, lse_outside);
    case Isa::kAvx2:
      return scale_reduce_row_f32_avx2(row, K, scale, col_scale, c, top_values, top_indices, lse_outside);
    case Isa::kDefault: break;
  }
#endif
  return scale_reduce_row_f32_body<PortableBlockSum>(row, K, scale, col_scale, c, top_values, top_indices,
                                                     lse_outside);
}

bool scale_row_f32(float* row, int64_t K, float scale, const float* col_scale) {
#if DK_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512: return scale_row_f32_avx512(row, K, scale, col_scale);
    case Isa::kAvx2: return scale_row_f32_avx2(row, K, scale, col_scale);
    case Isa::kDefault: break;
  }
#endif
  return scale_row_f32_body(row, K, scale, col_scale);
}

float lse_row_f32(const float* row, int64_t n) {
#if DK_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512: return lse_row_f32_avx512(row, n);
    case Isa::kAvx2: return lse_row_f32_avx2(row, n);
    case Isa::kDefault: break;
  }
#endif
  return lse_row_f32_body<PortableBlockSum>(row, n);
}

double lse_row_f64(const double* row, int64_t n) {
  double max = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) max = row[j] > max ? row[j] : max;
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(row[j] - max);
  return finish(max, sum);
}

double sum_squares_f32(const float* row, int64_t D) {
#if DK_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512: return sum_squares_f32_avx512(row, D);
    case Isa::kAvx2: return sum_squares_f32_avx2(row, D);
    case Isa::kDefault: break;
  }
#endif
  return sum_squares_f32_body(row, D);
}

const char* kernel_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kDefault: break;
  }
  return "default";
}

double reduce_row_f64(const double* row, int64_t K, int64_t c, double* top_values,
                      int64_t* top_indices) {
  TopList<double> top{top_values, top_indices, c};
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  for (int64_t j = 0; j < K; ++j) take_scalar(top, max, sum, row[j], j);
  return finish(max, sum);
}

bool scale_row_f64(double* row, int64_t K, double scale) {
  double probe = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    row[j] *= scale;
    probe += row[j] * 0.0;
  }
  return probe == 0.0;
}

double norm_f64(const double* row, int64_t D) {
  double largest = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double a = std::fabs(row[d]);
    if (std::isnan(a)) return a;
    if (a > largest) largest = a;
  }
  if (largest == 0.0 || std::isinf(largest)) return largest;
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = row[d] / largest;
    sum += v * v;
  }
  return largest * std::sqrt(sum);
}

}  // namespace cpu
}  // namespace deltakern
