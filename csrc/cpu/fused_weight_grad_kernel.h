// The kernel of cpu/fused_weight_grad.h, written once over the vector instruction set `Isa`
// (cpu/simd_avx512.h, cpu/simd_avx2.h) and compiled for each in its own translation unit
// (cpu/vector_kernels_*.cpp). Reuses the forward's staging of the experts
// (cpu/fused_mix_gemm_kernel.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/fused_mix_gemm_kernel.h"
#include "cpu/fused_weight_grad.h"

namespace condkernels::cpu::fused_weight_grad {

template <class Isa>
using Tile = fused_mix_gemm::Tile<Isa>;

// dy_t[b][p][j] = dy_b[c0 + j][p] (0 past Cout): the block's output gradients with the channels
// innermost, the vectors the product loads.
inline void transpose_dy(const Problem& pb, int64_t c0, float* dy_t) {
  const int64_t P = pb.pixels, valid = std::min(kBlock, pb.out_channels - c0);
  for (int64_t b = 0; b < pb.batch; ++b) {
    float* out = dy_t + b * P * kBlock;
    std::fill_n(out, P * kBlock, 0.0f);
    const float* dy = pb.dy + b * pb.dy_stride + c0 * P;
    for (int64_t j = 0; j < valid; ++j)
      for (int64_t p = 0; p < P; ++p) out[p * kBlock + j] = dy[j * P + p];
  }
}

// piece[k][j0 + j] = sum_p col[k * P + p] * dy_t[p][j0 + j] for the N rows k of this block and
// the tile's channels j from j0: one (rows x channels) block of dW_b in accumulator registers.
template <class Isa, int N>
inline void product_block(const float* col, int64_t P, const float* dy_t, int64_t j0, float* piece) {
  constexpr int V = Tile<Isa>::kChannelVectors, W = Isa::kLanes;
  typename Isa::Vec c[N][V];
  // Loops unrolled by pragma (here and in multiply_block): left to itself, GCC kept a copy of the
  // accumulators on the stack and moved all of them through it on every call.
#pragma GCC unroll 6
  for (int k = 0; k < N; ++k)
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) c[k][i] = Isa::zero();
  for (int64_t p = 0; p < P; ++p) {
    typename Isa::Vec g[V];
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) g[i] = Isa::load(dy_t + p * kBlock + j0 + W * i);
#pragma GCC unroll 6
    for (int k = 0; k < N; ++k) {
      const auto xk = Isa::broadcast(col[k * P + p]);
#pragma GCC unroll 4
      for (int i = 0; i < V; ++i) c[k][i] = Isa::fmadd(g[i], xk, c[k][i]);
    }
  }
#pragma GCC unroll 6
  for (int k = 0; k < N; ++k)
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) Isa::store(piece + k * kBlock + j0 + W * i, c[k][i]);
}

// piece[k][0..kBlock) = dW_b[c0 ..][k0 + k] for k < kc: rows in blocks of near-equal size (32 = 4 x 5
// + 2 x 6), all channels.
template <class Isa>
inline void product(const float* col, int64_t P, const float* dy_t, int64_t kc, float* piece) {
  static_assert(Tile<Isa>::kMaxPixels == 6, "one case per block height");
  const int64_t blocks = (kc + 5) / 6;
  for (int64_t j0 = 0; j0 < kBlock; j0 += Tile<Isa>::kChannels) {
    for (int64_t blk = 0, k0 = 0; blk < blocks; ++blk) {
      const int64_t n = (kc - k0) / (blocks - blk);
      const float* c = col + k0 * P;
      float* out = piece + k0 * kBlock;
      switch (n) {
        case 1: product_block<Isa, 1>(c, P, dy_t, j0, out); break;
        case 2: product_block<Isa, 2>(c, P, dy_t, j0, out); break;
        case 3: product_block<Isa, 3>(c, P, dy_t, j0, out); break;
        case 4: product_block<Isa, 4>(c, P, dy_t, j0, out); break;
        case 5: product_block<Isa, 5>(c, P, dy_t, j0, out); break;
        default: product_block<Isa, 6>(c, P, dy_t, j0, out); break;
      }
      k0 += n;
    }
  }
}

