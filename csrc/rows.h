// Small helpers every op shares: the accumulation dtype and row preparation.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

namespace deltakern {

// float64 when either input is float64, else float32 (half inputs accumulate in float32).
inline at::ScalarType accumulation_type(const at::Tensor& x, const at::Tensor& w) {
  return (x.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble) ? at::kDouble
                                                                             : at::kFloat;
}

// Per row [N] int64: the e for which 2^e * max|row| lies in [0.5, 1) (0 for an all-zero row),
// as deltakern.core.dtypes.unit_row_exponents. The maximum is exact (it never under- or
// overflows); the clamp only bounds the garbage frexp may return for NaN or inf rows.
inline at::Tensor unit_row_exponents(const at::Tensor& rows) {
  const at::Tensor amax = at::linalg_vector_norm(rows, INFINITY, {1}, /*keepdim=*/false);
  return -std::get<1>(at::frexp(amax)).to(at::kLong).clamp(-1074, 1074);
}

// 2^e in `dtype` from int64 exponents in [-1022, 1023], exact: built from float64's bit pattern.
inline at::Tensor powers_of_two(const at::Tensor& e, at::ScalarType dtype) {
  return at::bitwise_left_shift(e + 1023, 52).view(at::kDouble).to(dtype);
}

// rows (a new tensor) with row n multiplied by 2^e[n]: exact, in two halves so that each factor
// is representable in the rows' dtype (a float32 row of subnormals needs 2^149).
inline at::Tensor rescale_rows(const at::Tensor& rows, const at::Tensor& e) {
  const at::Tensor first = at::div(e, 2, "floor");
  const at::Tensor second = e - first;
  return rows * powers_of_two(first, rows.scalar_type()).unsqueeze(1) *
         powers_of_two(second, rows.scalar_type()).unsqueeze(1);
}

// Rows upcast to the accumulation dtype (a new tensor; the caller's is never written) and scaled
// to unit L2 norm when asked: the same operations as deltakern.core.dtypes.prepare_rows, so every
// path sees identical products. The norm is taken of the row rescaled by a power of two (exact):
// a plain sum of squares underflows for tiny rows (float32 entries of 1e-23 square to 0) and
// overflows for huge ones.
inline at::Tensor prepare_rows(const at::Tensor& rows, at::ScalarType acc, bool normalize) {
  at::Tensor out = rows.to(acc);
  if (normalize) {
    out = rescale_rows(out, unit_row_exponents(out));
    out = out / at::linalg_vector_norm(out, 2, {1}, /*keepdim=*/true);
  }
  return out.contiguous();
}

// g / |v| row by row (g and v [N, D] in the same dtype), without under- or overflow of the norm:
// g / |v 2^e| * 2^e with the exact power-of-two rescaling above.
inline at::Tensor divide_by_row_norms(const at::Tensor& g, const at::Tensor& v) {
  const at::Tensor e = unit_row_exponents(v);
  const at::Tensor scaled_norm = at::linalg_vector_norm(rescale_rows(v, e), 2, {1}, true);
  return rescale_rows(g / scaled_norm, e);
}

}  // namespace deltakern
