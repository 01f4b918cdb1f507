// Row primitives of the CPU convolution kernels: the innermost loops, compiled once per instruction
// set (AVX-512, AVX2+FMA, baseline) and picked at load time, because the extension itself is built
// for the baseline x86-64 that only has SSE2.
//
// Accumulators are float for float and bfloat16 data (bfloat16 accumulates in float) and double for
// double data.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "cpu/cpu_features.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CK_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define CK_MULTIVERSION_BELOW_AVX512 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CK_MULTIVERSION
#define CK_TARGET_AVX512
#define CK_MULTIVERSION_BELOW_AVX512
#endif

namespace condkernels::rows {

namespace impl {

// acc[i] += w * x[i * stride]
template <typename A, typename T>
inline __attribute__((always_inline)) void axpy_strided(A* __restrict acc, const T* __restrict x, A w,
                                                         int64_t n, int64_t stride) {
  if (stride == 1) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(x[i]);
  } else {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(x[i * stride]);
  }
}

// acc[i * stride] += w * g[i]
template <typename A, typename T>
inline __attribute__((always_inline)) void scatter_axpy(A* __restrict acc, const T* __restrict g, A w,
                                                         int64_t n, int64_t stride) {
  if (stride == 1) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(g[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i * stride] += w * static_cast<A>(g[i]);
  }
}

// sum_i g[i] * x[i * stride]
template <typename A, typename T>
inline __attribute__((always_inline)) A dot_strided(const T* __restrict g, const T* __restrict x,
                                                     int64_t n, int64_t stride) {
  A s = 0;
  if (stride == 1) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<A>(g[i]) * static_cast<A>(x[i]);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<A>(g[i]) * static_cast<A>(x[i * stride]);
  }
  return s;
}

// acc[i] += w[i] * x[i]
template <typename A, typename T>
inline __attribute__((always_inline)) void fma_rows(A* __restrict acc, const A* __restrict w,
                                                     const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w[i] * static_cast<A>(x[i]);
}

// acc[i] += a[i] * b[i]
template <typename A, typename T>
inline __attribute__((always_inline)) void fma_rows2(A* __restrict acc, const T* __restrict a,
                                                      const T* __restrict b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(a[i]) * static_cast<A>(b[i]);
}

// acc[i] += x[i]
template <typename A, typename T>
inline __attribute__((always_inline)) void add_rows(A* __restrict acc, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(x[i]);
}

// acc[r * acc_ld + i] += w[i] * x[r * x_ld + i] for r < n_rows, i < n: one tap of a depthwise
// NHWC convolution (or its transpose) over a run of pixels, vectorised along the channels.
template <typename A, typename T>
inline __attribute__((always_inline)) void fma_panel(A* __restrict acc, int64_t acc_ld, const A* __restrict w,
                                                      const T* __restrict x, int64_t x_ld, int64_t n_rows,
                                                      int64_t n) {
  for (int64_t r = 0; r < n_rows; ++r) {
    A* a = acc + r * acc_ld;
    const T* xr = x + r * x_ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] += w[i] * static_cast<A>(xr[i]);
  }
}

// acc[i] += sum_r a[r * a_ld + i] * b[r * b_ld + i]
template <typename A, typename T>
inline __attribute__((always_inline)) void dot_panel(A* __restrict acc, const T* __restrict a, int64_t a_ld,
                                                      const T* __restrict b, int64_t b_ld, int64_t n_rows,
                                                      int64_t n) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* ar = a + r * a_ld;
    const T* br = b + r * b_ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<A>(ar[i]) * static_cast<A>(br[i]);
  }
}

