// Per-row kernels shared by the CPU ops: the one-pass top-c + outside log-sum-exp reduction,
// the epilogue that turns a row of raw dot products into logits, and robust row norms.
//
// Why one pass with an "outside" sum: ΔEnergy needs log-sum-exps of a row with its top
// entries replaced. Subtracting exp(top) from the full sum loses every digit for confident
// rows (top-1 probability ~ 1 - 1e-12), so the sum of the *remaining* terms is kept directly:
// an element enters the outside sum when it is read below the current top-c threshold, or
// when it is pushed out of the top-c list by a larger one.
//
// The float kernels are compiled for several instruction sets (AVX-512, AVX2+FMA, baseline
// x86-64) and picked once per process: the best one the CPU runs AND ATen's CPU capability
// allows, so ATEN_CPU_CAPABILITY=default (or avx2) forces the portable code, as it does for
// PyTorch's own kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace deltakern {
namespace cpu {

// Running log-sum-exp as (max, sum of exp(v - max)), with the sum in double so that K in the
// tens of thousands adds no visible rounding.
struct OnlineLse {
  float max = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
};

// exp(x) for x <= 0, branch-free so the compiler vectorises the loops that call it
// (Cephes-style range reduction plus a degree-6 polynomial, ~2 ulp). Arguments below
// -87.3 are clamped: their terms are < 1.2e-38 of a sum that is >= 1.
inline float exp_nonpositive(float x) {
  x = x < -87.3365f ? -87.3365f : x;
  // Round x*log2(e) to the nearest integer with the 1.5*2^23 trick (vectorises everywhere).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// The epilogue of a GEMM on rows as given, for one row: row[j] = (row[j] * col_scale[j]) * scale
// in place (col_scale may be null: row[j] * scale), then the row of logits is reduced in the
// same visit: top_values/top_indices (length c, 1 <= c <= K) receive the sorted top-c (ties:
// lower index first) and lse_outside the log-sum-exp of the other K - c logits (-inf when
// K == c). Returns false (outputs unspecified) when any logit is NaN or ±inf, which is how a
// non-finite input or an overflowing logit is caught without a pass of its own.
bool scale_reduce_row_f32(float* row, int64_t K, float scale, const float* col_scale, int64_t c,
                          float* top_values, int64_t* top_indices, float* lse_outside);

// Same for double logits (float64 inputs: the oracle path, plain scalar code).
double reduce_row_f64(const double* row, int64_t K, int64_t c, double* top_values,
                      int64_t* top_indices);

// Log-sum-exp of all n >= 1 finite logits of a row (a negative-label group of the NegLabel
// state), accumulated in double like the outside sum.
float lse_row_f32(const float* row, int64_t n);
double lse_row_f64(const double* row, int64_t n);

// The epilogue of a GEMM on rows as given: row[j] = (row[j] * col_scale[j]) * scale in place
// (col_scale may be null: row[j] * scale). Returns false when any result is NaN or ±inf, which
// is how a non-finite input or an overflowing logit is caught without a pass of its own.
bool scale_row_f32(float* row, int64_t K, float scale, const float* col_scale);
bool scale_row_f64(double* row, int64_t K, double scale);

// Sum of squares of a float row accumulated in double: the square of every finite float,
// subnormals included, is a normal double, so it neither underflows nor overflows (a NaN or
// ±inf entry gives NaN or +inf).
double sum_squares_f32(const float* row, int64_t D);

// L2 norm of a double row without underflow or premature overflow: the row is scaled by its
// largest magnitude first. NaN when the row holds a NaN, +inf for ±inf entries or a norm past
// float64's range, 0 for a zero row.
double norm_f64(const double* row, int64_t D);

// Which variant the float kernels use in this process: "avx512", "avx2" or "default".
const char* kernel_isa();

}  // namespace cpu
}  // namespace deltakern
