// Indirect GEMM of gated_conv2d's float32 forward: each output row reads its weights in place,
// through a list of column indices, so an example's open filters are never gathered or reordered.
//
//   dst_r[p] = (sum_k w_r[widx[k]] * cols[k * ld + p] + bias_r) * scale_r,   p < positions
//
// w_r is one output channel's row of the (cout, cin * kh * kw) weight, widx lists the (open input
// channel, tap) entries of that row in the order of the rows of `cols` (an example's im2col of its
// open channels, rows `ld` floats apart, zero past `positions`). Registers hold a block of M output
// rows x V vectors of 16 pixels; each k loads the V pixel vectors once and broadcasts one weight per
// row. Vectorising along the pixels (not the output channels) is what lets every row be any
// channel of the weight as it lies in memory, and an out_gate simply skip rows. AVX-512 only, picked
// at run time; callers keep another path for CPUs without it.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CONDKERNELS_INDIRECT_GEMM 1
#include <immintrin.h>
#endif

namespace condkernels::cpu {

// Output rows of one call: weight row, destination row, and the epilogue's bias and scale.
struct IndirectRows {
  const float* const* weight;
  float* const* dst;
  const float* bias;   // per row
  const float* scale;  // per row
  int64_t count;
};

inline bool indirect_gemm_available() {
#ifdef CONDKERNELS_INDIRECT_GEMM
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// Pixel vectors per register block, and the most output rows per block for each V (M * V
// accumulators + V pixel vectors + one broadcast stay within the 32 zmm registers).
constexpr int kIndirectMaxVectors = 4;
constexpr int indirect_max_rows(int v) { return v == 4 ? 6 : 8; }

#ifdef CONDKERNELS_INDIRECT_GEMM

template <int M, int V>
__attribute__((target("avx512f"))) inline void indirect_block(const float* const* w, const int32_t* widx,
                                                              int64_t nk, const float* cols, int64_t ld,
                                                              float* const* dst, const float* bias,
                                                              const float* scale, int64_t p0,
                                                              __mmask16 last_mask) {
  __m512 acc[M][V];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* wr[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) wr[m] = w[m];
  const float* c = cols + p0;
  for (int64_t k = 0; k < nk; ++k, c += ld) {
    __m512 x[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) x[v] = _mm512_load_ps(c + 16 * v);
    const int32_t wi = widx[k];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 b = _mm512_set1_ps(wr[m][wi]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(b, x[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const __m512 bv = _mm512_set1_ps(bias[m]), sv = _mm512_set1_ps(scale[m]);
    float* d = dst[m] + p0;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      // (acc + bias) * scale, rounded after each step as the generic epilogue does.
      const __m512 y = _mm512_mul_ps(_mm512_add_ps(acc[m][v], bv), sv);
      if (v == V - 1) _mm512_mask_storeu_ps(d + 16 * v, last_mask, y);
      else _mm512_storeu_ps(d + 16 * v, y);
    }
  }
}

template <int V>
__attribute__((target("avx512f"))) inline void indirect_rows(const IndirectRows& rows, const int32_t* widx,
                                                             int64_t nk, const float* cols, int64_t ld,
                                                             int64_t p0, __mmask16 last_mask) {
  constexpr int kM = indirect_max_rows(V);
  int64_t r = 0;
  for (; r + kM <= rows.count; r += kM)
    indirect_block<kM, V>(rows.weight + r, widx, nk, cols, ld, rows.dst + r, rows.bias + r, rows.scale + r, p0,
                          last_mask);
  const int64_t left = rows.count - r;
  if (left == 0) return;
  auto w = rows.weight + r;
  auto d = rows.dst + r;
  auto b = rows.bias + r;
  auto s = rows.scale + r;
  switch (left) {
    case 1: indirect_block<1, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
    case 2: indirect_block<2, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
    case 3: indirect_block<3, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
    case 4: indirect_block<4, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
    case 5: indirect_block<5, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
    case 6: if constexpr (kM > 6) indirect_block<6, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
    case 7: if constexpr (kM > 7) indirect_block<7, V>(w, widx, nk, cols, ld, d, b, s, p0, last_mask); break;
  }
}

// Every row of `rows` over every pixel: the pixel vectors are split into blocks of at most
// kIndirectMaxVectors, as evenly as possible (49 pixels: one block of 4 vectors; 196: 4 + 3 + 3 + 3).
__attribute__((target("avx512f"))) inline void indirect_gemm_avx512(const IndirectRows& rows,
                                                                    const int32_t* widx, int64_t nk,
                                                                    const float* cols, int64_t ld,
                                                                    int64_t positions) {
  const int64_t nv = (positions + 15) / 16;
  const int64_t blocks = (nv + kIndirectMaxVectors - 1) / kIndirectMaxVectors;
  int64_t v0 = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t v = nv / blocks + (blk < nv % blocks ? 1 : 0);
    const int64_t p0 = v0 * 16;
    const int64_t tail = positions - (v0 + v - 1) * 16;  // pixels in the block's last vector
    const __mmask16 last = tail >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << tail) - 1);
    switch (v) {
      case 1: indirect_rows<1>(rows, widx, nk, cols, ld, p0, last); break;
      case 2: indirect_rows<2>(rows, widx, nk, cols, ld, p0, last); break;
      case 3: indirect_rows<3>(rows, widx, nk, cols, ld, p0, last); break;
      default: indirect_rows<4>(rows, widx, nk, cols, ld, p0, last); break;
    }
    v0 += v;
  }
}

#endif

// Runs the AVX-512 kernel; only to be called where indirect_gemm_available().
inline void indirect_gemm(const IndirectRows& rows, const int32_t* widx, int64_t nk, const float* cols,
                          int64_t ld, int64_t positions) {
#ifdef CONDKERNELS_INDIRECT_GEMM
  indirect_gemm_avx512(rows, widx, nk, cols, ld, positions);
#endif
}

}  // namespace condkernels::cpu
