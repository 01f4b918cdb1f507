// The indirect GEMM (cpu/indirect_gemm.h), written once over the vector instruction set `Isa`
// (cpu/simd_avx512.h, cpu/simd_avx2.h) and compiled for each in its own translation unit
// (cpu/vector_kernels_*.cpp).
//
// Registers hold a block of M output rows x V vectors of pixels; each (channel, tap) loads the V
// pixel vectors once and broadcasts one weight per row. Vectorising along the pixels (not the
// output channels) is what lets every row be any channel of the weight as it lies in memory, and an
// out_gate simply skip rows; the price is the padding lanes of planes that are not whole vectors
// (49 of 64 on 7x7 with 16 lanes, of 56 with 8).
#pragma once

#include <xmmintrin.h>

#include <cstdint>

#include "cpu/indirect_gemm.h"

namespace condkernels::cpu::indirect {

// Pixel vectors per register block, and the most output rows per block for each V: M * V
// accumulators + V pixel vectors + one broadcast within the ISA's registers (AVX-512: 6 x 4 and
// 8 x 1..3 of 32; AVX2: 6 x 2 and 8 x 1 of 16).
template <class Isa>
constexpr int max_vectors() { return Isa::kRegisters == 32 ? 4 : 2; }

template <class Isa>
constexpr int max_rows(int v) {
  if (Isa::kRegisters == 32) return v == 4 ? 6 : 8;
  return v == 2 ? 6 : 8;
}

// The first cache line of each row's weights of the open channel this many channels ahead is
// prefetched: an example's open filters are scattered 9-float pieces of each row, which the hardware
// prefetchers do not follow. (Prefetching the piece's last line too measured no faster.)
constexpr int64_t kPrefetchChannels = 4;

// Kernel shapes compiled with their taps unrolled: 3x3 with any steps (im2col), 3x3 whose
// column step is one pixel (padded planes, no dilation: the taps of a row are immediate offsets,
// which frees the registers the step arithmetic would take), 3x3 with a table of tap offsets
// (strided padded planes); anything else at run time, by steps or by table.
enum class Taps { kAny, k3x3, k3x3Unit, k3x3Table, kAnyTable };

constexpr bool is_3x3(Taps t) { return t == Taps::k3x3 || t == Taps::k3x3Unit || t == Taps::k3x3Table; }
constexpr bool by_table(Taps t) { return t == Taps::k3x3Table || t == Taps::kAnyTable; }

// One register block: rows [r0, r0 + M) of `rows` x V pixel vectors from pixel p0.
template <class Isa, int M, int V, Taps T>
inline void block(const IndirectRows& rows, int64_t r0, const IndirectCols& in, int64_t p0,
                  typename Isa::Mask last_mask) {
  using Vec = typename Isa::Vec;
  constexpr int W = Isa::kLanes;
  const float* const* w = rows.weight + r0;
  float* const* dst = rows.dst + r0;
  const float* bias = rows.bias + r0;
  const float* scale = rows.scale + r0;
  constexpr bool K3 = is_3x3(T);
  const int64_t kernel_h = K3 ? 3 : in.kernel_h, kernel_w = K3 ? 3 : in.kernel_w;
  const int32_t* chan = in.chan;
  const int64_t* tap_offset = in.tap_offset;
  const int64_t n_chan = in.n_chan, row_step = in.row_step;
  const int64_t col_step = T == Taps::k3x3Unit ? 1 : in.col_step;
  Vec acc[M][V];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[m][v] = Isa::zero();
  const float* wr[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) wr[m] = w[m];
  const float* c_chan = in.cols + p0;
  for (int64_t i = 0; i < n_chan; ++i, c_chan += in.chan_stride) {
    if (i + kPrefetchChannels < n_chan) {
      const int32_t ahead = chan[i + kPrefetchChannels];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[m] + ahead), _MM_HINT_T0);
      }
    }
    // Each row's filter of this channel: its taps are then fixed offsets from one pointer.
    const float* wc[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) wc[m] = wr[m] + chan[i];
#pragma GCC unroll 3
    for (int64_t kh = 0; kh < kernel_h; ++kh) {
#pragma GCC unroll 3
      for (int64_t kw = 0; kw < kernel_w; ++kw) {
        const float* c = c_chan + (by_table(T) ? tap_offset[kh * kernel_w + kw] : kh * row_step + kw * col_step);
        Vec x[V];
        // Unaligned: a padded plane's taps are shifted by single pixels.
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) x[v] = Isa::loadu(c + W * v);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const Vec b = Isa::broadcast(wc[m][kh * kernel_w + kw]);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[m][v] = Isa::fmadd(b, x[v], acc[m][v]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const Vec bv = Isa::broadcast(bias[m]), sv = Isa::broadcast(scale[m]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      // (acc + bias) * scale, rounded after each step as the generic epilogue does.
      const Vec y = Isa::mul(Isa::add(acc[m][v], bv), sv);
      const typename Isa::Mask k = v == V - 1 ? last_mask : Isa::all_lanes();
      const int64_t p = p0 + W * v;
      if (rows.compact_offset != nullptr) {
        const int64_t j = p / kCompactPixels;
        Isa::store_compressed(dst[m] + rows.compact_offset[j], k & Isa::mask_of_octets(rows.compact_mask, j), y);
      } else {
        Isa::store_lanes(dst[m] + p, k, y);
      }
    }
  }
}

