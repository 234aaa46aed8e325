// Python entry point of deltakern._C. Importing the module runs the static
// TORCH_LIBRARY registrations of every translation unit linked into it; the
// functions below only report how the extension was built.
#include <torch/extension.h>

#include <string>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deltakern compiled kernels (ops are registered under torch.ops.deltakern)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("built_with_openmp", &built_with_openmp, "True when the CPU kernels use OpenMP.");
  m.def("torch_version", []() { return std::string(DELTAKERN_TORCH_VERSION); },
        "The torch version the extension was compiled against.");
}