// out[2 * k + j] = sum_i a[k * a_ld + i] * w[j * w_ld + i] for k < 4, j < 2: eight dot products in
// one pass, each loaded vector used twice or four times (one dot at a time loads two per multiply-add).
template <typename A, typename T>
inline __attribute__((always_inline)) void dot_rows4x2(A* __restrict out, const T* __restrict a, int64_t a_ld,
                                                        const T* __restrict w, int64_t w_ld, int64_t n) {
  const T *a0 = a, *a1 = a + a_ld, *a2 = a + 2 * a_ld, *a3 = a + 3 * a_ld, *w0 = w, *w1 = w + w_ld;
  A s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)
  for (int64_t i = 0; i < n; ++i) {
    const A v0 = static_cast<A>(w0[i]), v1 = static_cast<A>(w1[i]);
    const A x0 = static_cast<A>(a0[i]), x1 = static_cast<A>(a1[i]), x2 = static_cast<A>(a2[i]),
            x3 = static_cast<A>(a3[i]);
    s00 += x0 * v0; s01 += x0 * v1; s10 += x1 * v0; s11 += x1 * v1;
    s20 += x2 * v0; s21 += x2 * v1; s30 += x3 * v0; s31 += x3 * v1;
  }
  out[0] = s00; out[1] = s01; out[2] = s10; out[3] = s11;
  out[4] = s20; out[5] = s21; out[6] = s30; out[7] = s31;
}

// acc[k * acc_ld + i] += sum_{j<4} r[k * 4 + j] * w_j[i] for NB (1 or 4) accumulator rows: four
// expert rows at a time (more concurrent streams at a large power-of-two stride thrash the cache sets).
template <int NB, typename A, typename T>
inline __attribute__((always_inline)) void mix4_rows(A* __restrict acc, int64_t acc_ld, const T* __restrict w0,
                                                      const T* __restrict w1, const T* __restrict w2,
                                                      const T* __restrict w3, const A* __restrict r, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A v0 = static_cast<A>(w0[i]), v1 = static_cast<A>(w1[i]), v2 = static_cast<A>(w2[i]),
            v3 = static_cast<A>(w3[i]);
    for (int k = 0; k < NB; ++k)
      acc[k * acc_ld + i] += r[4 * k] * v0 + r[4 * k + 1] * v1 + r[4 * k + 2] * v2 + r[4 * k + 3] * v3;
  }
}

// out[q] = init + sum_t w[t] * x[q + off[t]] for q < n: every tap of a stride-1 depthwise filter
// accumulated in registers with one store per output, where an axpy per tap loads and stores the
// output once per tap. Explicit vectors of `Bytes` (the compiler does not keep a 32-lane array in
// registers), kVectors of them per step: 32 floats, in independent chains of multiply-adds.
template <typename A, int Bytes>
inline __attribute__((always_inline)) void multi_tap(A* __restrict out, const A* __restrict x,
                                                      const int64_t* __restrict off, const A* __restrict w,
                                                      int64_t taps, int64_t n, A init) {
  typedef A V __attribute__((vector_size(Bytes)));
  constexpr int64_t L = Bytes / sizeof(A);
  constexpr int kVectors = 128 / Bytes;
  int64_t q = 0;
  for (; q + kVectors * L <= n; q += kVectors * L) {
    V a[kVectors];
    for (int v = 0; v < kVectors; ++v) a[v] = V{} + init;
    for (int64_t t = 0; t < taps; ++t) {
      const A* src = x + off[t] + q;
      const V wt = V{} + w[t];
      for (int v = 0; v < kVectors; ++v) {
        V s;
        std::memcpy(&s, src + v * L, sizeof(V));
        a[v] += wt * s;
      }
    }
    for (int v = 0; v < kVectors; ++v) std::memcpy(out + q + v * L, &a[v], sizeof(V));
  }
  for (; q < n; ++q) {
    A sum = init;
    for (int64_t t = 0; t < taps; ++t) sum += w[t] * x[q + off[t]];
    out[q] = sum;
  }
}

}  // namespace impl

