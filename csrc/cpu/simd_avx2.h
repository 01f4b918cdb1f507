// The AVX2 + FMA operations of the ISA-generic vector kernels (cpu/indirect_gemm_kernel.h,
// cpu/fused_mix_gemm_kernel.h): 8 float lanes, 16 registers, no mask registers (lane masks are
// bits, turned into vector masks where stored) and no compress (a permutation table instead). Only
// included where AVX2 code is generated (cpu/vector_kernels_avx2.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace condkernels::cpu {

namespace avx2_detail {

// kCompress.lanes[m]: the lanes set in m, in order, then zeros: the permutation that packs them.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
};

constexpr CompressTable make_compress_table() {
  CompressTable t{};
  for (int m = 0; m < 256; ++m) {
    int k = 0;
    for (int lane = 0; lane < 8; ++lane)
      if ((m >> lane) & 1) t.lanes[m][k++] = lane;
  }
  return t;
}

inline constexpr CompressTable kCompress = make_compress_table();

}  // namespace avx2_detail

struct Avx2 {
  using Vec = __m256;
  using Mask = uint32_t;  // one bit per lane
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;

  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec broadcast(float f) { return _mm256_set1_ps(f); }
  static Vec load(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
  static Vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load_first(const float* p, int n) { return _mm256_maskload_ps(p, lane_vector(first_lanes(n))); }
  static void store(float* p, Vec v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, Vec v) { _mm256_stream_ps(p, v); }  // past the caches; 32-byte aligned
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }

  static Mask all_lanes() { return 0xFFu; }
  static Mask first_lanes(int n) { return n >= 8 ? all_lanes() : (1u << n) - 1u; }
  static Mask mask_of_octets(const uint8_t* octets, int64_t j) { return octets[j]; }
  static void store_lanes(float* p, Mask lanes, Vec v) {
    if (lanes == all_lanes()) _mm256_storeu_ps(p, v);
    else if ((lanes & (lanes + 1)) == 0) store_first(p, __builtin_popcount(lanes), v);
    else _mm256_maskstore_ps(p, lane_vector(lanes), v);
  }
  static void store_compressed(float* p, Mask keep, Vec v) {
    if (keep == all_lanes()) return _mm256_storeu_ps(p, v);
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(avx2_detail::kCompress.lanes[keep]));
    store_first(p, __builtin_popcount(keep), _mm256_permutevar8x32_ps(v, order));
  }
  // Lanes [0, n) of v at p (n < 8) as plain stores of 4, 2 and 1 lanes: a masked store
  // (vmaskmovps) took about 13 cycles more than these on an AMD EPYC (Zen 3; one-off).
  static void store_first(float* p, int n, Vec v) {
    __m128 part = _mm256_castps256_ps128(v);
    if (n >= 4) {
      _mm_storeu_ps(p, part);
      part = _mm256_extractf128_ps(v, 1);
      p += 4, n -= 4;
    }
    if (n >= 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
      part = _mm_movehl_ps(part, part);
      p += 2, n -= 2;
    }
    if (n > 0) _mm_store_ss(p, part);
  }

  // rows[c] <- column c of the 8 x 8 block rows[0..7].
  static void transpose(Vec rows[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      rows[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
      rows[4 + j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
    }
  }

 private:
  // All ones in the lanes set in `lanes`, for the masked loads and stores.
  static __m256i lane_vector(Mask lanes) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lanes)), bit), bit);
  }
};

}  // namespace condkernels::cpu
