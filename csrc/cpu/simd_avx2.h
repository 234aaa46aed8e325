// AVX2+FMA building blocks shared by the CPU kernels (row_reduce.cpp, ebm_loss_host.cpp): GCC
// leaves their `omp simd` exponential loops scalar for AVX2 (it vectorises them only with AVX-512
// masks), so the hot exponentials are written with intrinsics once, here. Each function carries
// its own target attribute: callers pick them only when the CPU runs AVX2 (row_reduce.h's ISA
// choice), and the translation units stay buildable for baseline x86-64.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#include <immintrin.h>

namespace deltakern {
namespace cpu {

// exp_nonpositive (row_reduce.h) on 8 lanes: arguments below -87.3 are clamped, ~2 ulp. The clamp's
// operand order keeps a NaN argument NaN (max_ps returns its second operand when one is NaN).
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3365f), x);
  // x*log2(e) rounded to the nearest integer n by adding 1.5*2^23 (+127, the exponent bias): the
  // sum's low mantissa bits then hold n + 127 in [1, 127], which shifted into the exponent field
  // is 2^n, with no float-to-int conversion.
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 biased = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(biased, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23)));
}

// The sum of the 8 lanes.
__attribute__((target("avx2,fma"))) inline float sum_lanes_avx2(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

}  // namespace cpu
}  // namespace deltakern
#endif
