// A bfloat16 GEMM with float32 accumulation and float32 output for CPUs with AVX512-BF16
// (vdpbf16ps), used by the fused CPU ops for bfloat16 inputs (and for float32 rows rounded to
// bfloat16 under matmul_precision "high"/"medium") where MKL's mixed GEMM has no native code
// path: MKL runs cblas_gemm_bf16bf16f32 with bf16 instructions on Intel CPUs only, and on an
// AMD Zen 4 (AVX512-BF16, no AMX) it was ~2x slower than the float32 GEMM, whereas this kernel
// is ~2.5x faster than it (bench/RESULTS.md).
//
// out[r, k] = sum_d x[r, d] * w[k, d]: each product of two bfloat16 values is exact in float32
// and vdpbf16ps adds them in float32, so the result is as accurate as a float32 GEMM of the
// same values (denormal products are flushed to zero; the ops send rows whose norms lie outside
// [2^-30, 2^30] to the float32 GEMM, so a flushed product is below 2^-66 of the dot product's
// scale).
//
// The translation unit compiles for baseline x86-64: the kernel functions carry their own target
// attribute and are called only after avx512_bf16_usable() said yes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace deltakern {
namespace cpu {

// True when the kernel was compiled in (x86-64 with a compiler that knows AVX512-BF16), the CPU
// has AVX512-BF16, and ATen's CPU capability allows AVX-512 kernels (ATEN_CPU_CAPABILITY=avx2 or
// default turns it off, as it does for PyTorch's own kernels). Decided once per process.
bool avx512_bf16_usable();

// W [K, D] (bfloat16, any strides) in the kernel's layout: blocks of 16 classes, each holding
// ceil(D/2) pairs of dimensions, each pair 16 classes x 2 consecutive dimensions (one 64-byte
// vector); missing classes and the odd dimension are zero.
struct Bf16PackedClasses {
  at::Tensor data;  // [ceil(K/16), ceil(D/2), 16, 2] bfloat16
  int64_t K = 0;
  int64_t D = 0;
};

Bf16PackedClasses pack_bf16_classes(const at::Tensor& w);

// out[r * ldo + k] = x[r * ldx + :] · w[k, :] for r < rows, k < K, single-threaded (the ops run it
// inside their own parallel region). x holds `rows` rows of D bfloat16 values, ldx apart.
// Requires avx512_bf16_usable().
void bf16_gemm_avx512(const Bf16PackedClasses& w, const at::BFloat16* x, int64_t rows, int64_t ldx,
                      float* out, int64_t ldo);

}  // namespace cpu
}  // namespace deltakern