// For the N examples' pieces (kKc * kBlock apart) of kc rows: grad[e] += sum_i r[i][e] piece_i and
// dr[i][e] += <piece_i, staged[e]>, every expert e; grad and staged hold E pieces expert_stride
// apart, r the examples' routing rows. Each loaded piece vector serves both sums of an expert.
template <class Isa, int N>
inline void fold(const float* pieces, int64_t kc, const float* staged, float* grad, int64_t expert_stride,
                 const float* r, int64_t experts, bool want_dw, float* dr, bool want_dr) {
  const int64_t n = kc * kBlock;
  for (int64_t e = 0; e < experts; ++e) {
    const float* w = staged + e * expert_stride;
    float* g = grad + e * expert_stride;
    typename Isa::Vec d[N], re[N];
    for (int i = 0; i < N; ++i) d[i] = Isa::zero();
    // Loaded once per expert: read in the loop, each would be loaded again after every store to g,
    // which the compiler cannot tell apart from them.
    for (int i = 0; i < N; ++i) re[i] = Isa::broadcast(r[i * experts + e]);
    for (int64_t v = 0; v < n; v += Isa::kLanes) {
      typename Isa::Vec x[N];
      for (int i = 0; i < N; ++i) x[i] = Isa::load(pieces + i * kKc * kBlock + v);
      if (want_dw) {
        auto acc = Isa::load(g + v);
        for (int i = 0; i < N; ++i) acc = Isa::fmadd(x[i], re[i], acc);
        Isa::store(g + v, acc);
      }
      if (want_dr) {
        const auto we = Isa::load(w + v);
        for (int i = 0; i < N; ++i) d[i] = Isa::fmadd(x[i], we, d[i]);
      }
    }
    if (want_dr)
      for (int i = 0; i < N; ++i) dr[i * experts + e] += fused_mix_gemm::lane_sum<Isa>(d[i]);
  }
}

// grad_weight[e][c0 + j][s0 + k] (=|+=) grad[e][k][j] for the valid channels: the staging of
// cpu/fused_mix_gemm_kernel.h in reverse, W x W blocks transposed in registers, each channel's row
// written a whole 64-byte line (16 floats) at a time: streamed from the registers where asked and
// aligned (a cached store first reads the line from memory, and these lines, 16 floats of rows K
// apart, were the slowest part of the task), else through a buffer.
template <class Isa>
inline void write_back(const Problem& pb, int64_t c0, int64_t s0, int64_t sc, const float* grad) {
  constexpr int W = Isa::kLanes, kLine = 16, kParts = kLine / W;
  static_assert(kLine % W == 0, "whole vectors per line");
  const int64_t K = pb.reduction, expert_stride = pb.out_channels * K;
  alignas(64) float line[kLine];
  for (int64_t e = 0; e < pb.experts; ++e) {
    const float* in = grad + e * fused_mix_gemm::staged_expert_stride(sc);
    for (int64_t j0 = 0; j0 < kBlock && c0 + j0 < pb.out_channels; j0 += W) {
      const int channels = static_cast<int>(std::min<int64_t>(W, pb.out_channels - c0 - j0));
      for (int64_t kk = 0; kk < sc; kk += kLine) {
        const int width = static_cast<int>(std::min<int64_t>(kLine, sc - kk));
        typename Isa::Vec rows[kParts][W];
        for (int part = 0; part < kParts; ++part) {
          for (int k = 0; k < W; ++k) {
            const int64_t row = kk + part * W + k;
            rows[part][k] = row < sc ? Isa::load(in + row * kBlock + j0) : Isa::zero();
          }
          Isa::transpose(rows[part]);
        }
        for (int j = 0; j < channels; ++j) {
          float* dst = pb.grad_weight + e * expert_stride + (c0 + j0 + j) * K + s0 + kk;
          if (pb.write == mixing::Write::kStream && width == kLine && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
            for (int part = 0; part < kParts; ++part) Isa::stream(dst + part * W, rows[part][j]);
            continue;
          }
          for (int part = 0; part < kParts; ++part) Isa::store(line + part * W, rows[part][j]);
          if (pb.write == mixing::Write::kAdd)
            for (int k = 0; k < width; ++k) dst[k] += line[k];
          else
            std::copy_n(line, width, dst);
        }
      }
    }
  }
  if (pb.write == mixing::Write::kStream) mixing::finish_streaming();  // before the task reports done
}