#define CK_ROW_KERNELS(A, T)                                                                       \
  CK_MULTIVERSION static void axpy_strided(A* acc, const T* x, A w, int64_t n, int64_t stride) {   \
    impl::axpy_strided<A, T>(acc, x, w, n, stride);                                                \
  }                                                                                                \
  CK_MULTIVERSION static void scatter_axpy(A* acc, const T* g, A w, int64_t n, int64_t stride) {   \
    impl::scatter_axpy<A, T>(acc, g, w, n, stride);                                                \
  }                                                                                                \
  CK_MULTIVERSION static A dot_strided(const T* g, const T* x, int64_t n, int64_t stride) {        \
    return impl::dot_strided<A, T>(g, x, n, stride);                                               \
  }                                                                                                \
  CK_MULTIVERSION static void fma_rows(A* acc, const A* w, const T* x, int64_t n) {                \
    impl::fma_rows<A, T>(acc, w, x, n);                                                            \
  }                                                                                                \
  CK_MULTIVERSION static void fma_rows2(A* acc, const T* a, const T* b, int64_t n) {               \
    impl::fma_rows2<A, T>(acc, a, b, n);                                                           \
  }                                                                                                \
  CK_MULTIVERSION static void add_rows(A* acc, const T* x, int64_t n) {                            \
    impl::add_rows<A, T>(acc, x, n);                                                               \
  }                                                                                                \
  CK_MULTIVERSION static void fma_panel(A* acc, int64_t acc_ld, const A* w, const T* x, int64_t x_ld, \
                                       int64_t n_rows, int64_t n) {                                \
    impl::fma_panel<A, T>(acc, acc_ld, w, x, x_ld, n_rows, n);                                     \
  }                                                                                                \
  CK_MULTIVERSION static void dot_panel(A* acc, const T* a, int64_t a_ld, const T* b, int64_t b_ld,  \
                                       int64_t n_rows, int64_t n) {                                \
    impl::dot_panel<A, T>(acc, a, a_ld, b, b_ld, n_rows, n);                                       \
  }                                                                                                \
  CK_MULTIVERSION static void mix4_rows1(A* acc, const T* w0, const T* w1, const T* w2, const T* w3,    \
                                        const A* r, int64_t n) {                                   \
    impl::mix4_rows<1, A, T>(acc, 0, w0, w1, w2, w3, r, n);                                        \
  }                                                                                                \
  CK_MULTIVERSION static void dot_rows4x2(A* out, const T* a, int64_t a_ld, const T* w, int64_t w_ld,  \
                                         int64_t n) {                                              \
    impl::dot_rows4x2<A, T>(out, a, a_ld, w, w_ld, n);                                             \
  }                                                                                                \
  CK_MULTIVERSION static void mix4_rows4(A* acc, int64_t acc_ld, const T* w0, const T* w1,          \
                                        const T* w2, const T* w3, const A* r, int64_t n) {         \
    impl::mix4_rows<4, A, T>(acc, acc_ld, w0, w1, w2, w3, r, n);                                   \
  }


CK_ROW_KERNELS(float, float)
CK_ROW_KERNELS(double, double)
CK_ROW_KERNELS(float, c10::BFloat16)

#undef CK_ROW_KERNELS

// One per accumulator type (the data type is converted before: the input plane is padded in A).
// 64-byte vectors where the CPU has AVX-512, 32-byte ones elsewhere (compiled for AVX2 and
// baseline only): a 64-byte vector compiled for AVX2 is split in two and its broadcasts go through
// the stack (the depthwise layer ran 4x slower than oneDNN's that way on an AMD EPYC without
// AVX-512). By the hardware, not CONDKERNELS_CPU_ISA: this runs once per row, too often to read
// the environment.
#define CK_MULTI_TAP(A)                                                                               \
  CK_TARGET_AVX512 static void multi_tap_512(A* out, const A* x, const int64_t* off, const A* w,      \
                                             int64_t taps, int64_t n, A init) {                      \
    impl::multi_tap<A, 64>(out, x, off, w, taps, n, init);                                           \
  }                                                                                                  \
  CK_MULTIVERSION_BELOW_AVX512 static void multi_tap_256(A* out, const A* x, const int64_t* off,     \
                                                         const A* w, int64_t taps, int64_t n, A init) { \
    impl::multi_tap<A, 32>(out, x, off, w, taps, n, init);                                           \
  }                                                                                                  \
  static void multi_tap(A* out, const A* x, const int64_t* off, const A* w, int64_t taps, int64_t n,  \
                        A init) {                                                                    \
    if (cpu::hardware_vector_isa() == cpu::VectorIsa::kAvx512) {                                     \
      multi_tap_512(out, x, off, w, taps, n, init);                                                  \
    } else {                                                                                         \
      multi_tap_256(out, x, off, w, taps, n, init);                                                  \
    }                                                                                                \
  }

CK_MULTI_TAP(float)
CK_MULTI_TAP(double)
#undef CK_MULTI_TAP

}  // namespace condkernels::rows
