// Ascending sort of short runs of 64-bit items, as batch_shaping_loss sorts each gate column: its
// (order key << 32 | batch row) items, whose ties then keep batch order. A bitonic network over
// the lanes of AVX-512 registers where the CPU has them (cpu/small_sort_avx512.cpp): for columns of
// a few hundred values the radix sort's four passes, each a chain of increments of a few shared
// counters, cost more than the network's fixed ~n log^2 n / 16 vector operations.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"

namespace condkernels::cpu {

// The longest run the network sorts (padded to the next power of two).
constexpr int64_t kMaxSmallSort = 256;

// Sorts items[0 .. n) ascending in place, n <= kMaxSmallSort.
using SmallSort = void (*)(uint64_t* items, int64_t n);

void small_sort_avx512(uint64_t* items, int64_t n);

// The network for the CPU's instruction set (capped by CONDKERNELS_CPU_ISA), or null.
inline SmallSort small_sort_kernel() {
  return vector_isa() == VectorIsa::kAvx512 ? small_sort_avx512 : nullptr;
}

}  // namespace condkernels::cpu
