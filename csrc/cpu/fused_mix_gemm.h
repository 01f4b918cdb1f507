// cond_conv2d on small output planes (float32, one group, NCHW): the experts are mixed into
// per-example weight panels a cache-sized piece at a time and consumed at once by a register-blocked
// AVX-512 kernel, y_b = (sum_e r[b,e] W_e) cols_b + bias_b.
//
// Why: with few output pixels P per example (7x7 = 49 on ResNet-50's last stage) each example's
// product is a GEMM with a narrow N = P, where MKL runs far from its peak, and mixing whole
// tiles of per-example weights first writes and re-reads B copies of them. Here, per block of 64
// output channels, a piece of every expert (64 rows x a few hundred reduction rows) is read from
// memory once and transposed once into L2 (stage_experts); from it, (32, 64) panels are mixed for
// four examples at a time, each staged vector loaded once for the four (mix_panels); and each panel,
// in L1, meets its example's im2col columns in a 64-channel x 5-or-6-pixel block of accumulator
// registers (multiply_block). Mixing costs E multiply-adds per weight and example, against P for
// the product.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_features.h"
#include "cpu/scratch_pool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CONDKERNELS_FUSED_MIX_GEMM 1
#endif

namespace condkernels {
namespace cpu {
namespace fused_mix_gemm {

constexpr int64_t kBlock = 64;  // output channels per panel: four AVX-512 vectors
constexpr int64_t kKc = 32;        // reduction rows per panel: 8 KB
constexpr int64_t kMixGroup = 4;   // examples mixed together: their 4 panels stay in L1
constexpr int64_t kMaxPixels = 6;  // pixels per block of accumulators (24 of the 32 registers)
constexpr int64_t kStagedBytes = 1 << 20;  // transposed expert pieces: half of a core's L2

// Reduction rows staged at once: long enough runs of each expert row for the hardware prefetchers,
// short enough for E experts' pieces to stay in L2.
inline int64_t staged_rows(int64_t experts) {
  const int64_t rows = kStagedBytes / (experts * kBlock * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(kKc, rows / kKc * kKc);
}

// When this path is taken (use_fused_mix_gemm in cpu/cond_conv2d.cpp): planes up to kMaxPlane
// output pixels, at least kMinBatch examples, at most kMaxExperts experts. From
// `python -m condkernels.bench --suite condconv --full --paths --threads 1 --rounds 3 --filter ...`
// on the 2-core Intel Xeon (AVX-512), float32 inference, ms (fused=1 / fused=0): 3x3 512->512
// @7x7, E = 8: B = 8 31.8 / 35.8, B = 32 97.4 / 145, but B = 1 7.82 / 6.19 (one example cannot
// share the staged experts); B = 8, E = 4 25.6 / 35.6, but E = 32 75.2 / 63.7 (mixing, E
// multiply-adds per weight and example, outgrows the product's P; E = 16, between them, is not in
// the grid); pointwise 2048->512 @7x7 B = 8 E = 8 11.2 / 25.4; and pointwise 512->512 @14x14
// (P = 196) B = 8 E = 8 8.27 / 7.31, where MKL's GEMMs are wide enough.
constexpr int64_t kMaxPlane = 64;
constexpr int64_t kMinBatch = 2;
constexpr int64_t kMaxExperts = 16;

struct Problem {
  const float* cols;     // (B, K, P): each example's im2col columns (or x itself for a plain 1x1)
  int64_t cols_stride;   // elements between two examples' columns
  const float* weight;   // (E, Cout, K)
  const float* routing;  // (B, E)
  const float* bias;     // (B, Cout) mixed bias, or null
  float* y;              // (B, Cout, P), examples y_stride apart
  int64_t y_stride;
  int64_t batch, experts, out_channels, reduction, pixels;
};

#ifdef CONDKERNELS_FUSED_MIX_GEMM

// rows[c] <- column c of the 16 x 16 block rows[0..15].
__attribute__((target("avx512f"))) inline void transpose16(__m512 rows[16]) {
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

// staged[e][k][j] = W_e[c0 + j][k0 + k] for k < kc, j < kBlock (0 for channels past Cout): the
// piece of every expert that the run's examples mix, read from memory once and transposed once.
__attribute__((target("avx512f"))) inline void stage_experts(const Problem& pb, int64_t c0, int64_t k0,
                                                             int64_t kc, float* staged) {
  const int64_t K = pb.reduction, expert_stride = pb.out_channels * K;
  for (int64_t e = 0; e < pb.experts; ++e) {
    float* out = staged + e * kc * kBlock;
    // 16 rows at a time, walked along k: 16 sequential streams for the prefetchers.
    for (int64_t j0 = 0; j0 < kBlock; j0 += 16) {
      for (int64_t kk = 0; kk < kc; kk += 16) {
        const int64_t width = std::min<int64_t>(16, kc - kk);
        const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
        __m512 rows[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t c = c0 + j0 + j;
          rows[j] = c < pb.out_channels
                        ? _mm512_maskz_loadu_ps(mask, pb.weight + e * expert_stride + c * K + k0 + kk)
                        : _mm512_setzero_ps();
        }
        transpose16(rows);
        for (int64_t k = 0; k < width; ++k) _mm512_store_ps(out + (kk + k) * kBlock + j0, rows[k]);
      }
    }
  }
}

// panels[i][k][0..64) = sum_e r[i][e] staged[e][k][0..64) for k < kc and the N examples whose
// routing rows start at r (E apart); panels kKc * kBlock apart, experts expert_stride apart. Each
// staged vector is loaded once for the N examples: mixing is bound by reading the staged experts.
template <int N>
__attribute__((target("avx512f"))) inline void mix_panels(const float* staged, int64_t expert_stride,
                                                          const float* r, int64_t experts, int64_t kc,
                                                          float* panels) {
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t v = 0; v < kBlock; v += 16) {
      const float* w = staged + k * kBlock + v;
      __m512 m[N];
      for (int i = 0; i < N; ++i) m[i] = _mm512_setzero_ps();
      for (int64_t e = 0; e < experts; ++e) {
        const __m512 we = _mm512_load_ps(w + e * expert_stride);
        for (int i = 0; i < N; ++i) m[i] = _mm512_fmadd_ps(we, _mm512_set1_ps(r[i * experts + e]), m[i]);
      }
      for (int i = 0; i < N; ++i) _mm512_store_ps(panels + i * kKc * kBlock + k * kBlock + v, m[i]);
    }
  }
}

__attribute__((target("avx512f"))) inline void mix(int64_t n, const float* staged, int64_t expert_stride,
                                                   const float* r, int64_t experts, int64_t kc, float* panels) {
  switch (n) {
    case 1: return mix_panels<1>(staged, expert_stride, r, experts, kc, panels);
    case 2: return mix_panels<2>(staged, expert_stride, r, experts, kc, panels);
    case 3: return mix_panels<3>(staged, expert_stride, r, experts, kc, panels);
    default: return mix_panels<4>(staged, expert_stride, r, experts, kc, panels);
  }
}

// acc[p][0..64) += sum_k panel[k][0..64) * col[k * P + p] for the N pixels p of this block.
template <int N>
__attribute__((target("avx512f"))) inline void multiply_block(const float* panel, int64_t kc, const float* col,
                                                              int64_t P, float* acc) {
  __m512 c[N][4];
  for (int p = 0; p < N; ++p)
    for (int i = 0; i < 4; ++i) c[p][i] = _mm512_load_ps(acc + p * kBlock + 16 * i);
  for (int64_t k = 0; k < kc; ++k) {
    const float* w = panel + k * kBlock;
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
    const __m512 w2 = _mm512_load_ps(w + 32), w3 = _mm512_load_ps(w + 48);
    const float* x = col + k * P;
    for (int p = 0; p < N; ++p) {
      const __m512 xp = _mm512_set1_ps(x[p]);
      c[p][0] = _mm512_fmadd_ps(w0, xp, c[p][0]);
      c[p][1] = _mm512_fmadd_ps(w1, xp, c[p][1]);
      c[p][2] = _mm512_fmadd_ps(w2, xp, c[p][2]);
      c[p][3] = _mm512_fmadd_ps(w3, xp, c[p][3]);
    }
  }
  for (int p = 0; p < N; ++p)
    for (int i = 0; i < 4; ++i) _mm512_store_ps(acc + p * kBlock + 16 * i, c[p][i]);
}

__attribute__((target("avx512f"))) inline void multiply(int64_t n, const float* panel, int64_t kc,
                                                        const float* col, int64_t P, float* acc) {
  switch (n) {
    case 1: return multiply_block<1>(panel, kc, col, P, acc);
    case 2: return multiply_block<2>(panel, kc, col, P, acc);
    case 3: return multiply_block<3>(panel, kc, col, P, acc);
    case 4: return multiply_block<4>(panel, kc, col, P, acc);
    case 5: return multiply_block<5>(panel, kc, col, P, acc);
    default: return multiply_block<6>(panel, kc, col, P, acc);
  }
}

// One block of kBlock output channels for every example of the run.
__attribute__((target("avx512f"))) inline void run_block(const Problem& pb, int64_t c0, float* staged,
                                                         float* panels, float* acc) {
  const int64_t P = pb.pixels, B = pb.batch, valid = std::min(kBlock, pb.out_channels - c0);
  // Pixel blocks of near-equal size (49 = 5 x 5 + 4 x 6), no thin remainder block.
  const int64_t blocks = (P + kMaxPixels - 1) / kMaxPixels;
  for (int64_t b = 0; b < B; ++b) {
    float* acc_b = acc + b * P * kBlock;
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < kBlock; ++j)
        acc_b[p * kBlock + j] = pb.bias && j < valid ? pb.bias[b * pb.out_channels + c0 + j] : 0.0f;
  }
  const int64_t stage_rows = staged_rows(pb.experts);
  for (int64_t s0 = 0; s0 < pb.reduction; s0 += stage_rows) {
    const int64_t sc = std::min(stage_rows, pb.reduction - s0);
    stage_experts(pb, c0, s0, sc, staged);
    for (int64_t b0 = 0; b0 < B; b0 += kMixGroup) {
      const int64_t group = std::min(kMixGroup, B - b0);
      for (int64_t k0 = 0; k0 < sc; k0 += kKc) {
        const int64_t kc = std::min(kKc, sc - k0);
        mix(group, staged + k0 * kBlock, sc * kBlock, pb.routing + b0 * pb.experts, pb.experts, kc, panels);
        for (int64_t i = 0; i < group; ++i) {
          const float* col = pb.cols + (b0 + i) * pb.cols_stride + (s0 + k0) * P;
          float* acc_b = acc + (b0 + i) * P * kBlock;
          for (int64_t blk = 0, p0 = 0; blk < blocks; ++blk) {
            const int64_t n = (P - p0) / (blocks - blk);
            multiply(n, panels + i * kKc * kBlock, kc, col + p0, P, acc_b + p0 * kBlock);
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

inline bool available() { return has_avx512f(); }

// A 64-byte aligned buffer of `n` floats from the calling thread's scratch pool.
inline float* scratch_floats(int slot, int64_t n) {
  return static_cast<float*>(ScratchPool::of_this_thread().get(slot, static_cast<size_t>(n) * sizeof(float)));
}

// The examples [b0, b0 + n) of a problem, as a problem of their own.
inline Problem examples_of(const Problem& pb, int64_t b0, int64_t n) {
  Problem part = pb;
  part.cols += b0 * pb.cols_stride;
  part.routing += b0 * pb.experts;
  if (part.bias) part.bias += b0 * pb.out_channels;
  part.y += b0 * pb.y_stride;
  part.batch = n;
  return part;
}

// Runs the whole problem: tasks of one output-channel block and a run of examples, in parallel.
// The examples are split only when there are fewer blocks than threads (each run of examples
// stages the experts' pieces again).
inline void run(const Problem& pb) {
  const int64_t blocks = (pb.out_channels + kBlock - 1) / kBlock;
  const int64_t runs = std::min<int64_t>(pb.batch, (at::get_num_threads() + blocks - 1) / blocks);
  const int64_t run_size = (pb.batch + runs - 1) / runs;
  at::parallel_for(0, blocks * runs, 1, [&](int64_t begin, int64_t end) {
    float* staged = scratch_floats(0, pb.experts * staged_rows(pb.experts) * kBlock);
    float* panels = scratch_floats(1, kMixGroup * kKc * kBlock);
    float* acc = scratch_floats(2, run_size * pb.pixels * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / runs, b0 = (task % runs) * run_size;
      if (b0 >= pb.batch) continue;
      run_block(examples_of(pb, b0, std::min(run_size, pb.batch - b0)), blk * kBlock, staged, panels, acc);
    }
  });
}

#else

inline bool available() { return false; }
inline void run(const Problem&) {}

#endif

}  // namespace fused_mix_gemm
}  // namespace cpu
}  // namespace condkernels
