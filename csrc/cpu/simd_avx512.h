// The AVX-512 operations of the ISA-generic vector kernels (cpu/indirect_gemm_kernel.h,
// cpu/fused_mix_gemm_kernel.h): 16 float lanes, 32 registers. Only included where AVX-512 code is
// generated (cpu/vector_kernels_avx512.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace condkernels::cpu {

struct Avx512 {
  using Vec = __m512;
  using Mask = __mmask16;  // one bit per lane
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;

  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec broadcast(float f) { return _mm512_set1_ps(f); }
  static Vec load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
  static Vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load_first(const float* p, int n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
  static void store(float* p, Vec v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, Vec v) { _mm512_stream_ps(p, v); }  // past the caches; 64-byte aligned
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }

  static Mask all_lanes() { return static_cast<Mask>(0xFFFF); }
  static Mask first_lanes(int n) { return n >= 16 ? all_lanes() : static_cast<Mask>((1u << n) - 1u); }
  // The lanes of a vector starting at pixel 8j, from masks of 8 pixels each.
  static Mask mask_of_octets(const uint8_t* octets, int64_t j) {
    return static_cast<Mask>(octets[j] | (octets[j + 1] << 8));
  }
  static void store_lanes(float* p, Mask lanes, Vec v) { _mm512_mask_storeu_ps(p, lanes, v); }
  // The lanes of `keep`, packed together, to p[0 .. popcount(keep)).
  static void store_compressed(float* p, Mask keep, Vec v) {
    _mm512_mask_storeu_ps(p, first_lanes(__builtin_popcount(keep)), _mm512_maskz_compress_ps(keep, v));
  }

  // rows[c] <- column c of the 16 x 16 block rows[0..15].
  static void transpose(Vec rows[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    __m512 q[16];  // q[4i + j], 128-bit lane L: rows 4i..4i+3 at column 4L + j
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      q[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      q[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      q[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      q[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 u0 = _mm512_shuffle_f32x4(q[j], q[4 + j], 0x88);
      const __m512 u1 = _mm512_shuffle_f32x4(q[j], q[4 + j], 0xDD);
      const __m512 u2 = _mm512_shuffle_f32x4(q[8 + j], q[12 + j], 0x88);
      const __m512 u3 = _mm512_shuffle_f32x4(q[8 + j], q[12 + j], 0xDD);
      rows[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
      rows[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
      rows[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
      rows[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
  }
};

}  // namespace condkernels::cpu
