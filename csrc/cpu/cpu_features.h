// What the CPU offers the kernels, as ATen sees it: cpuinfo's instruction flags and ATen's
// capability setting (ATEN_CPU_CAPABILITY=avx2 or default turns AVX-512 kernels off, for
// PyTorch's own kernels and for deltakern's alike).
#pragma once

#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>

namespace deltakern {
namespace cpu {

// True when cpuinfo reports the instruction-set flag `name` (for example "avx512_bf16", "amx_bf16").
inline bool cpu_flag(const char* name) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// True when ATen's capability setting allows AVX-512 kernels in this process.
inline bool aten_allows_avx512() { return at::get_cpu_capability() == "AVX512"; }

}  // namespace cpu
}  // namespace deltakern
