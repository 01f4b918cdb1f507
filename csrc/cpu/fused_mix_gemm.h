// cond_conv2d on small output planes (float32, one group, NCHW): the experts are mixed into
// per-example weight panels a cache-sized piece at a time and consumed at once by a register-blocked
// kernel (AVX-512 or AVX2 + FMA, cpu/fused_mix_gemm_kernel.h), y_b = (sum_e r[b,e] W_e) cols_b + bias_b.
//
// Why: with few output pixels P per example (7x7 = 49 on ResNet-50's last stage) each example's
// product is a GEMM with a narrow N = P, where MKL runs far from its peak, and mixing whole
// tiles of per-example weights first writes and re-reads B copies of them. Here, per block of 64
// output channels, a piece of every expert (64 rows x a few hundred reduction rows) is read from
// memory once and transposed once into L2 (stage_experts); from it, (32, 64) panels are mixed for
// four examples at a time, each staged vector and routing weight loaded once for all the
// multiply-adds that use it (mix_panels); and each panel,
// in L1, meets its example's im2col columns in blocks of accumulator registers (64 channels x 5 or
// 6 pixels with AVX-512, 16 x 5 or 6 with AVX2: multiply_block). Mixing costs E multiply-adds per
// weight and example, against P for the product. The backward's column gradients W_b^T dy_b are the
// same problem with the experts read transposed (Problem::weight_transposed).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "cpu/scratch_pool.h"

namespace condkernels {
namespace cpu {
namespace fused_mix_gemm {

constexpr int64_t kBlock = 64;     // output channels per panel: 4 AVX-512 or 8 AVX2 vectors
constexpr int64_t kKc = 32;        // reduction rows per panel: 8 KB
constexpr int64_t kMixGroup = 4;   // examples mixed together: their 4 panels stay in L1

// Reduction rows staged at once: long enough runs of each expert row for the hardware prefetchers,
// short enough for E experts' pieces to stay in L2.
inline int64_t staged_rows(int64_t experts) {
  const int64_t staged_bytes = l2_cache_bytes() / 2;  // the other half: panels, columns, accumulators
  const int64_t rows = staged_bytes / (experts * kBlock * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(kKc, rows / kKc * kKc);
}

// Floats between two experts' pieces of `rows` staged rows: one row (kBlock floats, 4 cache lines)
// more than the piece. The mixing reads row k of every expert in turn; at a multiple of 4 KB apart
// (any rows % 16 == 0) those rows all fall in the same L1 sets, and at a multiple of 64 KB (the kept
// layout's K x 256 B for K % 256 == 0) in the same L2 sets, where 32 experts' lines exceed the
// ways (12 and 20 on the Intel Xeon) that a set has.
inline int64_t staged_expert_stride(int64_t rows) { return (rows + 1) * kBlock; }

// When this path is taken (use_fused_mix_gemm in cpu/cond_conv2d.cpp): planes up to max_plane()
// output pixels, at least kMinBatch examples, and at most kMaxExperts experts or at least as many
// examples as experts (any batch and E when the experts are kept staged, Problem::staged_weight).
// From
// `python -m condkernels.bench --suite condconv --full --paths --threads 1 --rounds 3 --filter ...`
// on the 2-core Intel Xeon (AVX-512), float32 inference, ms (fused=1 / fused=0): 3x3 512->512
// @7x7, E = 8: B = 8 31.8 / 35.8, B = 32 97.4 / 145, but B = 1 7.82 / 6.19 (one example cannot
// share the staged experts); B = 8, E = 4 25.6 / 35.6, but E = 32 75.2 / 63.7 (staging, a read of
// all 32 experts per run at about 7 GB/s on one core, took 40% of the time in one-off perf samples);
// pointwise 2048->512 @7x7 B = 8 E = 8 11.2 / 25.4; and pointwise 512->512 @14x14 (P = 196) B = 8
// E = 8 8.27 / 7.31, where MKL's GEMMs are wide enough. With as many examples as experts the staging
// is shared enough: B = 32, E = 32 (2 threads, --filter "@7x7 (ResNet-50) B=32 E=32"): 3x3 122 /
// 206, pointwise 2048->512 63.0 / 95.1. On the 2-core AMD EPYC with AVX-512 (Zen 4) the same kernel
// also won on 14x14 (`--full --paths --rounds 3 --filter "pointwise 512->512 @14x14 (MobileNetV1)
// B="`, 2 threads, fused=1 / automatic ms): B = 8 E = 4 4.59 / 5.28, E = 8 5.14 / 5.59; B = 32 E = 4
// 18.2 / 22.5, E = 8 19.2 / 22.9, E = 32 24.6 / 28.7; fwd+bwd 4-6% faster on each of those rows.
// There the limit is kMaxPlaneAmdAvx512.
constexpr int64_t kMaxPlane = 64;
constexpr int64_t kMaxPlaneAmdAvx512 = 196;

inline int64_t max_plane() {
  return cpu_is_amd() && vector_isa() == VectorIsa::kAvx512 ? kMaxPlaneAmdAvx512 : kMaxPlane;
}

constexpr int64_t kMinBatch = 2;
constexpr int64_t kMaxExperts = 16;

// y_b = (sum_e r[b,e] W_e) cols_b + bias_b for every example b. The layer's forward has W_e =
// weight[e] (Cout, K); the gradient of its im2col columns, dcols_b = W_b^T dy_b, is the same
// problem with the experts read transposed (weight_transposed: out_channels = the layer's K,
// reduction = its Cout, cols = dy) and no bias.
struct Problem {
  const float* cols;     // (B, K, P): each example's im2col columns (or x itself for a plain 1x1)
  int64_t cols_stride;   // elements between two examples' columns
  const float* weight;   // (E, Cout, K), or (E, K, Cout) when weight_transposed
  const float* routing;  // (B, E)
  const float* bias;     // (B, Cout) mixed bias, or null
  float* y;              // (B, Cout, P), examples y_stride apart
  int64_t y_stride;
  int64_t batch, experts, out_channels, reduction, pixels;
  bool weight_transposed = false;
  // The experts already in the staged layout for every reduction row (staged_experts below), or
  // null: then each piece is staged from `weight` as it is needed.
  const float* staged_weight = nullptr;
};

// Every expert's piece of one block of kBlock output channels from c0, for all reduction rows, in
// the staged layout (staged_experts below). Compiled once per instruction set
// (cpu/fused_mix_gemm_kernel.h, stage_experts over all rows).
using StageBlock = void (*)(const Problem& pb, int64_t c0, float* staged);
void stage_block_avx512(const Problem& pb, int64_t c0, float* staged);
void stage_block_avx2(const Problem& pb, int64_t c0, float* staged);

// The experts (E, Cout, K) as stage_experts lays out each piece, for all K at once: (blocks of
// kBlock output channels, E, K + 1, kBlock), channels past Cout zero, the skew row of
// staged_expert_stride never read. The kernel reads a piece of it in place
// (Problem::staged_weight): a weight that stays the same between calls is laid out once
// (cpu/frozen_weights.h) instead of on every call. Only where the kernel runs (available()).
inline at::Tensor staged_experts(const at::Tensor& weight) {
  TORCH_INTERNAL_ASSERT(vector_isa() != VectorIsa::kNone, "staged_experts needs the vector kernels");
  const StageBlock stage_block = vector_isa() == VectorIsa::kAvx512 ? stage_block_avx512 : stage_block_avx2;
  const int64_t E = weight.size(0), Cout = weight.size(1), K = weight.numel() / std::max<int64_t>(1, E * Cout);
  const int64_t blocks = (Cout + kBlock - 1) / kBlock, block_floats = E * staged_expert_stride(K);
  at::Tensor staged = at::empty({blocks, E, K + 1, kBlock}, weight.options());
  Problem layer{};
  layer.weight = weight.const_data_ptr<float>();
  layer.experts = E;
  layer.out_channels = Cout;
  layer.reduction = K;
  float* out = staged.mutable_data_ptr<float>();
  // Each block reads 64 rows of K floats (long runs for the prefetchers) and writes its own slab.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) stage_block(layer, blk * kBlock, out + blk * block_floats);
  });
  return staged;
}

// One block of kBlock output channels from c0 for every example of `pb`, with the calling thread's
// buffers: staged (E x staged_expert_stride(staged_rows) floats), panels (kMixGroup x kKc x kBlock) and acc
// (batch x pixels x kBlock), all 64-byte aligned. Compiled once per instruction set
// (cpu/fused_mix_gemm_kernel.h).
using RunBlock = void (*)(const Problem& pb, int64_t c0, float* staged, float* panels, float* acc);

void run_block_avx512(const Problem& pb, int64_t c0, float* staged, float* panels, float* acc);
void run_block_avx2(const Problem& pb, int64_t c0, float* staged, float* panels, float* acc);

// The kernel for the CPU's instruction set (vector_isa()), or null where it has no vector kernels.
inline RunBlock run_block_kernel() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return run_block_avx512;
    case VectorIsa::kAvx2: return run_block_avx2;
    default: return nullptr;
  }
}

