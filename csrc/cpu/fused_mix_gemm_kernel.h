// The kernel of cpu/fused_mix_gemm.h, written once over the vector instruction set `Isa`
// (cpu/simd_avx512.h, cpu/simd_avx2.h) and compiled for each in its own translation unit
// (cpu/vector_kernels_*.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/fused_mix_gemm.h"

namespace condkernels::cpu::fused_mix_gemm {

// A block of accumulator registers: kChannelVectors vectors of output channels x up to
// kMaxPixels pixels (AVX-512: 4 x 6 = 24 of 32 registers; AVX2: 2 x 6 = 12 of 16), the panel's
// kBlock channels in kBlock / (kChannelVectors * lanes) such blocks.
template <class Isa>
struct Tile {
  static constexpr int kChannelVectors = Isa::kRegisters == 32 ? 4 : 2;
  static constexpr int kChannels = kChannelVectors * Isa::kLanes;
  static constexpr int64_t kMaxPixels = 6;
  static_assert(kBlock % kChannels == 0, "the panel is whole blocks of channels");
};

// staged[e * staged_expert_stride(kc) + k * kBlock + j] = W_e[c0 + j][k0 + k] for k < kc,
// j < kBlock (0 for channels past Cout): the piece of every expert that the run's examples mix,
// read from memory once and transposed once (copied as it lies when the experts are stored
// transposed). With k0 = 0 and kc = K, one block of the kept layout (staged_experts).
template <class Isa>
inline void stage_experts(const Problem& pb, int64_t c0, int64_t k0, int64_t kc, float* staged) {
  constexpr int W = Isa::kLanes;
  const int64_t K = pb.reduction, expert_stride = pb.out_channels * K;
  if (pb.weight_transposed) {
    constexpr int64_t kRowsAhead = 8;
    const int64_t valid = std::min(kBlock, pb.out_channels - c0);
    for (int64_t e = 0; e < pb.experts; ++e) {
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = pb.weight + e * expert_stride + (k0 + k) * pb.out_channels + c0;
        // The rows, each a short run Cout floats from the next, are latency-bound without help.
        if (k + kRowsAhead < kc)
          for (int64_t j = 0; j < valid; j += 16)
            _mm_prefetch(reinterpret_cast<const char*>(src + kRowsAhead * pb.out_channels + j), _MM_HINT_T0);
        float* out = staged + e * staged_expert_stride(kc) + k * kBlock;
        std::copy_n(src, valid, out);
        std::fill(out + valid, out + kBlock, 0.0f);
      }
    }
    return;
  }
  for (int64_t e = 0; e < pb.experts; ++e) {
    float* out = staged + e * staged_expert_stride(kc);
    // W rows at a time, walked along k: W sequential streams for the prefetchers.
    for (int64_t j0 = 0; j0 < kBlock; j0 += W) {
      for (int64_t kk = 0; kk < kc; kk += W) {
        const int width = static_cast<int>(std::min<int64_t>(W, kc - kk));
        typename Isa::Vec rows[W];
        // The next expert's lines of these rows, a whole expert's piece ahead: the rows are short
        // runs (kc floats each) that the hardware prefetchers barely follow.
        const bool prefetch = e + 1 < pb.experts && (kk & 15) == 0;
        for (int j = 0; j < W; ++j) {
          const int64_t c = c0 + j0 + j;
          const float* src = pb.weight + e * expert_stride + c * K + k0 + kk;
          // A plain load where the row is whole: AVX2's masked load is much slower on some CPUs.
          rows[j] = c >= pb.out_channels ? Isa::zero() : width == W ? Isa::loadu(src) : Isa::load_first(src, width);
          if (prefetch && c < pb.out_channels)
            _mm_prefetch(reinterpret_cast<const char*>(src + expert_stride), _MM_HINT_T0);
        }
        Isa::transpose(rows);
        for (int k = 0; k < width; ++k) Isa::store(out + (kk + k) * kBlock + j0, rows[k]);
      }
    }
  }
}

// The sum of a vector's lanes, added in lane order: the dot products of the expert-gradient fold
// (cpu/fused_weight_grad_kernel.h) and of the routing gradient (cpu/mixing_kernel.h).
template <class Isa>
inline float lane_sum(typename Isa::Vec v) {
  alignas(64) float lanes[Isa::kLanes];
  Isa::store(lanes, v);
  float s = 0.0f;
  for (int i = 0; i < Isa::kLanes; ++i) s += lanes[i];
  return s;
}

// Channel vectors mixed per pass of mix_panels: N x kMixVectors accumulators, the kMixVectors staged
// vectors of an expert and a routing weight fit the registers (AVX-512: 16 + 4 + 1 of 32; AVX2:
// 8 + 2 + 1 of 16).
template <class Isa>
constexpr int kMixVectors = Isa::kRegisters == 32 ? 4 : 2;

