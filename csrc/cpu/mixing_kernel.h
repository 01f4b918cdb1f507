// The float32 kernel of cpu/mixing.h's blocks, written once over the vector instruction set `Isa`
// (cpu/simd_avx512.h, cpu/simd_avx2.h) and compiled for each in its own translation unit
// (cpu/vector_kernels_*.cpp).
//
// Why: the generic loop (rows::mix4_rows) adds four experts at a time into accumulator rows of 2048
// columns, so every fourth expert each accumulator is loaded and stored again, from L2: four
// accumulator rows and four expert rows take 64 KB, past the L1. Here the expert rows of a block
// are first packed chunk by chunk (the chunk's columns of every expert side by side, read once
// from memory, row by row for the prefetchers), and blocks of output rows x chunk columns stay in
// registers over all the experts: per expert, V chunk vectors and N coefficients are loaded for
// N x V multiply-adds, and each output is written once. On the Intel Xeon (2 threads, ms, with
// these kernels / capped to none, `python -m condkernels.bench --suite condconv --full --paths
// --filter "pointwise 512->512 @14x14 (MobileNetV1) B=32 E=32" --rounds 5 --no-report`):
// inference 26.7 / 33.4, forward+backward 90.6 / 96.5. At batch 1 (`--filter "(ResNet-50) B=1
// E=32" --filter fwd+bwd`), bound by reading the experts, a tie: 53.8 / 53.9 (3x3), 24.2 / 25.2
// (pointwise 2048).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/fused_mix_gemm_kernel.h"
#include "cpu/mixing.h"

namespace condkernels::cpu::mixing_kernel {

// Vectors of columns per chunk, as many as mix_panels mixes per pass (cpu/fused_mix_gemm_kernel.h):
// the kMaxRows x kVectors accumulators, the chunk's kVectors expert vectors and a coefficient fit
// the registers (AVX-512: 6 x 4 + 4 + 1 of 32; AVX2: 6 x 2 + 2 + 1 of 16).
template <class Isa>
constexpr int kVectors = fused_mix_gemm::kMixVectors<Isa>;
template <class Isa>
constexpr int64_t kChunk = kVectors<Isa> * Isa::kLanes;
constexpr int kMaxRows = 6;

// packed[(ch * experts + e) * C + j] = w[e * ld + ch * C + j] for every chunk ch of the nc
// columns, zeros past nc.
template <class Isa>
inline void pack(const float* w, int64_t ld, int64_t experts, int64_t nc, float* packed) {
  constexpr int64_t C = kChunk<Isa>;
  const int64_t chunks = (nc + C - 1) / C;
  for (int64_t e = 0; e < experts; ++e) {
    const float* row = w + e * ld;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t c0 = ch * C, valid = std::min(C, nc - c0);
      float* dst = packed + (ch * experts + e) * C;
      std::copy_n(row + c0, valid, dst);
      std::fill(dst + valid, dst + C, 0.0f);
    }
  }
}

// out[i * out_ld + j] (=|+=) sum_e r[i * experts + e] * chunk[e * C + j] for i < N and the
// `valid` first columns j of one chunk.
template <class Isa, int N>
inline void mix_chunk(const float* r, const float* chunk, int64_t experts, float* out, int64_t out_ld,
                      int64_t valid, mixing::Write write) {
  constexpr int V = kVectors<Isa>, W = Isa::kLanes;
  constexpr int64_t C = kChunk<Isa>;
  typename Isa::Vec acc[N][V];
#pragma GCC unroll 6
  for (int i = 0; i < N; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) acc[i][j] = Isa::zero();
  for (int64_t e = 0; e < experts; ++e) {
    typename Isa::Vec we[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) we[j] = Isa::load(chunk + e * C + j * W);
#pragma GCC unroll 6
    for (int i = 0; i < N; ++i) {
      const auto ri = Isa::broadcast(r[i * experts + e]);
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) acc[i][j] = Isa::fmadd(we[j], ri, acc[i][j]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < N; ++i) {
    float* dst = out + i * out_ld;
    // Streaming stores need whole aligned vectors; a row that starts unaligned is stored.
    const bool stream = write == mixing::Write::kStream && reinterpret_cast<uintptr_t>(dst) % (W * 4) == 0;
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) {
      const int64_t lanes = valid - j * W;
      if (lanes <= 0) break;
      typename Isa::Vec v = acc[i][j];
      if (lanes >= W) {
        if (write == mixing::Write::kAdd) v = Isa::add(Isa::loadu(dst + j * W), v);
        if (stream)
          Isa::stream(dst + j * W, v);
        else
          Isa::storeu(dst + j * W, v);
      } else {
        const int n = static_cast<int>(lanes);
        if (write == mixing::Write::kAdd) v = Isa::add(Isa::load_first(dst + j * W, n), v);
        Isa::store_lanes(dst + j * W, Isa::first_lanes(n), v);
      }
    }
  }
}

template <class Isa>
inline void mix_chunk_rows(int64_t n, const float* r, const float* chunk, int64_t experts, float* out,
                           int64_t out_ld, int64_t valid, mixing::Write write) {
  static_assert(kMaxRows == 6, "one case per block height");
  switch (n) {
    case 1: return mix_chunk<Isa, 1>(r, chunk, experts, out, out_ld, valid, write);
    case 2: return mix_chunk<Isa, 2>(r, chunk, experts, out, out_ld, valid, write);
    case 3: return mix_chunk<Isa, 3>(r, chunk, experts, out, out_ld, valid, write);
    case 4: return mix_chunk<Isa, 4>(r, chunk, experts, out, out_ld, valid, write);
    case 5: return mix_chunk<Isa, 5>(r, chunk, experts, out, out_ld, valid, write);
    default: return mix_chunk<Isa, 6>(r, chunk, experts, out, out_ld, valid, write);
  }
}

