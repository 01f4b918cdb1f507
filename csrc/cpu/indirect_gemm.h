// Indirect GEMM of gated_conv2d's float32 forward: each output row reads its weights in place,
// through a list of column indices, so an example's open filters are never gathered or reordered.
//
//   dst_r[p] = (sum_{i, kh, kw} w_r[chan[i] + kh * KW + kw] * col(i, kh, kw)[p] + bias_r) * scale_r
//
// w_r is one output channel's row of the (cout, cin * KH * KW) weight, chan[i] = (i-th open input
// channel) * KH * KW, and col(i, kh, kw) the pixels tap (kh, kw) of the i-th open channel reads,
// found at cols + i * chan_stride + kh * row_step + kw * col_step. Two layouts fill that form: an
// example's im2col of its open channels (rows `ld` apart), and, for stride 1, the open channels'
// zero-padded planes themselves, where the pixels of one tap are the plane shifted by the tap's
// offset (no im2col; see gated_conv2d.cpp, padded_forward). Registers hold a block of M output rows
// x V vectors of 16 pixels; each (channel, tap) loads the V pixel vectors once and broadcasts one
// weight per row. Vectorising along the pixels (not the output channels) is what lets every row be
// any channel of the weight as it lies in memory, and an out_gate simply skip rows; the price is
// the padding lanes of planes that are not whole vectors (49 of 64 on 7x7). AVX-512 only, picked
// at run time; callers keep another path for CPUs without it.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"

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
  // Set where only some pixels are outputs (padded planes: the columns past each output row are
  // not): vector i of the call (pixels 16i .. 16i + 15) stores the lanes of compact_mask[i], packed
  // together, from dst + compact_offset[i]. Unset: pixel p goes to dst + p.
  const int64_t* compact_offset = nullptr;
  const uint16_t* compact_mask = nullptr;
};

// One example's columns: tap (kh, kw) of its i-th open channel reads the consecutive pixels from
// cols + i * chan_stride + kh * row_step + kw * col_step on (entries past the last pixel are read
// and must be finite; what they give is not stored).
struct IndirectCols {
  const int32_t* chan;  // chan[i]: where the i-th open channel's taps start in a weight row
  int64_t n_chan, kernel_h, kernel_w;
  const float* cols;
  int64_t chan_stride, row_step, col_step;

  // An im2col of the open channels: row (i * kernel_h + kh) * kernel_w + kw at cols + row * ld.
  static IndirectCols im2col(const int32_t* chan, int64_t n_chan, int64_t kernel_h, int64_t kernel_w,
                             const float* cols, int64_t ld) {
    return {chan, n_chan, kernel_h, kernel_w, cols, kernel_h * kernel_w * ld, kernel_w * ld, ld};
  }
};

inline bool indirect_gemm_available() { return has_avx512f(); }

// Pixel vectors per register block, and the most output rows per block for each V (M * V
// accumulators + V pixel vectors + one broadcast stay within the 32 zmm registers).
constexpr int kIndirectMaxVectors = 4;
constexpr int indirect_max_rows(int v) { return v == 4 ? 6 : 8; }

#ifdef CONDKERNELS_INDIRECT_GEMM

// The first cache line of each row's weights of the open channel this many channels ahead is
// prefetched: an example's open filters are scattered 9-float pieces of each row, which the hardware
// prefetchers do not follow. (Prefetching the piece's last line too measured no faster.)
constexpr int64_t kIndirectPrefetchChannels = 4;

// Kernel shapes compiled with their taps unrolled: 3x3 with any steps (im2col), 3x3 whose
// column step is one pixel (padded planes, no dilation: the taps of a row are immediate offsets,
// which frees the registers the step arithmetic would take), anything else at run time.
enum class Taps { kAny, k3x3, k3x3Unit };

// One register block: rows [r0, r0 + M) of `rows` x V pixel vectors from pixel p0.
template <int M, int V, Taps T>
__attribute__((target("avx512f"))) inline void indirect_block(const IndirectRows& rows, int64_t r0,
                                                              const IndirectCols& in, int64_t p0,
                                                              __mmask16 last_mask) {
  const float* const* w = rows.weight + r0;
  float* const* dst = rows.dst + r0;
  const float* bias = rows.bias + r0;
  const float* scale = rows.scale + r0;
  constexpr bool K3 = T != Taps::kAny;
  const int64_t kernel_h = K3 ? 3 : in.kernel_h, kernel_w = K3 ? 3 : in.kernel_w;
  const int32_t* chan = in.chan;
  const int64_t n_chan = in.n_chan, row_step = in.row_step;
  const int64_t col_step = T == Taps::k3x3Unit ? 1 : in.col_step;
  __m512 acc[M][V];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* wr[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) wr[m] = w[m];
  const float* c_chan = in.cols + p0;
  for (int64_t i = 0; i < n_chan; ++i, c_chan += in.chan_stride) {
    if (i + kIndirectPrefetchChannels < n_chan) {
      const int32_t ahead = chan[i + kIndirectPrefetchChannels];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[m] + ahead), _MM_HINT_T0);
      }
    }
    int32_t tap = chan[i];