// panels[i][k][0..kBlock) = sum_e r[i][e] staged[e][k][0..kBlock) for k < kc and the N examples
// whose routing rows (E weights each) start at r, each weight broadcast from its float (a full
// vector per weight filled 8 KB of L1 beside the panels at E = 32); panels kKc * kBlock apart,
// experts expert_stride apart. Per expert, kMixVectors staged vectors and the N routing weights
// are loaded once and meet in N x kMixVectors multiply-adds: with one vector per pass, every
// multiply-add also loaded its routing weight, and the loads, not the multiply-adds, bound the
// mixing (about a quarter of the kernel's time at B = 32, E = 8 on the Intel Xeon, in one-off perf
// samples).
template <class Isa, int N>
inline void mix_panels(const float* staged, int64_t expert_stride, const float* r, int64_t experts, int64_t kc,
                       float* panels) {
  constexpr int W = Isa::kLanes, V = kMixVectors<Isa>;
  static_assert(kBlock % (V * W) == 0, "whole passes per panel row");
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t v0 = 0; v0 < kBlock; v0 += V * W) {
      const float* w = staged + k * kBlock + v0;
      typename Isa::Vec m[N][V];
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < V; ++j) m[i][j] = Isa::zero();
      for (int64_t e = 0; e < experts; ++e) {
        typename Isa::Vec we[V];
        for (int j = 0; j < V; ++j) we[j] = Isa::load(w + e * expert_stride + j * W);
        for (int i = 0; i < N; ++i) {
          const auto ri = Isa::broadcast(r[i * experts + e]);
          for (int j = 0; j < V; ++j) m[i][j] = Isa::fmadd(we[j], ri, m[i][j]);
        }
      }
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < V; ++j) Isa::store(panels + i * kKc * kBlock + k * kBlock + v0 + j * W, m[i][j]);
    }
  }
}

template <class Isa>
inline void mix(int64_t n, const float* staged, int64_t expert_stride, const float* r, int64_t experts,
                int64_t kc, float* panels) {
  static_assert(kMixGroup == 4, "one case per group size");
  switch (n) {
    case 1: return mix_panels<Isa, 1>(staged, expert_stride, r, experts, kc, panels);
    case 2: return mix_panels<Isa, 2>(staged, expert_stride, r, experts, kc, panels);
    case 3: return mix_panels<Isa, 3>(staged, expert_stride, r, experts, kc, panels);
    default: return mix_panels<Isa, 4>(staged, expert_stride, r, experts, kc, panels);
  }
}

// acc[p][j0 + j] += sum_k panel[k][j0 + j] * col[k * P + p] for the N pixels p of this block and the
// tile's channels j from j0.
template <class Isa, int N>
inline void multiply_block(const float* panel, int64_t j0, int64_t kc, const float* col, int64_t P, float* acc) {
  constexpr int V = Tile<Isa>::kChannelVectors, W = Isa::kLanes;
  typename Isa::Vec c[N][V];
#pragma GCC unroll 6
  for (int p = 0; p < N; ++p)
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) c[p][i] = Isa::load(acc + p * kBlock + j0 + W * i);
  for (int64_t k = 0; k < kc; ++k) {
    const float* w = panel + k * kBlock + j0;
    typename Isa::Vec wv[V];
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) wv[i] = Isa::load(w + W * i);
    const float* x = col + k * P;
#pragma GCC unroll 6
    for (int p = 0; p < N; ++p) {
      const auto xp = Isa::broadcast(x[p]);
#pragma GCC unroll 4
      for (int i = 0; i < V; ++i) c[p][i] = Isa::fmadd(wv[i], xp, c[p][i]);
    }
  }
#pragma GCC unroll 6
  for (int p = 0; p < N; ++p)
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) Isa::store(acc + p * kBlock + j0 + W * i, c[p][i]);
}

template <class Isa>
inline void multiply(int64_t n, const float* panel, int64_t kc, const float* col, int64_t P, float* acc) {
  static_assert(Tile<Isa>::kMaxPixels == 6, "one case per block width");
  for (int64_t j0 = 0; j0 < kBlock; j0 += Tile<Isa>::kChannels) {
    switch (n) {
      case 1: multiply_block<Isa, 1>(panel, j0, kc, col, P, acc); break;
      case 2: multiply_block<Isa, 2>(panel, j0, kc, col, P, acc); break;
      case 3: multiply_block<Isa, 3>(panel, j0, kc, col, P, acc); break;
      case 4: multiply_block<Isa, 4>(panel, j0, kc, col, P, acc); break;
      case 5: multiply_block<Isa, 5>(panel, j0, kc, col, P, acc); break;
      default: multiply_block<Isa, 6>(panel, j0, kc, col, P, acc); break;
    }
  }
}

