// What the CPU running the kernels supports, checked once: the AVX-512 kernels are built with
// target attributes and chosen at run time, so one binary also runs on CPUs without them.
#pragma once

namespace condkernels {
namespace cpu {

inline bool has_avx512f() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace condkernels
