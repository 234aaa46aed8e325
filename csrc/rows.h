// Small helpers every op shares: the accumulation dtype and row preparation.
#pragma once

#include <ATen/ATen.h>

namespace deltakern {

// float64 when either input is float64, else float32 (half inputs accumulate in float32).
inline at::ScalarType accumulation_type(const at::Tensor& x, const at::Tensor& w) {
  return (x.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble) ? at::kDouble
                                                                             : at::kFloat;
}

// Rows upcast to the accumulation dtype (a new tensor; the caller's is never written) and scaled
// to unit L2 norm when asked: the same operations as deltakern.reference.prepare, so every path
// sees identical products.
inline at::Tensor prepare_rows(const at::Tensor& rows, at::ScalarType acc, bool normalize) {
  at::Tensor out = rows.to(acc);
  if (normalize) out = out / at::linalg_vector_norm(out, 2, {1}, /*keepdim=*/true);
  return out.contiguous();
}

}  // namespace deltakern