// The n floats from p into L2, ahead of the multiply that reads them. An example's columns of a
// panel's reduction rows come from L3 or memory (each block of output channels re-reads the run's
// columns), and the leftmost pixel block reads them one element per row, P floats apart: without
// help it stalled on every row. Into L1 instead (T0) was slower on a 32 KB L1: the next example's
// columns evicted the panel and accumulators in use.
// With parts > 1, only part `part` of them (the line past the end too, which an unaligned p reaches): the
// kernel spreads the next multiply's columns over the current multiply's pixel blocks. In one burst
// the prefetches waited for free fill buffers and held up the multiply-adds behind them (8% of the
// samples at pointwise 2048->512 @7x7, B = 32, E = 4 on the Intel Xeon).
inline void prefetch_columns(const float* p, int64_t n, int64_t part = 0, int64_t parts = 1) {
  const int64_t lines = n / 16 + 1;
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; ++l)
    _mm_prefetch(reinterpret_cast<const char*>(p + l * 16), _MM_HINT_T1);
}

// One block of kBlock output channels for every example of the run (RunBlock in fused_mix_gemm.h).
template <class Isa>
inline void run_block(const Problem& pb, int64_t c0, float* staged, float* panels, float* acc) {
  const int64_t P = pb.pixels, B = pb.batch, valid = std::min(kBlock, pb.out_channels - c0);
  // Pixel blocks of near-equal size (49 = 5 x 5 + 4 x 6), no thin remainder block.
  const int64_t blocks = (P + Tile<Isa>::kMaxPixels - 1) / Tile<Isa>::kMaxPixels;
  // Separate loops with and without a bias: as one conditional expression the compiler made masked
  // loads of it, which fault-check a null bias in microcode on AMD CPUs (a fifth of the time here).
  std::fill_n(acc, B * P * kBlock, 0.0f);
  if (pb.bias) {
    for (int64_t b = 0; b < B; ++b) {
      const float* bias_b = pb.bias + b * pb.out_channels + c0;
      for (int64_t p = 0; p < P; ++p) std::copy_n(bias_b, valid, acc + (b * P + p) * kBlock);
    }
  }
  const int64_t stage_rows = staged_rows(pb.experts);
  for (int64_t s0 = 0; s0 < pb.reduction; s0 += stage_rows) {
    const int64_t sc = std::min(stage_rows, pb.reduction - s0);
    const float* piece = staged;  // [e][k][j], experts piece_stride apart
    int64_t piece_stride = staged_expert_stride(sc);
    if (pb.staged_weight != nullptr) {
      piece_stride = staged_expert_stride(pb.reduction);
      piece = pb.staged_weight + c0 / kBlock * pb.experts * piece_stride + s0 * kBlock;
    } else {
      stage_experts<Isa>(pb, c0, s0, sc, staged);
    }
    for (int64_t b0 = 0; b0 < B; b0 += kMixGroup) {
      const int64_t group = std::min(kMixGroup, B - b0);
      for (int64_t k0 = 0; k0 < sc; k0 += kKc) {
        const int64_t kc = std::min(kKc, sc - k0);
        const float* group_cols = pb.cols + b0 * pb.cols_stride + (s0 + k0) * P;
        // Every later multiply's columns are prefetched during the one before it (below).
        if (s0 == 0 && b0 == 0 && k0 == 0) prefetch_columns(group_cols, kc * P);
        mix<Isa>(group, piece + k0 * kBlock, piece_stride, pb.routing + b0 * pb.experts, pb.experts, kc, panels);
        for (int64_t i = 0; i < group; ++i) {
          const float* col = group_cols + i * pb.cols_stride;
          // The next multiply's columns: the next example's, else the first example's of the next
          // reduction rows, of the next group, or of the next stage.
          const float* next = nullptr;
          int64_t next_rows = 0;
          if (i + 1 < group) {
            next = col + pb.cols_stride, next_rows = kc;
          } else if (k0 + kc < sc) {
            next = group_cols + kc * P, next_rows = std::min(kKc, sc - k0 - kc);
          } else if (b0 + kMixGroup < B) {
            next = pb.cols + (b0 + kMixGroup) * pb.cols_stride + s0 * P, next_rows = std::min(kKc, sc);
          } else if (s0 + sc < pb.reduction) {
            next = pb.cols + (s0 + sc) * P, next_rows = std::min(kKc, pb.reduction - s0 - sc);
          }
          float* acc_b = acc + (b0 + i) * P * kBlock;
          for (int64_t blk = 0, p0 = 0; blk < blocks; ++blk) {
            const int64_t n = (P - p0) / (blocks - blk);
            if (next != nullptr) prefetch_columns(next, next_rows * P, blk, blocks);
            multiply<Isa>(n, panels + i * kKc * kBlock, kc, col + p0, P, acc_b + p0 * kBlock);
            p0 += n;
          }
        }
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* acc_b = acc + b * P * kBlock;
    float* y = pb.y + b * pb.y_stride + c0 * P;
    for (int64_t j = 0; j < valid; ++j)
      for (int64_t p = 0; p < P; ++p) y[j * P + p] = acc_b[p * kBlock + j];
  }
}

}  // namespace condkernels::cpu::fused_mix_gemm
