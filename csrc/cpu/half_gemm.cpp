// The half-GEMM choice of half_gemm.h.
#include "half_gemm.h"

#include <ATen/cpu/Utils.h>

#include <cstdlib>
#include <utility>

#include "bf16_gemm_avx512.h"
#include "cpu_features.h"

// MKL's mixed-precision GEMMs, exported by the MKL that x86 builds of torch link statically.
// Declared weak so the extension also loads with a torch that has no MKL (the pointers are then
// null and half inputs take the float32 path). Row-major = 101, no transpose = 111, transpose = 112.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const void* a, int lda, const void* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const void* a, int lda, const void* b, int ldb, float beta, float* c,
                          int ldc) __attribute__((weak));
}

namespace deltakern {
namespace cpu {
namespace {

using MixedGemm = decltype(&cblas_gemm_bf16bf16f32);

MixedGemm mixed_gemm(at::ScalarType t) {
  if (t == at::kBFloat16) return cblas_gemm_bf16bf16f32;
  if (t == at::kHalf) return cblas_gemm_f16f16f32;
  return nullptr;
}

// The half GEMM that "auto" picks for dtype t, or nullopt for the float32 conversion. MKL's mixed
// GEMM where the CPU has AMX (tile instructions, far more throughput than any vector kernel) or,
// for float16, AVX512-FP16; this extension's kernel for bfloat16 on CPUs with AVX512-BF16 and no
// AMX-BF16 (MKL has no native path there on every vendor: on an AMD Zen 4 its bf16 GEMM ran ~2x
// slower than the float32 GEMM). Everything requires ATen's capability setting to allow AVX-512
// (ATEN_CPU_CAPABILITY=avx2 or default turns the native paths off, as it does for PyTorch's own
// kernels). Decided once per process.
std::optional<HalfGemm> auto_half_gemm(at::ScalarType t) {
  static const auto probe = [] {
    const bool avx512 = aten_allows_avx512();
    const bool amx_bf16 = avx512 && cpu_flag("amx_bf16");
    const bool mkl_f16 = avx512 && (cpu_flag("amx_fp16") || cpu_flag("avx512_fp16"));
    if (cpu_flag("amx_tile") && (amx_bf16 || mkl_f16)) at::cpu::init_amx();  // asks the OS for the AMX state
    std::optional<HalfGemm> bf16, f16;
    if (amx_bf16 && mixed_gemm(at::kBFloat16) != nullptr) bf16 = HalfGemm::kMkl;
    else if (avx512_bf16_usable()) bf16 = HalfGemm::kAvx512Bf16;
    if (mkl_f16 && mixed_gemm(at::kHalf) != nullptr) f16 = HalfGemm::kMkl;
    return std::pair{bf16, f16};
  }();
  if (t == at::kBFloat16) return probe.first;
  return t == at::kHalf ? probe.second : std::nullopt;
}

}  // namespace

bool mkl_mixed_gemm_linked(at::ScalarType t) { return mixed_gemm(t) != nullptr; }

void mkl_mixed_gemm(at::ScalarType t, int rows, int K, int D, const void* x, int ldx, const void* w, int ldw,
                    float* out, int ldo) {
  const MixedGemm gemm = mixed_gemm(t);
  TORCH_CHECK(gemm != nullptr, "MKL's mixed GEMM for ", t, " is not linked into this torch");
  gemm(101, 111, 112, rows, K, D, 1.0f, x, ldx, w, ldw, 0.0f, out, ldo);
}

std::optional<HalfGemm> requested_half_gemm(at::ScalarType t) {
  const char* env = std::getenv("DELTAKERN_CPU_HALF_GEMM");
  const std::string mode = env == nullptr ? "" : env;
  if (mode.empty() || mode == "auto") return auto_half_gemm(t);
  if (mode == "float32") return std::nullopt;
  if (mode == "mkl") return mixed_gemm(t) != nullptr ? std::optional{HalfGemm::kMkl} : std::nullopt;
  TORCH_CHECK(mode == "avx512_bf16", "DELTAKERN_CPU_HALF_GEMM must be auto, mkl, avx512_bf16 or float32, got '",
              mode, "'");
  TORCH_CHECK(avx512_bf16_usable(), "DELTAKERN_CPU_HALF_GEMM=avx512_bf16 needs AVX512-BF16, which this CPU lacks "
              "or ATEN_CPU_CAPABILITY turned off (ATen's AVX-512 kernels must be allowed)");
  return t == at::kBFloat16 ? std::optional{HalfGemm::kAvx512Bf16} : std::nullopt;
}

std::string half_gemm_name(std::optional<HalfGemm> gemm) {
  if (!gemm) return "float32";
  return *gemm == HalfGemm::kMkl ? "mkl" : "avx512_bf16";
}

}  // namespace cpu
}  // namespace deltakern