// One block of the last rows.count - r rows (fewer than max_rows).
template <class Isa, int V, Taps T, int M = max_rows<Isa>(V) - 1>
inline void last_block(const IndirectRows& rows, int64_t r, const IndirectCols& in, int64_t p0,
                       typename Isa::Mask last_mask) {
  if constexpr (M >= 1) {
    if (rows.count - r == M) return block<Isa, M, V, T>(rows, r, in, p0, last_mask);
    last_block<Isa, V, T, M - 1>(rows, r, in, p0, last_mask);
  }
}

// Every row of `rows` x V pixel vectors from p0: blocks of max_rows rows, then the rest. A rest of
// one or two rows is not left alone: the last max_rows + 1 or + 2 rows run as two blocks of about
// half: a block of one or two rows spends about as much on loads and per-channel set-up as on FMAs
// (one-off, AVX2: 32 rows as 5 x 6 + 2 ran 4% slower than as 4 x 6 + 4 + 4).
template <class Isa, int V, Taps T>
inline void row_blocks(const IndirectRows& rows, const IndirectCols& in, int64_t p0, typename Isa::Mask last_mask) {
  constexpr int M = max_rows<Isa>(V);
  int64_t r = 0;
  for (; rows.count - r >= M && rows.count - r != M + 1 && rows.count - r != M + 2; r += M)
    block<Isa, M, V, T>(rows, r, in, p0, last_mask);
  if (rows.count - r >= M) {  // M + 1 or M + 2 rows: M / 2 + 1 of them here, the rest below
    block<Isa, M / 2 + 1, V, T>(rows, r, in, p0, last_mask);
    r += M / 2 + 1;
  }
  last_block<Isa, V, T>(rows, r, in, p0, last_mask);
}

template <class Isa, int V>
inline void rows_any_kernel(const IndirectRows& rows, const IndirectCols& in, int64_t p0,
                            typename Isa::Mask last_mask) {
  const bool k3x3 = in.kernel_h == 3 && in.kernel_w == 3;
  if (in.tap_offset != nullptr) {
    if (k3x3) row_blocks<Isa, V, Taps::k3x3Table>(rows, in, p0, last_mask);
    else row_blocks<Isa, V, Taps::kAnyTable>(rows, in, p0, last_mask);
  } else if (k3x3 && in.col_step == 1) {
    row_blocks<Isa, V, Taps::k3x3Unit>(rows, in, p0, last_mask);
  } else if (k3x3) {
    row_blocks<Isa, V, Taps::k3x3>(rows, in, p0, last_mask);
  } else {
    row_blocks<Isa, V, Taps::kAny>(rows, in, p0, last_mask);
  }
}

// Every row of `rows` over every pixel: the pixel vectors are split into blocks of at most
// max_vectors, as evenly as possible (49 pixels in 16 lanes: one block of 4 vectors; 196: 4 + 3 + 3 + 3).
template <class Isa>
inline void gemm(const IndirectRows& rows, const IndirectCols& in, int64_t positions) {
  constexpr int W = Isa::kLanes, kMaxV = max_vectors<Isa>();
  const int64_t nv = (positions + W - 1) / W;
  const int64_t blocks = (nv + kMaxV - 1) / kMaxV;
  int64_t v0 = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t v = nv / blocks + (blk < nv % blocks ? 1 : 0);
    const int64_t p0 = v0 * W;
    const auto mask = Isa::first_lanes(static_cast<int>(positions - (v0 + v - 1) * W));  // the last vector's pixels
    switch (v) {
      case 1: rows_any_kernel<Isa, 1>(rows, in, p0, mask); break;
      case 2: rows_any_kernel<Isa, 2>(rows, in, p0, mask); break;
      case 3: if constexpr (kMaxV >= 3) rows_any_kernel<Isa, 3>(rows, in, p0, mask); break;
      default: if constexpr (kMaxV >= 4) rows_any_kernel<Isa, 4>(rows, in, p0, mask); break;
    }
    v0 += v;
  }
}

}  // namespace condkernels::cpu::indirect