// out[b * out_ld + c] (=|+=) sum_e r[b * experts + e] * w[e * ld + c] for b < n_out, c < nc, with
// `packed` (64-byte aligned, packed_floats(experts, nc)) as the packed expert columns. Chunk by
// chunk, so that a chunk's experts stay in L1 while every block of output rows uses them.
template <class Isa>
inline void mix_block(const float* r, int64_t n_out, const float* w, int64_t ld, int64_t experts, int64_t nc,
                      float* out, int64_t out_ld, mixing::Write write, float* packed) {
  constexpr int64_t C = kChunk<Isa>;
  pack<Isa>(w, ld, experts, nc, packed);
  for (int64_t c0 = 0; c0 < nc; c0 += C) {
    const float* chunk = packed + (c0 / C) * experts * C;
    for (int64_t b = 0; b < n_out; b += kMaxRows)
      mix_chunk_rows<Isa>(std::min<int64_t>(kMaxRows, n_out - b), r + b * experts, chunk, experts,
                          out + b * out_ld + c0, out_ld, std::min(C, nc - c0), write);
  }
}

// The routing gradient's dot products, part[b * experts + e] = <a[b * a_ld + c], w[e * ld + c]>
// over c < nc, for b < n_rows, e < experts: blocks of rows x kDotExperts experts of accumulator
// vectors, each loaded vector used R or kDotExperts times, over runs of kDotColumns columns whose
// block of rows stays in L1 while every block of experts passes. (The generic rows::dot_rows4x2
// re-reads four rows of `a` for every two experts, from L2 once they and the expert rows pass the
// L1's size.)
template <class Isa>
constexpr int kDotRows = Isa::kRegisters == 32 ? 5 : 2;  // 5 x 4 + 5 + 1 of 32; 2 x 4 + 2 + 1 of 16
constexpr int kDotExperts = 4;
constexpr int64_t kDotColumns = 512;

template <class Isa, int R>
inline void dot_row_block(const float* a, int64_t a_ld, const float* w, int64_t ld, int64_t experts, int64_t nc,
                          float* part, bool accumulate) {
  constexpr int W = Isa::kLanes, Q = kDotExperts;
  const int64_t full = nc / W * W;
  const int tail = static_cast<int>(nc - full);
  for (int64_t e0 = 0; e0 < experts; e0 += Q) {
    const float* wr[Q];
    for (int q = 0; q < Q; ++q) wr[q] = w + std::min<int64_t>(e0 + q, experts - 1) * ld;  // past the end: unused
    typename Isa::Vec acc[R][Q];
#pragma GCC unroll 5
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) acc[i][q] = Isa::zero();
    auto step = [&](int64_t c, int lanes) {
      typename Isa::Vec av[R];
#pragma GCC unroll 5
      for (int i = 0; i < R; ++i)
        av[i] = lanes == W ? Isa::loadu(a + i * a_ld + c) : Isa::load_first(a + i * a_ld + c, lanes);
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) {
        const auto wv = lanes == W ? Isa::loadu(wr[q] + c) : Isa::load_first(wr[q] + c, lanes);
#pragma GCC unroll 5
        for (int i = 0; i < R; ++i) acc[i][q] = Isa::fmadd(av[i], wv, acc[i][q]);
      }
    };
    for (int64_t c = 0; c < full; c += W) step(c, W);
    if (tail > 0) step(full, tail);
    for (int i = 0; i < R; ++i)
      for (int q = 0; q < Q && e0 + q < experts; ++q) {
        const float sum = fused_mix_gemm::lane_sum<Isa>(acc[i][q]);
        float& out = part[i * experts + e0 + q];
        out = accumulate ? out + sum : sum;
      }
  }
}

template <class Isa>
inline void dot_rows(const float* a, int64_t a_ld, int64_t n_rows, const float* w, int64_t ld, int64_t experts,
                     int64_t nc, float* part) {
  static_assert(kDotRows<Isa> <= 5, "one case per block height");
  for (int64_t c0 = 0; c0 < nc; c0 += kDotColumns) {
    const int64_t cols = std::min(kDotColumns, nc - c0);
    const bool accumulate = c0 > 0;
    for (int64_t b = 0; b < n_rows; b += kDotRows<Isa>) {
      const float* ab = a + b * a_ld + c0;
      const float* wc = w + c0;
      float* pb = part + b * experts;
      switch (std::min<int64_t>(kDotRows<Isa>, n_rows - b)) {
        case 1: dot_row_block<Isa, 1>(ab, a_ld, wc, ld, experts, cols, pb, accumulate); break;
        case 2: dot_row_block<Isa, 2>(ab, a_ld, wc, ld, experts, cols, pb, accumulate); break;
        case 3: dot_row_block<Isa, 3>(ab, a_ld, wc, ld, experts, cols, pb, accumulate); break;
        case 4: dot_row_block<Isa, 4>(ab, a_ld, wc, ld, experts, cols, pb, accumulate); break;
        default: dot_row_block<Isa, 5>(ab, a_ld, wc, ld, experts, cols, pb, accumulate); break;
      }
    }
  }
}

}  // namespace condkernels::cpu::mixing_kernel
