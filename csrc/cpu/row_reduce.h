// Per-row one-pass reduction shared by the CPU kernels: the sorted top-c logits of a row
// and the log-sum-exp of every logit outside that top-c list.
//
// Why one pass with an "outside" sum: ΔEnergy needs log-sum-exps of a row with its top
// entries replaced. Subtracting exp(top) from the full sum loses every digit for confident
// rows (top-1 probability ~ 1 - 1e-12), so the sum of the *remaining* terms is kept directly:
// an element enters the outside sum when it is read below the current top-c threshold, or
// when it is pushed out of the top-c list by a larger one.
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

// Reduce one row of float logits. top_values/top_indices (length c) receive the sorted
// top-c (ties: lower index first); returns the log-sum-exp of the other K - c logits
// (-inf when K == c). Defined in row_reduce.cpp, compiled for several ISAs.
float reduce_row_f32(const float* row, int64_t K, int64_t c, float* top_values,
                     int64_t* top_indices);

// Same for double logits (float64 inputs: the oracle path, plain scalar code).
double reduce_row_f64(const double* row, int64_t K, int64_t c, double* top_values,
                      int64_t* top_indices);

}  // namespace cpu
}  // namespace deltakern
