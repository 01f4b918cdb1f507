// Indirect GEMM of gated_conv2d's float32 forward: each output row reads its weights in place,
// through a list of column indices, so an example's open filters are never gathered or reordered.
//
//   dst_r[p] = (sum_{i, kh, kw} w_r[chan[i] + kh * KW + kw] * col(i, kh, kw)[p] + bias_r) * scale_r
//
// w_r is one output channel's row of the (cout, cin * KH * KW) weight, chan[i] = (i-th open input
// channel) * KH * KW, and col(i, kh, kw) the pixels tap (kh, kw) of the i-th open channel reads,
// found at cols + i * chan_stride + kh * row_step + kw * col_step. Two layouts fill that form: an
// example's im2col of its open channels (rows `ld` apart), and the open channels' zero-padded
// planes themselves, where the pixels of one tap are the plane shifted by the tap's offset (no
// im2col; see gated_conv2d.cpp, padded_forward; with a stride, each plane is split into phases and
// a table gives every tap its phase and shift). The kernel itself is in
// cpu/indirect_gemm_kernel.h, compiled for AVX-512 and for AVX2 + FMA and picked at run time;
// callers keep another path for CPUs with neither.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"

namespace condkernels::cpu {

// Output rows of one call: weight row, destination row, and the epilogue's bias and scale.
struct IndirectRows {
  const float* const* weight;
  float* const* dst;
  const float* bias;   // per row
  const float* scale;  // per row
  int64_t count;
  // Set where only some pixels are outputs (padded planes: the columns past each output row are
  // not): of pixels 8j .. 8j + 7 of the call, those set in compact_mask[j] are stored, packed
  // together, from dst + compact_offset[j]. Unset: pixel p goes to dst + p.
  const int64_t* compact_offset = nullptr;
  const uint8_t* compact_mask = nullptr;
};

// Pixels per entry of IndirectRows' compaction pattern (both instruction sets' vectors are whole
// multiples of it).
constexpr int64_t kCompactPixels = 8;

// One example's columns: tap (kh, kw) of its i-th open channel reads the consecutive pixels from
// cols + i * chan_stride + kh * row_step + kw * col_step on, or, where tap_offset is set, from
// cols + i * chan_stride + tap_offset[kh * kernel_w + kw] (entries up to 15 past the last pixel
// are read and must be finite; what they give is not stored).
struct IndirectCols {
  const int32_t* chan;  // chan[i]: where the i-th open channel's taps start in a weight row
  int64_t n_chan, kernel_h, kernel_w;
  const float* cols;
  int64_t chan_stride, row_step, col_step;
  const int64_t* tap_offset = nullptr;

  // An im2col of the open channels: row (i * kernel_h + kh) * kernel_w + kw at cols + row * ld.
  static IndirectCols im2col(const int32_t* chan, int64_t n_chan, int64_t kernel_h, int64_t kernel_w,
                             const float* cols, int64_t ld) {
    return {chan, n_chan, kernel_h, kernel_w, cols, kernel_h * kernel_w * ld, kernel_w * ld, ld};
  }
};

// dst_r[p] = (sum_{i, kh, kw} w_r[chan[i] + kh * kernel_w + kw] * col(i, kh, kw)[p] + bias_r) * scale_r
// for every row r of `rows` and pixel p < positions.
using IndirectGemm = void (*)(const IndirectRows& rows, const IndirectCols& in, int64_t positions);

void indirect_gemm_avx512(const IndirectRows& rows, const IndirectCols& in, int64_t positions);
void indirect_gemm_avx2(const IndirectRows& rows, const IndirectCols& in, int64_t positions);

// The kernel for the CPU's instruction set (vector_isa()), or null where it has no vector kernels.
inline IndirectGemm indirect_gemm_kernel() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return indirect_gemm_avx512;
    case VectorIsa::kAvx2: return indirect_gemm_avx2;
    default: return nullptr;
  }
}

}  // namespace condkernels::cpu
