// The vector instruction set the hand-written CPU kernels run with, checked at run time: the
// extension is built for baseline x86-64, and each vector kernel is compiled once per instruction
// set (cpu/vector_kernels_avx512.cpp, cpu/vector_kernels_avx2.cpp) and picked here, so one binary
// runs everywhere and uses what the CPU has.
#pragma once

#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace condkernels {
namespace cpu {

enum class VectorIsa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// What the CPU supports: AVX-512F, else AVX2 with FMA, else none (the callers' library paths).
inline VectorIsa hardware_vector_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const VectorIsa isa = __builtin_cpu_supports("avx512f") ? VectorIsa::kAvx512
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? VectorIsa::kAvx2
                                                                                                  : VectorIsa::kNone;
  return isa;
#else
  return VectorIsa::kNone;
#endif
}

// Whether the CPU is an AMD one (a few thresholds were measured to differ from Intel CPUs').
inline bool cpu_is_amd() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

// The CPU's instruction set, capped by CONDKERNELS_CPU_ISA=avx512|avx2|none when set (as oneDNN's
// ONEDNN_MAX_CPU_ISA): to test or time the AVX2 kernels on an AVX-512 CPU, or the library paths
// on any. Read on every call, so that a test can change it between calls.
inline VectorIsa vector_isa() {
  const VectorIsa hardware = hardware_vector_isa();
  const char* cap = std::getenv("CONDKERNELS_CPU_ISA");
  if (cap == nullptr) return hardware;
  VectorIsa limit;
  if (std::strcmp(cap, "avx512") == 0) limit = VectorIsa::kAvx512;
  else if (std::strcmp(cap, "avx2") == 0) limit = VectorIsa::kAvx2;
  else if (std::strcmp(cap, "none") == 0) limit = VectorIsa::kNone;
  else TORCH_CHECK(false, "CONDKERNELS_CPU_ISA must be avx512, avx2 or none, got '", cap, "'");
  return static_cast<int>(limit) < static_cast<int>(hardware) ? limit : hardware;
}

// The L2 cache of one core in bytes, which the kernels size their cache blocks by: it differs
// fourfold between the machines this runs on (512 KB per core on AMD Zen 3, 2 MB on Intel Xeon
// Sapphire Rapids). 1 MB where the C library cannot tell.
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t reported = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    reported = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return reported > 0 ? std::clamp<int64_t>(reported, int64_t(256) << 10, int64_t(4) << 20) : int64_t(1) << 20;
  }();
  return bytes;
}

}  // namespace cpu
}  // namespace condkernels
