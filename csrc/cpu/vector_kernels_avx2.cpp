// The hand-written vector kernels compiled for AVX2 + FMA: the extension is built for baseline
// x86-64, so this file alone generates AVX2 + FMA code, and cpu_features.h picks it at run time on
// CPUs that have it. Everything not compiled for AVX2 + FMA is included before the target is set
// (an inline function first compiled under it could be the copy the linker keeps for all callers).
#include "cpu/fused_mix_gemm.h"
#include "cpu/indirect_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "cpu/fused_mix_gemm_kernel.h"
#include "cpu/indirect_gemm_kernel.h"
#include "cpu/simd_avx2.h"

namespace condkernels::cpu {

void indirect_gemm_avx2(const IndirectRows& rows, const IndirectCols& in, int64_t positions) {
  indirect::gemm<Avx2>(rows, in, positions);
}

namespace fused_mix_gemm {
void run_block_avx2(const Problem& pb, int64_t c0, float* staged, float* panels, float* acc) {
  run_block<Avx2>(pb, c0, staged, panels, acc);
}
}  // namespace fused_mix_gemm

}  // namespace condkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // no x86-64 vector kernels: vector_isa() is kNone, so these are never called

namespace condkernels::cpu {
void indirect_gemm_avx2(const IndirectRows&, const IndirectCols&, int64_t) {}
namespace fused_mix_gemm {
void run_block_avx2(const Problem&, int64_t, float*, float*, float*) {}
}  // namespace fused_mix_gemm
}  // namespace condkernels::cpu

#endif