#pragma GCC unroll 3
    for (int64_t kh = 0; kh < kernel_h; ++kh) {
#pragma GCC unroll 3
      for (int64_t kw = 0; kw < kernel_w; ++kw, ++tap) {
        const float* c = c_chan + kh * row_step + kw * col_step;
        __m512 x[V];
        // Unaligned: a padded plane's taps are shifted by single pixels.
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) x[v] = _mm512_loadu_ps(c + 16 * v);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512 b = _mm512_set1_ps(wr[m][tap]);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(b, x[v], acc[m][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const __m512 bv = _mm512_set1_ps(bias[m]), sv = _mm512_set1_ps(scale[m]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      // (acc + bias) * scale, rounded after each step as the generic epilogue does.
      const __m512 y = _mm512_mul_ps(_mm512_add_ps(acc[m][v], bv), sv);
      const __mmask16 k = v == V - 1 ? last_mask : static_cast<__mmask16>(0xFFFF);
      if (rows.compact_offset != nullptr) {
        const int64_t i = p0 / 16 + v;
        const __mmask16 keep = k & rows.compact_mask[i];
        const __mmask16 packed = static_cast<__mmask16>((1u << __builtin_popcount(keep)) - 1);
        _mm512_mask_storeu_ps(dst[m] + rows.compact_offset[i], packed, _mm512_maskz_compress_ps(keep, y));
      } else {
        _mm512_mask_storeu_ps(dst[m] + p0 + 16 * v, k, y);
      }
    }
  }
}

template <int V, Taps T>
__attribute__((target("avx512f"))) inline void indirect_rows(const IndirectRows& rows, const IndirectCols& in,
                                                             int64_t p0, __mmask16 last_mask) {
  constexpr int kM = indirect_max_rows(V);
  int64_t r = 0;
  for (; r + kM <= rows.count; r += kM) indirect_block<kM, V, T>(rows, r, in, p0, last_mask);
  switch (rows.count - r) {
    case 1: indirect_block<1, V, T>(rows, r, in, p0, last_mask); break;
    case 2: indirect_block<2, V, T>(rows, r, in, p0, last_mask); break;
    case 3: indirect_block<3, V, T>(rows, r, in, p0, last_mask); break;
    case 4: indirect_block<4, V, T>(rows, r, in, p0, last_mask); break;
    case 5: indirect_block<5, V, T>(rows, r, in, p0, last_mask); break;
    case 6: if constexpr (kM > 6) indirect_block<6, V, T>(rows, r, in, p0, last_mask); break;
    case 7: if constexpr (kM > 7) indirect_block<7, V, T>(rows, r, in, p0, last_mask); break;
    default: break;
  }
}

template <int V>
__attribute__((target("avx512f"))) inline void indirect_rows_any_kernel(const IndirectRows& rows,
                                                                        const IndirectCols& in, int64_t p0,
                                                                        __mmask16 last_mask) {
  if (in.kernel_h == 3 && in.kernel_w == 3 && in.col_step == 1) indirect_rows<V, Taps::k3x3Unit>(rows, in, p0, last_mask);
  else if (in.kernel_h == 3 && in.kernel_w == 3) indirect_rows<V, Taps::k3x3>(rows, in, p0, last_mask);
  else indirect_rows<V, Taps::kAny>(rows, in, p0, last_mask);
}

// Every row of `rows` over every pixel: the pixel vectors are split into blocks of at most
// kIndirectMaxVectors, as evenly as possible (49 pixels: one block of 4 vectors; 196: 4 + 3 + 3 + 3).
__attribute__((target("avx512f"))) inline void indirect_gemm_avx512(const IndirectRows& rows, const IndirectCols& in,
                                                                    int64_t positions) {
  const int64_t nv = (positions + 15) / 16;
  const int64_t blocks = (nv + kIndirectMaxVectors - 1) / kIndirectMaxVectors;
  int64_t v0 = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t v = nv / blocks + (blk < nv % blocks ? 1 : 0);
    const int64_t p0 = v0 * 16;
    const int64_t tail = positions - (v0 + v - 1) * 16;  // pixels in the block's last vector
    const __mmask16 mask = tail >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << tail) - 1);
    switch (v) {
      case 1: indirect_rows_any_kernel<1>(rows, in, p0, mask); break;
      case 2: indirect_rows_any_kernel<2>(rows, in, p0, mask); break;
      case 3: indirect_rows_any_kernel<3>(rows, in, p0, mask); break;
      default: indirect_rows_any_kernel<4>(rows, in, p0, mask); break;
    }
    v0 += v;
  }
}

#endif

// dst_r[p] = (sum_{i, kh, kw} w_r[chan[i] + kh * kernel_w + kw] * col(i, kh, kw)[p] + bias_r) * scale_r
// for every row r of `rows` and pixel p < positions. Only to be called where indirect_gemm_available().
inline void indirect_gemm(const IndirectRows& rows, const IndirectCols& in, int64_t positions) {
#ifdef CONDKERNELS_INDIRECT_GEMM
  indirect_gemm_avx512(rows, in, positions);
#endif
}

}  // namespace condkernels::cpu
