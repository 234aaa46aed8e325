// Which GEMM multiplies half-precision operands (bfloat16/float16 inputs, or float32 rows rounded
// to bfloat16 under matmul_precision "high"/"medium") with float32 accumulation and output, and
// MKL's mixed GEMM behind a function that is safe to call with a torch built without MKL.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace deltakern {
namespace cpu {

enum class HalfGemm {
  kMkl,         // MKL's mixed GEMM (cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32)
  kAvx512Bf16,  // this extension's AVX512-BF16 kernel, bfloat16 only (bf16_gemm_avx512.h)
};

// The half GEMM for dtype t (bfloat16 or float16) as DELTAKERN_CPU_HALF_GEMM asks: "auto" (or
// unset) picks by CPU, "mkl", "avx512_bf16" and "float32" force one for tests and benchmarks.
// nullopt means the float32 conversion. Raises for an unknown value, and for avx512_bf16 where
// the kernel cannot run.
std::optional<HalfGemm> requested_half_gemm(at::ScalarType t);

// "mkl", "avx512_bf16" or "float32" (nullopt), as `deltakern env` reports the choice.
std::string half_gemm_name(std::optional<HalfGemm> gemm);

// Whether the torch this extension runs with exports MKL's mixed GEMM for dtype t.
bool mkl_mixed_gemm_linked(at::ScalarType t);

// out[r * ldo + k] = x[r * ldx + :] · w[k * ldw + :] for r < rows, k < K, through MKL's mixed GEMM
// (requires mkl_mixed_gemm_linked(t); MKL threads it unless called inside a parallel region).
void mkl_mixed_gemm(at::ScalarType t, int rows, int K, int D, const void* x, int ldx, const void* w, int ldw,
                    float* out, int ldo);

}  // namespace cpu
}  // namespace deltakern
