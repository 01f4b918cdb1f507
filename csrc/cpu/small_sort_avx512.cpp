// The bitonic network of cpu/small_sort.h in AVX-512 (AVX-512F: 64-bit unsigned min/max), 8 items
// per register. Only this file is compiled for AVX-512; small_sort_kernel() calls it on CPUs that
// have it.
#include "cpu/small_sort.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <cstring>
#include <limits>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif

namespace condkernels::cpu {
namespace {

constexpr int kLanes = 8;

// Lane l's partner in a step of distance j < 8: lane l ^ j.
template <int J>
inline __m512i partners(__m512i v) {
  if constexpr (J == 4) return _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(1, 0, 3, 2));  // 256-bit halves
  if constexpr (J == 2) return _mm512_permutex_epi64(v, _MM_SHUFFLE(1, 0, 3, 2));    // pairs in halves
  if constexpr (J == 1) return _mm512_permutex_epi64(v, _MM_SHUFFLE(2, 3, 0, 1));    // neighbours
}

// Lanes l with (l & bit) == 0, bit < 8.
constexpr __mmask8 lanes_without(int bit) {
  __mmask8 m = 0;
  for (int l = 0; l < kLanes; ++l)
    if ((l & bit) == 0) m = static_cast<__mmask8>(m | (1u << l));
  return m;
}

// A compare-exchange of every lane with lane ^ J: the lanes in take_min keep the smaller item.
template <int J>
inline __m512i exchange(__m512i v, __mmask8 take_min) {
  const __m512i p = partners<J>(v);
  return _mm512_mask_blend_epi64(take_min, _mm512_max_epu64(v, p), _mm512_min_epu64(v, p));
}

// The steps of the network that stay within a register: at distances 4, 2, 1 the first lane of
// each pair takes the smaller item where ascending. A register's items form a bitonic sequence
// at this point, so these steps sort it.
inline __m512i merge_lanes(__m512i v, bool ascending) {
  const __mmask8 flip = ascending ? 0 : 0xFF;
  v = exchange<4>(v, lanes_without(4) ^ flip);
  v = exchange<2>(v, lanes_without(2) ^ flip);
  return exchange<1>(v, lanes_without(1) ^ flip);
}

// The network's first stages (runs of 2, 4, 8): the register's 8 items sorted, ascending or not.
inline __m512i sort_lanes(__m512i v, bool ascending) {
  // Runs of 2 ascending where (lane & 2) == 0, of 4 where (lane & 4) == 0: the lanes taking the
  // smaller item are those where "first of the pair" and "ascending" agree.
  v = exchange<1>(v, static_cast<__mmask8>(~(lanes_without(1) ^ lanes_without(2))));
  v = exchange<2>(v, static_cast<__mmask8>(~(lanes_without(2) ^ lanes_without(4))));
  v = exchange<1>(v, static_cast<__mmask8>(~(lanes_without(1) ^ lanes_without(4))));
  return merge_lanes(v, ascending);
}

// Bitonic sort of V registers' items (item i = lane i % 8 of register i / 8): every run of 2k is
// merged from two runs of k sorted in opposite directions, ascending where (i & 2k) == 0.
template <int V>
inline void sort_registers(__m512i* v) {
#pragma GCC unroll 32
  for (int a = 0; a < V; ++a) v[a] = sort_lanes(v[a], (a & 1) == 0);
  for (int k = 2 * kLanes; k <= V * kLanes; k *= 2) {
    for (int j = k / 2; j >= kLanes; j /= 2) {
      const int jv = j / kLanes;
#pragma GCC unroll 32
      for (int a = 0; a < V; ++a) {
        const int b = a ^ jv;
        if (b < a) continue;
        const __m512i lo = _mm512_min_epu64(v[a], v[b]), hi = _mm512_max_epu64(v[a], v[b]);
        const bool ascending = ((a * kLanes) & k) == 0;
        v[a] = ascending ? lo : hi;
        v[b] = ascending ? hi : lo;
      }
    }
#pragma GCC unroll 32
    for (int a = 0; a < V; ++a) v[a] = merge_lanes(v[a], ((a * kLanes) & k) == 0);
  }
}

template <int V>
void sort_padded(uint64_t* buf) {
  __m512i v[V];
  for (int a = 0; a < V; ++a) v[a] = _mm512_load_si512(buf + a * kLanes);
  sort_registers<V>(v);
  for (int a = 0; a < V; ++a) _mm512_store_si512(buf + a * kLanes, v[a]);
}

}  // namespace

void small_sort_avx512(uint64_t* items, int64_t n) {
  static_assert(kMaxSmallSort == 32 * kLanes, "one case per register count");
  if (n <= 1) return;
  int64_t size = kLanes;
  while (size < n) size *= 2;
  alignas(64) uint64_t buf[kMaxSmallSort];
  std::memcpy(buf, items, n * sizeof(uint64_t));
  for (int64_t i = n; i < size; ++i) buf[i] = std::numeric_limits<uint64_t>::max();  // sorts last
  switch (size / kLanes) {
    case 1: sort_padded<1>(buf); break;
    case 2: sort_padded<2>(buf); break;
    case 4: sort_padded<4>(buf); break;
    case 8: sort_padded<8>(buf); break;
    case 16: sort_padded<16>(buf); break;
    default: sort_padded<32>(buf); break;
  }
  std::memcpy(items, buf, n * sizeof(uint64_t));
}

}  // namespace condkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // no x86-64: vector_isa() is kNone, so this is never called

namespace condkernels::cpu {
void small_sort_avx512(uint64_t*, int64_t) {}
}  // namespace condkernels::cpu

#endif