inline bool available() { return run_block_kernel() != nullptr; }

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

// Runs the whole problem: tasks of one output-channel block and a run of examples, claimed by the
// threads as they go (cpu/parallel.h). The examples are split only when there are fewer blocks than
// threads (each run of examples stages the experts' pieces again).
inline void run(const Problem& pb) {
  const RunBlock run_block = run_block_kernel();
  const int64_t blocks = (pb.out_channels + kBlock - 1) / kBlock;
  const int64_t runs = std::min<int64_t>(pb.batch, (at::get_num_threads() + blocks - 1) / blocks);
  const int64_t run_size = (pb.batch + runs - 1) / runs;
  struct Buffers {
    float *staged, *panels, *acc;
  };
  for_each_claimed(
      blocks * runs,
      [&] {
        return Buffers{scratch_floats(0, pb.experts * staged_expert_stride(staged_rows(pb.experts))),
                       scratch_floats(1, kMixGroup * kKc * kBlock), scratch_floats(2, run_size * pb.pixels * kBlock)};
      },
      [&](const Buffers& buf, int64_t task) {
        const int64_t blk = task / runs, b0 = (task % runs) * run_size;
        if (b0 >= pb.batch) return;
        run_block(examples_of(pb, b0, std::min(run_size, pb.batch - b0)), blk * kBlock, buf.staged, buf.panels,
                  buf.acc);
      });
}

}  // namespace fused_mix_gemm
}  // namespace cpu
}  // namespace condkernels