template <class Isa>
inline void fold_group(int64_t n, const float* pieces, int64_t kc, const float* staged, float* grad,
                       int64_t expert_stride, const float* r, int64_t experts, bool want_dw, float* dr, bool want_dr) {
  static_assert(kMixGroup == 4, "one case per group size");
  switch (n) {
    case 1: return fold<Isa, 1>(pieces, kc, staged, grad, expert_stride, r, experts, want_dw, dr, want_dr);
    case 2: return fold<Isa, 2>(pieces, kc, staged, grad, expert_stride, r, experts, want_dw, dr, want_dr);
    case 3: return fold<Isa, 3>(pieces, kc, staged, grad, expert_stride, r, experts, want_dw, dr, want_dr);
    default: return fold<Isa, 4>(pieces, kc, staged, grad, expert_stride, r, experts, want_dw, dr, want_dr);
  }
}

// One task (RunTask in fused_weight_grad.h).
template <class Isa>
inline void run_task(const Problem& pb, int64_t c0, int64_t s0, int64_t sc, bool dy_ready, const Buffers& buf,
                     float* dr_part) {
  const int64_t P = pb.pixels, B = pb.batch, E = pb.experts;
  const bool want_dw = pb.grad_weight != nullptr, want_dr = dr_part != nullptr;
  if (!dy_ready) transpose_dy(pb, c0, buf.dy_t);
  if (want_dr) {
    // The forward's staging, (E, Cout, K) read as it lies: staged[e][k][j] = W_e[c0 + j][s0 + k].
    fused_mix_gemm::Problem layer{};
    layer.weight = pb.weight;
    layer.experts = E;
    layer.out_channels = pb.out_channels;
    layer.reduction = pb.reduction;
    fused_mix_gemm::stage_experts<Isa>(layer, c0, s0, sc, buf.staged);
    std::fill_n(dr_part, B * E, 0.0f);
  }
  // Staged experts and their gradients in the same layout (fused_mix_gemm::staged_expert_stride).
  const int64_t expert_stride = fused_mix_gemm::staged_expert_stride(sc);
  if (want_dw) std::fill_n(buf.grad, E * expert_stride, 0.0f);
  for (int64_t b0 = 0; b0 < B; b0 += kMixGroup) {
    const int64_t group = std::min(kMixGroup, B - b0);
    for (int64_t k0 = 0; k0 < sc; k0 += kKc) {
      const int64_t kc = std::min(kKc, sc - k0);
      for (int64_t i = 0; i < group; ++i)
        product<Isa>(pb.cols + (b0 + i) * pb.cols_stride + (s0 + k0) * P, P, buf.dy_t + (b0 + i) * P * kBlock, kc,
                     buf.pieces + i * kKc * kBlock);
      fold_group<Isa>(group, buf.pieces, kc, buf.staged + k0 * kBlock, buf.grad + k0 * kBlock, expert_stride,
                      pb.routing + b0 * E, E, want_dw, want_dr ? dr_part + b0 * E : nullptr, want_dr);
    }
  }
  if (want_dw) write_back<Isa>(pb, c0, s0, sc, buf.grad);
}

}  // namespace condkernels::cpu::fused_weight_grad
