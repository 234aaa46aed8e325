// Python entry point of deltakern._C. Importing the module runs the static
// TORCH_LIBRARY registrations of every translation unit linked into it; the
// functions below only report how the extension was built.
#include <torch/extension.h>

#include <string>

#include "cpu/bf16_gemm_avx512.h"
#include "cpu/half_gemm.h"

// setup.py and CMakeLists.txt pass the version of the torch they build against.
#ifndef DELTAKERN_TORCH_VERSION
#define DELTAKERN_TORCH_VERSION "unknown"
#endif

namespace {

bool built_with_cuda() {
#ifdef DELTAKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// The GEMM the CPU ops multiply same-dtype half inputs with, as DELTAKERN_CPU_HALF_GEMM and this
// CPU decide: "avx512_bf16", "mkl" or "float32" (the conversion).
std::string cpu_half_gemm(const std::string& dtype) {
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "cpu_half_gemm: dtype must be 'bfloat16' or 'float16', got '",
              dtype, "'");
  return deltakern::cpu::half_gemm_name(
      deltakern::cpu::requested_half_gemm(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deltakern compiled kernels (ops are registered under torch.ops.deltakern)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("built_with_openmp", &built_with_openmp, "True when the CPU kernels use OpenMP.");
  m.def("torch_version", []() { return std::string(DELTAKERN_TORCH_VERSION); },
        "The torch version the extension was compiled against.");
  m.def("cpu_half_gemm", &cpu_half_gemm, py::arg("dtype"),
        "The GEMM the CPU ops use for same-dtype 'bfloat16' or 'float16' inputs on this machine: "
        "'avx512_bf16' (deltakern's kernel), 'mkl' (MKL's mixed GEMM) or 'float32' (rows converted "
        "in cache). Follows DELTAKERN_CPU_HALF_GEMM.");
  m.def("avx512_bf16_usable", &deltakern::cpu::avx512_bf16_usable,
        "True when deltakern's AVX512-BF16 GEMM can run here (the CPU has AVX512-BF16 and "
        "ATEN_CPU_CAPABILITY allows AVX-512).");
}
